"""Command-line flags built from config dataclass fields, so that each option is documented (and defaulted) once.

``aift train`` and the commands that share its options (``aift plan``, ``aift bench``, ``aift demo``) take a
flag's help from the field's ``metadata["help"]`` and, unless they say otherwise, its default from the field.
A command that deliberately starts elsewhere passes ``default=`` with ``differs_because=``; the reason and
the config's own default join the help text, so ``--help`` shows the difference and why.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

FIELD_DEFAULT = object()  # the field's own default


def config_field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def add_field_flag(
    parser: Any,
    cls: type,
    name: str,
    *,
    flag: str | None = None,
    default: Any = FIELD_DEFAULT,
    differs_because: str | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """Adds ``--flag`` (``--name`` by default) for field ``name`` of config dataclass ``cls``.

    Args:
        parser: An argparse parser or argument group.
        cls: The config dataclass (TrainingConfig, LoRAConfig, ...).
        name: The field.
        flag: The flag, when it is not the field's name (``--lora-r`` for LoRAConfig.r).
        default: FIELD_DEFAULT: the field's default, the flag typed like it; None: unset, for the library to
            resolve (``aift train``: YAML < key=value < flags); any other value: a deliberate difference.
        differs_because: Why ``default`` is not the field's; required exactly when it is not.
        kwargs: More of ``add_argument`` (type, metavar, action, choices).
    """
    field = config_field(cls, name)
    help_text = field.metadata.get("help", "")
    differs = default is not FIELD_DEFAULT and default is not None
    if differs != (differs_because is not None) or (differs and default == field.default):
        raise ValueError(f"--{name}: a default other than {cls.__name__}'s needs its reason, and only then")
    if default is FIELD_DEFAULT:
        default = field.default
    elif differs:
        help_text += f" Default here {default}, not {cls.__name__}'s {field.default}: {differs_because}"
    if default is not None and "action" not in kwargs and type(field.default) in (int, float, str):
        kwargs.setdefault("type", type(field.default))  # typed like the field; unset flags stay strings for from_dict
    help_text = help_text.replace("%", "%%")  # argparse %-formats help: a field's "20%" is text, not a format
    return parser.add_argument(flag or "--" + name.replace("_", "-"), default=default, help=help_text, **kwargs)
