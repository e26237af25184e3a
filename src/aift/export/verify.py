"""Reading an export back and comparing it with its source: same tokens, same logits, same greedy answer.

Every `aift export` ends with this check, so a file that would behave differently is reported at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is the capital of France?"
# Largest max |logit difference| accepted per storage type on the check prompt; quantized types are judged
# by the greedy continuation and the KL instead (their logits legitimately move by up to about 1).
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 0.1, "bf16": 0.5}


def default_prompt(tokenizer) -> str:
    """The check prompt: the question in the model's chat template, or a plain completion."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": DEFAULT_QUESTION}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "The capital of France is"


def load_gguf(path: str | Path, dtype=torch.float32):
    """A GGUF file -> (transformers model, tokenizer), both read from the file alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


@torch.inference_mode()
def compare_models(
    source, source_tokenizer, exported, exported_tokenizer, prompt: str, max_new_tokens: int = 20
) -> dict:
    """Token ids, max |logit| difference, mean KL(source || exported) and greedy continuations on one prompt."""
    ids = source_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    exported_ids = exported_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits_a = source(ids).logits.float()
    logits_b = exported(ids).logits.float()
    kl = torch.nn.functional.kl_div(
        logits_b.log_softmax(-1), logits_a.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    greedy = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": source_tokenizer.pad_token_id}
    out_a = source.generate(ids, **greedy)[0, ids.shape[1] :]
    out_b = exported.generate(ids, **greedy)[0, ids.shape[1] :]
    return {
        "tokens_match": torch.equal(ids, exported_ids),
        "max_abs_logit_diff": (logits_a - logits_b).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "greedy_match": torch.equal(out_a, out_b),
        "source_text": source_tokenizer.decode(out_a, skip_special_tokens=True),
        "exported_text": exported_tokenizer.decode(out_b, skip_special_tokens=True),
    }


def verify_gguf(source_dir: str | Path, gguf_path: str | Path, quant: str, prompt: str | None = None) -> dict:
    """Loads the source folder and the GGUF file, compares them, and says whether the export passes.

    Passing means: the file's tokenizer gives the same ids, the greedy 20-token continuation is identical,
    and for f32/f16/bf16 the logits agree within LOGIT_TOLERANCE.
    """
    from aift.models.loading import load_causal_lm, load_tokenizer

    source = load_causal_lm(str(source_dir), dtype=torch.float32).eval()
    source_tokenizer = load_tokenizer(str(source_dir))
    exported, exported_tokenizer = load_gguf(gguf_path)
    report = compare_models(
        source, source_tokenizer, exported, exported_tokenizer, prompt or default_prompt(source_tokenizer)
    )
    logits_ok = quant not in LOGIT_TOLERANCE or report["max_abs_logit_diff"] <= LOGIT_TOLERANCE[quant]
    report["passed"] = bool(report["tokens_match"] and report["greedy_match"] and logits_ok)
    report["quant"] = quant
    return report
