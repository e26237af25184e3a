"""`aift bench --method dpo [--compare trl]`: aift's LoRA DPO against TRL's DPOTrainer on the same pairs.

Each trainer runs in its own process (``python -m aift.bench.preference SPEC.json RESULT.json``), so that peak
memory is its own. The pairs are a sorting task (the list sorted right is chosen, the same list with a few
neighbours swapped is rejected; ``task="larger"`` is the older one-number task); both trainers see the same pairs
in the model's chat template, one epoch, the same LoRA, batch, learning rate, beta, gradient checkpointing
(on by default: TRL's default) and precision (bf16 where the device has it in hardware, else fp32).
Reported: tokens/s (real prompt + answer tokens of chosen and rejected), peak memory (GPU max-allocated, else
the process's peak RSS) and the held-out reward accuracy (chosen reward above rejected, rewards = beta * (log
pi - log pi_ref)), measured by the same code on both trained models.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aift.bench import measure
from aift.bench.core import load_average
from aift.bench.measure import allocator
from aift.bench.process import run_worker, worker_main
from aift.bench.settings import aift_settings, settings_markdown, trl_settings
from aift.models.run_folder import BENCH_RESULT_FILE
from aift.utils.files import write_json_atomic, write_text_atomic
from aift.utils.gpu import peak_memory_gb

log = logging.getLogger("aift.bench")

# Both trainers put only the answers' tokens (chosen and rejected) in the log-probs.
ANSWER_TOKENS = "the chosen and rejected answers"
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}


@dataclass
class PreferenceBenchOptions:
    model: str = "smollm2-135m-instruct"
    examples: int = 96
    eval_examples: int = 128  # many, so that one pair is under a point of accuracy
    batch_size: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    max_length: int = 320
    compare: str | None = None
    output: str = "bench/results/dpo-vs-trl"
    seed: int = 0
    task: str = "sort"  # sort | larger
    numbers: int = 24  # numbers per list in the sort task: ~4 tokens each, so prompt and answers ~100 tokens
    gradient_checkpointing: bool = True  # the same for both trainers; on is the default of TRL and aift train
    precision: str = "auto"  # both trainers alike: bf16 where the device has it in hardware, else fp32

    def __post_init__(self) -> None:
        from aift.errors import AiftError

        if self.task not in TASKS:
            raise AiftError(f"the DPO bench's task must be one of {sorted(TASKS)}; got {self.task!r}")
        for name in ("examples", "eval_examples", "batch_size", "max_length", "numbers"):
            if getattr(self, name) <= 0:
                raise AiftError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")


def larger_number_pairs(n: int, seed: int, numbers: int = 2) -> list[dict]:
    """Which of two numbers is larger: the larger chosen, the smaller rejected (answers of ~4 tokens)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.sample(range(10, 999), 2)
        prompt = [{"role": "user", "content": f"Which number is larger, {a} or {b}? Answer with the number."}]
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": str(max(a, b))}],
                      "rejected": [{"role": "assistant", "content": str(min(a, b))}]})  # fmt: skip
    return pairs


