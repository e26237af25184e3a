"""Run under torchrun with 2 processes: pipeline training (2 stages) of the tiny llama, LoRA then full, each
into its own output dir. Not a test module: tests/distributed/test_pipeline_training.py starts it.

Usage: pipeline_training_worker.py MODEL_DIR DATASET_DIR OUTPUT_ROOT
"""

import json
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
        "save_steps": 0,
        "report_to": ["none"],
        "seed": 7,
        "bf16": False,
        "fp16": False,
        "packing": True,
        **overrides,
    }
    return MultiGPUTrainingConfig(**values)


def main(model_dir: str, data: str, root: str) -> None:
    from aift.training.multi_gpu import AdvancedMultiGPUTrainer

    dist.init_process_group("gloo")  # one group for both runs (the loop leaves a group it did not make alone)
    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    runs = {
        "lora": (config(Path(root) / "lora", data, gradient_checkpointing=True, pipeline_schedule="1f1b"), lora),
        "full": (config(Path(root) / "full", data, gradient_checkpointing=False, pipeline_schedule="gpipe"), None),
    }
    for name, (cfg, lora_config) in runs.items():
        trainer = AdvancedMultiGPUTrainer(model_dir, cfg, lora_config=lora_config)
        trainer.train()
        print(json.dumps({"rank": dist.get_rank(), "run": name, "steps": trainer.result.summary["steps"]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
