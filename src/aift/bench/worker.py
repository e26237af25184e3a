"""One benchmark run in its own process: `python -m aift.bench.worker SPEC.json RESULT.json`.

SPEC says which trainer (aift, trl, or none: only the matmul peak), whether to measure the matmul peak first,
the model, the data file (``{"train": [rows], "eval": [rows]}``) and the settings. Each run starts fresh, so no
run inherits another's memory, threads or allocator state; the parent decides the allocator through LD_PRELOAD.

Under torchrun (``aift bench --nproc N``) every rank runs this module: aift's loop trains DDP over gloo/NCCL,
each rank takes its share of the cores and writes RESULT.rankR.json with its own time and memory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aift.bench import measure
from aift.bench.data import to_messages, tokenize_conversation
from aift.bench.settings import aift_settings, trl_settings
from aift.models.run_folder import METRICS_FILE
from aift.utils.files import read_jsonl, write_json_atomic
from aift.utils.gpu import peak_memory_gb

log = logging.getLogger("aift.bench")

# The bench's SFT data trains every token (labels = input ids), as SFTTrainer does on "messages" rows.
ALL_TOKENS = "every token of the conversation"

# LoRA as in the reference TRL script: r=16, alpha=32, every linear layer, no dropout (peft's default).
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}


def load_split(spec: dict, tokenizer) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """(train rows, train token ids, eval token ids), tokenized the same way for every trainer."""
    data = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))
    seq_len = spec["seq_len"]
    train = [tokenize_conversation(tokenizer, to_messages(r), seq_len) for r in data["train"]]
    evaluation = [tokenize_conversation(tokenizer, to_messages(r), seq_len) for r in data["eval"]]
    return data["train"], train, evaluation


def run_aift(spec: dict) -> dict[str, Any]:
    """aift's own trainer (aift.training), with the levers of spec["levers"]."""
    from aift.config import LoRAConfig
    from aift.inference.japanese import JapaneseModel
    from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer

    levers = spec["levers"]
    holder = JapaneseModel(spec["model"], device="cuda" if torch.cuda.is_available() else "cpu")
    _, train_ids, eval_ids = load_split(spec, holder.load_tokenizer())
    # Every rank of a multi-process run must write into the same run folder: the parent names it.
    output_dir = Path(spec.get("output_dir") or tempfile.mkdtemp(prefix="aift-bench-"))
    config = aift_config(spec, train_ids, output_dir)
    rows_per_step = config.batch_size
    dataset = [{"input_ids": ids, "labels": ids} for ids in train_ids]
    lora = None
    if spec["method"] == "full":
        trainer = FullFinetuningTrainer(holder, config, train_dataset=dataset)
    else:
        lora = LoRAConfig(**LORA, use_qlora=spec["method"] == "qlora")
        trainer = LoRAFinetuningTrainer(holder, lora, config, train_dataset=dataset)
    model = trainer.train()
    peak = peak_memory_gb()
    summary = trainer.result.summary
    metrics = output_dir / METRICS_FILE  # written by the main process only
    steps = [r for r in (read_jsonl(metrics) if metrics.is_file() else []) if r.get("type") == "train"]
    compile_s = compile_time_s(steps) if levers["torch_compile"] else 0.0
    train_time = summary["tokens"] / summary["train_tokens_per_s"] - compile_s
    return {
        "tokens": summary["tokens"],
        "train_time_s": train_time,
        "tokens_per_s": summary["tokens"] / train_time,
        "compile_time_s": compile_s,
        "steps": summary["steps"],
        "rows_per_step": rows_per_step,
        "final_train_loss": summary["final_train_loss"],
        "peak_mem_gb": peak,
        # DDP keeps the ranks' models identical: rank 0 alone evaluates, the others would only repeat it.
        "eval_loss": measure.held_out_loss(model, eval_ids, spec.get("bf16", True)) if rank() == 0 else None,
        "levers": levers,
        "optimizer": config.optimizer,
        "optimizer_state_mb": optimizer_state_mb(output_dir),
        "settings": aift_settings(config, lora, measure.allocator(), ALL_TOKENS),
    }


def optimizer_state_mb(output_dir: Path) -> float | None:
    """The optimizer state's size on disk in the run's last checkpoint (MB): what the optimizer holds beside the
    model (None when no single-file state was written, as under FSDP / DeepSpeed)."""
    from aift.models.run_folder import CHECKPOINTS_DIR
    from aift.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(output_dir / CHECKPOINTS_DIR)
    state = checkpoints[-1] / "optimizer.pt" if checkpoints else None
    return round(state.stat().st_size / 1e6, 3) if state is not None and state.is_file() else None


