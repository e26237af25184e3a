"""Loss, perplexity and generation scores of a model (optionally with a LoRA adapter) on a prepared split.

Loss is the mean cross-entropy over the split's trained tokens (labels != -100), the same masking and the
same shift as training, weighted per token over the whole split. Generation is greedy from each row's
`prompt` column (the training prompt format, rendered by `aift prepare`), scored against `reference`.

    from aift.eval.evaluate import evaluate
    result = evaluate("smollm2-135m-instruct", adapter="out/final", dataset_path="data/prepared",
                      generate=True, compare_base=True)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from aift.data import DataError
from aift.data.prepared import read_prepare_json, read_split
from aift.errors import AiftError
from aift.inference.generation import SamplingParams, eos_token_ids, generate_batch
from aift.models.run_folder import RunTarget, load_run_model, load_run_tokenizer, resolve_run
from aift.utils.files import write_json_atomic

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("input_ids", "labels")
GENERATION_COLUMNS = ("prompt", "reference")
COMPARED_METRICS = ("loss", "perplexity", "exact_match", "chrf", "rouge_l")


class EvalError(AiftError, ValueError):
    """The model, adapter or dataset given to `aift eval` cannot be used; the message says why."""


# ---------------------------------------------------------------- what to load: aift.models.run_folder


def warn_on_mismatch(target: RunTarget, dataset_path: str | Path, load_in_4bit: bool) -> None:
    """Warns when the data's prompt format is not the one the fine-tune learned, or QLoRA runs on full weights."""
    meta = target.meta
    data_format = read_prepare_json(dataset_path).get("prompt_format")
    if meta.get("prompt_format") and data_format and meta["prompt_format"] != data_format:
        log.warning(
            "the fine-tune was trained with prompt format %r but %s was prepared with %r: scores will suffer; "
            "re-run `aift prepare --format %s`",
            meta["prompt_format"],
            dataset_path,
            data_format,
            meta["prompt_format"],
        )
    if meta.get("method") == "qlora" and not load_in_4bit:
        log.warning("the adapter was trained on a 4-bit base (QLoRA); pass --load-in-4bit to evaluate it the same way")


# ---------------------------------------------------------------- the dataset


def load_split(dataset_path: str | Path, split: str = "test", max_samples: int | None = None, generate: bool = False):
    """One split of a prepared dataset (`aift prepare` output), its first `max_samples` rows."""
    path = Path(dataset_path).expanduser()
    try:
        rows, _ = read_split(path, split)
    except DataError as e:
        raise EvalError(str(e)) from None
    wanted = LOSS_COLUMNS + (GENERATION_COLUMNS if generate else ())
    missing = [c for c in wanted if c not in rows.column_names]
    if missing:
        why = " (--generate needs the prompt and reference columns)" if generate else ""
        raise EvalError(f"{path} split {split!r} lacks column(s) {', '.join(missing)}{why}")
    if len(rows) == 0:
        raise EvalError(f"{path} split {split!r} is empty")
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


# ---------------------------------------------------------------- loss


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", leave=False)


@torch.no_grad()
def compute_loss(model, rows, pad_token_id: int, batch_size: int = 4, desc: str = "loss") -> dict[str, float]:
    """Token-weighted mean cross-entropy over the trained tokens of `rows`, and its perplexity."""
    from aift.data.packing import PaddedCollator
    from aift.training.loss import shifted_cross_entropy_sum

    collate = PaddedCollator(pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with _progress(len(rows), desc) as bar:
        for start in range(0, len(rows), batch_size):
            batch = collate(list(rows.select(range(start, min(start + batch_size, len(rows))))))
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            total_loss += shifted_cross_entropy_sum(logits, batch["labels"]).item()
            total_tokens += int(batch["num_trained_tokens"])
            bar.update(batch["input_ids"].shape[0])
    if total_tokens == 0:
        raise EvalError("the split has no trained tokens (every label is -100)")
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": _perplexity(loss), "trained_tokens": total_tokens}


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# ---------------------------------------------------------------- generation


def _prompt_ids(tokenizer, prompt: str, first_input_id: int) -> list[int]:
    """The prompt's tokens, with BOS in front when the training sequence began with it."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and first_input_id == bos and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def generate_answers(model, tokenizer, rows, max_new_tokens: int = 64, batch_size: int = 8, desc: str = "generate"):
    """Greedy answers to each row's `prompt`, decoded without special tokens and stripped."""
    prompts = [_prompt_ids(tokenizer, p, ids[0]) for p, ids in zip(rows["prompt"], rows["input_ids"], strict=True)]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=eos_token_ids(model, tokenizer))
    answers: list[str] = []
    with _progress(len(prompts), desc) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            completions = generate_batch(model, chunk, params, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            # U+FFFD at the end: a multi-byte character cut by max_new_tokens, not part of the answer
            answers += [t.strip().rstrip("\ufffd") for t in texts]
            bar.update(len(chunk))
    return answers


# ---------------------------------------------------------------- one model, then base vs fine-tuned


def evaluate_loaded(
    model,
    tokenizer,
    rows,
    *,
    generate: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    label: str = "model",
) -> dict[str, Any]:
    """Loss and perplexity of a loaded model on `rows`; with `generate`, EM / chrF / ROUGE-L and a few samples."""
    from aift.eval.metrics import score_generations

    result: dict[str, Any] = {"examples": len(rows)}
    result.update(compute_loss(model, rows, tokenizer.pad_token_id, batch_size, desc=f"loss ({label})"))
    if generate:
        answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size, desc=f"generate ({label})")
        result.update(score_generations(answers, rows["reference"]))
        result["answers"] = answers
    return result


