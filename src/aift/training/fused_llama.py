"""The Llama decoder's norms, MLP and attention swapped, per instance, for ones that use the fused paths.

``TrainingConfig.fused_ops`` (RMSNorm, SwiGLU, rotary: :mod:`aift.training.fused_ops`) and
``fused_projections`` (q/k/v and gate/up as one GEMM each: :mod:`aift.training.fused_projections`)
replace each ``LlamaRMSNorm``, ``LlamaMLP`` and ``LlamaAttention`` of the model by a subclass instance that
holds the very same parameters and child modules under the same names (so ``state_dict`` keys, peft's
adapters and the saved files are unchanged) and only computes its forward differently. No transformers
class is patched; a model without these classes (another family) is left alone, with a log line.
:func:`restore_modules` puts the original instances back (before the trained model is handed out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from aift.training.fused_ops import rms_norm, rotary, swiglu
from aift.training.fused_projections import FusedProjection, fused_projection_or_none

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fusion:
    """Which fused paths a swapped module takes."""

    ops: bool  # RMSNorm, SwiGLU, rotary
    projections: bool  # q/k/v and gate/up as one GEMM each


def _adopt(new: nn.Module, original: nn.Module) -> None:
    """``new`` takes over ``original``'s state: the very same parameter, buffer, child and hook dicts."""
    new.__dict__.update(vars(original))
    object.__setattr__(new, "_aift_original", original)  # not registered as a child: no second state_dict entry


class FusedLlamaRMSNorm(LlamaRMSNorm):
    """``LlamaRMSNorm`` through :func:`aift.training.fused_ops.rms_norm`."""

    def __init__(self, original: LlamaRMSNorm) -> None:
        _adopt(self, original)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedLlamaMLP(LlamaMLP):
    """``LlamaMLP`` with gate/up as one GEMM and/or the fused SwiGLU."""

    def __init__(self, original: LlamaMLP, fusion: Fusion) -> None:
        _adopt(self, original)
        self._fusion = fusion
        self._gate_up = fused_projection_or_none([self.gate_proj, self.up_proj]) if fusion.projections else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None and self._gate_up.layers == [self.gate_proj, self.up_proj]:
            gate, up = self._gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = swiglu(gate, up) if self._fusion.ops else self.act_fn(gate) * up
        return self.down_proj(hidden)


class FusedLlamaAttention(LlamaAttention):
    """``LlamaAttention`` with q/k/v as one GEMM and/or the fused rotary embedding; the same attention call."""

    def __init__(self, original: LlamaAttention, fusion: Fusion) -> None:
        _adopt(self, original)
        self._fusion = fusion
        layers = [self.q_proj, self.k_proj, self.v_proj]
        self._qkv = fused_projection_or_none(layers) if fusion.projections else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        """As ``LlamaAttention.forward`` (transformers 5), with the projections and rotary swapped."""
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self._qkv is not None and self._qkv.layers == [self.q_proj, self.k_proj, self.v_proj]:
            q, k, v = self._qkv(hidden_states)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        rope = rotary if self._fusion.ops else apply_rotary_pos_emb
        query, key = rope(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )  # fmt: skip
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def fuse_modules(model: nn.Module, ops: bool, projections: bool) -> int:
    """Swaps the Llama modules of ``model`` for the fused ones; returns how many were swapped."""
    if not (ops or projections):
        return 0
    fusion = Fusion(ops=ops, projections=projections)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _fused(child, fusion)
            if new is not None:
                setattr(parent, name, new)
                swapped += 1
    if swapped:
        log.info("fused ops=%s projections=%s: %d Llama modules swapped", ops, projections, swapped)
    else:
        log.info("fused_ops/fused_projections: no Llama-family modules in this model; its own forward is used")
    return swapped


def _fused(module: nn.Module, fusion: Fusion) -> nn.Module | None:
    if type(module) is LlamaRMSNorm and fusion.ops:
        return FusedLlamaRMSNorm(module)
    if type(module) is LlamaMLP and (fusion.projections or (fusion.ops and module.config.hidden_act == "silu")):
        silu = module.config.hidden_act == "silu"
        return FusedLlamaMLP(module, Fusion(ops=fusion.ops and silu, projections=fusion.projections))
    if type(module) is LlamaAttention:
        return FusedLlamaAttention(module, fusion)
    return None


def restore_modules(model: nn.Module) -> int:
    """Puts the original module instances back (they share the swapped ones' children and parameters); each
    base weight gets its own storage again. Returns how many were restored."""
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            original = getattr(child, "_aift_original", None)
            if original is None:
                continue
            for projection in (getattr(child, "_qkv", None), getattr(child, "_gate_up", None)):
                if isinstance(projection, FusedProjection):
                    projection.release()
            original.training = child.training  # the children (shared) are already in the right mode
            setattr(parent, name, original)
            restored += 1
    return restored
