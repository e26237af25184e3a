"""The one resolution of a training run (YAML < ``key=value`` overrides < flags), for every front door.

`aift train`, the web UI, the multi-process launcher and Python callers share :func:`resolve_train_configs`.
It lives in the training layer, not in :mod:`aift.config` (the bottom layer), because a method's options are
the dataclass its family file owns, found through the registry (:mod:`aift.training.methods`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.config import ConfigError, LoRAConfig, TrainingConfig, from_dict, load_yaml, parse_overrides
from aift.training.grpo_config import GRPOConfig
from aift.training.methods import METHODS, get_method, methods_of, sections
from aift.training.objectives.pairs import PreferenceConfig

__all__ = ["TrainConfigs", "resolve_train_configs"]


@dataclass
class TrainConfigs:
    """Everything one training run is made of, as every front door (CLI, Python, web UI) resolves it."""

    training: TrainingConfig
    lora: LoRAConfig | None = None  # None: full fine-tuning
    preference: PreferenceConfig | None = None  # DPO / ORPO / SimPO / KTO
    grpo: GRPOConfig | None = None  # GRPO; neither: supervised fine-tuning

    @property
    def method(self) -> str:
        """The registered method these configs train."""
        if self.grpo is not None:
            return "grpo"
        return self.preference.method if self.preference is not None else "sft"


def resolve_train_configs(
    config: str | Path | Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    *,
    training: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    preference: Mapping[str, Any] | None = None,
    grpo: Mapping[str, Any] | None = None,
    method_options: Mapping[str, Any] | None = None,
    method: str | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> TrainConfigs:
    """A YAML config < ``key=value`` overrides < explicit values -> typed configs (what `aift train` runs).

    Args:
        config: A YAML file, or its mapping: TrainingConfig keys at the top level, LoRAConfig keys under
            ``lora:`` (its presence means LoRA; ``lora: {use_qlora: true}`` QLoRA), ``method:`` and
            ``preference:`` (PreferenceConfig keys) for preference tuning.
        overrides: ``key=value`` items; ``lora.KEY=value``, ``preference.KEY=value`` and ``method=dpo`` too.
        training: TrainingConfig values that win over both (the CLI's flags).
        lora: LoRAConfig values that win over both; given, even empty, it turns LoRA on.
        preference: PreferenceConfig values that win over both.
        grpo: GRPOConfig values that win over both.
        method_options: values that win over both for the chosen method's options, whichever section holds
            them (the CLI's method flags: ``--beta`` is DPO's or GRPO's as ``--method`` says).
        method: a registered method (:data:`aift.training.methods.METHODS`); wins over the YAML's ``method:``.
        defaults: TrainingConfig values under everything else (the CLI's :data:`FRONT_DOOR_DEFAULTS`).

    Raises:
        ConfigError: An unknown key (with a suggestion), a bad value, or a method's options without it.
    """
    values = dict(load_yaml(config) if isinstance(config, (str, Path)) else (config or {}))
    values = {**(defaults or {}), **values}
    lora_values = _section(values, "lora", "LoRAConfig", " (or be left out for full fine-tuning)")
    options = {name: _section(values, name, cls.__name__) or {} for name, cls in sections().items()}
    yaml_method = values.pop("method", None)
    for key, value in parse_overrides(list(overrides)).items():
        prefix, _, rest = key.partition(".")
        if key == "method":
            yaml_method = value
        elif rest and prefix in options:
            options[prefix][rest] = value
        elif prefix == "lora" and rest:
            lora_values = {**(lora_values or {}), rest: value}
        else:
            values[key] = value
    values.update(training or {})
    if lora is not None:
        lora_values = {**(lora_values or {}), **lora}
    options["preference"].update(preference or {})
    options["grpo"].update(grpo or {})
    chosen = get_method(method or yaml_method or options["preference"].get("method") or "sft")
    if method_options and chosen.section is None:
        raise ConfigError(
            f"options {sorted(method_options)} need --method {_who_takes(method_options)} "
            f"(method {chosen.name} has no options)"
        )
    if method_options:
        options[chosen.section].update(method_options)
    method_config = _method_config(options, chosen.name)
    return TrainConfigs(
        training=from_dict(TrainingConfig, values),
        lora=from_dict(LoRAConfig, lora_values) if lora_values is not None else None,
        **({chosen.section: method_config} if chosen.section else {}),
    )


def _who_takes(names: Iterable[str]) -> str:
    """ "dpo|orpo|simpo|kto|grpo": the methods that have any of these options, in the registry's order."""
    names = set(names)
    return "|".join(
        m.name for m in METHODS.values() if m.config_cls and names & {f.name for f in dataclasses.fields(m.config_cls)}
    )


def _section(values: dict[str, Any], name: str, cls_name: str, hint: str = "") -> dict[str, Any] | None:
    """Pops the ``name:`` mapping of a YAML config (None when absent or empty)."""
    section = values.pop(name, None)
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"'{name}:' must be a mapping of {cls_name} keys{hint}")
    return dict(section) if section is not None else None


def _method_config(options: dict[str, dict[str, Any]], method: str | None) -> Any:
    """The chosen method's options dataclass (None for a method without options); others' options are errors."""
    method = method or options.get("preference", {}).get("method") or "sft"
    for values in options.values():
        values.pop("method", None)
    chosen = get_method(method)
    for section, values in options.items():
        if values and section != chosen.section:
            raise ConfigError(f"{section} options {sorted(values)} need --method {'|'.join(methods_of(section))}")
    if chosen.config_cls is None:
        return None
    values = options[chosen.section]
    if any(f.name == "method" for f in dataclasses.fields(chosen.config_cls)):
        values = {**values, "method": method}
    return from_dict(chosen.config_cls, values)
