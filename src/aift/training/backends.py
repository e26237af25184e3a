"""What differs between ways of running the one loop (:mod:`aift.training.loop`): the backends.

The loop owns the data plan, the step accounting, logging, eval cadence, checkpoint cadence and the summary.
A backend owns where the model lives and how one optimizer step runs on it:

- the rank layout: ``is_main``, ``barrier``, the data-parallel ``dp_rank`` / ``dp_world`` (which micro-batches
  this process runs), ``reduce_sum`` and ``all_gather`` over data-parallel replicas, ``gather_objects`` (an
  objective's checkpointed state, one per replica);
- ``rollout_model``: the model an objective's rollout generates with (:mod:`aift.training.rollout_hook`), or a
  clear error where none can;
- ``prepare``: the model, its optimizer and learning-rate schedule (``model``, ``optimizer``, ``scheduler``,
  from :mod:`aift.training.optimizers`), given the data plan the steps collate from;
- ``collate`` / ``forward_backward``: one optimizer step's micro-batches, forward and backward, returning the
  loss sum; ``eval_batches`` / ``eval_loss_sum``: the same without gradients;
- ``clip_grad_norm``, ``optimizer_step`` / ``skip_step``;
- ``save_checkpoint`` / ``load_checkpoint`` and ``final_model`` (the trained weights, gathered).

:class:`AccelerateBackend` (here) runs one process, DDP, FSDP or DeepSpeed through Accelerate;
:class:`aift.distributed.pipeline_backend.PipelineBackend` runs pipeline stages, one per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft.helpers import disable_input_dtype_casting

from aift.config import TrainingConfig
from aift.errors import AiftError
from aift.models.loading import eval_mode
from aift.training import checkpoint as ckpt
from aift.training.checkpoint import TrainerState
from aift.training.loss import split_causal_lm
from aift.training.objectives import Objective, to_device
from aift.training.optimizers import optimizer_and_schedule
from aift.training.segment_attention import PackedAttention
from aift.utils import gpu

log = logging.getLogger(__name__)

Metrics = dict[str, torch.Tensor]


class Backend(Protocol):
    """What the loop asks of a way of running it (see the module docstring)."""

    device: torch.device
    precision: str  # bf16 | fp16 | no
    is_main: bool  # the process that writes the run's files
    dp_rank: int
    dp_world: int  # data-parallel replicas: the micro-batches of a step are dealt over them
    all_ranks: Any  # every process, as run_guard asks of an accelerator (num_processes, device, reduce)
    can_skip: bool  # a non-finite step can still be dropped when its gradients are known
    checks_grad_norm: bool  # False when a loss scaler (fp16) handles inf gradients itself
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def barrier(self) -> None: ...
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def gather_objects(self, obj: Any) -> list: ...
    def rollout_model(self) -> torch.nn.Module: ...
    def attention(self, model: torch.nn.Module, config: TrainingConfig) -> PackedAttention | ModelAttention: ...
    def prepare(self, model: torch.nn.Module, planner: Any, total_steps: int) -> None: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def collate(self, planner: Any, micro_batches: list) -> list[dict]: ...
    def forward_backward(
        self, objective: Objective, batches: list[dict], weights: list[float], scale: float, rngs: list
    ) -> tuple[torch.Tensor, list[Metrics]]: ...
    def evaluating(self) -> contextlib.AbstractContextManager: ...
    def eval_batches(
        self, objective: Objective, examples: Any, batch_size: int, pad_token_id: int
    ) -> Iterable[dict]: ...
    def eval_loss_sum(self, objective: Objective, batch: dict) -> tuple[torch.Tensor, Metrics]: ...
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...
    def optimizer_step(self) -> None: ...
    def skip_step(self) -> None: ...
    def save_checkpoint(
        self, checkpoints_dir: Path, state: TrainerState, rng: dict, limit: int | None, extra: dict | None = None
    ) -> None: ...
    def load_checkpoint(self, path: Path) -> TrainerState: ...
    def final_model(self) -> tuple[torch.nn.Module, dict | None]: ...
    def close(self) -> None: ...


@dataclass
class ModelAttention:
    """The model's own attention, kept for the whole run: packed rows get the 4-D block-causal mask."""

    implementation: str
    mask: str = "4d"

    def __enter__(self) -> ModelAttention:
        return self

    def __exit__(self, *exc) -> None:
        return None