def sorting_pairs(n: int, seed: int, numbers: int = 24) -> list[dict]:
    """Sort a list ascending: the right order chosen, the same order with 2 neighbour pairs swapped rejected.

    Prompt and answers are of similar length (~4 tokens a number), as in chat preference data, and the two
    answers differ in a few tokens only, so the reward must come from the order, not from the answer's length.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        values = rng.sample(range(10, 999), numbers)
        ordered = sorted(values)
        wrong = list(ordered)
        for i in rng.sample(range(numbers - 1), min(2, numbers - 1)):
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        prompt = [{"role": "user", "content": "Sort these numbers in ascending order: " + ", ".join(map(str, values))}]
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": ", ".join(map(str, ordered))}],
                      "rejected": [{"role": "assistant", "content": ", ".join(map(str, wrong))}]})  # fmt: skip
    return pairs


TASKS = {"sort": sorting_pairs, "larger": larger_number_pairs}


def run_bench(options: PreferenceBenchOptions) -> dict:
    """Writes the pairs, runs each trainer in a fresh process, writes result.json and results.md."""
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.json"
    pairs = TASKS[options.task](options.examples + options.eval_examples, options.seed, options.numbers)
    data.write_text(
        json.dumps({"train": pairs[: options.examples], "eval": pairs[options.examples :]}), encoding="utf-8"
    )
    runs, load_before = {}, load_average()
    precision = measure.bench_precision(options.precision)
    for trainer in ["aift", *([options.compare] if options.compare else [])]:
        spec = {**asdict(options), "trainer": trainer, "data": str(data), "bf16": precision == "bf16"}
        runs[trainer] = run_worker("aift.bench.preference", spec, out / "logs", "DPO")
    result = {
        "options": asdict(options),
        "precision": precision,
        "runs": runs,
        "load_average": {"before": load_before, "after": load_average()},
    }
    if "trl" in runs:
        a, t = runs["aift"], runs["trl"]
        result["ratios"] = {
            "tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"],
            "peak_mem": a["peak_mem_gb"] / t["peak_mem_gb"],
            "reward_accuracy_points": 100 * (a["eval_reward_accuracy"] - t["eval_reward_accuracy"]),
        }
    write_json_atomic(out / BENCH_RESULT_FILE, result, ensure_ascii=True)  # what `aift report` reads
    write_text_atomic(out / "results.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    rows = ["| trainer | tokens/s | peak memory (GB) | held-out reward accuracy | train time (s) | steps |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, r in result["runs"].items():
        rows.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['peak_mem_gb']:.2f} | {r['eval_reward_accuracy']:.3f} | "
                    f"{r['train_time_s']:.1f} | {r['steps']} |")  # fmt: skip
    ratios = result.get("ratios")
    if ratios:
        rows.append(f"\naift / TRL: {ratios['tokens_per_s']:.2f}x tokens/s, {ratios['peak_mem']:.2f}x peak memory, "
                    f"{ratios['reward_accuracy_points']:+.1f} points of held-out reward accuracy.")  # fmt: skip
    o, load = result["options"], result.get("load_average")
    setting = (f"Task {o['task']}, {o['examples']} training pairs (one epoch), {o['eval_examples']} held-out pairs, "
               f"batch {o['batch_size']}, max length {o['max_length']}, lr {o['learning_rate']}, beta {o['beta']}, "
               f"gradient checkpointing {'on' if o['gradient_checkpointing'] else 'off'} and "
               f"{result.get('precision', 'bf16')} for both.")  # fmt: skip
    if load:
        setting += f" Load average (1, 5, 15 min) before {load['before']}, after {load['after']}."
    runs = result["runs"]
    if "trl" in runs and runs["trl"].get("settings") and runs["aift"].get("settings"):
        rows += ["", "## Settings of the two runs", ""]
        rows += settings_markdown("aift", runs["aift"]["settings"], "TRL", runs["trl"]["settings"])
    return "# LoRA DPO: aift vs TRL DPOTrainer\n\n" + setting + "\n\n" + "\n".join(rows) + "\n"


def summary_line(result: dict) -> str:
    r = result["runs"]["aift"]
    line = f"aift DPO: {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_mem_gb']:.2f} GB, held-out reward accuracy {r['eval_reward_accuracy']:.3f}"
    if "ratios" in result:
        x = result["ratios"]
        line += f"; vs TRL {x['tokens_per_s']:.2f}x tokens/s, {x['peak_mem']:.2f}x memory, {x['reward_accuracy_points']:+.1f} points"
    return line


# ---------------------------------------------------------------------- the worker side


def _eval_rows(spec: dict, tokenizer) -> list[dict]:
    """Held-out pairs tokenized as aift prepares them (template format), for both trainers' models."""
    from aift.data.formats import get_format
    from aift.data.preference import encode_answer

    fmt = get_format("template")
    rows = []
    for pair in json.loads(Path(spec["data"]).read_text(encoding="utf-8"))["eval"]:
        row = {}
        for side in ("chosen", "rejected"):
            ids, labels, _ = encode_answer(fmt, tokenizer, pair["prompt"], pair[side][0]["content"], spec["max_length"])
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
        rows.append(row)
    return rows


@torch.no_grad()
def reward_accuracy(model, rows: list[dict], pad_token_id: int, batch_pairs: int = 8) -> float:
    """Share of pairs whose chosen reward beta*(log pi - log pi_ref) exceeds the rejected one (adapter off = ref)."""
    model.eval()
    right = sum(_right_pairs(model, rows[i : i + batch_pairs], pad_token_id) for i in range(0, len(rows), batch_pairs))
    return right / len(rows)


def _right_pairs(model, rows: list[dict], pad_token_id: int) -> int:
    from aift.training.objectives.logps import sequence_logps
    from aift.training.objectives.pairs import PairObjective, PreferenceConfig

    batch = PairObjective(PreferenceConfig(share_prompt=False), pad_token_id).collate(rows)
    inputs = {
        "input_ids": batch["input_ids"].to(model.device),
        "attention_mask": batch["attention_mask"].to(model.device),
    }
    labels = batch["labels"].to(model.device)
    policy, _ = sequence_logps(model(**inputs).logits, labels)
    with model.disable_adapter():
        ref, _ = sequence_logps(model(**inputs).logits, labels)
    margin = policy - ref
    n = len(rows)
    return int((margin[:n] > margin[n:]).sum())


