"""A trained run on disk and how to open it: the run folder, its final/, aift_meta.json, and the model in it.

`aift train` writes RUN/{config.yaml, metrics.jsonl, ..., final/} (their names are the constants below); final/
holds a LoRA adapter (adapter_config.json, no config.json) or a whole model, the tokenizer and aift_meta.json
(base_model, method, prompt_format, max_length). `aift merge`, `aift quantize` and `aift export` write whole-model folders with
their own aift_meta.json. Inference, eval, export and the trainers open all of them here:

    run = open_run("runs/ja-lora", device="cpu")   # a run dir, its final/, an adapter or any model folder / name
    run.model, run.tokenizer, run.meta.get("prompt_format")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.errors import AiftError
from aift.utils import system_metrics
from aift.utils.files import FileFormatError, read_json_object, write_json_atomic

# The names inside a run folder, here alone: the loop writes them, the report, the web UI, eval and export read them.
CONFIG_FILE = "config.yaml"  # the resolved configuration of the run
METRICS_FILE = "metrics.jsonl"  # one JSON object per train / eval event
COMPLETIONS_FILE = "completions.jsonl"  # GRPO: prompts, sampled completions and their rewards, every few steps
SUMMARY_FILE = "train_summary.json"  # written when the run ends (completed: true when it finished)
SYSTEM_METRICS_FILE = system_metrics.FILE_NAME  # CPU / GPU samples, when collect_metrics is on
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/checkpoint-STEP/
FINAL_DIR = "final"  # the adapter or the whole model, its tokenizer and aift_meta.json
TENSORBOARD_DIR = "tensorboard"
MERGED_DIR = "merged"  # the adapter folded into its base (the LoRA trainer's save_merged, the web UI's merge)
EVAL_FILE = "eval.json"  # `aift eval --output RUN/eval.json`, which `aift report` shows
BENCH_RESULT_FILE = "result.json"  # what `aift bench` writes into its output folder
META_FILE = "aift_meta.json"  # in final/ and in merged, quantized and exported folders


class RunFolderError(AiftError, ValueError):
    """A folder is not the run, adapter or model it was given as; the message says what is missing."""


# ---------------------------------------------------------------- aift_meta.json


def read_json(path: Path) -> dict:
    """The JSON object in `path`; RunFolderError when the file is not one."""
    try:
        return read_json_object(path)
    except FileFormatError as e:
        raise RunFolderError(str(e)) from e


def read_meta(folder: str | Path) -> dict:
    """aift_meta.json of a training output / merged / quantized folder, or {} when it has none."""
    path = Path(folder) / META_FILE
    return read_json(path) if path.is_file() else {}


def write_meta(folder: Path, meta: dict) -> None:
    """The one writer of aift_meta.json (final/, merged, quantized and exported folders): `meta` plus aift's version."""
    from aift import __version__

    write_json_atomic(folder / META_FILE, {**meta, "aift_version": __version__})


# ---------------------------------------------------------------- which folder is what


def final_dir(path: str | Path) -> Path:
    """A training output dir stands for its final/ folder; any other path is itself."""
    path = Path(path).expanduser()
    final = path / FINAL_DIR
    if path.is_dir() and final.is_dir() and not (path / "config.json").is_file():
        return final
    return path


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and no full model beside it."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder `path` names (a run dir stands for its final/); RunFolderError when it holds no adapter."""
    folder = final_dir(path)
    if not (folder / "adapter_config.json").is_file():
        raise RunFolderError(f"{path} is not a LoRA adapter folder (no adapter_config.json in {folder})")
    return folder


def base_model_of(folder: str | Path) -> str | None:
    """The base model a fine-tuned folder came from: aift_meta.json first, then adapter_config.json; else None."""
    folder = Path(folder)
    base = read_meta(folder).get("base_model")
    if not base and (folder / "adapter_config.json").is_file():
        base = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    return str(base) if base else None


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on (aift_meta.json first, then adapter_config.json)."""
    folder = adapter_folder(adapter_dir)
    base = base_model_of(folder)
    if not base:
        raise RunFolderError(f"{folder / 'adapter_config.json'} names no base model; pass the base model with it")
    return base


@dataclass(frozen=True)
class RunTarget:
    """What to load: a base model plus either a LoRA adapter or a fully fine-tuned model folder (or neither)."""

    base: str
    adapter: str | None = None
    finetuned: str | None = None

    @property
    def has_finetune(self) -> bool:
        return self.adapter is not None or self.finetuned is not None

    @property
    def folder(self) -> str | None:
        """The fine-tune's own folder (adapter or whole model), where its tokenizer and aift_meta.json are."""
        return self.adapter or self.finetuned

    @property
    def meta(self) -> dict:
        return read_meta(self.folder) if self.folder else {}