# ---------------------------------------------------------------------- pieces every backend uses


def resolve_precision(config: TrainingConfig, device_type: str) -> str:
    """'bf16', 'fp16' or 'no': bf16 wherever the device has it; fp16 (with loss scaling) only on older GPUs.

    A CPU without bf16 instructions trains in fp32 (its bf16 is emulated); so does a device without autocast.
    """
    if not (config.bf16 or config.fp16):
        return "no"
    if device_type == "cpu":
        if not gpu.supports_bf16("cpu"):
            _note_emulated_bf16()
            return "no"
        if not config.bf16:
            log.info("note: fp16 was requested on a CPU, which has no fp16 loss scaling; using bf16 autocast")
        return "bf16"
    if device_type == "cuda":
        if gpu.supports_bf16("cuda"):
            return "bf16"
        if config.bf16:
            log.info("note: this GPU has no bf16; using fp16 autocast with loss scaling")
        return "fp16"
    log.info("note: mixed precision is not used on %s; training in the model's dtype", device_type)
    return "no"


@functools.cache
def _note_emulated_bf16() -> None:
    """Said once a process: the trainer and the backend both ask."""
    log.info(
        "note: this CPU has no bf16 instructions (AVX512-BF16/AMX): bf16 matmuls would be emulated, far slower "
        "than fp32; training in fp32 (frozen_base_bf16 is not applied either)"
    )


def holds_frozen_base_in_bf16(config: TrainingConfig, device_type: str) -> bool:
    """frozen_base_bf16 applies where the run autocasts (a CPU without bf16 instructions trains in fp32)."""
    return config.frozen_base_bf16 and resolve_precision(config, device_type) != "no"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------- Accelerate


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


