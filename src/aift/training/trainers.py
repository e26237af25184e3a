"""`FullFinetuningTrainer` and `LoRAFinetuningTrainer`: prepare the model, resolve the data, run the one loop.

```python
from aift import JapaneseModel, LoRAFinetuningTrainer, LoRAConfig, TrainingConfig
trainer = LoRAFinetuningTrainer(JapaneseModel(), LoRAConfig(r=16), TrainingConfig(learning_rate=3e-4))
model = trainer.train(train_texts=texts, eval_texts=eval_texts)
```
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.data import DatasetError
from aift.data.prepared import read_prepared
from aift.errors import AiftError
from aift.inference.japanese import JapaneseModel
from aift.lora.model import add_adapters, load_lora_model
from aift.models.loading import default_dtype
from aift.models.run_folder import FINAL_DIR, MERGED_DIR
from aift.training.backends import holds_frozen_base_in_bf16
from aift.training.batching import Examples, to_examples
from aift.training.checkpointing import resolve_gradient_checkpointing, selective_layer_count
from aift.training.fused_llama import fuse_modules, restore_modules
from aift.training.loop import TrainResult, run_training
from aift.training.loss import usable_loss_chunk
from aift.training.run_files import RunInfo
from aift.training.run_guard import output_dir_lock
from aift.training.selective import enable_selective_checkpointing
from aift.training.streaming import check_config
from aift.utils.gpu import enable_activation_checkpointing, get_available_device

log = logging.getLogger(__name__)

ModelArg = JapaneseModel | str


class _Trainer:
    """What both trainers share: the model holder, the data sources, and the call into the loop."""

    method = "full"
    rows_per_example = 1  # rows one example puts through the model (a preference pair: 2)

    def __init__(self, model: ModelArg, config: TrainingConfig | None, train_dataset: Any, eval_dataset: Any):
        self.model = model if isinstance(model, JapaneseModel) else JapaneseModel(str(model))
        self.config = config or TrainingConfig()
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.result: TrainResult | None = None
        self.selective_layers = 0  # decoder layers that keep their GEMM outputs (set by prepare, when selective)
        self.accelerator_kwargs: dict[str, Any] = {}  # set by AdvancedMultiGPUTrainer (FSDP / DeepSpeed plugins)

    def train(
        self, train_texts: list[str] | None = None, eval_texts: list[str] | None = None, resume_from_checkpoint=None
    ) -> torch.nn.Module:
        """Trains on train_texts (or the trainer's train_dataset, or config.dataset_path); returns the model."""
        with output_dir_lock(self.config):
            model, tokenizer, train_examples, eval_examples, info = self.prepare(
                train_texts, eval_texts, resume_from_checkpoint
            )
            self.result = run_training(
                model,
                tokenizer,
                self.config,
                train_examples,
                eval_examples,
                info,
                accelerator_kwargs=self.accelerator_kwargs,
            )
        restore_modules(self.result.model)  # the model handed out is transformers' own again
        return self.result.model

    def prepare(self, train_texts=None, eval_texts=None, resume_from_checkpoint=None) -> tuple:
        """What every loop starts from: (model, tokenizer, train examples, eval examples, RunInfo).

        The seed is set before the model is prepared, so that adapters start from the same weights in every
        process (data-parallel ranks, pipeline stages).
        """
        from accelerate.utils import set_seed

        if resume_from_checkpoint is not None:
            self.config.resume_from_checkpoint = str(resume_from_checkpoint)
        tokenizer = self.model.load_tokenizer()
        train_examples, eval_examples = self._examples(train_texts, eval_texts, tokenizer)
        set_seed(self.config.seed)
        self.config = dataclasses.replace(self.config, gradient_checkpointing=self._gradient_checkpointing())
        self.selective_layers = self._selective_layers()
        model = self._prepare_model()
        # q/k/v and gate/up share a GEMM only over a frozen base: LoRA (QLoRA's quantized bases step aside).
        fuse_modules(model, self.config.fused_ops, self.config.fused_projections and self.method != "full")
        chunk = usable_loss_chunk(model, self.config.loss_chunk_size, self.accelerator_kwargs)
        self.config = dataclasses.replace(self.config, loss_chunk_size=chunk)  # config.yaml records what ran
        info = RunInfo(
            method=self.method,
            model_name=self.model.model_name,
            prompt_format=train_examples.prompt_format,
            lora_config=getattr(self, "lora_config", None),
        )
        return model, tokenizer, train_examples, eval_examples, info

    def _gradient_checkpointing(self) -> bool | str:
        """The run's gradient checkpointing: a bool or "selective" (``auto`` decided from the memory plan, and logged)."""
        return resolve_gradient_checkpointing(self.config, self._model_config(), **self._plan_kwargs())

    def _selective_layers(self) -> int:
        """Decoder layers that keep their GEMM outputs: those the plan fits under selective checkpointing, else 0."""
        if self.config.gradient_checkpointing != "selective":
            return 0
        config = self._model_config()
        if isinstance(config, str):
            from aift.training.memory import load_model_config

            config = load_model_config(config, self.model.trust_remote_code)
        n_layers = config.get_text_config().num_hidden_layers
        return selective_layer_count(self.config, config, n_layers=n_layers, **self._plan_kwargs())

    def _model_config(self) -> Any:
        holder = self.model
        return holder.model.config if holder.model is not None else holder.model_name

    def _plan_kwargs(self) -> dict[str, Any]:
        lora = getattr(self, "lora_config", None)
        return {
            "method": self.method,
            "device_type": self._device_type(),
            "lora_r": lora.r if lora else LoRAConfig.r,
            "lora_dropout": lora.lora_dropout if lora else 0.0,
            "lora_targets": lora.target_modules if lora else None,
            "modules_to_save": lora.modules_to_save if lora else None,
            "rows_per_example": self.rows_per_example,
            "trust_remote_code": self.model.trust_remote_code,
        }

    def _device_type(self) -> str:
        """ "cuda", "cpu", ...: where the model trains."""
        return (self.model.device or get_available_device()).split(":")[0]

    def _examples(self, train_texts, eval_texts, tokenizer) -> tuple[Examples, Examples | None]:
        config = self.config
        train_source = train_texts if train_texts is not None else self.train_dataset
        if train_source is None:
            train_source = config.dataset_path
        if train_source is None:
            raise DatasetError("no training data: pass train_texts= or train_dataset=, or set dataset_path")
        train = to_examples(train_source, tokenizer, config.max_length, "training", split="train")
        check_config(train, config)  # a streamed corpus needs max_steps: say so before the model loads
        eval_source = eval_texts if eval_texts is not None else self.eval_dataset
        if eval_source is None and _has_test_split(train_source):
            eval_source = train_source
        evaluation = None
        if eval_source is not None:
            evaluation = to_examples(eval_source, tokenizer, config.max_length, "evaluation", split="test")
        return train, evaluation

    def _prepare_model(self) -> torch.nn.Module:
        raise NotImplementedError


def _has_test_split(source: Any) -> bool:
    if isinstance(source, (str, Path)):
        data, _ = read_prepared(source)
        return "test" in data
    return isinstance(getattr(source, "column_names", None), dict) and "test" in source


def _enable_checkpointing(model: torch.nn.Module, selective_layers: int = 0) -> None:
    """Checkpointing on every decoder layer; the first ``selective_layers`` recompute only element-wise ops."""
    if selective_layers:
        enable_selective_checkpointing(model, selective_layers)
    else:
        enable_activation_checkpointing(model)
    model.config.use_cache = False


class FullFinetuningTrainer(_Trainer):
    """Trains every weight of the model; saves the full model (safetensors), tokenizer and resolved config.

    Args:
        model: A JapaneseModel (loaded or not) or a model name / folder.
        config: Training settings; defaults to TrainingConfig().
        train_dataset: A prepared dataset folder, a datasets.Dataset/DatasetDict with input_ids and labels,
            a TextDataset, or a list of strings. ``train(train_texts=...)`` takes precedence.
        eval_dataset: The same kinds; a prepared folder's test split is used when none is given.
        use_accelerate: Deprecated and ignored (a DeprecationWarning when given): the loop always runs on
            Accelerate (a single process is a plain loop, several processes are DDP).
    """

    method = "full"

    def __init__(
        self,
        model: ModelArg,
        config: TrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        use_accelerate: bool | None = None,
    ):
        super().__init__(model, config, train_dataset, eval_dataset)
        if use_accelerate is not None:
            warnings.warn(
                "FullFinetuningTrainer(use_accelerate=...) is ignored and will be removed: the loop always runs "
                "on Accelerate; drop the argument",
                DeprecationWarning,
                stacklevel=2,
            )

    def _prepare_model(self) -> torch.nn.Module:
        if self.model.load_in_4bit or self.model.load_in_8bit:
            raise AiftError(
                "full fine-tuning of a quantized model is not possible: use LoRAFinetuningTrainer with use_qlora=True"
            )
        model = self.model.load_model()
        if self.config.frozen_base_bf16:
            raise AiftError("frozen_base_bf16 applies to LoRA only: a full fine-tune has no frozen base")
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.gradient_checkpointing:
            _enable_checkpointing(model, self.selective_layers)
        return model


class LoRAFinetuningTrainer(_Trainer):
    """Trains LoRA adapters (peft) on a frozen base, optionally quantized with bitsandbytes (QLoRA).

    Args:
        model: A JapaneseModel (loaded or not) or a model name / folder.
        lora_config: Adapter settings (r, alpha, dropout, target modules, DoRA, rsLoRA, QLoRA).
        training_config: Training settings; defaults to TrainingConfig().
        train_dataset: As for FullFinetuningTrainer.
        eval_dataset: As for FullFinetuningTrainer.
        merge: After training, also write the base model with the adapter merged into ``OUTPUT/merged``
            (and return that merged model).
    """

    method = "lora"

    def __init__(
        self,
        model: ModelArg,
        lora_config: LoRAConfig | None = None,
        training_config: TrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        merge: bool = False,
    ):
        super().__init__(model, training_config, train_dataset, eval_dataset)
        self.lora_config = lora_config or LoRAConfig()
        self.merge = merge
        if self.lora_config.use_qlora:
            self.method = "qlora"

    def train(self, train_texts=None, eval_texts=None, resume_from_checkpoint=None, merge: bool | None = None):
        """Trains the adapter; with merge (here or in the constructor) returns and saves the merged model."""
        model = super().train(train_texts, eval_texts, resume_from_checkpoint)
        if not (self.merge if merge is None else merge):
            return model
        return self._save_merged()

    def _prepare_model(self) -> torch.nn.Module:
        from peft import prepare_model_for_kbit_training

        lc, config = self.lora_config, self.config
        model = self._load_base()
        if lc.use_qlora:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            if self.selective_layers:
                enable_selective_checkpointing(model, self.selective_layers)
        elif config.gradient_checkpointing:
            _enable_checkpointing(model, self.selective_layers)
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        fused = config.fused_lora and not lc.use_qlora
        frozen_bf16 = holds_frozen_base_in_bf16(config, self._device_type())
        return add_adapters(model, lc, fused=fused, frozen_base_bf16=frozen_bf16)

    def _load_base(self) -> torch.nn.Module:
        """The base model, (re)loaded quantized when QLoRA asks for it."""
        lc, holder = self.lora_config, self.model
        if lc.use_qlora:
            want_4bit, want_8bit = lc.qlora_4bit, not lc.qlora_4bit
            if (holder.load_in_4bit, holder.load_in_8bit) != (want_4bit, want_8bit):
                holder.load_in_4bit, holder.load_in_8bit, holder.model = want_4bit, want_8bit, None
        return holder.load_model()

    def _train_objective(self, build_objective, resume_from_checkpoint=None, merge: bool | None = None):
        """A method trainer's run (preference, GRPO): in the locked output dir, prepare, then the loop on the
        objective that ``build_objective(tokenizer)`` makes; the merged model with merge, else the trained one."""
        with output_dir_lock(self.config):
            model, tokenizer, train_examples, eval_examples, info = self.prepare(None, None, resume_from_checkpoint)
            self.result = run_training(
                model, tokenizer, self.config, train_examples, eval_examples, info,
                accelerator_kwargs=self.accelerator_kwargs, objective=build_objective(tokenizer),
            )  # fmt: skip
        restore_modules(self.result.model)
        if self.lora_config is not None and (self.merge if merge is None else merge):
            return self._save_merged()
        return self.result.model

    def _save_merged(self) -> torch.nn.Module:
        """Merges the saved adapter into a freshly loaded, unquantized base and saves it under OUTPUT/merged.

        The same merge as `aift merge` (tokens added in training resize the base's embeddings first).
        """
        from aift.export.merge import load_merged, save_merged

        final = self.result.output_dir / FINAL_DIR
        device = self.model.device or get_available_device()
        dtype = "fp32" if default_dtype(device) == torch.float32 else "bf16"
        merged, tokenizer, meta = load_merged(final, self.model.model_name, dtype, device)
        save_merged(merged, tokenizer, meta, final, self.result.output_dir / MERGED_DIR, dtype, overwrite=True)
        return merged

    @staticmethod
    def load_lora_model(base_model_name: str, lora_adapter_path: str | Path, device: str | None = None):
        """Loads a base model and applies a saved LoRA adapter (or a run dir's); returns (model, tokenizer)."""
        return load_lora_model(base_model_name, lora_adapter_path, device)
