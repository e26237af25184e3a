"""`AdvancedMultiGPUTrainer`: the same loop as every trainer, with Accelerate set up for several devices.

```python
from aift import AdvancedMultiGPUTrainer, LoRAConfig, TrainingConfig
config = TrainingConfig(strategy="ddp", batch_size=2, learning_rate=2e-4)
trainer = AdvancedMultiGPUTrainer("smollm2-135m-instruct", config, lora_config=LoRAConfig(r=16))
trainer.train(train_texts=texts)     # under `torchrun --nproc-per-node 2` (or `aift train --nproc-per-node 2`)
```

Strategies (aift has no distributed engine of its own; this file only configures Accelerate):
- ``ddp``: DistributedDataParallel (gloo on CPU, NCCL on GPU). The loop gives each process its share of
  every optimizer step's micro-batches and normalises the loss by the trained tokens of all processes, so
  N processes x batch B equal 1 process x batch B x N accumulation steps. Only rank 0 writes.
- ``fsdp``: FSDP2 (``fully_shard``) through Accelerate's FullyShardedDataParallelPlugin(fsdp_version=2).
- ``deepspeed``: ZeRO-1/2/3 (optionally offloaded) from the presets in ``deepspeed_presets/`` or your JSON.
- ``model_parallel``: one process, the layers spread over the GPUs with ``device_map="auto"`` and
  ``max_memory_per_gpu`` (``aift plan`` prints the same map without loading anything).
- ``pipeline``: one process per stage (``pipeline_parallel_size``), 1F1B or GPipe through
  ``torch.distributed.pipelining``, trained by :mod:`aift.distributed.pipeline_backend` through the one loop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.distributed.launch import check_world_size, under_launcher
from aift.distributed.pipeline_backend import check_pipeline_config, train_pipeline
from aift.errors import AiftError, NotAvailableError
from aift.inference.japanese import JapaneseModel
from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer, _Trainer

log = logging.getLogger(__name__)

DEEPSPEED_PRESETS = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
# Shipped inside the package (package-data), so presets resolve from an installed wheel too.
PRESET_DIR = Path(__file__).resolve().parent / "deepspeed_presets"


class AdvancedMultiGPUTrainer:
    """Full or LoRA/QLoRA fine-tuning over several processes or devices, through Accelerate.

    Args:
        model: A JapaneseModel or a model name / folder.
        config: Training settings with their strategy; defaults to TrainingConfig() (strategy ddp).
        train_dataset: As for FullFinetuningTrainer (prepared folder, Dataset, TextDataset, texts).
        eval_dataset: The same kinds.
        lora_config: Train LoRA adapters (QLoRA with ``use_qlora=True``); None means full fine-tuning.
    """

    def __init__(
        self,
        model: JapaneseModel | str,
        config: TrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        lora_config: LoRAConfig | None = None,
    ):
        self.config = config or TrainingConfig()
        self.model = model if isinstance(model, JapaneseModel) else JapaneseModel(str(model))
        self.train_dataset, self.eval_dataset, self.lora_config = train_dataset, eval_dataset, lora_config
        self.result = None
        self.inner: _Trainer | None = None

    def train(self, train_texts=None, eval_texts=None, resume_from_checkpoint=None) -> torch.nn.Module:
        """Trains with the configured strategy; returns the trained (unwrapped) model on every process."""
        check_world_size(self.config.world_size if self.config.world_size > 1 else None)
        setup = STRATEGIES[self.config.strategy]
        accelerator_kwargs = setup(self)
        self.inner = self._inner_trainer()
        if self.config.strategy == "pipeline":  # its own schedule-driven loop instead of Accelerate's
            model = train_pipeline(self.inner, train_texts, eval_texts, resume_from_checkpoint)
            self.result = self.inner.result
            return model
        self.inner.accelerator_kwargs = accelerator_kwargs
        model = self.inner.train(train_texts, eval_texts, resume_from_checkpoint)
        self.result = self.inner.result
        return model

    def _inner_trainer(self) -> _Trainer:
        if self.lora_config is None:
            return FullFinetuningTrainer(self.model, self.config, self.train_dataset, self.eval_dataset)
        return LoRAFinetuningTrainer(self.model, self.lora_config, self.config, self.train_dataset, self.eval_dataset)

    # ------------------------------------------------------------------ strategies -> Accelerator kwargs

    def _ddp(self) -> dict[str, Any]:
        if not under_launcher():
            log.info("strategy ddp in a single process: start it with `aift train --nproc-per-node N` or torchrun")
        self._load_on_own_gpu()
        return {}

    def _load_on_own_gpu(self) -> None:
        """Each process loads its copy on its own GPU (all on cuda:0 first would not fit large models)."""
        if torch.cuda.is_available() and under_launcher():
            self.model.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(self.model.device)
            self.model.model = None

    def _fsdp(self) -> dict[str, Any]:
        _require_cuda(
            "fsdp",
            "Accelerate enables FSDP only on GPU backends: on a CPU it would run plain DDP without sharding "
            "(torch's fully_shard itself runs on CPU with gloo, but not through Accelerate)",
        )
        return {"fsdp_plugin": fsdp_plugin(self._no_split_modules(), self.config)}

    def _deepspeed(self) -> dict[str, Any]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not under_launcher():
            raise AiftError(
                "strategy deepspeed runs under a launcher: `aift train --nproc-per-node N --strategy deepspeed ...`, "
                "`accelerate launch`, `torchrun` or `deepspeed` (one process: --nproc-per-node 1)"
            )
        if not torch.cuda.is_available() and world > 1:
            raise NotAvailableError(
                "strategy deepspeed needs CUDA GPUs for more than one process: with DeepSpeed on a CPU, "
                "Accelerate reports one process whatever the launcher started, so data would not be split "
                "between processes (one process on a CPU works, for testing)"
            )
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() and (self.config.fp16 or self.config.bf16):
            raise NotAvailableError(
                "strategy deepspeed with fp16 loss scaling is not supported by aift's loop: use a GPU with bf16 "
                "(Ampere or newer), fp32 (--no-fp16 --no-bf16), or strategy ddp / fsdp"
            )
        self._load_on_own_gpu()
        ds_config = resolve_deepspeed_config(self.config.deepspeed or "zero2", self.config, world)
        # cpu=False even without CUDA: Accelerate sets DeepSpeed up only when not told to stay on the CPU.
        return {"deepspeed_plugin": deepspeed_plugin(ds_config), "cpu": False}

    def _model_parallel(self) -> dict[str, Any]:
        if under_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise AiftError(
                "strategy model_parallel runs in ONE process that spreads the model over the GPUs: "
                "start it without torchrun / --nproc-per-node"
            )
        _require_cuda("model_parallel", "there is no second device to put layers on")
        memory = self.config.max_memory_per_gpu or {
            i: f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9 / 2**30)}GiB"
            for i in range(torch.cuda.device_count())
        }
        budgets = {**memory, "cpu": memory.get("cpu", "64GiB")}
        self._log_plan(budgets)
        self.model.device_map, self.model.max_memory = "auto", budgets
        self.model.offload_folder = str(Path(self.config.output_dir) / "offload")  # last resort, disk
        self.model.model = None  # reload with the device map
        return {}

    def _log_plan(self, budgets: dict) -> None:
        """The same device map and memory estimate as `aift plan`, before the weights are loaded."""
        from aift.distributed.planning import plan_training

        lc = self.lora_config
        method = "full" if lc is None else ("qlora" if lc.use_qlora else "lora")
        plan = plan_training(
            self.model.model_name,
            method=method,
            batch_size=self.config.batch_size,
            max_length=self.config.max_length,
            gradient_checkpointing=self.config.gradient_checkpointing is not False,  # auto is on for this strategy
            lora_r=lc.r if lc else LoRAConfig.r,
            lora_dropout=lc.lora_dropout if lc else 0.0,
            lora_targets=lc.target_modules if lc else None,
            optimizer=self.config.optimizer,
            modules_to_save=lc.modules_to_save if lc else None,
            max_memory=budgets,
            trust_remote_code=self.model.trust_remote_code,
        )
        log.info("model_parallel plan:\n%s", plan.render())
        if plan.offloaded and lc is None:
            log.warning("full fine-tuning with layers offloaded to CPU/disk is slow; consider lora or deepspeed zero3")

    def _pipeline(self) -> dict[str, Any]:
        """One process per stage, run by :mod:`aift.distributed.pipeline_backend` in the one loop (not Accelerate)."""
        if not under_launcher():
            raise AiftError(
                "strategy pipeline runs one process per stage under a launcher: "
                f"`aift train --nproc-per-node {max(self.config.pipeline_parallel_size, 2)} --strategy pipeline ...` "
                "or torchrun"
            )
        check_pipeline_config(self.config, int(os.environ["WORLD_SIZE"]))
        if self.lora_config is not None and self.lora_config.use_qlora:
            raise NotAvailableError("QLoRA with strategy pipeline is not supported: use LoRA, or strategy ddp")
        if self.model.device != "cpu":  # each process loads the model on the CPU and moves only its stage
            self.model.device, self.model.model = "cpu", None
        return {}

    def _no_split_modules(self) -> list[str]:
        """The decoder-layer class names (FSDP wraps each), read from a meta-device copy of the model."""
        from aift.training.memory import empty_model, load_model_config

        meta = empty_model(load_model_config(self.model.model_name, self.model.trust_remote_code))
        return list(getattr(meta, "_no_split_modules", None) or [])


STRATEGIES = {
    "ddp": AdvancedMultiGPUTrainer._ddp,
    "fsdp": AdvancedMultiGPUTrainer._fsdp,
    "deepspeed": AdvancedMultiGPUTrainer._deepspeed,
    "model_parallel": AdvancedMultiGPUTrainer._model_parallel,
    "pipeline": AdvancedMultiGPUTrainer._pipeline,
}


def _require_cuda(strategy: str, why: str) -> None:
    if not torch.cuda.is_available():
        raise NotAvailableError(f"strategy {strategy} needs CUDA GPUs: {why}")


# ---------------------------------------------------------------------- plugins


def fsdp_plugin(no_split_modules: list[str], config: TrainingConfig, sharded_state_dict: bool = False):
    """FSDP2: every decoder layer its own shard group, resharded after forward; full state dict on save."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,  # full shard (ZeRO-3 like)
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=no_split_modules,
        state_dict_type="SHARDED_STATE_DICT" if sharded_state_dict else "FULL_STATE_DICT",
        activation_checkpointing=False,  # the trainers enable transformers' own checkpointing when asked
        cpu_ram_efficient_loading=False,
    )


