"""Typed configuration: TrainingConfig (strategy fields included), LoRAConfig, and how config dataclasses are read.

Each option is documented once, on its field (``metadata["help"]``); YAML files and ``key=value``
overrides from the CLI go through :func:`from_dict`, which rejects unknown keys with a suggestion.
 The config of each training method (``PreferenceConfig`` for dpo..kto) lives with its objective in
:mod:`aift.training.objectives`, and :func:`aift.training.configs.resolve_train_configs`, the one resolution of a
run (YAML < overrides < flags), reads the method registry there: this module is the bottom layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import types as types_module
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from aift.errors import AiftError

T = TypeVar("T")


class ConfigError(AiftError, ValueError):
    """A configuration value or key is invalid; the message names the field."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (``metadata["help"]``), read by --help, YAML comments and docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


_f = option  # the short name the fields below use


STRATEGIES = ("ddp", "model_parallel", "pipeline", "fsdp", "deepspeed")
# The optimizers and learning-rate schedules of aift.training.optimizers (built there; named here to check configs).
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "muon", "schedule_free_adamw", "sgd")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant_with_warmup", "wsd")
# Warmup when warmup_steps is unset: 3% of the run, the ratio of the Alpaca, Vicuna and QLoRA recipes. Enough
# steps for Adam's second-moment estimates to settle, and a short run still spends 97% of it at useful rates.
DEFAULT_WARMUP_RATIO = 0.03
# What `aift train` and the web UI start from, under the YAML: where the command line and the Python API differ.
FRONT_DOOR_DEFAULTS = {"gradient_checkpointing": "auto"}
CHECKPOINTING_WORDS = ("auto", "selective")  # gradient_checkpointing's values besides true and false


