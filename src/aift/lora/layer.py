"""A LoRA linear layer whose adapter product is fused into the base matmul's output, forward and backward.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the three matmuls, a
multiply and an add over the whole output (as wide as the layer) in forward, and in backward another
multiply and a second gradient for ``x`` that autograd adds to the first. On a CPU these memory-bound
passes cost as much as the small adapter matmuls themselves. :class:`FusedLoraLinear` keeps peft's layer
(same parameters, same names, same saved adapter, merge and unload) and only replaces its forward, when it
is plain LoRA (one active adapter, no dropout, not merged, no DoRA), by one autograd function:

    forward:   y  = x W^T + b;   y += s (x A^T) B^T        (addmm: the scale and the add inside the GEMM)
    backward:  gB = s g^T (x A^T);   gA = (s g B)^T x;   gx = g W + (s g B) A   (addmm again)

Every other case falls back to peft's forward. The layer is chosen through peft's custom-module mapping
(``LoraConfig._register_custom_module``), not by patching peft; see :func:`register_fused_lora`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class _LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen; all tensors already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        out = F.linear(x2, weight, bias)
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa = g @ (lora_b * ctx.scaling)  # [tokens, r]: the gradient reaching x A^T
        grad_b = g.t() @ (xa * ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_a = g_xa.t() @ x2 if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g_xa, lora_a).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` with the fused forward/backward of :class:`_LoraLinearFunction` for plain LoRA."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dtype = compute_dtype(x)
        # The casts sit outside the function so that autograd carries the adapters' gradients back to fp32.
        lora_a = self.lora_A[adapter].weight.to(dtype)
        lora_b = self.lora_B[adapter].weight.to(dtype)
        bias = base.bias.to(dtype) if base.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinearFunction.apply(
                x.to(dtype), base.weight.to(dtype), bias, lora_a, lora_b, float(self.scaling[adapter])
            )

    def _fusable_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the fused path computes exactly what peft would, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:  # DoRA and other variants: peft's path
            return None
        if not isinstance(self.lora_dropout[adapter], nn.Identity) and self.training:
            return None
        base = self.get_base_layer()
        if type(base) is not nn.Linear or base.weight.requires_grad:  # quantized, or a trained base: peft's path
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        if hasattr(base.weight, "ds_id"):  # DeepSpeed ZeRO-3 gathers weights in module hooks this path skips
            return None
        return adapter


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def register_fused_lora(peft_lora_config) -> None:
    """Makes peft build :class:`FusedLoraLinear` for plain ``nn.Linear`` targets of ``peft_lora_config``.

    Only for unquantized bases: bitsandbytes' layers subclass ``nn.Linear`` but must keep peft's own layers.
    """
    peft_lora_config._register_custom_module({nn.Linear: FusedLoraLinear})