def run_aift(spec: dict) -> dict[str, Any]:
    from aift.config import LoRAConfig, TrainingConfig
    from aift.data.prepare import prepare_preference
    from aift.inference.japanese import JapaneseModel
    from aift.training.objectives.pairs import PreferenceConfig
    from aift.training.preference import PreferenceTrainer

    holder = JapaneseModel(spec["model"])
    tokenizer = holder.load_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="aift-dpo-bench-"))
    train_file = work / "train.jsonl"
    train = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))["train"]
    train_file.write_text("".join(json.dumps(p) + "\n" for p in train), encoding="utf-8")
    data = prepare_preference(holder.model_name, source_path=train_file, output_dir=work / "data", val_ratio=0,
                              max_length=spec["max_length"], format="template")  # fmt: skip
    config = TrainingConfig(
        model_name=holder.model_name, output_dir=str(work / "run"), learning_rate=spec["learning_rate"],
        batch_size=spec["batch_size"], gradient_accumulation_steps=1, num_epochs=1, warmup_steps=0, eval_steps=0,
        save_steps=0, logging_steps=1, bf16=spec.get("bf16", True), gradient_checkpointing=spec["gradient_checkpointing"], max_length=spec["max_length"],
        seed=spec["seed"], report_to=["none"], loss_chunk_size=1024,  # fused log-probs, as the SFT bench's lever
    )  # fmt: skip
    preference, lora = PreferenceConfig(method="dpo", beta=spec["beta"]), LoRAConfig(**LORA)
    trainer = PreferenceTrainer(holder, preference, lora, config, train_dataset=str(data))
    model = trainer.train()
    peak = peak_memory_gb()
    summary = trainer.result.summary
    train_time = summary["tokens"] / summary["train_tokens_per_s"]
    return {
        "tokens": summary["tokens"],
        "train_time_s": train_time,
        "tokens_per_s": summary["train_tokens_per_s"],
        "steps": summary["steps"],
        "final_train_loss": summary["final_train_loss"],
        "peak_mem_gb": peak,
        "eval_reward_accuracy": reward_accuracy(model, _eval_rows(spec, tokenizer), tokenizer.pad_token_id),
        "settings": aift_settings(config, lora, allocator(), ANSWER_TOKENS, _aift_dpo_settings(preference)),
    }


def _aift_dpo_settings(preference) -> dict[str, Any]:
    """The DPO settings of aift's PreferenceConfig, named as for TRL."""
    return {
        "beta": preference.beta,
        "dpo loss": preference.loss_type,
        "label smoothing": preference.label_smoothing,
        "reference model": "the base with the adapter disabled"
        + (", log-probs precomputed" if preference.precompute_ref_log_probs else ""),
        "forward of a pair": "prompt once, chosen and rejected behind a 4-D mask"
        if preference.share_prompt
        else "chosen and rejected concatenated in one batch",
    }


def _trl_dpo_settings(args) -> dict[str, Any]:
    loss = args.loss_type if isinstance(args.loss_type, str) else ",".join(map(str, args.loss_type))
    return {
        "beta": args.beta,
        "dpo loss": loss,
        "label smoothing": args.label_smoothing,
        "reference model": "the base with the adapter disabled"
        + (", log-probs precomputed" if args.precompute_ref_log_probs else ""),
        "forward of a pair": "chosen and rejected concatenated in one batch",
    }


def run_trl(spec: dict) -> dict[str, Any]:
    """TRL's DPOTrainer as a user configures it: its defaults plus the bench's precision, the same LoRA, batch, lr,
    beta, length."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from aift.models.loading import resolve_model_path

    path = str(resolve_model_path(spec["model"]))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))["train"]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-bench-"), per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1, max_length=spec["max_length"], learning_rate=spec["learning_rate"], beta=spec["beta"],
        bf16=spec.get("bf16", True), use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=1,
        dataloader_num_workers=0, seed=spec["seed"], gradient_checkpointing=spec["gradient_checkpointing"],
    )  # fmt: skip
    lora = LoraConfig(**LORA, task_type="CAUSAL_LM")
    # peft rewrites the config it is given (all-linear -> the layer names): keep the one the user wrote for the table.
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tokenizer,
                         peft_config=copy.deepcopy(lora))  # fmt: skip
    data = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                 data["rejected_ids"], strict=True))  # fmt: skip
    output, train_time, peak = measure.timed_train(trainer)
    return {
        "tokens": tokens,
        "train_time_s": train_time,
        "tokens_per_s": tokens / train_time,
        "steps": output.global_step,
        "final_train_loss": output.training_loss,
        "peak_mem_gb": peak,
        "eval_reward_accuracy": reward_accuracy(trainer.model, _eval_rows(spec, tokenizer), tokenizer.pad_token_id),
        "settings": trl_settings(args, lora, trainer.model, allocator(), ANSWER_TOKENS, _trl_dpo_settings(args)),
    }


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"aift": run_aift, "trl": run_trl}))