@dataclass
class TrainingConfig:
    """How to train: optimisation, precision, schedule, logging and checkpoints."""

    model_name: str = _f("smollm2-135m-instruct", "Model alias, local folder or Hugging Face id.")
    dataset_path: str | None = _f(None, "Folder written by `aift prepare` (DatasetDict with train/test).")
    output_dir: str = _f("./outputs", "Where checkpoints, logs and the final model go.")
    learning_rate: float = _f(2e-5, "Peak learning rate (of every parameter group, Muon's included).")
    weight_decay: float = _f(
        0.0, "Weight decay of the matrices (decoupled for AdamW, Muon, schedule-free; L2 for SGD)."
    )
    optimizer: str = _f(
        "adamw",
        "adamw (torch, fused where supported), adamw_8bit, paged_adamw_8bit (bitsandbytes), muon (Muon on hidden "
        "matrices, AdamW on embeddings, head and 1-D parameters), schedule_free_adamw (needs the schedulefree "
        "package) or sgd (momentum 0.9). See docs/optimizers.md.",
    )
    lr_scheduler: str | None = _f(
        None,
        "linear (warmup, then linear decay to 0), cosine (to 0), cosine_with_min_lr (to min_lr_ratio), "
        "constant_with_warmup, or wsd (warmup, stable, then a 1-sqrt decay to 0 over the last wsd_decay_ratio of "
        "the run). None: linear, or constant_with_warmup for schedule_free_adamw (which takes no decay).",
    )
    min_lr_ratio: float = _f(0.1, "cosine_with_min_lr: the final learning rate, as a fraction of the peak.")
    wsd_decay_ratio: float = _f(
        0.2,
        "wsd: the fraction of the run spent decaying (0.2: the last fifth, which Hagele et al. 2024 found to match cosine).",
    )
    batch_size: int = _f(4, "Micro-batch size per process (rows per forward pass).")
    gradient_accumulation_steps: int = _f(4, "Micro-batches accumulated per optimizer step.")
    num_epochs: float = _f(3, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means run num_epochs.")
    warmup_steps: int | None = _f(None, "Linear warmup steps from 0 to the peak; when set, wins over warmup_ratio.")
    warmup_ratio: float = _f(
        DEFAULT_WARMUP_RATIO,
        "Warmup as a fraction of the run's optimizer steps (rounded up), when warmup_steps is unset. 0.03: the "
        "Alpaca/QLoRA recipes' ratio; a warning says when warmup covers the whole run.",
    )
    max_grad_norm: float = _f(1.0, "Clip gradients to this global L2 norm; 0 disables clipping.")
    eval_steps: int = _f(
        100,
        "Evaluate on the test split every this many optimizer steps, and always before the first step and after "
        "the last (the loss before and after); 0: only those two.",
    )
    max_eval_samples: int = _f(
        0,
        "Evaluate on the first this many examples of the test split (every process the same ones); 0: all of it.",
    )
    save_steps: int = _f(500, "Write a checkpoint every this many optimizer steps; 0 saves only at the end.")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints (oldest deleted); None keeps all.")
    logging_steps: int = _f(10, "Log loss, lr, grad norm, tokens/s and memory every this many steps.")
    fp16: bool = _f(True, "Mixed precision; becomes bf16 where the device supports it (CPU, Ampere+).")
    bf16: bool = _f(False, "bf16 autocast (takes precedence over fp16).")
    gradient_checkpointing: bool | str = _f(
        True,
        "Recompute activations in backward to save memory (about a third more compute per step). 'selective': "
        "keep the outputs of each layer's GEMMs and attention and recompute only the element-wise ops (norms, "
        "rotary, SiLU), in as many layers as the memory plan fits, the rest fully recomputed. 'auto': off where "
        "the memory plan (`aift plan`) says the run fits the device without it, else selective where that fits "
        "a layer, else on; the decision logged. `aift train` and the web UI default to auto.",
    )
    max_length: int = _f(512, "Tokens per packed row (or the truncation length without packing).")
    packing: bool = _f(True, "Pack examples into full rows with per-example position ids (no cross-attention).")
    seed: int = _f(42, "Seed for model init, data order and dropout.")
    report_to: list[str] = _f(["tensorboard"], "Loggers besides metrics.jsonl: tensorboard, wandb, mlflow, none.")
    resume_from_checkpoint: str | None = _f(
        None,
        "Checkpoint folder, or 'latest', to continue from; verified against its manifest ('latest' falls back "
        "past a damaged checkpoint to the newest intact one).",
    )
    resume_force: bool = _f(
        False,
        "Resume although the checkpoint was written with another model, dataset, method, LoRA shape or batch "
        "geometry (the differences are listed; without this they are an error).",
    )
    overwrite_output_dir: bool = _f(
        False, "Allow writing into an output dir that holds another (finished or dead) run; never a running one."
    )
    force_unlock: bool = _f(
        False,
        "Take over the output dir's lock (.aift.lock) when it names a run on another host, which cannot be "
        "checked from here: only when that run is known to be dead. A dead run on this host is taken over anyway.",
    )
    skip_nonfinite_steps: int = _f(
        0,
        "Skip up to this many steps whose loss or gradient is NaN/inf (no update; counted in metrics and the "
        "summary; they do not count toward max_steps); 0 stops the run at the first one.",
    )
    loss_chunk_size: int = _f(
        1024,
        "Fused linear cross-entropy over this many tokens at a time, never holding the full-vocabulary "
        "logits of the batch (about a quarter less peak memory, same speed and loss); 0 uses the model's own "
        "loss. Where it cannot work (a biased or soft-capped head, an adapter on lm_head, FSDP, DeepSpeed "
        "ZeRO-3, pipeline stages) it steps aside by itself, with a log line.",
    )
    neftune_noise_alpha: float = _f(
        0.0,
        "SFT: NEFTune, uniform noise of scale alpha/sqrt(tokens x hidden) added to the input embeddings in "
        "training forwards only (5 is the paper's usual value); 0 disables.",
    )
    torch_compile: bool = _f(False, "torch.compile the model (pays ~100 s of compile on 2 CPU cores; long runs only).")
    frozen_base_bf16: bool = _f(False, "LoRA: hold the frozen base weights in bf16 while adapters stay fp32.")
    fused_lora: bool = _f(
        True,
        "LoRA (not QLoRA): add the adapter's product inside the base layer's matmul, forward and backward "
        "(same result as peft's layer, fewer passes over memory; the saved adapter is peft's).",
    )
    fused_ops: bool = _f(
        False,
        "Llama-family models: RMSNorm, SwiGLU and rotary embedding as fused forward+backward functions that "
        "keep less for backward (same loss and gradients within fp32 rounding). Off until an ablation on a "
        "quiet machine decides; other model families take their own forward (a log line says so).",
    )
    fused_projections: bool = _f(
        False,
        "LoRA on Llama-family models: q/k/v and gate/up each as one wider GEMM over the concatenated frozen "
        "base weights, the adapters' A matrices in one GEMM (the saved adapter is peft's, unchanged). Off "
        "until an ablation decides; a trained base (full fine-tuning) takes the plain path.",
    )
    segment_attention: bool = _f(
        True,
        "Packing on a CPU with SDPA: attend within each packed example only (aift_segment attention), "
        "instead of SDPA over a block-diagonal mask that computes every pair it then masks.",
    )
    collect_metrics: bool = _f(False, "Sample CPU/GPU utilisation and memory every second into system_metrics.jsonl.")
    use_flash_attention: bool = _f(True, "Use flash-attention 2 on CUDA when installed, else SDPA.")
    trust_remote_code: bool = _f(
        False, "Run code from the model's hub repository (some models need it); off unless asked."
    )
    # How to spread the work over devices and processes (AdvancedMultiGPUTrainer); one process needs none.
    strategy: str | None = _f(
        None,
        "One of ddp, model_parallel, pipeline, fsdp, deepspeed; None: deepspeed with a deepspeed config, else ddp.",
    )
    deepspeed: str | None = _f(None, "DeepSpeed JSON config (or a preset name zero1/zero2/zero3).")
    max_memory_per_gpu: dict[Any, str] | None = _f(None, 'Per-device budget for model_parallel, e.g. {0: "22GB"}.')
    pipeline_parallel_size: int = _f(
        1,
        "Pipeline stages (strategy=pipeline), one process each. The schedule's micro-batches are the "
        "gradient_accumulation_steps micro-batches of batch_size rows of each optimizer step.",
    )
    pipeline_schedule: str = _f("1f1b", "strategy=pipeline: 1f1b (less activation memory) or gpipe.")
    world_size: int = _f(
        1,
        "Processes the run expects (nnodes x nproc-per-node); written by `aift train --nproc-per-node`, checked "
        "against the processes that really started. 1 means whatever the launcher started.",
    )

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "gradient_accumulation_steps", "max_length")
        check_non_negative(self, "max_grad_norm", "eval_steps", "max_eval_samples", "save_steps", "logging_steps")
        check_non_negative(self, "skip_nonfinite_steps", "neftune_noise_alpha")
        if self.warmup_steps is not None:
            check_non_negative(self, "warmup_steps")
        self._check_schedule()
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("num_epochs must be > 0 when max_steps is not set")
        if isinstance(self.report_to, str):
            self.report_to = [s for s in self.report_to.split(",") if s]
        unknown = set(self.report_to) - {"tensorboard", "wandb", "mlflow", "none"}
        if unknown:
            raise ConfigError(f"report_to: unknown logger(s) {sorted(unknown)}; use tensorboard, wandb, mlflow or none")
        if self.strategy is None:
            self.strategy = "deepspeed" if self.deepspeed else "ddp"
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        _check_positive(self, "pipeline_parallel_size", "world_size")
        if isinstance(self.gradient_checkpointing, str):
            word = self.gradient_checkpointing.lower()
            if word not in CHECKPOINTING_WORDS:
                raise ConfigError(
                    "gradient_checkpointing must be true, false, auto or selective; "
                    f"got {self.gradient_checkpointing!r}"
                )
            self.gradient_checkpointing = word

    def _check_schedule(self) -> None:
        """The optimizer and schedule are known names; schedule-free AdamW gets (and takes only) a constant one."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr_scheduler is None:
            self.lr_scheduler = "constant_with_warmup" if self.optimizer == "schedule_free_adamw" else "linear"
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        if self.optimizer == "schedule_free_adamw" and self.lr_scheduler != "constant_with_warmup":
            raise ConfigError(
                f"optimizer schedule_free_adamw replaces the schedule's decay with its averaging: use "
                f"lr_scheduler constant_with_warmup (or leave it unset), not {self.lr_scheduler!r}"
            )
        for name in ("warmup_ratio", "min_lr_ratio", "wsd_decay_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


@dataclass
class LoRAConfig:
    """LoRA / QLoRA adapter settings (passed to peft)."""

    r: int = _f(16, "Adapter rank.")
    lora_alpha: int = _f(32, "Scaling numerator: the update is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA).")
    target_modules: list[str] | str | None = _f(
        None,
        "Modules to adapt: a comma list of names (q_proj,v_proj), or all-linear (also 'all', as LLaMA-Factory "
        "writes it) for every linear layer but the output head; None means all-linear.",
    )
    lora_dropout: float = _f(0.05, "Dropout on the adapter input.")
    modules_to_save: list[str] | None = _f(
        None,
        "Modules trained in full beside the adapters and saved with them: a comma list such as "
        "embed_tokens,lm_head, as is usual for continued pretraining (tied embeddings stay tied).",
    )
    bias: str = _f("none", "Which biases to train: none, all or lora_only.")
    task_type: str = _f("CAUSAL_LM", "peft task type.")
    use_qlora: bool = _f(False, "Load the frozen base quantized with bitsandbytes (QLoRA).")
    qlora_4bit: bool = _f(True, "With use_qlora: 4-bit NF4 with double quantization; False means 8-bit.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling lora_alpha / sqrt(r).")

    def __post_init__(self) -> None:
        _check_positive(self, "r", "lora_alpha")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be one of none, all, lora_only; got {self.bias!r}")
        if self.target_modules is not None:
            self.target_modules = _target_modules(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _module_names(self.modules_to_save, "modules_to_save")


# Names that mean "every linear layer but the output head" (peft's "all-linear"); "all" is LLaMA-Factory's.
ALL_LINEAR = ("all-linear", "all")


def _target_modules(value: str | list[str]) -> str | list[str]:
    """'all-linear' / 'all' (alone, or as a one-item list from a flag or YAML) -> peft's 'all-linear'; else names."""
    names = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"target_modules must be module names or all-linear, got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    if not any(n.lower() in ALL_LINEAR for n in names):
        return names
    if len(names) > 1:
        raise ConfigError(f"target_modules: {value!r} mixes all-linear with module names; give one or the other")
    return "all-linear"


