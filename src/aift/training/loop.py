"""The one training loop of aift, top to bottom: setup, loop, save, cleanup.

Every trainer (full, LoRA, QLoRA, multi-process) ends up in :func:`run_training`. It runs on a CPU, one
GPU, or under ``torchrun`` / ``accelerate launch`` across processes: Accelerate provides the processes,
the device, DDP wrapping, ``no_sync`` and the all-reduces; everything else is here, in the open:

- micro-batches from :mod:`aift.training.data` (packed rows or length-grouped padding), a fixed plan per
  (seed, epoch), split over processes micro-batch by micro-batch;
- the loss is the sum of per-token cross-entropy (fp32) over the trained tokens of the whole accumulated
  batch, on every process, divided by their count: 8 micro-batches of 1 equal 1 batch of 8 (without
  dropout), and 2 processes x batch 2 equal 1 process x batch 2 x 2 accumulation steps;
- each micro-batch draws its dropout masks from a seed of (seed, epoch, its index in the plan), so the
  last equality holds with dropout on too;
- AdamW (fused where supported), linear warmup then linear decay to 0, clipping, bf16 autocast
  (fp16 with loss scaling on GPUs without bf16);
- eval, logging, checkpoints (exactly resumable, verified on resume), Ctrl-C and SIGTERM save a checkpoint
  first, a NaN/inf loss or gradient stops the run (or is skipped, counted) and NaN weights are never saved.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft.helpers import disable_input_dtype_casting
from tqdm.auto import tqdm

from aift.config import LoRAConfig, TrainingConfig, to_yaml
from aift.errors import AiftError
from aift.export.folders import write_meta
from aift.models.loading import eval_mode
from aift.training import checkpoint as ckpt
from aift.training import run_guard
from aift.training.data import Examples
from aift.training.loss import split_causal_lm
from aift.training.objectives import SFTObjective, to_device
from aift.training.reporting import MetricsLogger, check_loggers, peak_memory_gb
from aift.training.segment_attention import PackedAttention
from aift.training.step import count_step, is_log_step, loss_scale, lr_factor, next_epoch_if_done, pad_plan, step_window

log = logging.getLogger(__name__)

# Files and folders that mark an output dir as holding a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "train_summary.json", "checkpoints", "final", "tensorboard")


class OutputDirError(AiftError, ValueError):
    """The output dir holds another run."""


@dataclass
class RunInfo:
    """What the trainer knows about the run beyond TrainingConfig."""

    method: str  # full | lora | qlora
    model_name: str
    prompt_format: str | None = None
    lora_config: LoRAConfig | None = None


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
    objective: Any = None,
) -> TrainResult:
    """Trains ``model`` (already LoRA-wrapped / quantized / checkpointed by the trainer) and saves the run.

    ``accelerator_kwargs`` go to ``Accelerator`` (the multi-GPU trainer passes its FSDP / DeepSpeed plugin).
    ``objective`` is what the loop minimises (:mod:`aift.training.objectives`); default the SFT token sum.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    # ------------------------------------------------------------------ setup
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    is_peft = info.method in ("lora", "qlora")
    objective = objective or SFTObjective(config.loss_chunk_size)
    objective.check(train_examples)
    if eval_examples is not None and not eval_examples.rows:
        eval_examples = None
    check_loggers(config.report_to)
    resume_from = (
        ckpt.find_checkpoint(output_dir, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    )

    # Mixed precision is done here (autocast + GradScaler), not by Accelerate, so that several runs with
    # different precisions can share one process (tests, notebooks).
    # cpu=True without CUDA: else Accelerate ignores torchrun's processes on a CPU (DistributedType.NO, 1 process).
    accelerator = Accelerator(
        mixed_precision="no", **{"cpu": not torch.cuda.is_available(), **(accelerator_kwargs or {})}
    )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    identity = ckpt.run_identity(config, info, world, train_examples.rows)
    if resume_from is not None:
        ckpt.check_same_run(resume_from, identity, config.resume_force)
    precision = resolve_precision(config, device.type)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if config.frozen_base_bf16 and autocast_dtype is None:
        raise AiftError("frozen_base_bf16 needs mixed precision: set bf16: true (or fp16: true)")
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, config, resuming=resume_from is not None)
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    attention = PackedAttention(model, config, device.type)
    planner = objective.planner(train_examples, config, tokenizer.pad_token_id, attention.mask)
    micro_per_step = config.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(planner.num_micro_batches() / micro_per_step)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * steps_per_epoch)
    if config.warmup_steps >= total_steps:
        log.warning(
            "warmup_steps=%d >= total steps %d: the learning rate never reaches its peak",
            config.warmup_steps,
            total_steps,
        )
    log.info(
        "training %d steps (%d per epoch), %d examples, %s on %s, precision %s, packing efficiency %.1f%%, "
        "attention %s",
        total_steps,
        steps_per_epoch,
        len(train_examples.rows),
        info.method,
        f"{world} x {device.type}" if world > 1 else device.type,
        precision,
        100 * planner.efficiency,
        attention.implementation,
    )

    if config.torch_compile and config.loss_chunk_size:
        split_causal_lm(model)[0].compile()  # compiled in place: the fused loss reads the model's hidden states
    elif config.torch_compile:
        model = torch.compile(model)
    optimizer = make_optimizer(model, config, device.type)
    scheduler = linear_warmup_then_decay(optimizer, config.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    # FSDP and DeepSpeed hold weights and optimizer states in shards: saving and loading them is collective.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def autocast() -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast around the model's forward, as the precision asks."""
        # Under autocast, peft's cast of bf16 activations to the adapters' fp32 is undone at once: skip it.
        # Not with gradient checkpointing: its recompute in backward runs outside this context, would cast,
        # and torch.utils.checkpoint then refuses the recomputed fp32 tensors.
        skip_cast = is_peft and autocast_dtype is not None and not config.gradient_checkpointing
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None))
        stack.enter_context(disable_input_dtype_casting(model, active=skip_cast))
        return stack

    if getattr(objective, "precompute", False):  # before a checkpoint is loaded: the reference is the start
        for examples in (train_examples, eval_examples):
            if examples is not None:
                objective.precompute_reference(model, examples.rows, config.batch_size, autocast, device)
    state = ckpt.TrainerState(seed=config.seed, total_steps=total_steps, run=identity)
    if resume_from is not None and sharded:
        state, rng = ckpt.load_sharded_checkpoint(resume_from, accelerator, scheduler)
    elif resume_from is not None:
        state, rng = ckpt.load_checkpoint(resume_from, unwrap(accelerator, model), optimizer, scheduler, is_peft)
    if resume_from is not None:
        state.total_steps, state.run = total_steps, identity
        ckpt.restore_rng(rng)
        log.info("resumed from %s at step %d", resume_from, state.step)
    logger = (
        MetricsLogger(output_dir, config.report_to, flat_config(config, info), state.step if resume_from else None)
        if accelerator.is_main_process
        else None
    )
    if accelerator.is_main_process:
        sections = (config, info.lora_config, getattr(objective, "config", None))  # PreferenceConfig for DPO & co
        write_atomic(output_dir / "config.yaml", to_yaml(*[c for c in sections if c is not None]))

    micro_metrics: list[dict[str, torch.Tensor]] = []  # the objective's metric sums of this step's micro-batches

    def forward_loss_sum(batch: dict) -> torch.Tensor:
        """The objective's loss, summed over what it counts (trained tokens for SFT, pairs for DPO, ...)."""
        loss, metrics = objective.loss_sum(model, to_device(batch, device), autocast)
        micro_metrics.append(metrics)
        return loss

    @torch.no_grad()
    def evaluate() -> float:
        eval_mode(model)  # not model.eval(): see eval_mode (QLoRA on a CPU)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count (trained tokens / pairs)
        micro_metrics.clear()
        for batch in objective.eval_batches(eval_examples, config.batch_size, tokenizer.pad_token_id, rank, world):
            totals[0] += forward_loss_sum(batch).double()
            totals[1] += objective.count(batch)
        totals = accelerator.reduce(totals, "sum")
        eval_metrics.clear()
        eval_metrics.update(reduce_metrics(micro_metrics, totals[1].item()))
        model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    def reduce_metrics(metrics: list[dict[str, torch.Tensor]], count: float) -> dict[str, float]:
        """Means over the step (all processes) of the objective's metric sums; clears the list."""
        names = sorted({k for m in metrics for k in m})
        if not names:
            metrics.clear()
            return {}
        sums = torch.stack([sum(m.get(k, torch.zeros((), device=device)) for m in metrics).float() for k in names])
        metrics.clear()
        return dict(zip(names, (accelerator.reduce(sums, "sum") / max(count, 1)).tolist(), strict=True))

    eval_metrics: dict[str, float] = {}

    def log_eval(loss: float) -> None:
        if logger is not None:
            ppl = math.exp(min(loss, 50.0))
            logger.log(
                {
                    "type": "eval",
                    "step": state.step,
                    "eval_loss": loss,
                    "eval_ppl": ppl,
                    **{f"eval_{k}": v for k, v in eval_metrics.items()},
                    "time": round(time.perf_counter() - started, 3),
                }
            )

    def save(rng: dict) -> None:
        run_guard.check_finite_weights(model, accelerator, state.step, output_dir / "checkpoints")
        if sharded:
            path = ckpt.save_sharded_checkpoint(
                accelerator, output_dir / "checkpoints", state, scheduler, rng, config.save_total_limit
            )
            log.info("saved %s", path)
        elif accelerator.is_main_process:
            path = ckpt.save_checkpoint(
                output_dir / "checkpoints",
                state,
                unwrap(accelerator, model),
                optimizer,
                scheduler,
                rng,
                config.save_total_limit,
            )
            log.info("saved %s", path)
        accelerator.wait_for_everyone()

    stop = run_guard.StopOnSignal()
    progress = tqdm(
        total=total_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    sampler = system_metrics(output_dir, config.collect_metrics and accelerator.is_main_process)
    final_eval = None

    # ------------------------------------------------------------------ loop
    window_losses: list[float] = []
    window_metrics: list[dict[str, float]] = []
    window_tokens, window_time = 0, 0.0
    with stop, sampler, attention, progress:  # the bar closes on an error too: its message starts a line
        if eval_examples is not None and resume_from is None:
            state.initial_eval_loss = evaluate()
            log_eval(state.initial_eval_loss)
        while state.step < total_steps:
            plan, real = pad_plan(planner.epoch(state.epoch), world)
            while state.micro_batch < len(plan) and state.step < total_steps:
                step_started = time.perf_counter()
                window, mine, weights = step_window(plan, real, state.micro_batch, micro_per_step, rank, world)
                batches = [planner.collate(plan[j]) for j in mine]
                counts = torch.tensor(
                    [
                        sum(objective.count(b) * w for b, w in zip(batches, weights, strict=True)),
                        sum(int(b["num_tokens"]) * w for b, w in zip(batches, weights, strict=True)),
                    ],
                    device=device,
                )
                trained_tokens, real_tokens = accelerator.reduce(counts, "sum").tolist()
                scale = loss_scale(trained_tokens, world)

                loss_sum = torch.zeros((), device=device)
                for i, (j, batch, weight) in enumerate(zip(mine, batches, weights, strict=True)):
                    sync = i == len(batches) - 1
                    no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(model)
                    with no_sync, micro_batch_rng(config.seed, state.epoch, j, device):
                        loss = forward_loss_sum(batch) * (scale * weight)
                        if deepspeed:  # the loop, not DeepSpeed's counter, says where a step ends and scales the loss
                            model.set_gradient_accumulation_boundary(sync)
                            model.backward(loss, scale_wrt_gas=False)
                            if sync:
                                model.step()  # clips (gradient_clipping) and steps; optimizer.step() below is a no-op
                        else:
                            accelerator.backward(scaler.scale(loss) if scaler else loss)
                    loss_sum += loss.detach()

                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or math.inf)
                lr = scheduler.get_last_lr()[0]
                step_loss = accelerator.reduce(loss_sum, "sum").item() / world
                if not run_guard.is_finite_step(step_loss, grad_norm, check_grads=scaler is None):
                    # Raises unless a skip is left; DeepSpeed cannot skip: it stepped already, inside model.step().
                    skipped = run_guard.skip_nonfinite_step(
                        state, config.skip_nonfinite_steps, step_loss, grad_norm, window, output_dir / "checkpoints",
                        can_skip=not deepspeed,
                    )  # fmt: skip
                    if logger is not None:
                        logger.log(skipped)
                    if scaler is not None:
                        scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    micro_metrics.clear()  # the skipped batch's objective metrics are not logged either
                    state.micro_batch += len(window)  # the batch is skipped; the step is not counted
                    continue
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                # Padding micro-batches (weight 0) of the last step of an epoch are not counted in the metrics.
                for j, weight in enumerate(weights):
                    if not weight and j < len(micro_metrics):
                        micro_metrics[j] = {}
                window_metrics.append(reduce_metrics(micro_metrics, trained_tokens))
                elapsed = time.perf_counter() - step_started
                count_step(state, len(window), int(real_tokens), step_loss, elapsed)
                window_losses.append(step_loss)
                window_tokens += int(real_tokens)
                window_time += elapsed
                progress.update(1)

                if is_log_step(state.step, config.logging_steps, total_steps):
                    record = {
                        "type": "train",
                        "step": state.step,
                        "epoch": round(state.step / steps_per_epoch, 4),
                        "loss": sum(window_losses) / len(window_losses),
                        **_mean_metrics(window_metrics),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(window_time, 1e-9),
                        "tokens": state.tokens,
                        "peak_mem_gb": round(peak_memory_gb(device.type), 3),
                        "time": round(time.perf_counter() - started, 3),
                        "skipped_nonfinite_steps": state.skipped_nonfinite_steps,
                    }
                    if logger is not None:
                        logger.log(record)
                    progress.set_postfix(
                        loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
                    window_losses, window_metrics, window_tokens, window_time = [], [], 0, 0.0
                if eval_examples is not None and config.eval_steps and state.step % config.eval_steps == 0:
                    final_eval = evaluate()
                    log_eval(final_eval)
                if config.save_steps and state.step % config.save_steps == 0 and state.step < total_steps:
                    save(ckpt.capture_rng())
                if stop.should_stop(accelerator):
                    save(ckpt.capture_rng())
                    raise stop.interrupted()
            next_epoch_if_done(state, len(plan))

        # -------------------------------------------------------------- save
        if eval_examples is not None and (final_eval is None or state.step % max(config.eval_steps, 1)):
            final_eval = evaluate()
            log_eval(final_eval)
        save(ckpt.capture_rng())

    full_state = accelerator.get_state_dict(model) if sharded else None  # gathers the shards (collective)
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
    summary = {
        "completed": True,
        "model": info.model_name,
        "method": info.method,
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 4),
        "tokens": state.tokens,
        "train_tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
        "final_train_loss": state.last_loss,
        "skipped_nonfinite_steps": state.skipped_nonfinite_steps,
        "final_eval_loss": final_eval,
        "initial_eval_loss": state.initial_eval_loss,
        "peak_mem_gb": round(peak_memory_gb(device.type), 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "output_dir": str(output_dir),
        "prompt_format": info.prompt_format,
    }
    if objective.name != "sft":  # preference runs say which objective trained them
        summary["objective"] = objective.name
    if accelerator.is_main_process:
        save_final(model, tokenizer, output_dir / "final", info, config.max_length, state_dict=full_state)
        write_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
        log.info("done: %d steps, final train loss %.4f; output in %s", state.step, state.last_loss or 0, output_dir)

    # ------------------------------------------------------------------ cleanup
    if logger is not None:
        logger.close()
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return TrainResult(model=model, summary=summary, output_dir=output_dir)


# ---------------------------------------------------------------------- pieces of the setup


def resolve_precision(config: TrainingConfig, device_type: str) -> str:
    """'bf16', 'fp16' or 'no': bf16 wherever the device has it; fp16 (with loss scaling) only on older GPUs."""
    if not (config.bf16 or config.fp16):
        return "no"
    if device_type == "cpu":
        if not config.bf16:
            log.info("note: fp16 was requested on a CPU, which has no fp16 loss scaling; using bf16 autocast")
        return "bf16"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if config.bf16:
            log.info("note: this GPU has no bf16; using fp16 autocast with loss scaling")
        return "fp16"
    log.info("note: mixed precision is not used on %s; training in the model's dtype", device_type)
    return "no"


def make_optimizer(model: torch.nn.Module, config: TrainingConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors); fused if possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AiftError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device_type in ("cuda", "cpu") and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None)
    except RuntimeError:  # fused kernels are not built for every device/dtype
        return torch.optim.AdamW(groups, lr=config.learning_rate)


