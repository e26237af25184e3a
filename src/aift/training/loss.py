"""Fused linear cross-entropy: the language-model loss without the full-vocabulary logits of the batch.

A causal LM's last matmul turns every position's hidden state into ``vocab_size`` logits (49,152 for
SmolLM2). The plain path holds them for the whole batch, in bf16 and again in fp32 for the loss, plus
their gradient: about 2 GB for 4 x 512 tokens. Here the positions that have a target are taken a chunk
at a time; each chunk's logits are turned into its loss and, right away, into the gradients of the
hidden states (and of the weight, when it trains). Backward then only scales what forward stored
(the approach of Liger-Kernel's fused linear cross-entropy). Positions without a target (padding,
masked prompt tokens, the last position of each row) are skipped entirely.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from aift.data.packing import IGNORE_INDEX
from aift.errors import NotAvailableError

log = logging.getLogger(__name__)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every position, in fp32, from full logits: ``[B, T-1]``, 0 where untrained.

    ``labels`` are not shifted: labels[:, i] is the target of position i, which position i-1 predicts; labels
    equal to IGNORE_INDEX (prompt, padding) add nothing. The one definition of the language-model loss that the
    training loops, eval and the preference log-probs use (the fused path below computes the same sum without
    the full logits).
    """
    targets = labels[:, 1:].to(logits.device)
    losses = nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(targets.shape)


def shifted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over trained tokens of :func:`shifted_cross_entropy` (the caller divides by its token count)."""
    return shifted_cross_entropy(logits, labels).sum()


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sum of the cross-entropy of ``hidden_states @ weight.T`` against the next-token labels.

    Labels are not shifted (``labels[..., i]`` is the target of position ``i``, as the contract of prepared
    datasets says), so position ``i`` is scored against ``labels[..., i + 1]``. The caller divides the sum by
    its own count of trained tokens, which lets gradient accumulation weight every token equally.

    Args:
        hidden_states: ``[..., T, H]`` final hidden states (after the last norm).
        weight: ``[V, H]`` output projection (``lm_head.weight``).
        labels: ``[..., T]`` token ids, ``ignore_index`` where nothing is trained.
        chunk_size: positions per chunk; peak extra memory is about ``chunk_size * V * 6`` bytes.
        ignore_index: label value that is not trained.

    Returns:
        A scalar fp32 tensor: the summed loss over trained positions (0 when there are none).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden = hidden_states[..., :-1, :].reshape(-1, hidden_states.shape[-1])
    targets = labels[..., 1:].reshape(-1)
    kept = (targets != ignore_index).nonzero().squeeze(1)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, targets = hidden.index_select(0, kept), targets.index_select(0, kept)
    if not torch.is_grad_enabled():  # needs_input_grad ignores no_grad: detach so no gradient is computed
        hidden, weight = hidden.detach(), weight.detach()
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients computed together, chunk by chunk, in forward; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype):  # noqa: D417
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Both kept in fp32 until backward has scaled them: one bf16 rounding fewer, and an fp32 accumulator
        # for the weight, since summing many bf16 chunk products would lose the small ones.
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Matmuls in compute_dtype, softmax in fp32, chosen above, not by an autocast that may be active here.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)
                t = targets[start : start + chunk_size]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_hidden_grad or want_weight_grad):
                    continue
                # d(sum CE)/d logits = softmax - one_hot, formed in place over the chunk's logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_logits = grad_logits.to(compute_dtype)
                if want_hidden_grad:
                    grad_hidden[start : start + chunk_size] = grad_logits @ w
                if want_weight_grad:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


# Config fields of architectures whose logits are not plain hidden @ W.T (Gemma, Cohere, Granite, Falcon-H1, ...).
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder stack (returns hidden states) and the output projection of a causal LM, peft-wrapped or not.

    DDP / DeepSpeed wrappers (``.module``) are looked through. Raises NotAvailableError for models whose
    logits are more than ``hidden @ lm_head.weight.T`` (soft-capping, logit scaling, an adapter on lm_head),
    for which the fused loss would be wrong, and for weights that are sharded outside forward (FSDP, ZeRO-3).
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    inner = getattr(model, "module", model)  # DistributedDataParallel, DeepSpeedEngine
    base = inner.get_base_model() if isinstance(inner, PeftModel) else inner
    if not isinstance(base, PreTrainedModel):
        raise NotAvailableError(
            f"loss_chunk_size needs a transformers causal LM, not {type(base).__name__} (set loss_chunk_size=0)"
        )
    head = base.get_output_embeddings()
    config = base.config
    if type(head) is not nn.Linear or head.bias is not None:
        raise NotAvailableError(
            f"loss_chunk_size needs a plain bias-free nn.Linear lm_head; this model has {type(head).__name__} "
            "(set loss_chunk_size=0)"
        )
    if hasattr(head.weight, "ds_id") or type(head.weight).__name__ == "DTensor":
        raise NotAvailableError(
            "loss_chunk_size does not support an lm_head sharded outside forward (FSDP, DeepSpeed ZeRO-3): "
            "set loss_chunk_size=0"
        )
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1.0):  # only some architectures define these
            raise NotAvailableError(f"loss_chunk_size does not support models with {name} (set loss_chunk_size=0)")
    return base.get_decoder(), head


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Runs the model on a batch and returns the summed next-token loss through the fused cross-entropy.

    The model runs through its own forward (and so through a DDP wrapper's, which syncs gradients), asked
    for its final hidden states and the logits of one position only; the loss then comes from the hidden
    states chunk by chunk. ``batch`` holds ``input_ids`` and ``labels`` and optionally ``attention_mask``
    and ``position_ids`` (the packed collator's 4-D mask included); other keys are ignored.
    """
    _, head = split_causal_lm(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # the final norm's output (transformers ties it to last_hidden_state)
    return fused_linear_cross_entropy(hidden, head.weight, batch["labels"], chunk_size=chunk_size)


def usable_loss_chunk(model: nn.Module, chunk_size: int, accelerator_kwargs: dict[str, Any] | None = None) -> int:
    """``chunk_size`` where the fused cross-entropy can run on ``model``, else 0, with a log line saying why.

    The fused loss is on by default, so a model or strategy it cannot serve must not stop the run: it steps
    aside for a head that is more than ``hidden @ W.T`` (a bias, soft-capping, logit scaling, an adapter on
    lm_head) and for weights sharded outside forward (FSDP, DeepSpeed ZeRO-3), which ``accelerator_kwargs``
    (the Accelerator's plugins) announce before the model is wrapped. Pipeline stages say so in their backend.
    """
    if chunk_size <= 0:
        return 0
    sharding = _sharding_strategy(accelerator_kwargs or {})
    reason = f"{sharding} shards lm_head outside forward" if sharding else None
    if reason is None:
        try:
            split_causal_lm(model)
        except NotAvailableError as err:
            reason = str(err).split(" (set loss_chunk_size=0)")[0]
    if reason is not None:
        log.info("fused cross-entropy off, the model's own loss instead: %s", reason)
        return 0
    return chunk_size


def _sharding_strategy(accelerator_kwargs: dict[str, Any]) -> str | None:
    if accelerator_kwargs.get("fsdp_plugin") is not None:
        return "FSDP"
    deepspeed = accelerator_kwargs.get("deepspeed_plugin")
    if deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return None
