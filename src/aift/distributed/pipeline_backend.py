"""Pipeline-parallel training (``strategy="pipeline"``): the pipeline backend of the one loop.

One process per stage, started by a launcher::

    aift train --strategy pipeline pipeline_parallel_size=2 --nproc-per-node 2 dataset_path=... [--use-lora]

Each process loads the model, cuts it with :func:`aift.distributed.pipeline.split_stages` and keeps its
own stage (on ``cuda:LOCAL_RANK`` when there is a GPU). ``torch.distributed.pipelining`` runs the schedule
(1F1B or GPipe); only hidden states and their gradients cross between processes. :func:`train_pipeline`
runs :func:`aift.training.loop.run_training` with :class:`PipelineBackend`, so the same config trains the
same model as in one process:

- an optimizer step takes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` rows from the same
  per-epoch plan (:class:`aift.training.batching.BatchPlanner`); they are the schedule's micro-batches (the
  stages are not data-parallel: to the loop the pipeline is one data-parallel replica);
- the loss is the sum of per-token cross-entropy (fp32) over the trained tokens of the whole step divided by
  their count (``scale_grads=False``: the schedule must not average micro-batch losses again);
- each stage's optimizer (AdamW by default) updates its own trainable parameters (LoRA adapters or every weight), with the same
  warmup/decay schedule; clipping uses the global norm (squared norms all-reduced over stages), a tied
  embedding's two gradients (first and last stage) are summed first;
- the last stage computes the loss; the step loss and eval loss reach every rank, rank 0 alone writes; every
  checkpoint gathers the trained weights on rank 0, which saves ``final/`` as the one-process loop does;
- checkpoints have the one-process layout (weights gathered on rank 0, scheduler, trainer state) plus each
  stage's ``optimizer-stageR.pt`` and ``rng_state-stageR.pt``; they resume with the same number of stages.

Every process collates the same batch, so packed rows' position ids and block-causal masks need not be
sent. Stages exchange buffers of one shape, so every micro-batch is padded to ``batch_size x max_length``
(missing rows or micro-batches at the end of an epoch are empty and train nothing). Dropout is not drawn
from the per-micro-batch seeds of the Accelerate backend: the schedule decides when each stage runs which
micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from aift.config import MultiGPUTrainingConfig
from aift.data.packing import IGNORE_INDEX, PackedCollator, PaddedCollator
from aift.distributed.pipeline import mark_tied_embeddings, split_stages, sum_tied_gradients, tied_embedding_weight
from aift.errors import AiftError, NotAvailableError
from aift.training import checkpoint as ckpt
from aift.training.backends import ModelAttention, resolve_precision
from aift.training.batching import Examples
from aift.training.checkpoint import CheckpointError, TrainerState
from aift.training.loop import run_training
from aift.training.loss import shifted_cross_entropy_sum
from aift.training.objectives import Objective
from aift.training.optimizers import optimizer_and_schedule
from aift.training.run_guard import output_dir_lock

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "gpipe")


def train_pipeline(trainer, train_texts=None, eval_texts=None, resume_from_checkpoint=None) -> nn.Module:
    """What ``_Trainer.train`` does (data, seed, model preparation), with the pipeline backend in the loop.

    Returns the trained model: complete on rank 0; on the other ranks only their own stage is trained.
    """
    config = trainer.config
    check_pipeline_config(config, int(os.environ.get("WORLD_SIZE", "1")))
    with output_dir_lock(config):
        model, tokenizer, train_examples, eval_examples, info = trainer.prepare(
            train_texts, eval_texts, resume_from_checkpoint
        )
        backend = PipelineBackend(config, is_peft=info.method != "full")
        trainer.result = run_training(model, tokenizer, config, train_examples, eval_examples, info, backend=backend)
    return trainer.result.model


def check_pipeline_config(config: MultiGPUTrainingConfig, world: int) -> None:
    """Clear errors, before anything is loaded or written, for what the pipeline backend does not do."""
    stages = config.pipeline_parallel_size
    if world != stages:
        raise AiftError(
            f"strategy pipeline runs one process per stage: pipeline_parallel_size={stages} but {world} process(es) "
            f"run; start them with `aift train --nproc-per-node {stages} ...` (or torchrun), or set "
            f"pipeline_parallel_size={world} (data parallel x pipeline is not supported)"
        )
    if stages < 2:
        raise AiftError("strategy pipeline needs pipeline_parallel_size >= 2 (one process per stage)")
    if config.pipeline_schedule not in SCHEDULES:
        raise AiftError(f"pipeline_schedule must be one of {', '.join(SCHEDULES)}; got {config.pipeline_schedule!r}")
    if config.pipeline_schedule == "1f1b" and config.gradient_accumulation_steps < stages:
        raise AiftError(
            f"pipeline_schedule 1f1b needs at least one micro-batch per stage: gradient_accumulation_steps="
            f"{config.gradient_accumulation_steps} < pipeline_parallel_size={stages} (raise it, or use gpipe)"
        )


@dataclasses.dataclass
class _Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    @property
    def num_processes(self) -> int:  # what run_guard asks of an accelerator
        return self.world

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Sum over every rank (the one reduction run_guard needs), as ``accelerator.reduce``."""
        if reduction != "sum":
            raise ValueError(f"internal: only sum is reduced over pipeline ranks, not {reduction!r}")
        total = tensor.clone()
        dist.all_reduce(total)
        return total