def load_deepspeed_config(preset_or_path: str) -> dict[str, Any]:
    """A preset name (zero1, zero2, zero3, zero2_offload, zero3_offload) or a JSON file -> dict."""
    path = Path(preset_or_path)
    if not path.is_file():
        if preset_or_path not in DEEPSPEED_PRESETS:
            raise AiftError(
                f"deepspeed: {preset_or_path!r} is neither a JSON file nor a preset ({', '.join(DEEPSPEED_PRESETS)})"
            )
        path = PRESET_DIR / f"{preset_or_path}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AiftError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise AiftError(f"{path}: a DeepSpeed config needs a 'zero_optimization' section")
    return data


def resolve_deepspeed_config(preset_or_path: str, config: TrainingConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled from aift's config (batch, accumulation, clipping, precision).

    A value set in the file that contradicts aift's config (e.g. another micro-batch size) is an error
    instead of a silent surprise. ``bf16``/``fp16`` "auto" become disabled: aift's loop autocasts to bf16
    itself, so DeepSpeed keeps fp32 master weights; enable them in your JSON to hold bf16 weights instead.
    """
    ds = load_deepspeed_config(preset_or_path)
    wanted = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.batch_size * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise AiftError(f'deepspeed config sets {key}={ds[key]} but aift\'s config gives {value}: set it to "auto"')
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {"enabled": "auto"})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = False
    return ds


def deepspeed_plugin(ds_config: dict[str, Any]):
    """Accelerate's DeepSpeedPlugin from a resolved config dict (validated by Accelerate and DeepSpeed's parser)."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds_config)
