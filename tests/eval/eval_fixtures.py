"""Builders of the files other parts write, in the contract schemas (docs/CONTRACTS.md), for eval and report tests.

Shared by tests/eval/ (through conftest.py) and tests/cli/test_eval_cli.py (imported by path).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

QA = [
    ("日本の首都はどこですか？", "東京です。"),
    ("富士山の高さは？", "3776メートルです。"),
    ("What is two plus two?", "Four."),
    ("一年は何か月ですか？", "12か月です。"),
    ("Name a colour.", "Blue."),
    ("猫は何と鳴きますか？", "ニャーと鳴きます。"),
]


def render_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def prepared_rows(tokenizer, pairs) -> list[dict]:
    """Rows as `aift prepare` writes them: prompt tokens masked with -100, answer + end-of-turn trained."""
    rows = []
    for question, answer in pairs:
        prompt = render_prompt(question)
        text = f"{prompt}{answer}<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": labels,
                "text": text,
                "prompt": prompt,
                "reference": answer,
            }
        )
    return rows


def write_prepared(path: Path, tokenizer, train_pairs, test_pairs) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {
            "train": Dataset.from_list(prepared_rows(tokenizer, train_pairs)),
            "test": Dataset.from_list(prepared_rows(tokenizer, test_pairs)),
        }
    ).save_to_disk(str(path))
    meta = {
        "source": "fixture",
        "format": "chatml",
        "prompt_format": "chatml",
        "model": "smollm2-135m-instruct",
        "tokenizer": "smollm2-135m-instruct",
        "max_length": 128,
        "counts": {"train": len(train_pairs), "test": len(test_pairs)},
    }
    (path / "prepare.json").write_text(json.dumps(meta), encoding="utf-8")
    return path


def write_run(
    run: Path,
    *,
    steps: int = 10,
    method: str = "lora",
    model: str = "smollm2-135m-instruct",
    start_loss: float = 3.0,
    complete: bool = True,
    truncate_last_line: bool = False,
    system_metrics: bool = True,
    eval_json: dict | None = None,
) -> Path:
    """A training output dir as the trainer writes it (metrics.jsonl, train_summary.json, final/aift_meta.json)."""
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        loss = start_loss * 0.8 ** (step - 1)
        lines.append(
            {
                "type": "train",
                "step": step,
                "epoch": step / steps,
                "loss": loss,
                "lr": 2e-4 * (1 - step / (steps + 1)),
                "grad_norm": 1.0 / step,
                "tokens_per_s": 400.0 + step,
                "tokens": 512 * step,
                "peak_mem_gb": 2.0 + 0.01 * step,
                "time": 1.5 * step,
            }
        )
        if step % 5 == 0:
            lines.append(
                {
                    "type": "eval",
                    "step": step,
                    "eval_loss": loss * 1.1,
                    "eval_ppl": 2.718 ** (loss * 1.1),
                    "time": 1.5 * step + 0.3,
                }
            )
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if truncate_last_line:
        text = text[: len(text) - 25]  # a crash in the middle of writing the last line
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    (run / "final").mkdir(exist_ok=True)
    meta = {
        "base_model": model,
        "method": method,
        "prompt_format": "chatml",
        "max_length": 128,
        "aift_version": "0.1.0",
    }
    (run / "final" / "aift_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    if complete:
        summary = {
            "completed": True,
            "model": model,
            "method": method,
            "steps": steps,
            "epochs": 1,
            "tokens": 512 * steps,
            "train_tokens_per_s": 405.0,
            "final_train_loss": lines[-2]["loss"] if lines[-1]["type"] == "eval" else lines[-1]["loss"],
            "final_eval_loss": start_loss * 0.8 ** (steps - 1) * 1.1,
            "initial_eval_loss": start_loss * 1.1,
            "peak_mem_gb": 2.0 + 0.01 * steps,
            "wall_time_s": 1.5 * steps + 1,
            "output_dir": str(run),
            "prompt_format": "chatml",
        }
        (run / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if system_metrics:
        samples = [
            {
                "timestamp": 1_700_000_000.0 + t,
                "time": float(t),
                "cpu_percent": 50.0 + t,
                "rss_gb": 1.0 + 0.1 * t,
                "mem_used_gb": 8.0,
                "gpu_util_percent": [],
                "gpu_mem_gb": [],
            }
            for t in range(8)
        ]
        (run / "system_metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    if eval_json is not None:
        (run / "eval.json").write_text(json.dumps(eval_json), encoding="utf-8")
    return run


BENCH_RESULT = {
    "aift": {"tokens_per_s": 520.0, "peak_mem_gb": 3.1, "eval_loss": 1.91},
    "trl": {"tokens_per_s": 86.0, "peak_mem_gb": 6.3, "eval_loss": 1.93},
    "speedup": 6.05,
    "memory_ratio": 0.49,
    "mfu": 0.41,
    "matmul_peak_gflops": 790.0,
    "environment": {"torch": "2.13.0", "cpu": "test"},
}


def train_tiny_adapter(base_dir: Path, tokenizer, out_dir: Path, steps: int = 20) -> Path:
    """A real LoRA adapter: a few Adam steps on the QA rows, saved like the trainer's final/ folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aift.data.packing import PaddedCollator

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # lm_head in the targets: a random tiny model's final norm caps its logits, LoRA on attention alone barely moves
    # the loss; tie warnings are irrelevant here (the adapter is never merged).
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, lora)
    batch = PaddedCollator(tokenizer.pad_token_id)(prepared_rows(tokenizer, QA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "base_model": str(base_dir),
        "method": "lora",
        "prompt_format": "chatml",
        "max_length": 128,
        "aift_version": "0.1.0",
    }
    (out_dir / "aift_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return out_dir
