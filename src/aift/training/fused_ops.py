"""RMSNorm, SwiGLU and rotary embedding as autograd functions whose backward keeps less than autograd's.

Each computes what the Llama decoder's own code computes (``LlamaRMSNorm``, ``silu(gate) * up``,
``apply_rotary_pos_emb``), in fewer passes over memory, and saves only what its backward cannot cheaply
recompute, as Liger-Kernel's kernels do (linkedin/Liger-Kernel ``ops/rms_norm.py``, ``swiglu.py``,
``rope.py``), in plain torch ops:

- RMSNorm keeps its input and the per-token ``rstd`` (one fp32 number a token), not the normalised tensor
  that autograd keeps besides the input; backward recomputes it.
- SwiGLU keeps ``gate`` and ``up``, not ``silu(gate)`` as well; backward recomputes the sigmoid.
- Rotary keeps only ``cos`` and ``sin`` (shared by every layer) and does one multiply and two half-width
  ``addcmul`` where autograd's path slices, negates, concatenates and multiplies twice, forward and backward.

No op here writes into a tensor it did not create, nor uses ``out=``: under selective checkpointing
(:mod:`aift.training.selective`) an in-place op on a kept GEMM output is kept, not replayed, and that
would be wrong for a write into a fresh buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)), the statistics in fp32, as ``LlamaRMSNorm``."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        normed = xf * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_n = (grad_out * weight).float()
            # d/dx of x * rstd: rstd * (g - n * mean(g * n)), per token.
            dot = (grad_n * normed).mean(-1, keepdim=True)
            grad_x = normed.mul_(dot).neg_().add_(grad_n).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; backward recomputes the sigmoid instead of keeping silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = (grad_out * silu).to(up.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # silu'(g) = sig * (1 + g * (1 - sig)) = silu + sig * (1 - silu)
            dsilu = silu.neg().add_(1).mul_(sig).add_(silu)
            grad_gate = (grad_out * up * dsilu).to(gate.dtype)
        return grad_gate, grad_up


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin for one of q or k: [B, H, T, D] with cos/sin [B, 1, T, D]."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        # rotate_half(x) = (-x2, x1): the first half gets -x2 * sin1, the second x1 * sin2.
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        half = grad_out.shape[-1] // 2
        grad = grad_out * cos
        # The transpose of rotate_half maps (z1, z2) to (z2, -z1).
        grad[..., :half].addcmul_(grad_out[..., half:], sin[..., half:])
        grad[..., half:].addcmul_(grad_out[..., :half], sin[..., :half], value=-1)
        return grad.to(ctx.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``'s output for ``x`` with ``weight``, through :class:`_RMSNorm`."""
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` through :class:`_SwiGLU`."""
    return _SwiGLU.apply(gate, up)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` through :class:`_Rotary` (any cos/sin, not only the
    duplicated-halves layout of the default rope: each half of each is used as it is)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)