def linear_warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """The learning rate climbs linearly over warmup_steps, then falls linearly to 0 at total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup_steps, total_steps))


def prepare_output_dir(output_dir: Path, config: TrainingConfig, resuming: bool) -> None:
    """Refuses to mix two runs in one folder; with overwrite_output_dir, removes the old run's files."""
    existing = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if existing and not resuming:
        if not config.overwrite_output_dir:
            raise OutputDirError(
                f"{output_dir} holds another run ({', '.join(existing)}): choose another output_dir, resume it "
                "with resume_from_checkpoint=latest, or pass overwrite_output_dir=true to replace it"
            )
        for name in existing:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "train_summary.json").unlink(missing_ok=True)


def save_final(
    model: torch.nn.Module, tokenizer, final_dir: Path, info: RunInfo, max_length: int, state_dict: dict | None = None
) -> None:
    """final/: the adapter (LoRA) or the full model, the tokenizer and aift_meta.json, written atomically."""
    tmp = final_dir.with_name(".tmp-final")
    with ckpt.writing_folder(tmp, final_dir):
        _write_final(model, tokenizer, tmp, final_dir, info, max_length, state_dict)


def _write_final(model, tokenizer, tmp: Path, final_dir: Path, info: RunInfo, max_length: int, state_dict) -> None:
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(tmp)
    meta = {
        "base_model": info.model_name,
        "method": info.method,
        "prompt_format": info.prompt_format,
        "max_length": max_length,
    }
    quantization = quantization_meta(model)
    if quantization is not None:  # QLoRA: what `aift merge --base-weights dequantized` must reproduce
        meta["quantization"] = quantization
    write_meta(tmp, meta)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)


