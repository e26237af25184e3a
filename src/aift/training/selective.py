"""Selective activation checkpointing: a decoder layer's recompute redoes its element-wise ops, not its GEMMs.

Full checkpointing keeps each layer's input and reruns the whole layer in backward: every projection's GEMM
a second time, about a third more compute per step. Most of a layer's activation memory is element-wise
results, though (norm outputs, rotary outputs, SiLU and its product with ``up``: four ``intermediate``-wide
tensors of the SwiGLU alone), and they are cheap to recompute. Here a layer keeps the outputs of its GEMMs
(the projections; the adapters' rank-r products are recomputed) and of its attention kernel, through torch's
selective checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``), and its recompute
replays only the rest.

An in-place op on a kept output is kept with it (not replayed): the fused LoRA layer adds the adapter's
product into the base GEMM's output in place (:mod:`aift.lora.layer`), and replaying that add on the kept,
already updated tensor would add it twice. Skipping it gives the forward's tensor back exactly, so the cache
entries may be mutated (``allow_cache_entry_mutation``) only by the ops that are themselves kept.

Which layers are selective is the memory plan's choice (:func:`aift.training.checkpointing.selective_layer_count`):
the first N keep their GEMM outputs, the others are fully recomputed, through transformers' per-layer
checkpointing function (``GradientCheckpointingLayer._gradient_checkpointing_func``, which
``activation_checkpointing_enable`` sets on each layer instance; no class is patched).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from aift.utils.gpu import enable_activation_checkpointing

aten = torch.ops.aten
# (op, index of its first matrix operand): the GEMMs whose output a selective layer keeps when their inner
# dimension is a projection's (at least half the hidden size), not an adapter's rank.
GEMMS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def enable_selective_checkpointing(model: torch.nn.Module, selective_layers: int) -> int:
    """Checkpoints every decoder layer; the first ``selective_layers`` keep their GEMM and attention outputs.

    Returns how many layers are selective (at most the model's decoder layers).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable_activation_checkpointing(model)
    min_inner = max(1, model.config.get_text_config().hidden_size // 2)
    selective = functools.partial(
        checkpoint, use_reentrant=False, context_fn=functools.partial(selective_contexts, min_inner)
    )
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[:selective_layers]:
        layer._gradient_checkpointing_func = selective
    return min(selective_layers, len(layers))


def selective_contexts(min_inner: int) -> tuple[Any, Any]:
    """The (forward, recompute) contexts of one checkpointed call: a fresh policy, with its own kept storages."""
    kept: set[int] = set()  # data pointers of the outputs kept in this call (alive until its backward)

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in ATTENTION or (op in GEMMS and args[GEMMS[op]].shape[-1] >= min_inner):
            kept.update(t.untyped_storage().data_ptr() for t in _tensors(ctx.op_output))
            return CheckpointPolicy.MUST_SAVE
        target = args[0] if op._schema.is_mutable and args and isinstance(args[0], torch.Tensor) else None
        if target is not None and target.untyped_storage().data_ptr() in kept:
            return CheckpointPolicy.MUST_SAVE  # an in-place update of a kept output: kept, not replayed
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy, allow_cache_entry_mutation=True)


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
