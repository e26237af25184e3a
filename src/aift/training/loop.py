"""The one training loop of aift, top to bottom: setup, loop, save, cleanup.

Every trainer (full, LoRA, QLoRA, multi-process, pipeline stages) ends up in :func:`run_training`. It runs
on a CPU, one GPU, or across processes; a backend (:mod:`aift.training.backends`) runs each step:
Accelerate's (one process, DDP, FSDP, DeepSpeed) or the pipeline schedule's
(:mod:`aift.distributed.pipeline_backend`). Everything else is here, in the open:

- micro-batches from :mod:`aift.training.batching` (packed rows or length-grouped padding), a fixed plan per
  (seed, epoch), split over data-parallel processes micro-batch by micro-batch;
- the loss is the sum of per-token cross-entropy (fp32) over the trained tokens of the whole accumulated
  batch, on every process, divided by their count: 8 micro-batches of 1 equal 1 batch of 8 (without
  dropout), and 2 processes x batch 2 equal 1 process x batch 2 x 2 accumulation steps;
- each micro-batch draws its dropout masks from a seed of (seed, epoch, its index in the plan), so the
  last equality holds with dropout on too;
- the optimizer and learning-rate schedule of :mod:`aift.training.optimizers` (AdamW, fused where supported,
  and linear warmup then linear decay to 0 by default), clipping, bf16 autocast (fp16 with loss scaling on GPUs
  without bf16), all prepared by the backend; NEFTune noise on the input embeddings when asked (SFT);
- eval, logging, checkpoints (exactly resumable, verified on resume), Ctrl-C and SIGTERM save a checkpoint
  first, a NaN/inf loss or gradient stops the run (or is skipped, counted) and NaN weights are never saved.

**The rollout hook** (:mod:`aift.training.rollout_hook`), for objectives that make their batch at train time.
An objective that defines ``rollout(batches, ctx) -> list[dict]`` gets, each step, this process's collated
micro-batches right after they are collated and before ``count`` is asked of them, and returns the batches
the loss is computed on: GRPO gets prompts and returns the sampled completions, scored, with their advantages.
It runs with the model unwrapped, in eval mode, under ``torch.no_grad`` (train mode is restored after), with
a :class:`~aift.training.objectives.StepContext`: the step, the epoch and the plan indices of the micro-batches
(seed sampling from them, and a resumed run or another number of processes samples the same), the rank
layout, ``reduce_sum`` and ``all_gather`` (statistics over the whole step). Each eval batch goes through it too
(``ctx.is_eval``). Its seconds are logged apart (``rollout_s`` beside ``train_s``). An objective that defines
``state_dict()`` / ``load_state_dict()`` has its state (one per process) saved in each checkpoint and
restored on resume. The pipeline backend refuses rollouts (no process holds the whole model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from aift.config import ConfigError, TrainingConfig, to_yaml
from aift.errors import AiftError
from aift.models import run_folder
from aift.training import checkpoint as ckpt
from aift.training import optimizers, run_guard, streaming
from aift.training.backends import AccelerateBackend, Backend
from aift.training.batching import Examples, first_examples
from aift.training.objectives import Objective
from aift.training.objectives.sft import SFTObjective
from aift.training.reporting import MetricsLogger, check_loggers
from aift.training.rollout_hook import Rollout, has_rollout, has_state, objective_files
from aift.training.run_files import RunInfo, flat_config, prepare_output_dir, save_final
from aift.training.step import (
    count_step,
    is_log_step,
    loss_scale,
    micro_batch_rng,
    next_epoch_if_done,
    pad_plan,
    step_window,
)
from aift.utils.files import write_json_atomic, write_text_atomic
from aift.utils.gpu import peak_memory_gb
from aift.utils.system_metrics import SystemMetricsSampler

__all__ = ["Run", "TrainResult", "run_training"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module
    summary: dict
    output_dir: Path


def run_training(
    model: torch.nn.Module,
    tokenizer,
    config: TrainingConfig,
    train_examples: Examples,
    eval_examples: Examples | None,
    info: RunInfo,
    accelerator_kwargs: dict[str, Any] | None = None,
    objective: Objective | None = None,
    backend: Backend | None = None,
) -> TrainResult:
    """Trains ``model`` (already LoRA-wrapped / quantized / checkpointed by the trainer) and saves the run.

    ``objective`` is what the loop minimises (:mod:`aift.training.objectives`); default the SFT token sum.
    ``backend`` runs the steps (:mod:`aift.training.backends`); default Accelerate's, made with
    ``accelerator_kwargs`` (the multi-GPU trainer passes its FSDP / DeepSpeed plugin).
    """
    # ------------------------------------------------------------------ setup
    objective = objective or SFTObjective(config.loss_chunk_size)
    streaming.check_data(objective, train_examples)
    if config.neftune_noise_alpha and objective.name != "sft":
        raise ConfigError(f"neftune_noise_alpha is for supervised fine-tuning, not {objective.name}")
    optimizers.check_available(config)
    check_loggers(config.report_to)
    eval_examples = first_examples(eval_examples, config.max_eval_samples)
    backend = backend or AccelerateBackend(config, info.method in ("lora", "qlora"), accelerator_kwargs)
    run = Run(tokenizer, config, info, backend, objective, train_examples, eval_examples)
    run.setup(model)

    # ------------------------------------------------------------------ loop
    stop = run_guard.StopOnSignal()
    sampler = system_metrics(run.output_dir, config.collect_metrics and backend.is_main)
    noise = optimizers.neftune(model, config.neftune_noise_alpha)
    with stop, sampler, noise, run.attention, run.progress:  # the bar closes on an error too: its message starts a line
        if eval_examples is not None and run.resume_from is None:
            run.state.initial_eval_loss = run.evaluate()
        while run.state.step < run.total_steps:
            plan, real = pad_plan(run.planner.epoch(run.state.epoch), backend.dp_world)
            while run.state.micro_batch < len(plan) and run.state.step < run.total_steps:
                outcome = run.train_step(plan, real)
                if outcome is not None:  # None: a non-finite step was skipped, not counted
                    run.record(outcome)
                    run.after_step(stop)
            next_epoch_if_done(run.state, len(plan))

        # -------------------------------------------------------------- save
        if eval_examples is not None and (run.final_eval is None or run.state.step % max(config.eval_steps, 1)):
            run.final_eval = run.evaluate()
        run.save()
    return run.finish()


@dataclass
class StepOutcome:
    """What one counted optimizer step reports (the same on every process)."""

    loss: float
    grad_norm: float
    lr: float  # the learning rate the step used
    metrics: dict[str, float]  # the objective's means over the step (DPO rewards, ...); SFT has none
    tokens: int  # real (non-padding) tokens of the step, all processes
    seconds: float
    rollout_seconds: float = 0.0  # of ``seconds``, in the objective's rollout (generation)


@dataclass
class LogWindow:
    """The steps since the last train record: the record gives their mean loss and metrics and tokens/s."""

    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    rollout_seconds: float = 0.0

    def add(self, outcome: StepOutcome) -> None:
        self.losses.append(outcome.loss)
        self.metrics.append(outcome.metrics)
        self.tokens += outcome.tokens
        self.seconds += outcome.seconds
        self.rollout_seconds += outcome.rollout_seconds

    def timing(self) -> dict[str, float]:
        """Seconds per step in the rollout and in the rest of the step (training), when there is a rollout."""
        if not self.rollout_seconds:
            return {}
        n = len(self.losses)
        return {"rollout_s": self.rollout_seconds / n, "train_s": (self.seconds - self.rollout_seconds) / n}


class Run:
    """What the loop's steps share, from setup to finish; :func:`run_training` drives it top to bottom."""

    def __init__(
        self,
        tokenizer,
        config: TrainingConfig,
        info: RunInfo,
        backend: Backend,
        objective: Objective,
        train_examples: Examples,
        eval_examples: Examples | None,
    ) -> None:
        self.tokenizer, self.config, self.info = tokenizer, config, info
        self.backend, self.objective = backend, objective
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.started = time.perf_counter()
        self.output_dir = Path(config.output_dir)
        self.checkpoints_dir = self.output_dir / run_folder.CHECKPOINTS_DIR
        self.resume_from = (
            ckpt.find_checkpoint(self.output_dir, config.resume_from_checkpoint)
            if config.resume_from_checkpoint
            else None
        )
        self.final_eval: float | None = None
        self.window = LogWindow()
        self.logger: MetricsLogger | None = None

    def setup(self, model: torch.nn.Module) -> None:
        """Checks, output dir, data plan, model and optimizer (through the backend), resumed state, logger."""
        from accelerate.utils import set_seed

        config, backend = self.config, self.backend
        identity = ckpt.run_identity(config, self.info, backend.dp_world, self.train_examples.rows)
        if self.resume_from is not None:
            ckpt.check_same_run(self.resume_from, identity, config.resume_force)
        if config.frozen_base_bf16 and not (config.bf16 or config.fp16):  # a CPU's fp32 fallback is no error
            raise AiftError("frozen_base_bf16 needs mixed precision: set bf16: true (or fp16: true)")
        if backend.is_main:
            prepare_output_dir(self.output_dir, config, resuming=self.resume_from is not None)
        backend.barrier()
        set_seed(config.seed)

        self.attention = backend.attention(model, config)
        pad, mask = self.tokenizer.pad_token_id, self.attention.mask
        self.planner = streaming.planner(self.objective, self.train_examples, config, pad, mask, backend)
        self.micro_per_step = config.gradient_accumulation_steps * backend.dp_world
        self.steps_per_epoch = math.ceil(self.planner.num_micro_batches() / self.micro_per_step)
        self.total_steps = (
            config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * self.steps_per_epoch)
        )
        self._log_plan()
        backend.prepare(model, self.planner, self.total_steps)
        optimizers.training_mode(backend.optimizer, config)
        self.rollout = Rollout(self.objective, backend, config.seed) if has_rollout(self.objective) else None
        if getattr(self.objective, "precompute", False):  # before a checkpoint is loaded: the reference is the start
            self._precompute_reference()
        self.state = self._initial_state(identity)
        self.progress = tqdm(
            total=self.total_steps, initial=self.state.step, desc="train", disable=not backend.is_main,
            dynamic_ncols=True,
        )  # fmt: skip
        if backend.is_main:
            resumed_at = self.state.step if self.resume_from else None
            self.logger = MetricsLogger(self.output_dir, config.report_to, flat_config(config, self.info), resumed_at)
            sections = (config, self.info.lora_config, getattr(self.objective, "config", None))  # DPO & co
            write_text_atomic(
                self.output_dir / run_folder.CONFIG_FILE, to_yaml(*[c for c in sections if c is not None])
            )

    def _log_plan(self) -> None:
        config, backend = self.config, self.backend
        warmup = optimizers.warmup_steps(config, self.total_steps)
        if warmup >= self.total_steps:
            given = "" if config.warmup_steps is not None else f" (warmup_ratio={config.warmup_ratio})"
            log.warning(
                "warmup_steps=%d%s >= total steps %d: warmup covers the whole run, the learning rate never reaches "
                "its peak", warmup, given, self.total_steps,
            )  # fmt: skip
        device = backend.device.type
        log.info(
            "training %d steps (%d per epoch), %s, %s on %s, precision %s, packing efficiency %.1f%%, attention %s",
            self.total_steps,
            self.steps_per_epoch,
            streaming.describe(self.train_examples),
            self.info.method,
            f"{backend.dp_world} x {device}" if backend.dp_world > 1 else device,
            backend.precision,
            100 * self.planner.efficiency,
            self.attention.implementation,
        )

    def _precompute_reference(self) -> None:
        """The preference reference log-probs, from the model before any step (full fine-tunes, or when asked)."""
        backend = self.backend
        for examples in (self.train_examples, self.eval_examples):
            if examples is not None:
                self.objective.precompute_reference(
                    backend.model, examples.rows, self.config.batch_size, backend.autocast, backend.device
                )

    def _initial_state(self, identity: dict) -> ckpt.TrainerState:
        if self.resume_from is None:
            return ckpt.TrainerState(seed=self.config.seed, total_steps=self.total_steps, run=identity)
        backend = self.backend
        state = backend.load_checkpoint(self.resume_from)
        optimizers.training_mode(backend.optimizer, self.config)  # saved with the averaged weights
        state.total_steps, state.run = self.total_steps, identity
        streaming.restore(self.planner, self.resume_from, state)
        if has_state(self.objective):
            self.objective.load_state_dict(
                ckpt.load_objective_state(self.resume_from, backend.dp_rank, backend.dp_world)
            )
        log.info("resumed from %s at step %d", self.resume_from, state.step)
        return state

    # ------------------------------------------------------------------ one step

    def train_step(self, plan: list, real: int) -> StepOutcome | None:
        """One optimizer step from the data position in ``state``; None when a non-finite step is skipped.

        ``plan`` is the epoch's micro-batches padded for the data-parallel processes, ``real`` its real length.
        """
        config, backend, state, objective = self.config, self.backend, self.state, self.objective
        started = time.perf_counter()
        window, mine, weights = step_window(
            plan, real, state.micro_batch, self.micro_per_step, backend.dp_rank, backend.dp_world
        )
        batches = backend.collate(self.planner, [plan[j] for j in mine])
        rollout_s = 0.0
        if self.rollout is not None:  # the objective makes the step's batches (GRPO: samples completions)
            batches, rollout_s = self.rollout.train(batches, state.step, state.epoch, mine)
        counts = torch.tensor(
            [
                sum(objective.count(b) * w for b, w in zip(batches, weights, strict=True)),
                sum(int(b["num_tokens"]) * w for b, w in zip(batches, weights, strict=True)),
            ],
            device=backend.device,
        )
        trained_tokens, real_tokens = backend.reduce_sum(counts).tolist()
        rngs = [micro_batch_rng(config.seed, state.epoch, j, backend.device) for j in mine]
        scale = loss_scale(trained_tokens, backend.dp_world)
        loss_sum, metrics = backend.forward_backward(objective, batches, weights, scale, rngs)
        grad_norm = backend.clip_grad_norm(config.max_grad_norm or math.inf)
        lr = backend.scheduler.get_last_lr()[0]
        step_loss = backend.reduce_sum(loss_sum).item() / backend.dp_world
        if not run_guard.is_finite_step(step_loss, grad_norm, check_grads=backend.checks_grad_norm):
            self._skip(step_loss, grad_norm, window)
            return None
        backend.optimizer_step()
        # Padding micro-batches (weight 0) of the last step of an epoch are not counted in the metrics.
        metrics = [m if w else {} for m, w in zip(metrics, weights, strict=True)]
        outcome = StepOutcome(
            loss=step_loss,
            grad_norm=float(grad_norm),
            lr=lr,
            metrics=self._reduce_metrics(metrics, trained_tokens),
            tokens=int(real_tokens),
            seconds=time.perf_counter() - started,
            rollout_seconds=rollout_s,
        )
        count_step(state, len(window), outcome.tokens, step_loss, outcome.seconds)
        return outcome

    def _skip(self, loss: float, grad_norm, window: list) -> None:
        """Raises unless a skip is left (and the backend can still skip); else drops the step's batch."""
        skipped = run_guard.skip_nonfinite_step(
            self.state, self.config.skip_nonfinite_steps, loss, grad_norm, window, self.checkpoints_dir,
            can_skip=self.backend.can_skip,
        )  # fmt: skip
        if self.logger is not None:
            self.logger.log(skipped)
        self.backend.skip_step()
        self.state.micro_batch += len(window)  # the batch is skipped; the step is not counted

    def _reduce_metrics(self, metrics: list[dict[str, torch.Tensor]], count: float) -> dict[str, float]:
        """Means over the step or the eval split (all processes) of the objective's metric sums."""
        names = sorted({k for m in metrics for k in m})
        if not names:
            return {}
        zero = torch.zeros((), device=self.backend.device)
        sums = torch.stack([sum(m.get(k, zero) for m in metrics).float() for k in names])
        return dict(zip(names, (self.backend.reduce_sum(sums) / max(count, 1)).tolist(), strict=True))

    def record(self, outcome: StepOutcome) -> None:
        """Progress bar, and the train record every ``logging_steps`` steps (means over the steps since)."""
        self.window.add(outcome)
        self.progress.update(1)
        if not is_log_step(self.state.step, self.config.logging_steps, self.total_steps):
            return
        window = self.window
        record = {
            "type": "train",
            "step": self.state.step,
            "epoch": round(self.state.step / self.steps_per_epoch, 4),
            "loss": sum(window.losses) / len(window.losses),
            **_mean_metrics(window.metrics),
            **window.timing(),
            "lr": outcome.lr,
            "grad_norm": outcome.grad_norm,
            "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
            "tokens": self.state.tokens,
            "peak_mem_gb": round(peak_memory_gb(self.backend.device.type), 3),
            "time": round(time.perf_counter() - self.started, 3),
            "skipped_nonfinite_steps": self.state.skipped_nonfinite_steps,
        }
        if self.logger is not None:
            self.logger.log(record)
        self.progress.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{outcome.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
        )
        self.window = LogWindow()

    def after_step(self, stop: run_guard.StopOnSignal) -> None:
        """The eval and checkpoint cadence; a signal on any process saves, then stops every process."""
        config, step = self.config, self.state.step
        if self.eval_examples is not None and config.eval_steps and step % config.eval_steps == 0:
            self.final_eval = self.evaluate()
        if config.save_steps and step % config.save_steps == 0 and step < self.total_steps:
            self.save()
        if stop.should_stop(self.backend.all_ranks):
            self.save()
            raise stop.interrupted()

    # ------------------------------------------------------------------ eval, save, finish

    @torch.no_grad()
    def evaluate(self) -> float:
        """The eval loss (loss sum over every process / its count), logged with the objective's metrics."""
        backend, objective = self.backend, self.objective
        totals = torch.zeros(2, dtype=torch.float64, device=backend.device)  # loss sum, count (tokens / pairs)
        metrics: list[dict[str, torch.Tensor]] = []
        with optimizers.averaged_weights(backend.optimizer, self.config), backend.evaluating():
            batches = backend.eval_batches(objective, self.eval_examples, self.config.batch_size,
                                           self.tokenizer.pad_token_id)  # fmt: skip
            for k, batch in enumerate(batches):
                if self.rollout is not None:
                    batch = self.rollout.eval(batch, self.state.step, k)
                loss, batch_metrics = backend.eval_loss_sum(objective, batch)
                totals[0] += loss.double()
                totals[1] += objective.count(batch)
                metrics.append(batch_metrics)
        totals = backend.reduce_sum(totals)
        eval_metrics = self._reduce_metrics(metrics, totals[1].item())
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        if self.logger is not None:
            self.logger.log(
                {
                    "type": "eval",
                    "step": self.state.step,
                    "eval_loss": loss,
                    "eval_ppl": math.exp(min(loss, 50.0)),
                    **{f"eval_{k}": v for k, v in eval_metrics.items()},
                    "time": round(time.perf_counter() - self.started, 3),
                }
            )
        return loss

    def save(self) -> None:
        """A checkpoint of the current step (collective); NaN weights are never saved."""
        rng = ckpt.capture_rng()
        backend = self.backend
        with optimizers.averaged_weights(backend.optimizer, self.config):
            run_guard.check_finite_weights(backend.model, backend.all_ranks, self.state.step, self.checkpoints_dir)
            extra = {**(objective_files(self.objective, backend) or {}), **streaming.files(self.planner, self.state)}
            backend.save_checkpoint(self.checkpoints_dir, self.state, rng, self.config.save_total_limit, extra)

    def summary(self) -> dict[str, Any]:
        state = self.state
        summary = {
            "completed": True,
            "model": self.info.model_name,
            "method": self.info.method,
            "steps": state.step,
            "epochs": round(state.step / self.steps_per_epoch, 4),
            "tokens": state.tokens,
            "train_tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
            "final_train_loss": state.last_loss,
            "skipped_nonfinite_steps": state.skipped_nonfinite_steps,
            "final_eval_loss": self.final_eval,
            "initial_eval_loss": state.initial_eval_loss,
            "peak_mem_gb": round(peak_memory_gb(self.backend.device.type), 3),
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "output_dir": str(self.output_dir),
            "prompt_format": self.info.prompt_format,
        }
        summary.update(streaming.summary(self.planner))  # a streamed run: its passes, documents, tokens
        if self.objective.name != "sft":  # preference runs say which objective trained them
            summary["objective"] = self.objective.name
        return summary

    def finish(self) -> TrainResult:
        """final/ and train_summary.json (main process), then cleanup; the trained model on every process."""
        backend, state = self.backend, self.state
        optimizers.final_weights(backend.optimizer, self.config)
        model, full_state = backend.final_model()
        summary = self.summary()
        if backend.is_main:
            final_dir = self.output_dir / run_folder.FINAL_DIR
            save_final(model, self.tokenizer, final_dir, self.info, self.config.max_length, state_dict=full_state)
            write_json_atomic(self.output_dir / run_folder.SUMMARY_FILE, summary)
            log.info("done: %d steps, final train loss %.4f; output in %s", state.step, state.last_loss or 0,
                     self.output_dir)  # fmt: skip
        if self.logger is not None:
            self.logger.close()
        backend.close()
        return TrainResult(model=model, summary=summary, output_dir=self.output_dir)


# ---------------------------------------------------------------------- pieces


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for m in window for k in m})
    return {k: sum(m[k] for m in window if k in m) / sum(1 for m in window if k in m) for k in names}


def system_metrics(output_dir: Path, enabled: bool):
    """The sampler of CPU/GPU use into system_metrics.jsonl when asked for, else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return SystemMetricsSampler(output_dir / run_folder.SYSTEM_METRICS_FILE, interval=1.0)