def resolve_run(model: str | Path, adapter: str | Path | None = None) -> RunTarget:
    """Works out base / adapter / full fine-tune from a model argument and an optional adapter argument.

    `model` may be a base model name or folder, a training output dir (its final/ is used), an adapter folder
    (its base is read from aift_meta.json or adapter_config.json), or a fine-tuned, merged or quantized folder
    (its base from aift_meta.json; a folder that names no base is a model of its own).
    """
    if adapter is not None:
        return RunTarget(base=str(model), adapter=str(adapter_folder(adapter)))
    folder = final_dir(model)
    if is_adapter_dir(folder):
        return RunTarget(base=adapter_base(folder), adapter=str(folder))
    base = base_model_of(folder) if (folder / "config.json").is_file() else None
    if base:
        return RunTarget(base=base, finetuned=str(folder))
    return RunTarget(base=str(folder) if folder.is_dir() else str(model))


# ---------------------------------------------------------------- opening it


def load_run_tokenizer(target: RunTarget, trust_remote_code: bool = False):
    """The fine-tune's own tokenizer when it saved one (it may have added tokens), else the base model's."""
    from aift.models.loading import ensure_pad_token, load_tokenizer

    own = target.folder
    if not (own and (Path(own) / "tokenizer_config.json").is_file()):
        return load_tokenizer(target.base, trust_remote_code=trust_remote_code)
    from transformers import AutoTokenizer

    # Straight from the folder: an adapter folder has no config.json, which load_tokenizer's resolving wants.
    return ensure_pad_token(AutoTokenizer.from_pretrained(own, trust_remote_code=trust_remote_code))


def attach_adapter(model, tokenizer, adapter_dir: str | Path, merge: bool = False):
    """A LoRA adapter put on its loaded base (peft); merged into the weights with `merge`.

    Tokens added during training (the saved tokenizer is longer) resize the base's embeddings first.
    """
    from peft import PeftModel

    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.merge_and_unload() if merge else model


def is_quantized_folder(path: str | Path) -> bool:
    """A saved bitsandbytes model: its config.json carries a quantization_config (load it with a device_map)."""
    config = Path(path) / "config.json"
    return config.is_file() and bool(read_json(config).get("quantization_config"))


def load_run_model(
    target: RunTarget,
    tokenizer,
    *,
    device: str = "cpu",
    dtype=None,
    merge: bool = False,
    trust_remote_code: bool = False,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
):
    """The target's model in eval mode: the fine-tuned folder, or the base with the adapter on it.

    merge: fold the adapter into the weights (same outputs, faster generation); never on a quantized base, whose
    weights cannot take it.
    """
    from aift.models.loading import load_causal_lm

    name = target.finetuned or target.base
    saved_quantized = is_quantized_folder(name)
    model = load_causal_lm(
        name,
        device=device,
        dtype=dtype,
        device_map={"": device} if saved_quantized else None,
        trust_remote_code=trust_remote_code,
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
    )
    if target.adapter is not None:
        model = attach_adapter(
            model, tokenizer, target.adapter, merge=merge and not (saved_quantized or load_in_4bit or load_in_8bit)
        )
    return model.eval()


@dataclass
class OpenedRun:
    """A loaded fine-tune (or plain model): the model in eval mode, its tokenizer, what it is, and its meta."""

    model: Any
    tokenizer: Any
    target: RunTarget

    @property
    def meta(self) -> dict:
        return self.target.meta


def open_run(
    path: str | Path,
    adapter: str | Path | None = None,
    *,
    device: str | None = None,
    dtype=None,
    merge: bool = False,
    trust_remote_code: bool = False,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> OpenedRun:
    """Opens a run dir, its final/, an adapter folder, a merged / quantized folder or a base model (+ `adapter`).

    Args:
        path: What to open (see resolve_run); with `adapter`, the base model to put it on.
        adapter: A LoRA adapter folder or run dir for `path`.
        device: cpu / cuda / mps; default: the best available.
        dtype: Weights' dtype; default: the device's (models.loading.default_dtype).
        merge: Fold the adapter into the weights (not on a quantized base).
        trust_remote_code: Run the model repository's own code (only for models that need it).
        load_in_8bit: Load the base with bitsandbytes 8-bit.
        load_in_4bit: Load the base with bitsandbytes 4-bit (as QLoRA trained it).
    """
    from aift.utils.gpu import get_available_device

    target = resolve_run(path, adapter)
    tokenizer = load_run_tokenizer(target, trust_remote_code)
    model = load_run_model(
        target,
        tokenizer,
        device=device or get_available_device(),
        dtype=dtype,
        merge=merge,
        trust_remote_code=trust_remote_code,
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
    )
    return OpenedRun(model, tokenizer, target)
