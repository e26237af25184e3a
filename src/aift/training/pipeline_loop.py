"""Pipeline-parallel training (``strategy="pipeline"``), top to bottom: setup, loop, save, cleanup.

One process per stage, started by a launcher::

    aift train --strategy pipeline pipeline_parallel_size=2 --nproc-per-node 2 dataset_path=... [--use-lora]

Each process loads the model, cuts it with :func:`aift.distributed.pipeline.split_stages` and keeps its
own stage (on ``cuda:LOCAL_RANK`` when there is a GPU). ``torch.distributed.pipelining`` runs the schedule
(1F1B or GPipe); only hidden states and their gradients cross between processes. The math is the one of
:mod:`aift.training.loop`, so the same config trains the same model:

- an optimizer step takes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` rows from the same
  per-epoch plan (:class:`aift.training.data.BatchPlanner`); they are the schedule's micro-batches;
- the loss is the sum of per-token cross-entropy (fp32) over the trained tokens of the whole step divided by
  their count (``scale_grads=False``: the schedule must not average micro-batch losses again);
- each stage's AdamW updates its own trainable parameters (LoRA adapters or every weight), with the same
  warmup/decay schedule; clipping uses the global norm (squared norms all-reduced over stages);
- the last stage computes the loss; the step loss and eval loss reach rank 0, which alone writes; at the end
  every stage sends its trained weights to rank 0, which saves ``final/`` as the one-process loop does;
- checkpoints have the one-process layout (weights gathered on rank 0, scheduler, trainer state) plus each
  stage's ``optimizer-stageR.pt`` and ``rng_state-stageR.pt``; they resume with the same number of stages.

Every process collates the same batch, so packed rows' position ids and block-causal masks need not be
sent. Stages exchange buffers of one shape, so every batch is padded to ``batch_size x max_length`` per
micro-batch (missing rows at the end of an epoch are empty and train nothing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from aift.config import MultiGPUTrainingConfig, to_yaml
from aift.data.packing import PackedCollator, PaddedCollator
from aift.distributed.pipeline import mark_tied_embeddings, split_stages, sum_tied_gradients, tied_embedding_weight
from aift.errors import AiftError, NotAvailableError
from aift.training import checkpoint as ckpt
from aift.training import run_guard
from aift.training.checkpoint import CheckpointError, TrainerState
from aift.training.data import BatchPlanner, Examples, check_trainable
from aift.training.loop import (
    RunInfo,
    TrainResult,
    flat_config,
    linear_warmup_then_decay,
    make_optimizer,
    prepare_output_dir,
    resolve_precision,
    save_final,
    system_metrics,
    write_atomic,
)
from aift.training.loss import shifted_cross_entropy_sum
from aift.training.reporting import MetricsLogger, check_loggers, peak_memory_gb
from aift.training.run_guard import output_dir_lock
from aift.training.step import count_step, is_log_step, next_epoch_if_done

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "gpipe")


def train_pipeline(trainer, train_texts=None, eval_texts=None, resume_from_checkpoint=None) -> nn.Module:
    """What ``_Trainer.train`` does (data, seed, model preparation), with the pipeline loop instead of Accelerate's.

    Returns the trained model: complete on rank 0; on the other ranks only their own stage is trained.
    """
    check_pipeline_config(trainer.config, int(os.environ.get("WORLD_SIZE", "1")))
    with output_dir_lock(trainer.config):
        model, tokenizer, train_examples, eval_examples, info = trainer.prepare(
            train_texts, eval_texts, resume_from_checkpoint
        )
        trainer.result = run_pipeline(model, tokenizer, trainer.config, train_examples, eval_examples, info)
    return trainer.result.model


def check_pipeline_config(config: MultiGPUTrainingConfig, world: int) -> None:
    """Clear errors, before anything is loaded or written, for what the pipeline loop does not do."""
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
    def num_processes(self) -> int:  # what run_guard.StopOnSignal asks of an accelerator
        return self.world

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Sum over every rank (the one reduction the loop needs), as ``accelerator.reduce``."""
        if reduction != "sum":
            raise ValueError(f"internal: only sum is reduced over pipeline ranks, not {reduction!r}")
        total = tensor.clone()
        dist.all_reduce(total)
        return total


