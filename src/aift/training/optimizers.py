"""The optimizer and learning-rate schedule of a run (``TrainingConfig.optimizer`` / ``lr_scheduler``), and NEFTune.

Every backend builds both with :func:`optimizer_and_schedule`; the loop then sees one ``torch.optim.Optimizer``
and one ``LambdaLR`` whatever was chosen, so clipping, loss scaling, checkpoints and exact resume are the same:

- ``adamw``: torch's AdamW, fused where supported (the default); ``adamw_8bit`` / ``paged_adamw_8bit``:
  bitsandbytes' 8-bit AdamW (paged: its states can spill to host memory on a GPU);
- ``muon``: torch's Muon on the hidden 2-D matrices and AdamW on embeddings, the output head and 1-D
  parameters, as Muon's authors prescribe, in one optimizer (:class:`MuonWithAdamW`). Muon's update is scaled
  to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``, Moonshot's Moonlight recipe), so one learning rate
  and one weight decay serve both;
- ``schedule_free_adamw``: Defazio et al.'s schedule-free AdamW (the ``schedulefree`` package); the loop
  evaluates and saves its averaged weights (:func:`averaged_weights`);
- ``sgd``: SGD with momentum 0.9.

No weight decay on 1-D parameters (biases, norms) for any of them. Schedules are factors of the peak
learning rate after ``step`` optimizer steps (:func:`lr_factor`), each after a linear warmup from 0.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from aift.config import TrainingConfig
from aift.errors import AiftError, NotAvailableError
from aift.training import step

log = logging.getLogger(__name__)

SGD_MOMENTUM = 0.9  # the usual momentum; SGD without it barely moves a language model
SCHEDULE_FREE = "schedule_free_adamw"
# optimizer -> (module it needs, the pip install that brings it)
NEEDS = {
    "adamw_8bit": ("bitsandbytes", "pip install 'aift[quant]'"),
    "paged_adamw_8bit": ("bitsandbytes", "pip install 'aift[quant]'"),
    SCHEDULE_FREE: ("schedulefree", "pip install 'aift[schedulefree]'"),
}


def check_available(config: TrainingConfig) -> None:
    """Raises NotAvailableError when the chosen optimizer's package is not installed (before any training)."""
    module, install = NEEDS.get(config.optimizer, (None, ""))
    if module is not None and importlib.util.find_spec(module) is None:
        raise NotAvailableError(f"optimizer {config.optimizer} needs the {module} package: {install}")


# ---------------------------------------------------------------------- optimizers


def make_optimizer(model: nn.Module, config: TrainingConfig, device_type: str) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s trainable parameters (no weight decay on 1-D tensors)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise AiftError("the model has no trainable parameters")
    check_available(config)
    params = [p for _, p in named]
    if config.optimizer == "muon":
        return _muon(model, named, config, device_type)
    groups = _decay_groups(params, config.weight_decay)
    lr = config.learning_rate
    if config.optimizer == "adamw":
        return _adamw(groups, lr, device_type)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM)
    if config.optimizer == SCHEDULE_FREE:
        import schedulefree

        return schedulefree.AdamWScheduleFree(groups, lr=lr, warmup_steps=0)  # the warmup is the loop's schedule
    import bitsandbytes as bnb

    paged = config.optimizer == "paged_adamw_8bit"
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(groups, lr=lr)


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], lr: float, device_type: str) -> torch.optim.AdamW:
    """torch's AdamW, fused where the device and dtypes have the kernel."""
    params = [p for g in groups for p in g["params"]]
    fused = device_type in ("cuda", "cpu") and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    except RuntimeError:  # fused kernels are not built for every device/dtype
        return torch.optim.AdamW(groups, lr=lr)


def _muon(model: nn.Module, named: list, config: TrainingConfig, device_type: str) -> MuonWithAdamW:
    """Muon for the hidden 2-D matrices; AdamW for embeddings, the output head and everything else."""
    outside = embedding_and_head_params(model)
    hidden = [p for _, p in named if p.ndim == 2 and id(p) not in outside]
    rest = [p for _, p in named if p.ndim != 2 or id(p) in outside]
    if not hidden:
        raise AiftError("optimizer muon: no hidden 2-D matrix is trained (only embeddings, head or 1-D parameters)")
    return MuonWithAdamW(hidden, _decay_groups(rest, config.weight_decay), config, device_type)


