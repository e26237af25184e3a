"""Pipeline stages of a decoder-only model for ``torch.distributed.pipelining`` (checked on gloo, 2 stages).

Stage 0 holds the embeddings and the first decoder layers; the last stage holds the remaining layers, the
final norm and the output head, and returns the logits. Every stage recomputes the rotary embeddings
from the positions (they are cheap), so only hidden states cross between processes. Without a mask, rows
are causal and right-padded: padding at the end of a row never influences the tokens before it. Packed
rows pass their ``position_ids`` and 4-D block-causal ``attention_mask`` to every stage as keyword
arguments: each process collates the same batch, so these never cross between processes.

:mod:`aift.distributed.pipeline_backend` trains with these stages (``strategy="pipeline"``).
"""

from __future__ import annotations

import torch
from torch import nn

from aift.errors import AiftError


class PipelineSplitError(AiftError, ValueError):
    """The model cannot be cut into the requested stages."""


class DecoderStage(nn.Module):
    """A contiguous slice of a llama-style decoder (``model.model.layers``), optionally with the ends."""

    def __init__(self, causal_lm: nn.Module, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        inner = causal_lm.model
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleList(inner.layers[start:stop])
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = causal_lm.lm_head if last else None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (first stage) or hidden states -> hidden states, or logits (last stage).

        ``attention_mask``, when given, is the 4-D mask ``[B, 1, T, T]`` the model's own forward would build
        (packed rows: block-causal); None means plain causal attention.
        """
        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        positions = position_ids
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
        rotary = self.rotary_emb(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attention_mask, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.lm_head is None:
            return hidden
        return self.lm_head(self.norm(hidden))


def split_stages(causal_lm: nn.Module, n_stages: int) -> list[DecoderStage]:
    """Cuts a llama-style causal LM into ``n_stages`` stages of (nearly) equal numbers of decoder layers."""
    inner = getattr(causal_lm, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise PipelineSplitError(
            f"{type(causal_lm).__name__} is not a llama-style decoder (model.embed_tokens/layers/norm/rotary_emb)"
        )
    n_layers = len(inner.layers)
    if not 1 <= n_stages <= n_layers:
        raise PipelineSplitError(f"cannot cut {n_layers} decoder layers into {n_stages} stages")
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return [
        DecoderStage(causal_lm, bounds[i], bounds[i + 1], first=i == 0, last=i == n_stages - 1) for i in range(n_stages)
    ]


def tied_embedding_weight(stage: DecoderStage) -> nn.Parameter | None:
    """The shared input/output embedding this stage holds, when the model ties them (e.g. SmolLM2)."""
    if stage.embed_tokens is not None:
        weight = stage.embed_tokens.weight
    elif stage.lm_head is not None:
        weight = stage.lm_head.weight
    else:
        return None
    return weight if getattr(weight, "_aift_tied", False) else None


def mark_tied_embeddings(causal_lm: nn.Module) -> bool:
    """Flags a tied embedding so the first and last stages add up its two gradients after backward."""
    tied = causal_lm.get_input_embeddings().weight is causal_lm.get_output_embeddings().weight
    if tied:
        causal_lm.get_input_embeddings().weight._aift_tied = True
    return tied


def sum_tied_gradients(stage: DecoderStage, first_rank: int, last_rank: int, group=None) -> None:
    """The first stage saw the embedding's gradient, the last the output head's: both need their sum.

    Call on every rank after the schedule's backward. Without ``group`` a new one of the two ranks is made
    (new_group is collective over all ranks): a training loop makes it once and passes it in.
    """
    import torch.distributed as dist

    if group is None:
        group = dist.new_group([first_rank, last_rank])
    weight = tied_embedding_weight(stage)
    if weight is not None and weight.grad is not None:
        dist.all_reduce(weight.grad, group=group)
