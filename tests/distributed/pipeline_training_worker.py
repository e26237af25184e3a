"""Run under torchrun with 2 processes: pipeline training (2 stages) of the tiny llama, LoRA then full, each
into its own output dir, and each resumed from its step-2 checkpoint into NAME-resumed. Not a test module:
tests/distributed/test_pipeline_training.py starts it.

Usage: pipeline_training_worker.py MODEL_DIR DATASET_DIR OUTPUT_ROOT
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from aift.config import LoRAConfig, MultiGPUTrainingConfig


def config(output_dir: Path, data: str, **overrides) -> MultiGPUTrainingConfig:
    """batch 4 per optimizer step as 2 micro-batches of 2 rows: the schedule's 2 micro-batches."""
    values = {
        "strategy": "pipeline",
        "pipeline_parallel_size": 2,
        "dataset_path": data,
        "output_dir": str(output_dir),
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 5,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "max_length": 64,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "save_total_limit": 5,
        "report_to": ["none"],
        "seed": 7,
        "bf16": False,
        "fp16": False,
        "packing": True,
        **overrides,
    }
    return MultiGPUTrainingConfig(**values)


def resume_copy(source: Path, target: Path) -> None:
    """The run as it was after step 2: checkpoint-2 is the latest, no final model (made by rank 0)."""
    if dist.get_rank() == 0:
        shutil.copytree(source, target)
        for name in ("checkpoints/checkpoint-4", "checkpoints/checkpoint-5", "final", "train_summary.json"):
            path = target / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    dist.barrier()


def main(model_dir: str, data: str, root: str) -> None:
    from aift.distributed.trainer import AdvancedMultiGPUTrainer

    dist.init_process_group("gloo")  # one group for all runs (the loop leaves a group it did not make alone)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    runs = {
        "lora": (dict(gradient_checkpointing=True, pipeline_schedule="1f1b"), lora),
        "full": (dict(gradient_checkpointing=False, pipeline_schedule="gpipe"), None),
    }
    for name, (overrides, lora_config) in runs.items():
        out = Path(root) / name
        AdvancedMultiGPUTrainer(model_dir, config(out, data, **overrides), lora_config=lora_config).train()
        resume_copy(out, out.with_name(f"{name}-resumed"))
        resumed = config(out.with_name(f"{name}-resumed"), data, **overrides)
        AdvancedMultiGPUTrainer(model_dir, resumed, lora_config=lora_config).train(resume_from_checkpoint="latest")
        sys.stdout.write(json.dumps({"rank": dist.get_rank(), "run": name}) + "\n")  # one write: ranks share stdout
        sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
