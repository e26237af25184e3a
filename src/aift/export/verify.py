"""Reading an export back and comparing it with its source: same tokens, same logits, same greedy answer.

Every `aift export` ends with this check, so a file that would behave differently is reported at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


def load_gguf(path: str | Path, dtype=torch.float32, rope_parameters: dict | None = None):
    """A GGUF file -> (transformers model, tokenizer), both read from the file alone.

    transformers' GGUF reader drops a llama file's rope scaling (linear metadata, llama3 rope_freqs) and
    builds default rope; `rope_parameters` (the source's, once `rope_scaling_in_file` has checked the file
    holds them) puts them back so the rest of the file can be compared.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    config = None
    if rope_parameters is not None:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.rope_parameters = dict(rope_parameters)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, config=config)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def rope_scaling_in_file(source_config, gguf_path: str | Path) -> bool | None:
    """Whether the file holds the source's rope scaling as llama.cpp reads it; None when there is none.

    llama3: the rope_freqs tensor must equal default inv_freq / llama3 inv_freq, both computed by
    transformers' own rope functions. linear: rope.scaling.type and rope.scaling.factor.
    """
    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(source_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    reader = gguf.GGUFReader(gguf_path)
    if rope_type == "llama3":
        stored = {t.name: t for t in reader.tensors}.get("rope_freqs.weight")
        if stored is None:
            return False
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](source_config, "cpu")
        expected = (_default_inv_freq(source_config) / scaled).numpy()
        return bool(np.allclose(np.asarray(stored.data), expected, rtol=1e-5, atol=0))
    if rope_type == "linear":
        field = reader.get_field("llama.rope.scaling.factor")
        kind = reader.get_field("llama.rope.scaling.type")
        return (
            field is not None
            and kind is not None
            and kind.contents() == "linear"
            and abs(float(field.contents()) - float(rope["factor"])) < 1e-6
        )
    return False


def _default_inv_freq(config) -> torch.Tensor:
    """Unscaled rope frequencies (transformers has no "default" entry in ROPE_INIT_FUNCTIONS)."""
    rope = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@torch.inference_mode()
def reference_run(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> dict:
    """What the source does on the check prompt: its token ids, logits and greedy continuation."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    greedy = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    return {
        "prompt": prompt,
        "ids": ids,
        "logits": model(ids).logits.float(),
        "continuation": model.generate(ids, **greedy)[0, ids.shape[1] :],
        "tokenizer": tokenizer,
        "greedy": greedy,
    }


@torch.inference_mode()
def compare_to_reference(reference: dict, exported, exported_tokenizer) -> dict:
    """Token ids, max |logit| difference, mean KL(source || exported) and greedy continuations."""
    ids = reference["ids"]
    exported_ids = exported_tokenizer(reference["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits = exported(ids).logits.float()
    kl = torch.nn.functional.kl_div(
        logits.log_softmax(-1), reference["logits"].log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    continuation = exported.generate(ids, **reference["greedy"])[0, ids.shape[1] :]
    return {
        "tokens_match": torch.equal(ids, exported_ids),
        "max_abs_logit_diff": (reference["logits"] - logits).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "greedy_match": torch.equal(reference["continuation"], continuation),
        "source_text": reference["tokenizer"].decode(reference["continuation"], skip_special_tokens=True),
        "exported_text": exported_tokenizer.decode(continuation, skip_special_tokens=True),
    }


def compare_models(
    source, source_tokenizer, exported, exported_tokenizer, prompt: str, max_new_tokens: int = 20
) -> dict:
    """Runs the source and the export on one prompt and compares them (see compare_to_reference)."""
    reference = reference_run(source, source_tokenizer, prompt, max_new_tokens)
    return compare_to_reference(reference, exported, exported_tokenizer)


def llama_cpp_run(
    gguf_path: str | Path,
    prompt: str,
    max_new_tokens: int = 20,
    tokenize_also: Sequence[str] = (),
    forced: Sequence[int] = (),
    n_threads: int = 2,
) -> dict:
    """What llama.cpp itself (llama-cpp-python) does with the file on `prompt`: token ids and greedy tokens.

    The prompt is tokenized as llama.cpp's own tools do (special tokens parsed, a BOS only when the file's
    tokenizer.ggml.add_bos_token asks for one); the continuation is the argmax of llama.cpp's logits, one token
    at a time, stopping after the file's EOS, so it is comparable with transformers' greedy `generate`.

    Returns:
        ids (the prompt's token ids), logits (llama.cpp's last-position logits for the prompt, float32),
        continuation (the greedy token ids), also_ids (the ids of each of `tokenize_also`, tokenized the
        same way), forced_ranks (for each token of `forced` fed after the prompt, how many tokens llama.cpp's
        logits rank above it: 0 where llama.cpp's greedy choice is that token) and metadata (the GGUF key/values).
    """
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=n_threads, verbose=False, logits_all=False)
    try:
        ids, *also_ids = (
            llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in (prompt, *tokenize_also)
        )
        llm.eval(ids)
        logits = step = _last_logits(llm)
        continuation: list[int] = []
        for _ in range(max_new_tokens):
            continuation.append(int(np.argmax(step)))
            if continuation[-1] == llm.token_eos() or len(continuation) == max_new_tokens:
                break
            llm.eval(continuation[-1:])
            step = _last_logits(llm)
        forced_ranks = []
        if forced:
            llm.reset()
            llm.eval(ids)
            for token in forced:
                step = _last_logits(llm)
                forced_ranks.append(int((step > step[token]).sum()))
                llm.eval([token])
        return {
            "ids": ids,
            "logits": logits,
            "continuation": continuation,
            "also_ids": also_ids,
            "forced_ranks": forced_ranks,
            "metadata": dict(llm.metadata),
        }
    finally:
        llm.close()


def _last_logits(llm) -> np.ndarray:
    """llama.cpp's logits after the last evaluated token (llama-cpp-python keeps them only with logits_all)."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def verify_gguf(source_dir: str | Path, gguf_path: str | Path, quant: str, prompt: str | None = None) -> dict:
    """Loads the source folder and the GGUF file, compares them, and says whether the export passes.

    Passing means: the file's tokenizer gives the same ids, the greedy 20-token continuation is identical,
    and for f32/f16/bf16 the logits agree within LOGIT_TOLERANCE. A source with rope scaling also needs
    `rope_scaling_in_file` (the scaling is then put back on the read-back model, whose reader drops it).
    """
    from aift.models.loading import load_causal_lm, load_tokenizer

    source = load_causal_lm(str(source_dir), dtype=torch.float32).eval()
    source_tokenizer = load_tokenizer(str(source_dir))
    rope_ok = rope_scaling_in_file(source.config, gguf_path)
    rope = source.config.rope_parameters if rope_ok else None
    exported, exported_tokenizer = load_gguf(gguf_path, rope_parameters=rope)
    report = compare_models(
        source, source_tokenizer, exported, exported_tokenizer, prompt or default_prompt(source_tokenizer)
    )
    logits_ok = quant not in LOGIT_TOLERANCE or report["max_abs_logit_diff"] <= LOGIT_TOLERANCE[quant]
    report["rope_scaling_in_file"] = rope_ok
    report["passed"] = bool(report["tokens_match"] and report["greedy_match"] and logits_ok and rope_ok is not False)
    report["quant"] = quant
    return report
