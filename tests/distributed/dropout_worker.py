"""Trains the dropout variants of tests/distributed/test_ddp_dropout.py: under torchrun with 2 processes x batch 2,
or alone as 1 process x batch 2 x 2 accumulation steps (both with the same threads, so the same kernels).
Not a test module: the test starts it both ways.

Usage: dropout_worker.py MODEL_DIR DROPOUT_MODEL_DIR DATASET_DIR OUTPUT_ROOT
"""

import os
import sys
from pathlib import Path

# name -> (method, packing). LoRA keeps LoRAConfig's default dropout (0.05) on the tiny llama; full trains the
# tiny llama with attention_dropout=0.1. Everything else is TrainingConfig's default (bf16 autocast, gradient
# checkpointing) but the short schedule and a learning rate that moves the weights in 6 steps.
VARIANTS = {
    "lora-padded": ("lora", False),
    "lora-packed": ("lora", True),
    "full-padded": ("full", False),
    "full-packed": ("full", True),
}
STEPS = 6


def train_variants(model_dir: str, dropout_model_dir: str, data: str, root: str, accumulation: int) -> None:
    from aift.config import LoRAConfig, TrainingConfig
    from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer

    for name, (method, packing) in VARIANTS.items():
        config = TrainingConfig(
            dataset_path=data,
            output_dir=str(Path(root) / name),
            batch_size=2,
            gradient_accumulation_steps=accumulation,
            max_steps=STEPS,
            learning_rate=1e-2 if method == "lora" else 1e-3,
            warmup_steps=1,
            max_length=64,
            packing=packing,
            logging_steps=1,
            eval_steps=0,
            save_steps=0,
            report_to=["none"],
            seed=7,
        )
        if method == "lora":
            LoRAFinetuningTrainer(model_dir, LoRAConfig(r=4, lora_alpha=8), config).train()
        else:
            FullFinetuningTrainer(dropout_model_dir, config).train()


def main(model_dir: str, dropout_model_dir: str, data: str, root: str) -> None:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")  # one group for all the runs
    train_variants(model_dir, dropout_model_dir, data, root, accumulation=2 // world)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
