"""What `aift serve` serves: a model, or several LoRA adapters on one shared base, each under its own name.

served = load_served_models("smollm2-135m-instruct", adapters={"ja": "runs/ja/final"})
with adapter_active(served[1]):  # the shared peft model now answers as "ja"
    ...
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from aift.data.formats import resolve_format, stored_format
from aift.errors import AiftError
from aift.inference.runner import LoadedModel, load_for_inference
from aift.models.run_folder import RunTarget, adapter_folder, is_adapter_dir, load_run_tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One name requests can ask for: a model, or one adapter of a shared base (adapter=None: the base itself)."""

    name: str
    loaded: LoadedModel
    adapter: str | None = None


def load_served_models(
    model: str,
    adapters: dict[str, str] | None = None,
    *,
    name: str | None = None,
    device: str | None = None,
    prompt_format: str = "auto",
    trust_remote_code: bool = False,
) -> list[ServedModel]:
    """Loads a model (base, merged, quantized or adapter folder), or a base with several LoRA adapters on it.

    With adapters the base is loaded once and each adapter is added to it with peft; the base is served too,
    under `name` (default: `model` as given), and each adapter under its key. Each answers in the prompt
    format it was trained with (its aift_meta.json), unless `prompt_format` names one.
    """
    base_name = name or model
    if not adapters:
        return [ServedModel(base_name, load_for_inference(model, None, device, prompt_format, trust_remote_code))]
    if is_adapter_dir(model):
        raise AiftError(f"{model} is an adapter folder; pass its base model as --model and it as --adapter NAME=PATH")
    if base_name in adapters:
        raise AiftError(f"adapter name {base_name!r} is also the base model's name; choose another")
    from peft import PeftModel

    folders = {adapter_name: _adapter_dir(adapter_name, path) for adapter_name, path in adapters.items()}
    base = load_for_inference(model, None, device, prompt_format, trust_remote_code)
    (first, first_dir), *rest = folders.items()
    peft_model = PeftModel.from_pretrained(base.model, first_dir, adapter_name=first)
    for adapter_name, folder in rest:
        peft_model.load_adapter(str(folder), adapter_name=adapter_name)
    peft_model.eval()
    served = [
        ServedModel(base_name, LoadedModel(peft_model, base.tokenizer, base.prompt_format, base_name, base.system))
    ]
    for adapter_name, path in folders.items():
        tokenizer = load_run_tokenizer(RunTarget(base=model, adapter=str(path)), trust_remote_code)
        if len(tokenizer) != len(base.tokenizer):
            raise AiftError(
                f"adapter {adapter_name!r} ({path}) has a different vocabulary than {model}; "
                "merge it (aift merge) and serve the merged folder on its own"
            )
        fmt = resolve_format(path if stored_format(path) else model, tokenizer, prompt_format)
        log.info("adapter %s: prompt format %s", adapter_name, fmt.name)
        loaded = LoadedModel(peft_model, tokenizer, fmt, adapter_name, base.system)
        served.append(ServedModel(adapter_name, loaded, adapter=adapter_name))
    return served


def _adapter_dir(name: str, path: str) -> Path:
    try:
        return adapter_folder(path)
    except AiftError as e:
        raise AiftError(f"adapter {name!r}: {e}") from None


@contextlib.contextmanager
def adapter_active(served: ServedModel):
    """Selects the served adapter on a shared peft model; the base answers with all adapters disabled."""
    model = served.loaded.model
    if served.adapter is not None:
        model.set_adapter(served.adapter)
        yield
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield
