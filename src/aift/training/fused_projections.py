"""Projections that read the same input (q/k/v, gate/up) as one wider GEMM, their LoRA adapters included.

The frozen base weights are concatenated once, and each layer's ``weight`` becomes a view into the
concatenation (same Parameter objects and values, no second copy in memory). A step then computes

    forward:   y = x [W_q; W_k; W_v]^T + b;   xa = x [A_q; A_k; A_v]^T   (two GEMMs instead of six)
               y_t += s_t xa_t B_t^T for each target t                     (per target: B is not block-shared)
    backward:  gB_t = s_t g_t^T xa_t;   gxa_t = s_t g_t B_t;   gA = gxa^T x;   gx = g W + gxa A

The adapters stay peft's parameters (``lora_A.default.weight`` ... of each layer), so the optimizer, the
checkpoints and the saved adapter are exactly the plain path's. Every case this does not cover takes each
layer's own forward: a trained base (full fine-tuning), quantized or sharded bases, merged or disabled
adapters, several active adapters, DoRA and other variants. With LoRA dropout active, the base GEMM is
still one, and each target's adapter runs through peft's own modules in the plain path's order, so that
the dropout masks drawn are the same.

If something replaces a weight's storage (a cast, ``.to(device)``, a merge that assigns ``.data``), the
views are stale: the next forward concatenates again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aift.lora.layer import compute_dtype


class _LoraProjection(torch.autograd.Function):
    """y = x W^T + b with, for each adapted slice t of y, s_t (x A_t^T) B_t^T added; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: tuple, *adapters):
        # plan: per adapted target (output start, output end, scaling); adapters: A_1..A_n, B_1..B_n.
        n = len(plan)
        lora_a, lora_b = adapters[:n], adapters[n:]
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)
        a_cat = torch.cat(lora_a) if n > 1 else lora_a[0]
        xa = x2 @ a_cat.t()
        ranks = [a.shape[0] for a in lora_a]
        for (start, end, scaling), xa_t, b in zip(plan, xa.split(ranks, dim=1), lora_b, strict=True):
            out[:, start:end].addmm_(xa_t, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a_cat, *lora_b)
        ctx.plan, ctx.ranks, ctx.x_shape = plan, ranks, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, a_cat, *lora_b = ctx.saved_tensors
        n = len(ctx.plan)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa, grad_b = [], []
        for (start, end, scaling), xa_t, b in zip(ctx.plan, xa.split(ctx.ranks, dim=1), lora_b, strict=True):
            g_t = g[:, start:end]
            g_xa.append(g_t @ (b * scaling))  # [tokens, r_t]: the gradient reaching x A_t^T
            grad_b.append(torch.mm(g_t.t(), xa_t).mul_(scaling))
        g_xa = torch.cat(g_xa, dim=1) if n > 1 else g_xa[0]
        grad_a = (g_xa.t() @ x2).split(ctx.ranks, dim=0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_xa, a_cat).view(ctx.x_shape)
        return grad_x, None, None, None, *grad_a, *grad_b