def _module_names(value: str | list[str], name: str) -> list[str] | None:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (None when empty); ConfigError for anything but names."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{name} must be a comma list of module names, got {value!r}")
    return [n.strip() for n in names if n.strip()] or None


# Kept so that code written for the separate multi-GPU config keeps working: the strategy fields are
# TrainingConfig's own, so every front door (CLI, Python, web UI) builds one config shape.
MultiGPUTrainingConfig = TrainingConfig


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")


def field_help(cls: type) -> dict[str, str]:
    """The documentation of each field of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# Keys older configs may still hold; they never changed what a run did. key -> what to do instead.
REMOVED_KEYS = {
    "ddp": "data parallelism follows from the processes started: use `aift train --nproc-per-node N` (or torchrun)",
    "local_rank": "each process reads its rank from the launcher (LOCAL_RANK)",
    "tensor_parallel_size": "aift has no tensor parallelism: shard with strategy fsdp or deepspeed (zero3)",
}


def _unknown_key_error(cls: type, key: str) -> ConfigError:
    if key in REMOVED_KEYS:
        return ConfigError(f"{cls.__name__} key {key!r} was removed (it had no effect): {REMOVED_KEYS[key]}; delete it")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"unknown {cls.__name__} key {key!r}{hint}")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Turns strings from the CLI (and YAML scalars) into the field's declared type."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    is_union = typing.get_origin(hint) in (typing.Union, types_module.UnionType)
    args = typing.get_args(hint) if is_union else ()  # list[str]'s args are its items', not alternatives
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
        return None
    types = [a for a in args if a is not type(None)] or [hint]
    if not isinstance(value, str):
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, list):  # a YAML list: its items typed like the field's (list[float]: [1, 0.2])
            return _coerce_items(value, types, name)
        return value
    for t in types:
        origin = typing.get_origin(t) or t
        try:
            if origin is bool:
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if origin in (int, float):
                return origin(value)
            if origin is list:  # "a,b" or a YAML list "[a, 'b,c']" (items that hold commas)
                items = yaml.safe_load(value) if value.lstrip().startswith("[") else value.split(",")
                return _coerce_items([v.strip() if isinstance(v, str) else v for v in items if v != ""], [t], name)
            if origin is dict:
                return yaml.safe_load(value)
            if origin is str:
                return value
        except (ValueError, yaml.YAMLError):
            continue
    raise ConfigError(f"{name}: cannot read {value!r} as {hint}")


def _coerce_items(items: list, types: list, name: str) -> list:
    """The items of a list value as the field's item type says (``list[float]``: numbers from "1,0.2")."""
    item_type = next(
        (typing.get_args(t)[0] for t in types if typing.get_origin(t) is list and typing.get_args(t)), None
    )
    if item_type not in (int, float):
        return list(items)
    try:
        return [item_type(v) for v in items]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: expected a list of {item_type.__name__} values, got {items!r}") from e


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Builds a config dataclass from a mapping; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise _unknown_key_error(cls, key)
        kwargs[key] = _coerce(value, hints[key], key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(str(e)) from e


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parses CLI ``key=value`` items into a dict (values stay strings, typed by from_dict)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def to_yaml(*configs: Any) -> str:
    """Serialises config dataclasses (sections named after their class) to YAML."""
    return yaml.safe_dump(
        {type(c).__name__: dataclasses.asdict(c) for c in configs}, sort_keys=False, allow_unicode=True
    )