class PipelineBackend:
    """One pipeline stage per process (see the module docstring); to the loop, one data-parallel replica."""

    dp_rank, dp_world = 0, 1
    can_skip = True  # the optimizer steps after the loop has seen the loss and the global norm
    checks_grad_norm = True

    def __init__(self, config: MultiGPUTrainingConfig, is_peft: bool) -> None:
        self.config, self.is_peft = config, is_peft
        self.device = _stage_device()  # before the process group: NCCL binds to the current device
        self._owns_group = _init_process_group()
        self.ranks = self.all_ranks = _Ranks(dist.get_rank(), dist.get_world_size(), self.device)
        check_pipeline_config(config, self.ranks.world)
        self.is_main = self.ranks.is_first
        self.precision = resolve_precision(config, self.device.type)
        if self.precision == "fp16":
            raise NotAvailableError(
                "strategy pipeline has no fp16 loss scaling: use GPUs with bf16 (Ampere or newer) or fp32 (--no-fp16)"
            )
        _log_unused_levers(config)

    def barrier(self) -> None:
        dist.barrier()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every rank: it alone computes losses; every rank collates the same batch."""
        total = tensor.clone() if self.ranks.is_last else torch.zeros_like(tensor)
        dist.all_reduce(total)
        return total

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        raise _no_rollouts()

    def gather_objects(self, obj: Any) -> list:
        raise _no_rollouts()

    def rollout_model(self) -> nn.Module:
        raise _no_rollouts()

    def attention(self, model: nn.Module, config) -> ModelAttention:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return ModelAttention(getattr(base.config, "_attn_implementation", None) or "eager")

    def prepare(self, model: nn.Module, planner: Any, total_steps: int) -> None:
        """Cuts the model, keeps this rank's stage and builds the schedule around it."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        config, ranks = self.config, self.ranks
        self.model = model
        self.causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        tied = mark_tied_embeddings(self.causal_lm)
        self.stage_module = split_stages(self.causal_lm, ranks.world)[ranks.rank].to(self.device)
        self.stage_module.train()
        self.tied_group = dist.new_group([0, ranks.world - 1]) if tied else None  # collective: every rank makes it
        self.micro_batches = config.gradient_accumulation_steps
        rows = (planner.examples, planner.max_length, planner.packing, planner.pad_token_id)
        self.train_rows = FixedShapeBatches(rows[0], config.batch_size, *rows[1:])
        self.eval_rows = FixedShapeBatches(rows[0], self.micro_batches * config.batch_size, *rows[1:])
        self.optimizer, self.scheduler = optimizer_and_schedule(
            self.stage_module, config, self.device.type, total_steps
        )
        stage = PipelineStage(self.stage_module, ranks.rank, ranks.world, self.device)
        schedule_class = Schedule1F1B if config.pipeline_schedule == "1f1b" else ScheduleGPipe
        # scale_grads=False: loss_fn already divides by the trained tokens of the whole step.
        self.schedule = schedule_class(stage, n_microbatches=self.micro_batches, loss_fn=token_loss, scale_grads=False)
        # The tied embedding's gradient lives on the first and the last stage: count it once in the norm.
        shared = tied_embedding_weight(self.stage_module) if not ranks.is_first else None
        self.norm_params = [p for p in self.stage_module.parameters() if p.requires_grad and p is not shared]
        log.info(
            "pipeline: stage %d/%d holds %d decoder layer(s) on %s; %d steps, %d micro-batches of %d rows each, %s",
            ranks.rank, ranks.world, len(self.stage_module.layers), self.device, total_steps, self.micro_batches,
            config.batch_size, config.pipeline_schedule,
        )  # fmt: skip

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def collate(self, planner: Any, micro_batches: list) -> list[dict]:
        return [self.train_rows.train([items]) for items in micro_batches]

    def forward_backward(
        self, objective: Objective, batches: list[dict], weights: list[float], scale: float, rngs: list
    ) -> tuple[torch.Tensor, list[dict]]:
        """One pass of the schedule over the step's micro-batches (weights are all 1: no data parallelism).

        A short last step of an epoch gets idle micro-batches: the schedule always runs the same number.
        """
        idle = [_without_labels(batches[0])] * (self.micro_batches - len(batches))
        loss_sum = self._run_schedule(_concat(batches + idle), normalizer=1 / scale, train=True)
        if self.tied_group is not None:
            sum_tied_gradients(self.stage_module, 0, self.ranks.world - 1, group=self.tied_group)
        return loss_sum, [{} for _ in batches]

    def _run_schedule(self, batch: dict, normalizer: float, train: bool) -> torch.Tensor:
        """One pass of the schedule over the batch's micro-batches; the loss sum on the last stage, else 0."""
        ranks = self.ranks
        kwargs = {}
        if batch["attention_mask"].ndim == 4:  # packed rows; padded rows are right-padded and causal: no mask
            kwargs = {k: batch[k].to(self.device) for k in ("position_ids", "attention_mask")}
        if ranks.is_last:
            kwargs.update(target=batch["labels"].to(self.device), loss_kwargs={"normalizer": normalizer})
        args = (batch["input_ids"].to(self.device),) if ranks.is_first else ()
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        with self.autocast():
            run(*args, losses=losses if ranks.is_last else None, **kwargs)
        return torch.tensor(sum(float(x.detach()) for x in losses), dtype=torch.float64, device=self.device)

    @contextlib.contextmanager
    def evaluating(self):
        self.stage_module.eval()
        try:
            yield
        finally:
            self.stage_module.train()

    def eval_batches(
        self, objective: Objective, examples: Examples, batch_size: int, pad_token_id: int
    ) -> Iterator[dict]:
        return self.eval_rows.eval(examples)

    def eval_loss_sum(self, objective: Objective, batch: dict) -> tuple[torch.Tensor, dict]:
        return self._run_schedule(batch, normalizer=1.0, train=False), {}

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clips with the global norm: every stage's squared norm, added up over the stages."""
        own_norm = torch.nn.utils.get_total_norm([p.grad for p in self.norm_params if p.grad is not None])
        squared = torch.tensor([own_norm.item() ** 2], dtype=torch.float64, device=self.device)
        dist.all_reduce(squared)
        grad_norm = squared[0].sqrt().to(torch.float32)
        grads = [p for p in self.stage_module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, grad_norm)
        return grad_norm

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(
        self, checkpoints_dir: Path, state: TrainerState, rng: dict, limit: int | None, extra: dict | None = None
    ) -> None:
        if extra:
            raise _no_rollouts()
        path = save_stage_checkpoint(
            checkpoints_dir, state, self.model, self.causal_lm, self.optimizer, self.scheduler, self.ranks, limit, rng
        )
        log.info("saved %s", path)

    def load_checkpoint(self, path: Path) -> TrainerState:
        return load_stage_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ranks, self.is_peft)

    def final_model(self) -> tuple[nn.Module, None]:
        """The model: on rank 0 the whole trained one, gathered by the run's last checkpoint."""
        if self.ranks.is_first:
            self.model.to("cpu")  # stage 0 may sit on a GPU, the stages received from the others are on the CPU
        return self.model, None

    def close(self) -> None:
        dist.barrier()
        if self._owns_group:
            dist.destroy_process_group()