class AccelerateBackend:
    """One process, DDP, FSDP or DeepSpeed through Accelerate: every process holds a data-parallel replica.

    Accelerate provides the processes, the device, DDP wrapping, ``no_sync`` and the all-reduces. Mixed
    precision is done here (autocast + GradScaler), not by Accelerate, so that several runs with different
    precisions can share one process (tests, notebooks).
    """

    def __init__(self, config: TrainingConfig, is_peft: bool, accelerator_kwargs: dict[str, Any] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        # cpu=True without CUDA: else Accelerate ignores torchrun's processes on a CPU (DistributedType.NO).
        kwargs = {"cpu": not torch.cuda.is_available(), **(accelerator_kwargs or {})}
        self.accelerator = accelerator = Accelerator(mixed_precision="no", **kwargs)
        self.config, self.is_peft = config, is_peft
        self.device, self.is_main = accelerator.device, accelerator.is_main_process
        self.dp_rank, self.dp_world = accelerator.process_index, accelerator.num_processes
        self.all_ranks = accelerator
        # FSDP and DeepSpeed hold weights and optimizer states in shards: saving and loading them is collective.
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.precision = resolve_precision(config, self.device.type)
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.checks_grad_norm = self.scaler is None
        self.can_skip = not self.deepspeed  # DeepSpeed steps inside model.step(), before the loop sees the norm

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, "sum")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape on each) concatenated along dim 0, in rank order."""
        if self.dp_world == 1:
            return tensor
        if tensor.dtype == torch.bool:  # gloo gathers no bools
            return self.accelerator.gather(tensor.to(torch.uint8)).bool()
        return self.accelerator.gather(tensor)

    def gather_objects(self, obj: Any) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.dp_world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def rollout_model(self) -> torch.nn.Module:
        """The whole model, unwrapped, for generation; refused where a process holds only shards of it."""
        if self.sharded and not (self.deepspeed and _zero_stage(self.accelerator) < 3):
            strategy = "DeepSpeed ZeRO-3" if self.deepspeed else "FSDP"
            raise AiftError(
                f"{strategy} shards the weights over processes, so no process can generate alone: an objective that "
                "generates (GRPO) runs on one process, DDP or DeepSpeed ZeRO-1/2"
            )
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def attention(self, model: torch.nn.Module, config: TrainingConfig) -> PackedAttention:
        return PackedAttention(model, config, self.device.type)

    def prepare(self, model: torch.nn.Module, planner: Any, total_steps: int) -> None:
        config = self.config
        if config.torch_compile and config.loss_chunk_size:
            split_causal_lm(model)[0].compile()  # compiled in place: the fused loss reads the hidden states
        elif config.torch_compile:
            model = torch.compile(model)
        optimizer, self.scheduler = optimizer_and_schedule(model, config, self.device.type, total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast around the model's forward, as the precision asks."""
        # Under autocast, peft's cast of bf16 activations to the adapters' fp32 is undone at once: skip it.
        # Not with gradient checkpointing: its recompute in backward runs outside this context, would cast,
        # and torch.utils.checkpoint then refuses the recomputed fp32 tensors.
        dtype = self.autocast_dtype
        skip_cast = self.is_peft and dtype is not None and not self.config.gradient_checkpointing
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None))
        stack.enter_context(disable_input_dtype_casting(self.model, active=skip_cast))
        return stack

    def collate(self, planner: Any, micro_batches: list) -> list[dict]:
        return [planner.collate(items) for items in micro_batches]

    def forward_backward(
        self, objective: Objective, batches: list[dict], weights: list[float], scale: float, rngs: list
    ) -> tuple[torch.Tensor, list[Metrics]]:
        """Forward and backward of this process's micro-batches; gradients sync on the last one only."""
        loss_sum, metrics = torch.zeros((), device=self.device), []
        for i, (batch, weight, rng) in enumerate(zip(batches, weights, rngs, strict=True)):
            sync = i == len(batches) - 1
            no_sync = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
            with no_sync, rng:
                loss, batch_metrics = objective.loss_sum(self.model, to_device(batch, self.device), self.autocast)
                loss = loss * (scale * weight)
                self._backward(loss, sync)
            metrics.append(batch_metrics)
            loss_sum += loss.detach()
        return loss_sum, metrics

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        if not self.deepspeed:
            self.accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)
            return
        # The loop, not DeepSpeed's counter, says where a step ends and scales the loss.
        self.model.set_gradient_accumulation_boundary(sync)
        self.model.backward(loss, scale_wrt_gas=False)
        if sync:
            self.model.step()  # clips (gradient_clipping) and steps; optimizer.step() is then a no-op

    @contextlib.contextmanager
    def evaluating(self):
        eval_mode(self.model)  # not model.eval(): see eval_mode (QLoRA on a CPU)
        try:
            yield
        finally:
            self.model.train()

    def eval_batches(self, objective: Objective, examples: Any, batch_size: int, pad_token_id: int) -> Iterable[dict]:
        return objective.eval_batches(examples, batch_size, pad_token_id, self.dp_rank, self.dp_world)

    def eval_loss_sum(self, objective: Objective, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return objective.loss_sum(self.model, to_device(batch, self.device), self.autocast)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(
        self, checkpoints_dir: Path, state: TrainerState, rng: dict, limit: int | None, extra: dict | None = None
    ) -> None:
        """``extra``: more files of the checkpoint (name -> object for ``torch.save``), written by the main process."""
        if self.sharded:
            path = ckpt.save_sharded_checkpoint(
                self.accelerator, checkpoints_dir, state, self.scheduler, rng, limit, extra
            )
            log.info("saved %s", path)
        elif self.is_main:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            path = ckpt.save_checkpoint(
                checkpoints_dir, state, model, self.optimizer, self.scheduler, rng, limit, extra
            )
            log.info("saved %s", path)
        self.barrier()

    def load_checkpoint(self, path: Path) -> TrainerState:
        """Weights, optimizer, scheduler and RNG from ``path`` (in place); returns the trainer state."""
        if self.sharded:
            state, rng = ckpt.load_sharded_checkpoint(path, self.accelerator, self.scheduler)
        else:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            state, rng = ckpt.load_checkpoint(path, model, self.optimizer, self.scheduler, self.is_peft)
        ckpt.restore_rng(rng)
        return state

    def final_model(self) -> tuple[torch.nn.Module, dict | None]:
        """The unwrapped model, and under FSDP / DeepSpeed its full state dict (gathering shards is collective)."""
        full_state = self.accelerator.get_state_dict(self.model) if self.sharded else None
        model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
        return model, full_state

    def close(self) -> None:
        self.barrier()
        self.accelerator.free_memory()
