"""`PreferenceTrainer`: DPO / ORPO / SimPO / KTO after SFT, on the one loop, full or LoRA / QLoRA.

```python
from aift import JapaneseModel, LoRAConfig, PreferenceConfig, PreferenceTrainer, TrainingConfig
trainer = PreferenceTrainer(
    JapaneseModel(), PreferenceConfig(method="dpo", beta=0.1), LoRAConfig(r=16),
    TrainingConfig(learning_rate=5e-6), train_dataset="datasets/preference_pairs",
)
model = trainer.train()
```

With LoRA the reference is the base with the adapter disabled (no second copy); a full fine-tune computes
the reference log-probs once, before training, from the model as loaded.
"""

from __future__ import annotations

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.errors import AiftError
from aift.training.batching import Examples
from aift.training.methods import get_method
from aift.training.objectives.pairs import PreferenceConfig
from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer, ModelArg


class PreferenceTrainer(LoRAFinetuningTrainer):
    """Preference tuning with the shape of LoRAFinetuningTrainer; without ``lora_config``, a full fine-tune.

    Args:
        model: A JapaneseModel (loaded or not) or a model name / folder (usually an SFT result).
        preference_config: Method and its options; defaults to DPO with TRL's defaults.
        lora_config: Adapter settings; None trains every weight.
        training_config: Training settings; defaults to TrainingConfig().
        train_dataset: A folder written by `aift prepare --task preference`, or a Dataset/DatasetDict/list of
            rows with chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels (KTO: input_ids /
            labels / label).
        eval_dataset: The same kinds; a prepared folder's test split is used when none is given.
        merge: As for LoRAFinetuningTrainer.
    """

    rows_per_example = 2  # chosen and rejected go through the model together

    def __init__(
        self,
        model: ModelArg,
        preference_config: PreferenceConfig | None = None,
        lora_config: LoRAConfig | None = None,
        training_config: TrainingConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        merge: bool = False,
    ):
        super().__init__(model, lora_config, training_config, train_dataset, eval_dataset, merge)
        self.preference_config = preference_config or PreferenceConfig()
        if lora_config is None:
            self.lora_config, self.method = None, "full"

    def train(self, train_texts=None, eval_texts=None, resume_from_checkpoint=None, merge: bool | None = None):
        """Trains on the trainer's datasets (or config.dataset_path); returns the model (merged with merge)."""
        if train_texts is not None or eval_texts is not None:
            raise AiftError(
                "preference training takes pairs, not texts: pass train_dataset= (see `aift prepare --task preference`)"
            )
        self.config.packing = False  # pairs are padded per micro-batch, never packed (config.yaml says so)

        def objective(tokenizer):
            return get_method(self.preference_config.method).build(
                self.preference_config,
                pad_token_id=tokenizer.pad_token_id,
                is_peft=self.lora_config is not None,
                loss_chunk_size=self.config.loss_chunk_size,  # fused log-probs: no full-vocabulary logits
                tokenizer=tokenizer,
            )

        return self._train_objective(objective, resume_from_checkpoint, merge)

    def _examples(self, train_texts, eval_texts, tokenizer) -> tuple[Examples, Examples | None]:
        from aift.data import DatasetError
        from aift.data.preference import load_preference_rows
        from aift.training.trainers import _has_test_split

        config, method = self.config, self.preference_config.method
        train_source = self.train_dataset if self.train_dataset is not None else config.dataset_path
        if train_source is None:
            raise DatasetError("no training data: pass train_dataset= or set dataset_path")
        rows, fmt = load_preference_rows(train_source, "training", "train", method, config.max_length)
        train = Examples(rows=rows, name="training", prompt_format=fmt)
        eval_source = self.eval_dataset
        if eval_source is None and _has_test_split(train_source):
            eval_source = train_source
        evaluation = None
        if eval_source is not None:
            rows, _ = load_preference_rows(eval_source, "evaluation", "test", method, config.max_length)
            evaluation = Examples(rows=rows, name="evaluation", prompt_format=fmt) if rows else None
        return train, evaluation

    def _prepare_model(self) -> torch.nn.Module:
        if self.lora_config is None:
            model = FullFinetuningTrainer._prepare_model(self)
        else:
            model = super()._prepare_model()
        if self.preference_config.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        return model