def embedding_and_head_params(model: nn.Module) -> set[int]:
    """ids of the parameters of nn.Embedding modules and of the output head (the model's output embeddings, or
    a module named lm_head, such as peft's modules_to_save copy of it)."""
    heads = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
    ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or module in heads or "lm_head" in name.split("."):
            ids.update(id(p) for p in module.parameters())
    return ids


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon and AdamW as one optimizer: one ``param_groups`` list (the schedule sets every group's
    learning rate), one ``step``, one state dict (``{"muon": ..., "adamw": ...}``)."""

    def __init__(self, hidden: list, adamw_groups: list[dict], config: TrainingConfig, device_type: str):
        lr = config.learning_rate
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = _adamw(adamw_groups, lr, device_type) if adamw_groups else None
        super().__init__(self._inner_groups(), {})  # the inner optimizers' own group dicts, shared

    def _inner_groups(self) -> list[dict]:
        return self.muon.param_groups + (self.adamw.param_groups if self.adamw else [])

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.muon.step(closure)
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self._inner_groups()  # loading replaced the inner group dicts


@contextlib.contextmanager
def averaged_weights(optimizer, config: TrainingConfig) -> Iterator[None]:
    """Schedule-free AdamW: the model holds its averaged weights inside (eval, checkpoint), its training point
    after. Other optimizers: nothing."""
    if config.optimizer != SCHEDULE_FREE:
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def training_mode(optimizer, config: TrainingConfig) -> None:
    """Schedule-free AdamW steps only in train mode: at the start, and after a checkpoint (saved averaged) loads."""
    if config.optimizer == SCHEDULE_FREE:
        optimizer.train()


def final_weights(optimizer, config: TrainingConfig) -> None:
    """Schedule-free AdamW: the averaged weights are the trained model (for final/ and the returned model)."""
    if config.optimizer == SCHEDULE_FREE:
        optimizer.eval()


# ---------------------------------------------------------------------- schedules


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    """warmup_steps when set, else warmup_ratio of the run's steps, rounded up (as transformers rounds it)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return math.ceil(config.warmup_ratio * total_steps)


def lr_factor(config: TrainingConfig, warmup: int, total_steps: int, done: int) -> float:
    """The peak learning rate's factor after ``done`` optimizer steps: linear warmup from 0 over ``warmup``
    steps, then the schedule over ``progress`` = (done - warmup) / (total_steps - warmup), in [0, 1]:

    - linear: 1 - progress; cosine: (1 + cos(pi * progress)) / 2;
    - cosine_with_min_lr: min_lr_ratio + (1 - min_lr_ratio) * cosine;
    - constant_with_warmup: 1;
    - wsd: 1 until the last wsd_decay_ratio of the run, then 1 - sqrt(d), d going 0 -> 1 over those steps.
    """
    name = config.lr_scheduler
    if name == "linear":
        return step.lr_factor(warmup, total_steps, done)
    if done < warmup:
        return done / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "wsd":
        decay = max(1, round(config.wsd_decay_ratio * total_steps)) if config.wsd_decay_ratio else 0
        start = max(warmup, total_steps - decay)
        return 1.0 if done < start else max(0.0, 1 - math.sqrt((done - start) / max(1, total_steps - start)))
    progress = min(1.0, (done - warmup) / max(1, total_steps - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    if name == "cosine":
        return cosine
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine  # cosine_with_min_lr


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
    """The LambdaLR of ``config.lr_scheduler`` over ``total_steps`` (its state is the step count: exact resume)."""
    factor = functools.partial(lr_factor, config, warmup_steps(config, total_steps), total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """The learning rate climbs linearly over warmup_steps, then falls linearly to 0 at total_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(step.lr_factor, warmup_steps, total_steps))


def optimizer_and_schedule(module: nn.Module, config: TrainingConfig, device_type: str, total_steps: int):
    """The configured optimizer over ``module``'s trainable parameters and its schedule over the run."""
    optimizer = make_optimizer(module, config, device_type)
    return optimizer, make_schedule(optimizer, config, total_steps)


# ---------------------------------------------------------------------- NEFTune


@contextlib.contextmanager
def neftune(model: nn.Module, alpha: float) -> Iterator[None]:
    """NEFTune (Jain et al. 2023, as TRL and transformers do it): a forward hook on the input embeddings adds
    uniform noise in [-m, m], m = alpha / sqrt(sequence length x hidden size), in training mode only. The
    noise draws from the micro-batch's RNG (:func:`aift.training.step.micro_batch_rng`): resumes stay exact."""
    if not alpha:
        yield
        return
    handle = model.get_input_embeddings().register_forward_hook(functools.partial(_add_noise, alpha))
    try:
        yield
    finally:
        handle.remove()


def _add_noise(alpha: float, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    if not module.training:
        return output
    magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
    return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
