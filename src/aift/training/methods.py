"""The training methods `aift train --method` knows: one registry that the CLI, the web UI and the docs read.

Placeholder until the objectives branch lands: it follows Contract B of the session plan (Method, METHODS,
get_method) over today's objectives (:func:`aift.training.objectives.make_objective`, one
:class:`aift.config.PreferenceConfig` for the four preference methods); the real registry replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aift.config import ConfigError, PreferenceConfig


@dataclass(frozen=True)
class Method:
    name: str  # "sft", "dpo", "orpo", "simpo", "kto"
    summary: str  # one line, shown by `aift train --help`, the web UI and the docs
    task: str  # the `aift prepare --task` its data comes from: "sft" | "preference"
    section: str | None  # its YAML mapping and key=value prefix ("preference" for dpo..kto)
    config_cls: type | None  # dataclass of its options (field metadata["help"] documents each); None: none
    build: Callable[..., Any]  # build(method_config, *, pad_token_id, is_peft, loss_chunk_size, tokenizer)


def _build(method_config, *, pad_token_id: int, is_peft: bool, loss_chunk_size: int = 0, tokenizer=None):
    from aift.training.objectives import make_objective  # torch: only when a run is built

    return make_objective(method_config, pad_token_id, is_peft, loss_chunk_size)


def _preference(name: str, summary: str) -> Method:
    return Method(name, summary, "preference", "preference", PreferenceConfig, _build)


METHODS: dict[str, Method] = {
    "sft": Method("sft", "Supervised fine-tuning: next-token loss on the answers.", "sft", None, None, _build),
    "dpo": _preference("dpo", "DPO: prefer the chosen answer over the rejected one, against a frozen reference."),
    "orpo": _preference("orpo", "ORPO: the SFT loss plus an odds-ratio preference term; no reference model."),
    "simpo": _preference("simpo", "SimPO: a length-normalised reward margin with a target gap; no reference model."),
    "kto": _preference("kto", "KTO: single answers labelled desirable or not (pairs too), against a reference."),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError listing the known names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