def _no_rollouts() -> AiftError:
    """Pipeline stages each hold a slice of the model: none can generate, nor hold an objective's rollout."""
    return AiftError(
        "strategy pipeline cannot run an objective that generates its batches (GRPO): each process holds one "
        "stage of the model, so none can sample completions; use one process or DDP"
    )


def _without_labels(batch: dict) -> dict:
    """A micro-batch of the same shape that trains nothing: no trained token, so no loss and no gradient."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def _concat(batches: list[dict]) -> dict:
    """Micro-batches of one fixed shape as one batch: the schedule cuts it back into micro-batches."""
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    return {k: torch.cat([b[k] for b in batches]) for k in keys if k in batches[0]}


# ---------------------------------------------------------------------- pieces


def token_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Sum over trained tokens of the cross-entropy (fp32), divided by the trained tokens of the whole step.

    ``labels`` are not shifted (labels[i] is the target of position i; position i-1 predicts it), as in the
    one-process loop, so micro-batch losses add up to the token mean of the whole batch.
    """
    return shifted_cross_entropy_sum(logits, labels) / normalizer


class FixedShapeBatches:
    """Batches of ``rows x max_length`` tensors: pipeline stages exchange buffers of one fixed shape.

    Rows missing at the end of an epoch are empty (padding, no trained token), so they add nothing to the
    loss or the gradients; the training rows are the plan's micro-batches, in the plan's order.
    """

    def __init__(self, examples: Examples, rows: int, max_length: int, packing: bool, pad_token_id: int):
        self.examples, self.rows, self.packing = examples, rows, packing
        self._packed = PackedCollator(pad_token_id, max_length, pad_to_multiple_of=max_length)
        self._padded = PaddedCollator(pad_token_id, pad_to_multiple_of=max_length)

    def train(self, window: list[list]) -> dict:
        """One optimizer step's micro-batches (lists of packed rows or of example indices) as one batch."""
        items = [item for micro_batch in window for item in micro_batch]
        if len(items) > self.rows:
            raise AiftError(f"internal: {len(items)} rows for a pipeline batch of {self.rows}")
        empty = self.rows - len(items)
        ex = self.examples.rows
        if self.packing:
            return self._packed([[ex[i] for i in row] for row in items] + [[] for _ in range(empty)])
        return self._padded([ex[i] for i in items] + [_EMPTY] * empty)

    def eval(self, examples: Examples) -> Iterator[dict]:
        """The eval split, longest first (as :func:`aift.training.batching.eval_batches`), never packed."""
        order = sorted(range(len(examples.rows)), key=lambda i: -len(examples.rows[i]["input_ids"]))
        for start in range(0, len(order), self.rows):
            chosen = [examples.rows[i] for i in order[start : start + self.rows]]
            yield self._padded(chosen + [_EMPTY] * (self.rows - len(chosen)))