class FusedProjection:
    """Linear layers over one input (plain ``nn.Linear`` or peft LoRA layers over one) computed as one GEMM.

    Not a module: the layers stay where they are (``q_proj`` ...); this holds references and the
    concatenated base weight.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.weight: torch.Tensor | None = None
        self.sizes = [base.out_features for base in map(_base, layers)]
        if self._fusable_bases() is not None:
            self._concatenate()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        bases = self._fusable_bases()
        adapters = [_adapter(layer) for layer in self.layers] if bases is not None else None
        if adapters is None or any(a is False for a in adapters) or hasattr(bases[0].weight, "ds_id"):
            return [layer(x) for layer in self.layers]  # each layer's own path
        weight = self._current_weight(bases)
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        if any(a is not None and _dropout_active(layer, a) for layer, a in zip(self.layers, adapters, strict=True)):
            return self._with_dropout(x, weight, bias, adapters)
        out = self._fused(x, weight, bias, adapters)
        return list(out.split(self.sizes, dim=-1))

    def _fused(self, x, weight, bias, adapters) -> torch.Tensor:
        dtype = compute_dtype(x)
        plan, lora_a, lora_b, start = [], [], [], 0
        for layer, adapter, size in zip(self.layers, adapters, self.sizes, strict=True):
            if adapter is not None:
                plan.append((start, start + size, float(layer.scaling[adapter])))
                # Cast outside the function, so that autograd carries the adapters' gradients back to fp32.
                lora_a.append(layer.lora_A[adapter].weight.to(dtype))
                lora_b.append(layer.lora_B[adapter].weight.to(dtype))
            start += size
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if not plan:
                return F.linear(x.to(dtype), weight, bias)
            return _LoraProjection.apply(x.to(dtype), weight, bias, tuple(plan), *lora_a, *lora_b)

    def _with_dropout(self, x, weight, bias, adapters) -> list[torch.Tensor]:
        """One base GEMM; each adapter as peft computes it, in the layers' order (the same dropout draws)."""
        outs = list(F.linear(x, weight, bias).split(self.sizes, dim=-1))
        for i, (layer, adapter) in enumerate(zip(self.layers, adapters, strict=True)):
            if adapter is not None:
                lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
                x_t = layer._cast_input_dtype(x, lora_a.weight.dtype)
                delta = lora_b(lora_a(layer.lora_dropout[adapter](x_t))) * layer.scaling[adapter]
                outs[i] = (outs[i] + delta).to(outs[i].dtype)
        return outs

    def _fusable_bases(self) -> list[nn.Linear] | None:
        """The frozen ``nn.Linear`` bases when they can share one GEMM (same input, dtype, device, bias kind)."""
        bases = [_base(layer) for layer in self.layers]
        if any(type(b) is not nn.Linear or b.weight.requires_grad for b in bases):
            return None
        first = bases[0].weight
        for b in bases:
            w = b.weight
            if (w.dtype, w.device, w.shape[1]) != (first.dtype, first.device, first.shape[1]):
                return None
            if (b.bias is None) != (bases[0].bias is None) or (b.bias is not None and b.bias.requires_grad):
                return None
        return bases

    def _current_weight(self, bases: list[nn.Linear]) -> torch.Tensor:
        if not self._views_intact(bases):
            self._concatenate()
        return self.weight

    def _views_intact(self, bases: list[nn.Linear]) -> bool:
        if self.weight is None:
            return False
        storage, offset = self.weight.untyped_storage().data_ptr(), 0
        for b in bases:
            w = b.weight
            if w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset or not w.is_contiguous():
                return False
            if w.dtype != self.weight.dtype:
                return False
            offset += w.numel()
        return True

    @torch.no_grad()
    def _concatenate(self) -> None:
        """One [sum of out_features, in_features] weight; each base's weight becomes a view into it."""
        bases = [_base(layer) for layer in self.layers]
        self.weight = torch.cat([b.weight.detach() for b in bases])
        start = 0
        for b, size in zip(bases, self.sizes, strict=True):
            b.weight.data = self.weight[start : start + size]
            start += size

    @torch.no_grad()
    def release(self) -> None:
        """Gives each base weight its own storage again (before the model leaves aift's hands)."""
        if self.weight is None:
            return
        for b in map(_base, self.layers):
            if b.weight.untyped_storage().data_ptr() == self.weight.untyped_storage().data_ptr():
                b.weight.data = b.weight.data.clone()
        self.weight = None


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _adapter(layer: nn.Module) -> str | None | bool:
    """The layer's one active plain-LoRA adapter; None for a layer without adapters (or with them disabled);
    False where only the layer's own forward is right (merged, several adapters, a variant such as DoRA)."""
    if not hasattr(layer, "lora_A"):
        return None
    if layer.merged:
        return False
    if layer.disable_adapters:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return None
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return False
    if layer.lora_B[active[0]].bias is not None:  # peft's lora_bias
        return False
    return active[0]


def _dropout_active(layer: nn.Module, adapter: str) -> bool:
    return layer.training and not isinstance(layer.lora_dropout[adapter], nn.Identity)


def fused_projection_or_none(layers: list[Any]) -> FusedProjection | None:
    """A :class:`FusedProjection` over ``layers`` when their bases could ever share a GEMM, else None."""
    bases = [_base(layer) for layer in layers]
    if any(type(b) is not nn.Linear for b in bases):
        return None
    return FusedProjection(layers)