def quantization_meta(model: torch.nn.Module) -> dict | None:
    """How bitsandbytes quantized the (frozen) base, as aift_meta.json records it; None for a plain base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return None
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if config.get("load_in_8bit"):
        return {"bits": 8}
    if not config.get("load_in_4bit"):
        return None
    dtype_names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    compute = str(config.get("bnb_4bit_compute_dtype", "bfloat16")).removeprefix("torch.")
    return {
        "bits": 4,
        "quant_type": config.get("bnb_4bit_quant_type", "nf4"),
        "double_quant": bool(config.get("bnb_4bit_use_double_quant", False)),
        "compute_dtype": dtype_names.get(compute, compute),
    }


@contextlib.contextmanager
def micro_batch_rng(seed: int, epoch: int, index: int, device: torch.device):
    """Runs a micro-batch's forward and backward on an RNG seeded from (seed, epoch, its index in the plan).

    Its dropout masks (LoRA, attention, hidden) are then those of that micro-batch, whichever process runs it
    and whatever ran before: N processes x batch B draw what 1 process x batch B x N accumulation draws.
    Gradient checkpointing replays the same masks (torch.utils.checkpoint restores the RNG state it saw).
    The RNG streams outside are left as they were (fork_rng), so resuming a run stays exact.
    """
    digest = hashlib.sha256(f"aift-dropout:{seed}:{epoch}:{index}".encode()).digest()
    devices = [device.index or 0] if device.type == "cuda" else []  # fork_rng always forks the CPU's
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _mean_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for m in window for k in m})
    return {k: sum(m[k] for m in window if k in m) / sum(1 for m in window if k in m) for k in names}


def flat_config(config: TrainingConfig, info: RunInfo) -> dict[str, Any]:
    flat = asdict(config)
    if info.lora_config is not None:
        flat.update({f"lora_{k}": v for k, v in asdict(info.lora_config).items()})
    return flat


def system_metrics(output_dir: Path, enabled: bool):
    """The EVAL part's sampler of CPU/GPU use when asked for and available, else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    try:
        from aift.eval.system_metrics import SystemMetricsSampler
    except ImportError:
        log.warning("collect_metrics: aift.eval.system_metrics is not available in this version; not sampling")
        return contextlib.nullcontext()
    return SystemMetricsSampler(output_dir / "system_metrics.jsonl", interval=1.0)