_EMPTY = {"input_ids": [], "labels": []}


def gather_stages_to_rank0(causal_lm: nn.Module, ranks: _Ranks) -> None:
    """Every stage sends its trainable tensors to rank 0, which copies them into its own copy of the model.

    All ranks cut the same model the same way, so rank 0 knows every stage's parameters, in order: no names
    or shapes need to be sent. A parameter two stages share (tied embeddings) comes from the first stage.
    """
    stages = split_stages(causal_lm, ranks.world)  # views into this rank's model: which parameter is whose
    seen: set[int] = set()
    owned: list[list[nn.Parameter]] = []
    for stage_module in stages:
        params = [p for p in stage_module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        owned.append(params)
    for source in range(1, ranks.world):
        for param in owned[source]:
            if ranks.rank == source:
                dist.send(param.detach().contiguous(), dst=0)
            elif ranks.is_first:
                buffer = torch.empty(param.shape, dtype=param.dtype, device=ranks.device)
                dist.recv(buffer, src=source)
                param.data.copy_(buffer.to(param.device))


def save_stage_checkpoint(
    checkpoints_dir: Path,
    state: TrainerState,
    model: nn.Module,
    causal_lm: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ranks: _Ranks,
    total_limit: int | None,
    rng: dict,
) -> Path:
    """checkpoint-STEP in the one-process layout (model or adapter, scheduler, RNG, trainer state) plus each
    stage's ``optimizer-stageR.pt`` and ``rng_state-stageR.pt``; rank 0 renames it into place once all wrote.

    Collective: every rank calls it. The folder must be shared between nodes (as for FSDP checkpoints).
    """
    final = checkpoints_dir / f"{ckpt.PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{ckpt.PREFIX}{state.step}"
    gather_stages_to_rank0(causal_lm, ranks)
    if ranks.is_first:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
    dist.barrier()
    torch.save(optimizer.state_dict(), tmp / f"optimizer-stage{ranks.rank}.pt")
    torch.save(rng, tmp / f"rng_state-stage{ranks.rank}.pt")
    dist.barrier()
    if ranks.is_first:
        with ckpt.writing_folder(tmp, final, fresh=False):
            ckpt.finish_checkpoint(tmp, final, scheduler, rng, state, total_limit)
    dist.barrier()
    return final


def load_stage_checkpoint(
    path: Path, model: nn.Module, optimizer, scheduler, ranks: _Ranks, is_peft: bool
) -> TrainerState:
    """Counterpart of save_stage_checkpoint, on every rank: weights, this stage's optimizer and RNG, the state."""
    stage_files = sorted(path.glob("optimizer-stage*.pt"))
    if len(stage_files) != ranks.world:
        found = f"{len(stage_files)} stage(s)" if stage_files else "no optimizer-stageR.pt: not a pipeline run"
        raise CheckpointError(f"{path} cannot resume a pipeline of {ranks.world} stages ({found})")
    ckpt.load_weights(path, model, is_peft)
    own = path / f"optimizer-stage{ranks.rank}.pt"
    optimizer.load_state_dict(torch.load(own, weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    ckpt.restore_rng(torch.load(path / f"rng_state-stage{ranks.rank}.pt", weights_only=True))
    return TrainerState.from_json((path / ckpt.STATE_FILE).read_text(encoding="utf-8"))


def _init_process_group() -> bool:
    """Joins the launcher's process group (NCCL on GPUs, gloo on CPUs); True when this call created it."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        raise AiftError("strategy pipeline runs under a launcher: `aift train --nproc-per-node N ...` or torchrun")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _stage_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(device)
    return device


def _log_unused_levers(config: MultiGPUTrainingConfig) -> None:
    if config.loss_chunk_size:
        log.info("pipeline: loss_chunk_size is not used (the last stage computes the loss from full logits)")
    if config.torch_compile:
        log.info("pipeline: torch_compile is not used with pipeline stages")