def aift_config(spec: dict, train_ids: list[list[int]], output_dir: Path):
    """aift's TrainingConfig for the bench's spec and levers (also what bench/profile/run.py profiles)."""
    from aift.config import TrainingConfig

    levers = spec["levers"]
    rows_per_step = spec["batch_size"]
    if levers["packing"]:
        # The same number of examples per optimizer step on average as the padded batch: as many optimizer
        # steps as TRL takes, so that the eval losses compare like with like.
        mean_len = sum(map(len, train_ids)) / len(train_ids)
        rows_per_step = max(1, round(spec["batch_size"] * mean_len / spec["seq_len"]))
    return TrainingConfig(
        model_name=spec["model"],
        output_dir=str(output_dir),
        learning_rate=spec["learning_rate"],
        optimizer=spec.get("optimizer", "adamw"),
        batch_size=rows_per_step,
        gradient_accumulation_steps=1,
        num_epochs=1,
        warmup_steps=0,  # TRL's default
        eval_steps=0,
        save_steps=0,
        save_total_limit=1,
        logging_steps=1,  # per-step times give the compile time of the first step
        bf16=levers["bf16"],
        fp16=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        max_length=spec["seq_len"],
        packing=levers["packing"],
        seed=spec["seed"],
        report_to=["none"],
        loss_chunk_size=levers["loss_chunk_size"],
        torch_compile=levers["torch_compile"],
        frozen_base_bf16=levers["frozen_base_bf16"],
        fused_lora=levers.get("fused_lora", False),
        segment_attention=levers.get("segment_attention", False),
        fused_ops=levers.get("fused_ops", False),
        fused_projections=levers.get("fused_projections", False),
    )


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_threads(local_processes: int) -> int:
    """The physical cores split between this node's processes, so that ranks do not oversubscribe them."""
    from aift.utils.allocator import physical_cores

    threads = max(1, physical_cores() // local_processes)
    torch.set_num_threads(threads)
    return threads


def result_path_of(result_path: str | Path, rank_: int, world: int) -> Path:
    """RESULT itself for one process; RESULT.rankR.json for each rank of several."""
    path = Path(result_path)
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank_}.json")


def compile_time_s(steps: list[dict]) -> float:
    """First step's time beyond a typical step's: what torch.compile cost (0 with too few steps to tell)."""
    times = [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False)]
    if len(steps) < 3:
        return 0.0
    first = steps[0]["tokens"] / steps[0]["tokens_per_s"]
    typical = sorted(times)[len(times) // 2]
    return max(0.0, first - typical)


def run_trl(spec: dict) -> dict[str, Any]:
    """TRL's SFTTrainer as a user configures it: its defaults, plus the bench's precision (bf16 where the device
    has it), the same LoRA, batch and learning rate."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows, train_ids, eval_ids = load_split(spec, tokenizer)
    dataset = Dataset.from_list([{"messages": to_messages(r)} for r in rows])
    quantization = None
    if spec["method"] == "qlora":
        from aift.models.loading import bnb_config

        quantization = bnb_config(load_in_8bit=False, load_in_4bit=True, compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, quantization_config=quantization)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1,
        max_length=spec["seq_len"],
        packing=False,
        learning_rate=spec["learning_rate"],
        bf16=spec.get("bf16", True),
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to=[],
        logging_steps=5,
        dataloader_num_workers=0,
        seed=spec["seed"],
        gradient_checkpointing=bool(spec["gradient_checkpointing"]),  # "selective" is aift's: TRL's full one
    )
    lora = None if spec["method"] == "full" else LoraConfig(**LORA, task_type="CAUSAL_LM")
    # peft rewrites the config it is given (all-linear -> the layer names): keep the one the user wrote for the table.
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=copy.deepcopy(lora))  # fmt: skip
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    output, train_time, peak = measure.timed_train(trainer)
    return {
        "tokens": tokens,
        "tokens_match_aift_tokenization": tokens == sum(map(len, train_ids)),
        "train_time_s": train_time,
        "tokens_per_s": tokens / train_time,
        "steps": output.global_step,
        "final_train_loss": output.training_loss,
        "peak_mem_gb": peak,
        "eval_loss": measure.held_out_loss(trainer.model, eval_ids, spec.get("bf16", True)),
        "settings": trl_settings(args, lora, trainer.model, measure.allocator(), _trl_trained_tokens(args)),
    }


def _trl_trained_tokens(args) -> str:
    """What SFTTrainer puts in its loss for a conversational ("messages") dataset under these args."""
    if args.assistant_only_loss:
        return "assistant turns only"
    return ALL_TOKENS


def measure_peak(spec: dict) -> dict[str, Any]:
    """The matmul peak of this machine, and the model's matmul parameter counts for the FLOPs formula."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aift.bench.peak import matmul_param_counts, matmul_peak_gflops

    config = AutoConfig.from_pretrained(spec["model"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    body, head = matmul_param_counts(model)
    # Emulated bf16 (a CPU without AVX512-BF16/AMX) runs at ~1 GFLOP/s: a smaller matrix says as much, sooner.
    bf16_size = 2048 if measure.device_has_bf16() else 512
    return {
        "bf16_gflops": matmul_peak_gflops(torch.bfloat16, size=bf16_size),
        "bf16_size": bf16_size,
        "fp32_gflops": matmul_peak_gflops(torch.float32),
        "body_params": body,
        "head_params": head,
    }


RUNNERS = {"aift": run_aift, "trl": run_trl, "none": lambda spec: {}}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec["trainer"] != "trl":  # as aift's launcher does; TRL keeps torch's default, as its users have it
        set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if torch.cuda.is_available() and world_size() > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" and the memory figures mean this rank's GPU
    torch.manual_seed(spec.get("seed", 0))
    # Measured before training, in the process (threads, allocator) that trains.
    peak = measure_peak(spec) if spec.get("measure_peak") else None
    started = time.perf_counter()
    result = RUNNERS[spec["trainer"]](spec)
    if peak is not None:
        result["peak"] = peak
    result.update(measure.process_facts(), process_wall_time_s=time.perf_counter() - started)
    result.update(rank=rank(), world_size=world_size())
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("non-finite figures: %s", ", ".join(bad))
    target = result_path_of(result_path, rank(), world_size())
    write_json_atomic(target, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
