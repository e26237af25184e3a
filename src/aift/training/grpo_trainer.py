r"""`GRPOTrainer`: GRPO with verifiable rewards on the one loop, LoRA / QLoRA or full, beside PreferenceTrainer.

```python
from aift import GRPOConfig, GRPOTrainer, JapaneseModel, LoRAConfig, TrainingConfig
trainer = GRPOTrainer(
    JapaneseModel(), GRPOConfig(rewards=["exact_match", r"format:^\d+$"], reward_weights=[1, 0.2]),
    LoRAConfig(r=16), TrainingConfig(batch_size=16, max_steps=20), train_dataset="datasets/tasks",
)
model = trainer.train()
```

The data is what `aift prepare --task sft` writes: its ``prompt`` column (in the model's prompt format) is what
the model answers, its ``reference`` column what ``exact_match`` compares with. ``batch_size`` counts completions
per process (TRL's ``per_device_train_batch_size``) and must be a multiple of ``num_generations``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.data import DatasetError
from aift.data.formats import default_system, resolve_format
from aift.data.prepared import read_prepared
from aift.errors import AiftError
from aift.training.batching import Examples
from aift.training.grpo_config import GRPOConfig
from aift.training.methods import get_method
from aift.training.objectives.grpo import is_conversational, prompt_rows
from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer, ModelArg


class GRPOTrainer(LoRAFinetuningTrainer):
    """GRPO with the shape of PreferenceTrainer; without ``lora_config``, a full fine-tune.

    Args:
        model: A JapaneseModel (loaded or not) or a model name / folder (often an SFT result).
        grpo_config: Rewards, sampling and loss options; defaults are TRL 1.16's GRPOConfig's.
        lora_config: Adapter settings; None trains every weight.
        training_config: Training settings; ``batch_size`` counts completions per process.
        train_dataset: A folder written by `aift prepare --task sft`, a Dataset/DatasetDict, or a list of dicts,
            with a ``prompt`` column (the rendered prompt) and a ``reference`` column for ``exact_match``.
        eval_dataset: The same kinds; a prepared folder's test split is used when none is given.
        merge: As for LoRAFinetuningTrainer.
    """

    def __init__(
        self,
        model: ModelArg,
        grpo_config: GRPOConfig | None = None,
        lora_config: LoRAConfig | None = None,
        training_config: TrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        merge: bool = False,
    ):
        super().__init__(model, lora_config, training_config, train_dataset, eval_dataset, merge)
        self.grpo_config = grpo_config or GRPOConfig()
        if lora_config is None:
            self.lora_config, self.method = None, "full"

    def train(self, train_texts=None, eval_texts=None, resume_from_checkpoint=None, merge: bool | None = None):
        """Trains on the trainer's datasets (or config.dataset_path); returns the model (merged with merge)."""
        if train_texts is not None or eval_texts is not None:
            raise AiftError("GRPO trains on prompts, not texts: pass train_dataset= (see `aift prepare --task sft`)")
        check_grpo_strategy(self.config)
        check_batch_size(self.config.batch_size, self.grpo_config.num_generations)
        self.config.packing = False  # a prompt and its completions are one padded row each, never packed

        def objective(tokenizer):
            return get_method("grpo").build(
                self.grpo_config, pad_token_id=tokenizer.pad_token_id, is_peft=self.lora_config is not None,
                tokenizer=tokenizer, output_dir=self.config.output_dir,
            )  # fmt: skip

        return self._train_objective(objective, resume_from_checkpoint, merge)

    def _examples(self, train_texts, eval_texts, tokenizer) -> tuple[Examples, Examples | None]:
        source = self.train_dataset if self.train_dataset is not None else self.config.dataset_path
        if source is None:
            raise DatasetError("no training data: pass train_dataset= or set dataset_path")
        train_split, test_split, fmt = _splits(source)
        if self.eval_dataset is not None:
            test_split = _splits(self.eval_dataset, split="test")[0]
        render = self._render_format(tokenizer, fmt, train_split, test_split)
        if render is not None:
            fmt = render.name
        system = default_system(self.model.model_name)
        train = Examples(rows=prompt_rows(train_split, tokenizer, render, system), name="training", prompt_format=fmt)
        evaluation = None
        if test_split is not None and len(test_split):
            rows = prompt_rows(test_split, tokenizer, render, system)
            evaluation = Examples(rows=rows, name="evaluation", prompt_format=fmt)
        return train, evaluation

    def _render_format(self, tokenizer, fmt: str | None, *splits):
        """The prompt format that renders message-list prompts (conversational data), None for text prompts."""
        firsts = [next(iter(split), None) for split in splits if split is not None]
        if not any(row is not None and is_conversational(row.get("prompt")) for row in firsts):
            return None
        return resolve_format(self.model.model_name, tokenizer, fmt or "auto")

    def _prepare_model(self) -> torch.nn.Module:
        model = FullFinetuningTrainer._prepare_model(self) if self.lora_config is None else super()._prepare_model()
        if self.grpo_config.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        return model


def _splits(source, split: str = "train"):
    """(the ``split`` rows, the test rows or None, the prompt format) of a prepared folder, a Dataset(Dict) or rows."""
    fmt = None
    if isinstance(source, (str, Path)):
        source, meta = read_prepared(source)
        fmt = meta.get("prompt_format") or meta.get("format")
    if isinstance(getattr(source, "column_names", None), dict):  # a DatasetDict
        if split not in source:
            raise DatasetError(f"the dataset has no {split!r} split (splits: {', '.join(source.keys())})")
        return source[split], source["test"] if split == "train" and "test" in source else None, fmt
    return source, None, fmt


def check_batch_size(batch_size: int, num_generations: int) -> None:
    """``batch_size`` counts completions per process: whole groups of ``num_generations`` only."""
    if batch_size % num_generations:
        raise AiftError(
            f"--batch-size {batch_size} counts completions per process and must be a multiple of --num-generations "
            f"{num_generations} (each prompt's completions stay in one micro-batch), e.g. {num_generations * max(1, batch_size // num_generations)}"
        )


def check_grpo_strategy(config: TrainingConfig) -> None:
    """GRPO runs on one process or DDP: each process generates with the whole model."""
    if config.strategy != "ddp" or config.deepspeed:
        strategy = "deepspeed" if config.deepspeed else config.strategy
        raise AiftError(
            f"--method grpo runs on one process or DDP; strategy {strategy} cannot serve it (each process samples "
            "completions with the whole model, which pipeline stages, FSDP and DeepSpeed ZeRO-3 split over processes)"
        )