def run_pipeline(
    model: nn.Module,
    tokenizer,
    config: MultiGPUTrainingConfig,
    train_examples: Examples,
    eval_examples: Examples | None,
    info: RunInfo,
) -> TrainResult:
    """Trains ``model`` (already LoRA-wrapped / checkpointed by the trainer) with one stage per process."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    # ------------------------------------------------------------------ setup
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    check_trainable(train_examples)
    if eval_examples is not None and not eval_examples.rows:
        eval_examples = None
    check_loggers(config.report_to)
    resume_from = (
        ckpt.find_checkpoint(output_dir, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    )
    device = _stage_device()  # before the process group: NCCL binds to the current device
    owns_group = _init_process_group()
    ranks = _Ranks(dist.get_rank(), dist.get_world_size(), device)
    check_pipeline_config(config, ranks.world)
    identity = ckpt.run_identity(config, info, 1, train_examples.rows)  # stages split layers, not data
    if resume_from is not None:
        ckpt.check_same_run(resume_from, identity, config.resume_force)
    precision = resolve_precision(config, ranks.device.type)
    if precision == "fp16":
        raise NotAvailableError(
            "strategy pipeline has no fp16 loss scaling: use GPUs with bf16 (Ampere or newer) or fp32 (--no-fp16)"
        )
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    if config.frozen_base_bf16 and autocast_dtype is None:
        raise AiftError("frozen_base_bf16 needs mixed precision: set bf16: true (or fp16: true)")
    _log_unused_levers(config)
    if ranks.is_first:
        prepare_output_dir(output_dir, config, resuming=resume_from is not None)
    dist.barrier()

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = mark_tied_embeddings(causal_lm)
    stage_module = split_stages(causal_lm, ranks.world)[ranks.rank].to(ranks.device)
    stage_module.train()
    tied_group = dist.new_group([0, ranks.world - 1]) if tied else None  # collective: every rank makes it

    micro_batches = config.gradient_accumulation_steps
    planner = BatchPlanner(
        train_examples, config.batch_size, config.max_length, config.packing, tokenizer.pad_token_id, config.seed
    )
    batches = FixedShapeBatches(
        train_examples, micro_batches * config.batch_size, config.max_length, config.packing, tokenizer.pad_token_id
    )
    steps_per_epoch = math.ceil(planner.num_micro_batches() / micro_batches)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * steps_per_epoch)
    log.info(
        "pipeline: stage %d/%d holds %d decoder layer(s) on %s; %d steps, %d micro-batches of %d rows each, %s",
        ranks.rank,
        ranks.world,
        len(stage_module.layers),
        ranks.device,
        total_steps,
        micro_batches,
        config.batch_size,
        config.pipeline_schedule,
    )

    optimizer = make_optimizer(stage_module, config, ranks.device.type)
    scheduler = linear_warmup_then_decay(optimizer, config.warmup_steps, total_steps)
    stage = PipelineStage(stage_module, ranks.rank, ranks.world, ranks.device)
    schedule_class = Schedule1F1B if config.pipeline_schedule == "1f1b" else ScheduleGPipe
    # scale_grads=False: loss_fn already divides by the trained tokens of the whole step.
    schedule = schedule_class(stage, n_microbatches=micro_batches, loss_fn=token_loss, scale_grads=False)
    # The tied embedding's gradient lives on the first and the last stage: count it once in the norm.
    shared = tied_embedding_weight(stage_module) if not ranks.is_first else None
    norm_params = [p for p in stage_module.parameters() if p.requires_grad and p is not shared]

    state = TrainerState(seed=config.seed, total_steps=total_steps, run=identity)
    if resume_from is not None:
        state = load_stage_checkpoint(resume_from, model, optimizer, scheduler, ranks, info.method != "full")
        state.total_steps, state.run = total_steps, identity
        log.info("resumed from %s at step %d", resume_from, state.step)
    logger = (
        MetricsLogger(output_dir, config.report_to, flat_config(config, info), state.step if resume_from else None)
        if ranks.is_first
        else None
    )
    if ranks.is_first:
        write_atomic(output_dir / "config.yaml", to_yaml(*[c for c in (config, info.lora_config) if c is not None]))

    def run_schedule(batch: dict, normalizer: float, train: bool) -> float:
        """One pass of the schedule over the batch's micro-batches; the loss sum on the last stage, else 0."""
        kwargs = {}
        if batch["attention_mask"].ndim == 4:  # packed rows; padded rows are right-padded and causal: no mask
            kwargs = {k: batch[k].to(ranks.device) for k in ("position_ids", "attention_mask")}
        if ranks.is_last:
            kwargs.update(target=batch["labels"].to(ranks.device), loss_kwargs={"normalizer": normalizer})
        args = (batch["input_ids"].to(ranks.device),) if ranks.is_first else ()
        losses: list[torch.Tensor] = []
        with torch.autocast(ranks.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if train:
                schedule.step(*args, losses=losses if ranks.is_last else None, **kwargs)
            else:
                schedule.eval(*args, losses=losses if ranks.is_last else None, **kwargs)
        return sum(float(x.detach()) for x in losses)

    def from_last_stage(value: float) -> float:
        """The last stage's number, on every rank (the others add 0)."""
        total = torch.tensor([value if ranks.is_last else 0.0], dtype=torch.float64, device=ranks.device)
        dist.all_reduce(total)
        return total.item()

    @torch.no_grad()
    def evaluate() -> float:
        stage_module.eval()
        loss_sum, tokens = 0.0, 0
        for batch in batches.eval(eval_examples):
            loss_sum += run_schedule(batch, normalizer=1.0, train=False)
            tokens += int(batch["num_trained_tokens"])
        stage_module.train()
        return from_last_stage(loss_sum) / max(tokens, 1)

    def log_eval(loss: float) -> None:
        if logger is not None:
            logger.log(
                {
                    "type": "eval",
                    "step": state.step,
                    "eval_loss": loss,
                    "eval_ppl": math.exp(min(loss, 50.0)),
                    "time": round(time.perf_counter() - started, 3),
                }
            )

    def save() -> None:
        path = save_stage_checkpoint(
            output_dir / "checkpoints", state, model, causal_lm, optimizer, scheduler, ranks, config.save_total_limit
        )
        log.info("saved %s", path)

    progress = tqdm(total=total_steps, initial=state.step, desc="train", disable=not ranks.is_first, dynamic_ncols=True)
    final_eval = None
    if eval_examples is not None and resume_from is None:
        state.initial_eval_loss = evaluate()
        log_eval(state.initial_eval_loss)

    # ------------------------------------------------------------------ loop
    window_losses: list[float] = []
    window_tokens, window_time = 0, 0.0
    stop = run_guard.StopOnSignal()
    sampler = system_metrics(output_dir, config.collect_metrics and ranks.is_first)
    with stop, sampler, progress:
        while state.step < total_steps:
            plan = planner.epoch(state.epoch)
            while state.micro_batch < len(plan) and state.step < total_steps:
                step_started = time.perf_counter()
                window = plan[state.micro_batch : state.micro_batch + micro_batches]
                batch = batches.train(window)  # every rank collates the same rows
                trained_tokens, real_tokens = int(batch["num_trained_tokens"]), int(batch["num_tokens"])

                loss_sum = run_schedule(batch, normalizer=max(trained_tokens, 1), train=True)
                if tied_group is not None:
                    sum_tied_gradients(stage_module, 0, ranks.world - 1, group=tied_group)
                # One all-reduce gives the global gradient norm (squared norms add up) and the last stage's loss.
                own_norm = torch.nn.utils.get_total_norm([p.grad for p in norm_params if p.grad is not None])
                stats = torch.tensor(
                    [own_norm.item() ** 2, loss_sum if ranks.is_last else 0.0], dtype=torch.float64, device=ranks.device
                )
                dist.all_reduce(stats)
                grad_norm = stats[0].sqrt().to(torch.float32)
                torch.nn.utils.clip_grads_with_norm_(
                    [p for p in stage_module.parameters() if p.grad is not None],
                    config.max_grad_norm or math.inf,
                    grad_norm,
                )
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step_loss = stats[1].item()
                elapsed = time.perf_counter() - step_started
                count_step(state, len(window), real_tokens, step_loss, elapsed)
                window_losses.append(step_loss)
                window_tokens += real_tokens
                window_time += elapsed
                progress.update(1)

                if is_log_step(state.step, config.logging_steps, total_steps):
                    record = {
                        "type": "train",
                        "step": state.step,
                        "epoch": round(state.step / steps_per_epoch, 4),
                        "loss": sum(window_losses) / len(window_losses),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(window_time, 1e-9),
                        "tokens": state.tokens,
                        "peak_mem_gb": round(peak_memory_gb(ranks.device.type), 3),
                        "time": round(time.perf_counter() - started, 3),
                    }
                    if logger is not None:
                        logger.log(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    window_losses, window_tokens, window_time = [], 0, 0.0
                if eval_examples is not None and config.eval_steps and state.step % config.eval_steps == 0:
                    final_eval = evaluate()
                    log_eval(final_eval)
                if config.save_steps and state.step % config.save_steps == 0 and state.step < total_steps:
                    save()
                if stop.should_stop(ranks):  # Ctrl-C / SIGTERM on any rank: all save, then stop
                    save()
                    raise stop.interrupted()
            next_epoch_if_done(state, len(plan))

    # ------------------------------------------------------------------ save
    if eval_examples is not None and (final_eval is None or state.step % max(config.eval_steps, 1)):
        final_eval = evaluate()
        log_eval(final_eval)
    save()  # gathers every stage's weights on rank 0, which then holds the whole trained model
    summary = {
        "completed": True,
        "model": info.model_name,
        "method": info.method,
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 4),
        "tokens": state.tokens,
        "train_tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
        "final_train_loss": state.last_loss,
        "final_eval_loss": final_eval,
        "initial_eval_loss": state.initial_eval_loss,
        "peak_mem_gb": round(peak_memory_gb(ranks.device.type), 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "output_dir": str(output_dir),
        "prompt_format": info.prompt_format,
    }
    if ranks.is_first:
        model.to("cpu")  # stage 0 may sit on a GPU, the stages received from the others are on the CPU
        save_final(model, tokenizer, output_dir / "final", info, config.max_length)
        write_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
        log.info("done: %d steps, final train loss %.4f; output in %s", state.step, state.last_loss or 0, output_dir)

    # ------------------------------------------------------------------ cleanup
    if logger is not None:
        logger.close()
    dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    return TrainResult(model=model, summary=summary, output_dir=output_dir)


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
        """The eval split, longest first (as :func:`aift.training.data.eval_batches`), never packed."""
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
) -> Path:
    """checkpoint-STEP in the one-process layout (model or adapter, scheduler, RNG, trainer state) plus each
    stage's ``optimizer-stageR.pt`` and ``rng_state-stageR.pt``; rank 0 renames it into place once all wrote.

    Collective: every rank calls it. The folder must be shared between nodes (as for FSDP checkpoints).
    """
    final = checkpoints_dir / f"{ckpt.PREFIX}{state.step}"
    tmp = checkpoints_dir / f".tmp-{ckpt.PREFIX}{state.step}"
    rng = ckpt.capture_rng()
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
