"""The one registry of training methods: what `aift train --method`, its option flags, the web UI and the docs read.

A method is an objective family (:mod:`aift.training.objectives`), the data task it trains on (an
``aift prepare --task``), and the dataclass of its options with the YAML mapping / ``key=value`` prefix they go
under. Adding a method is a family file plus a line here. Insertion order is the order every list shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aift.config import ConfigError
from aift.training.grpo_config import GRPOConfig
from aift.training.objectives import Objective, grpo, kto, pairs, sft


@dataclass(frozen=True)
class Method:
    """One ``--method``: ``build(method_config, *, pad_token_id, is_peft, loss_chunk_size, tokenizer, output_dir)``."""

    name: str
    summary: str  # one line, shown by `aift train --help`, the web UI and the docs
    task: str  # the `aift prepare --task` its data comes from: "sft" | "preference"
    section: str | None  # its YAML mapping and key=value prefix; None: no options of its own
    config_cls: type | None  # dataclass of its options (field metadata["help"] documents each)
    build: Callable[..., Objective]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sft", "supervised fine-tuning: cross-entropy on the answer tokens", "sft", None, None, sft.build),
        Method("dpo", "DPO on preference pairs, against the reference model", "preference", "preference",
               pairs.PreferenceConfig, pairs.build),
        Method("orpo", "ORPO on preference pairs: chosen NLL plus an odds-ratio term, no reference", "preference",
               "preference", pairs.PreferenceConfig, pairs.build),
        Method("simpo", "SimPO on preference pairs: length-normalised rewards with a margin, no reference",
               "preference", "preference", pairs.PreferenceConfig, pairs.build),
        Method("kto", "KTO on unpaired examples labelled desirable or not, against the reference model",
               "preference", "preference", pairs.PreferenceConfig, kto.build),
        Method("grpo", "GRPO: sampled completions scored by reward functions, group-relative advantages", "sft",
               "grpo", GRPOConfig, grpo.build),
    )
}  # fmt: skip


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError listing the known names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[name]


def sections() -> dict[str, type]:
    """Each options mapping (``preference``, ...) and the dataclass it holds, in registry order."""
    return {m.section: m.config_cls for m in METHODS.values() if m.section is not None}


def methods_of(section: str) -> list[str]:
    """The methods whose options go under ``section``."""
    return [m.name for m in METHODS.values() if m.section == section]