def difference(finetuned: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """Fine-tuned minus base for each metric both have (lower loss is better, higher scores are better)."""
    return {k: finetuned[k] - base[k] for k in COMPARED_METRICS if k in finetuned and k in base}


def evaluate(
    model: str,
    dataset_path: str | Path,
    *,
    adapter: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    generate: bool = False,
    compare_base: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    num_shown: int = 3,
    device: str | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> dict[str, Any]:
    """Evaluates a model (or base + adapter, or a full fine-tune) on a prepared split.

    Args:
        model: Base model name/folder, a training output dir, an adapter folder or a fine-tuned folder.
        dataset_path: A folder written by `aift prepare`.
        adapter: A LoRA adapter folder (or training output dir) to put on `model`.
        split: Which split to score.
        max_samples: Score only the first N rows.
        generate: Also generate greedy answers and score them against the `reference` column.
        compare_base: Evaluate the base model too and report fine-tuned minus base per metric.
        max_new_tokens: Generation length limit.
        batch_size: Rows per forward pass.
        num_shown: How many answers to keep side by side with their references in `samples`.
        device: cpu / cuda / mps; default: the best available.
        load_in_8bit: Load the base with bitsandbytes 8-bit.
        load_in_4bit: Load the base with bitsandbytes 4-bit (as QLoRA trained it).

    Returns:
        A JSON-ready dict: `metrics` (the fine-tuned model, or the only model), with `compare_base` also
        `base_metrics` and `delta`; `samples` (prompt, reference, answers) when generating.
    """
    from aift.utils.gpu import get_available_device

    start = time.perf_counter()
    target = resolve_run(model, adapter)
    if compare_base and not target.has_finetune:
        raise EvalError(
            "--compare-base needs a fine-tune: pass --adapter DIR, or --model pointing at a training output dir "
            "or a fine-tuned folder with aift_meta.json"
        )
    rows = load_split(dataset_path, split, max_samples, generate)
    warn_on_mismatch(target, dataset_path, load_in_4bit)
    tokenizer = load_run_tokenizer(target)
    device = device or get_available_device()
    common = {"generate": generate, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    quant = {"load_in_8bit": load_in_8bit, "load_in_4bit": load_in_4bit}
    scores = _evaluate_target(target, tokenizer, rows, device, quant, compare_base, common)
    result: dict[str, Any] = {
        "model": target.base,
        "adapter": target.adapter,
        "finetuned_model": target.finetuned,
        "dataset_path": str(dataset_path),
        "split": split,
        "examples": len(rows),
        "metrics": _without_answers(scores["finetuned"] if target.has_finetune else scores["model"]),
    }
    if compare_base:
        result["base_metrics"] = _without_answers(scores["base"])
        result["delta"] = difference(scores["finetuned"], scores["base"])
    if generate:
        result["samples"] = _samples(rows, scores, num_shown)
    result["time_s"] = time.perf_counter() - start
    return result


def _evaluate_target(target: RunTarget, tokenizer, rows, device: str, quant: dict, compare_base: bool, common):
    """Scores per label ('finetuned' and 'base', or 'model' alone); with an adapter one load serves both."""
    scores: dict[str, dict] = {}
    if target.finetuned is not None:
        model = load_run_model(target, tokenizer, device=device, **quant)
        scores["finetuned"] = evaluate_loaded(model, tokenizer, rows, label="fine-tuned", **common)
        del model
        if compare_base:
            base = load_run_model(RunTarget(base=target.base), tokenizer, device=device, **quant)
            scores["base"] = evaluate_loaded(base, tokenizer, rows, label="base", **common)
        return scores
    model = load_run_model(target, tokenizer, device=device, **quant)  # the adapter stays apart: disable_adapter
    if target.adapter is not None:
        scores["finetuned"] = evaluate_loaded(model, tokenizer, rows, label="fine-tuned", **common)
        if compare_base:
            with model.disable_adapter():
                scores["base"] = evaluate_loaded(model, tokenizer, rows, label="base", **common)
    else:
        scores["model"] = evaluate_loaded(model, tokenizer, rows, label="model", **common)
    return scores


def _without_answers(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k != "answers"}


def _samples(rows, scores: dict[str, dict], num_shown: int) -> list[dict[str, str]]:
    """The first few prompts with their reference and each model's answer, side by side."""
    samples = []
    for i in range(min(num_shown, len(rows))):
        sample = {"prompt": rows[i]["prompt"], "reference": rows[i]["reference"]}
        sample.update(
            {label: scores[label]["answers"][i] for label in ("base", "finetuned", "model") if label in scores}
        )
        samples.append(sample)
    return samples


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Writes the result atomically (temp file in the same folder, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return path
