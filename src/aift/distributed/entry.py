"""`train`: typed configs -> the trainer that serves them. What `aift train` and the web UI's runs call.

```python
from aift.training.configs import resolve_train_configs
from aift.distributed.entry import train
configs = resolve_train_configs("configs/smollm2-135m-instruct/lora.yaml", ["max_steps=10"])
result = train(configs.training, configs.lora, configs.preference)
```

Which trainer: a GRPO config -> GRPOTrainer; a preference config -> PreferenceTrainer; a strategy other than plain DDP, a DeepSpeed config,
an expected world size or a launcher's environment -> AdvancedMultiGPUTrainer (it sets Accelerate up for
several devices); otherwise FullFinetuningTrainer, or LoRAFinetuningTrainer with a LoRA config. It lives here,
above `aift.training`, because one of its answers is the multi-device trainer.
"""

from __future__ import annotations

import os

from aift.config import LoRAConfig, TrainingConfig
from aift.distributed.launch import under_launcher
from aift.errors import AiftError
from aift.training.grpo_config import GRPOConfig
from aift.training.objectives.pairs import PreferenceConfig


def train(
    config: TrainingConfig,
    lora: LoRAConfig | None = None,
    preference: PreferenceConfig | None = None,
    merge: bool = False,
    grpo: GRPOConfig | None = None,
):
    """Trains as the configs say and returns the TrainResult (summary, output_dir, model).

    Args:
        config: Training settings, strategy included.
        lora: LoRA / QLoRA adapter settings; None trains every weight.
        preference: DPO / ORPO / SimPO / KTO settings; None is supervised fine-tuning.
        merge: With LoRA, also save the base with the adapter merged into ``OUTPUT/merged``.
        grpo: GRPO settings (rewards, sampling, loss); None for the other methods.
    """
    from aift.inference.japanese import JapaneseModel

    holder = JapaneseModel(
        config.model_name, use_flash_attention=config.use_flash_attention, trust_remote_code=config.trust_remote_code
    )
    if grpo is not None:
        from aift.training.grpo_trainer import GRPOTrainer

        trainer = GRPOTrainer(holder, grpo, lora, config, merge=merge)
        trainer.train()
        return trainer.result
    if preference is not None:
        from aift.training.preference import PreferenceTrainer

        check_preference_strategy(config, preference)
        trainer = PreferenceTrainer(holder, preference, lora, config, merge=merge)
        trainer.train()
        return trainer.result
    if needs_device_setup(config):
        return _train_multi_device(holder, config, lora, merge)
    from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer

    if lora is None:
        trainer = FullFinetuningTrainer(holder, config)
    else:
        trainer = LoRAFinetuningTrainer(holder, lora, config, merge=merge)
    trainer.train()
    return trainer.result


def needs_device_setup(config: TrainingConfig) -> bool:
    """Whether AdvancedMultiGPUTrainer must set Accelerate up, rather than a plain one-process trainer."""
    return config.strategy != "ddp" or bool(config.deepspeed) or config.world_size > 1 or under_launcher()


def _train_multi_device(holder, config: TrainingConfig, lora: LoRAConfig | None, merge: bool):
    from aift.distributed.trainer import AdvancedMultiGPUTrainer

    trainer = AdvancedMultiGPUTrainer(holder, config, lora_config=lora)
    trainer.train()
    if merge and lora is not None and int(os.environ.get("RANK", "0")) == 0:
        trainer.inner._save_merged()
    return trainer.result


def check_preference_strategy(config: TrainingConfig, preference: PreferenceConfig) -> None:
    """Preference tuning runs on one process or DDP: its paired batches are not split over stages or shards."""
    if config.strategy != "ddp" or config.deepspeed:
        strategy = "deepspeed" if config.deepspeed else config.strategy
        raise AiftError(
            f"--method {preference.method} runs on one process or DDP; strategy {strategy} "
            "cannot serve it (the reference forward and the paired batches are not split over stages or shards)"
        )
