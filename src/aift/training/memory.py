"""The memory model of training: bytes of each parameter's state, of activations and of the logits.

Bytes per parameter, as aift trains, with ``d`` the bytes of ``dtype``: the dtype aift loads the weights in
and computes in (bf16, d = 2, on CUDA GPUs: ``default_dtype``; fp32, d = 4, on a CPU without autocast):
- full: weights and gradients in that dtype (2d); aift does not keep fp32 master weights beside bf16 ones.
- lora: the frozen base (d); adapters r * (in + out) per adapted linear layer, in fp32 with their gradients
  (8: peft keeps adapters in fp32 under a bf16 base). ``modules_to_save`` (embed_tokens, lm_head) adds a
  trainable copy of each such module in the dtype, with its gradient and optimizer state, beside the frozen
  original (peft's ModulesToSaveWrapper; a tied embedding and head share one copy).
- qlora: linear layers of the decoder blocks in 4-bit NF4 with double quantization (about 0.52),
  embeddings, norms and the output head in the dtype (d); adapters as for lora.
The optimizer state of each trained tensor of n elements in its dtype (e bytes), as the optimizers of
:mod:`aift.training.optimizers` keep it (:func:`state_bytes`): adamw two moments (2en) and its step count (an
fp32 scalar tensor); sgd its momentum (en); schedule_free_adamw z and the second moment (2en); muon a momentum
(en) for the hidden matrices and AdamW's state for embeddings, head and 1-D tensors; adamw_8bit and
paged_adamw_8bit (bitsandbytes) one byte per moment (2n) plus an fp32 absmax per block of 256 for each,
fp32 moments (8n) for tensors under 4096 elements, and two 256-entry quantization maps in all.
Activations, in the dtype, per token and decoder layer (Korthikanti et al. 2022, adapted to SwiGLU and
SDPA/flash attention, which keep no seq x seq scores): 6h + 2kv + 4i elements (h hidden, kv the key/value
width, i the MLP width). LoRA dropout (peft's path) adds, per input feature of each adapted layer, the
dropped copy (d) and its mask (1 byte on CUDA, d on a CPU). With gradient checkpointing only each layer's
input (h) is kept, plus one layer being recomputed; a selectively checkpointed layer also keeps the outputs of
its GEMMs and attention (5h + 2kv + 2i in all), so that its recompute redoes only element-wise ops. The logits cost d + 8 bytes per token and vocabulary
entry (the logits, the fp32 log-softmax cross-entropy keeps, and its fp32 gradient). With gradient
accumulation, the largest gradient is also in flight before it is added (two for a tied head). Each GPU
also loses about 0.5 GB to the CUDA context. bench/results/plan/ checks these terms against measured peaks.

The adapted layers are the run's ``target_modules`` (LoRAConfig's): module names such as ``q_proj``, or
``all-linear`` (None) for every linear layer of the decoder blocks. `aift plan` places these bytes on devices
(:mod:`aift.distributed.planning`); ``gradient_checkpointing: auto`` asks :func:`one_device_estimate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aift.config import ALL_LINEAR, OPTIMIZERS, LoRAConfig
from aift.errors import AiftError

METHODS = ("full", "lora", "qlora")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit absmax per 64 + fp32 per 256 blocks
LOSS_FP32_BYTES = 8  # per logit: the fp32 log-softmax cross-entropy saves, and its fp32 gradient
DTYPE_BYTES = {"bf16": 2, "fp32": 4}  # bf16: aift's dtype on CUDA GPUs; fp32: on a CPU without autocast
# Per element dropout zeroes: CUDA's fused dropout keeps a bool mask; the CPU's multiplies by a noise tensor
# of the input's dtype and keeps that.
DROPOUT_MASK_BYTES = {"bf16": 1, "fp32": 4}
CUDA_CONTEXT_BYTES = 0.5 * 1024**3  # CUDA context, cuBLAS workspace and allocator slack on every GPU
LORA_R = LoRAConfig.r  # what a LoRA run adapts with unless told otherwise
STEP_BYTES = 4  # torch's AdamW keeps each tensor's step count as an fp32 scalar tensor
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 moments for smaller tensors
BNB_BLOCK = 256  # elements per fp32 absmax of its 8-bit moments
BNB_QMAPS_BYTES = 2 * 256 * 4  # its two quantization maps (256 fp32 values each), shared by every tensor


class PlanningError(AiftError, ValueError):
    """The plan cannot be made: bad budget, unknown method, unreadable model config."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one device (or one process) during training."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(
            self.weights + other.weights,
            self.gradients + other.gradients,
            self.optimizer + other.optimizer,
            self.activations + other.activations,
        )


def unique_parameters(model) -> dict[str, Any]:
    """Unique parameters by name (tied weights once, under their first name)."""
    seen, out = set(), {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    """weight name -> (in_features, out_features) of every nn.Linear."""
    import torch.nn as nn

    return {
        f"{name}.weight": (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def _in_decoder_layers(name: str, layer_prefix: str) -> bool:
    return name.startswith(layer_prefix + ".")


def _is_target(weight_name: str, lora_targets) -> bool:
    """Whether a decoder linear's weight is adapted: every one for all-linear (None), else by module name."""
    if lora_targets is None or (isinstance(lora_targets, str) and lora_targets.lower() in ALL_LINEAR):
        return True
    names = lora_targets.split(",") if isinstance(lora_targets, str) else lora_targets
    return weight_name.split(".")[-2] in {n.strip() for n in names}


def _adapted(name: str, linears, prefix: str, lora_targets) -> bool:
    return name in linears and _in_decoder_layers(name, prefix) and _is_target(name, lora_targets)


def layer_prefix_of(model) -> str:
    """The module path of the decoder-layer list (``model.layers`` for llama; others vary)."""
    import torch.nn as nn

    best, size = "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > size:
            best, size = name, len(module)
    return best


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise PlanningError(f"dtype must be one of {', '.join(DTYPE_BYTES)}; got {dtype!r}")
    return DTYPE_BYTES[dtype]


def state_bytes(optimizer: str, numel: int, element_bytes: int, momentum_only: bool = False) -> float:
    """Optimizer state of one trained tensor of ``numel`` elements of ``element_bytes`` each (see the module).

    ``momentum_only``: the tensor is one of muon's hidden matrices (Muon keeps only a momentum for it).
    """
    if optimizer not in OPTIMIZERS:
        raise PlanningError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * 4 * numel
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)
    if optimizer == "sgd" or (optimizer == "muon" and momentum_only):
        return element_bytes * numel  # the momentum buffer
    if optimizer == "schedule_free_adamw":
        return 2 * element_bytes * numel  # z and the second moment
    return 2 * element_bytes * numel + STEP_BYTES  # adamw, and muon's AdamW part


def parameter_bytes(
    model,
    method: str,
    lora_r: int = LORA_R,
    lora_targets=None,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    modules_to_save: list[str] | None = None,
) -> dict[str, MemoryEstimate]:
    """Parameter name -> memory of that parameter (with its adapter or trainable copy, if any) during training.

    ``optimizer``: TrainingConfig's; ``modules_to_save``: LoRAConfig's (lora and qlora only).
    """
    if method not in METHODS:
        raise PlanningError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    d = dtype_bytes(dtype)
    linears, prefix = _linear_shapes(model), layer_prefix_of(model)
    saved = set() if method == "full" else saved_parameters(model, modules_to_save)
    matrices = muon_matrices(model)

    out, eight_bit = {}, None
    for name, param in unique_parameters(model).items():
        n = param.numel()
        # The frozen weight (none in full fine-tuning), then each trained tensor: (elements, bytes each, Muon's).
        if method == "full":
            out[name], trained = MemoryEstimate(), [(n, d, name in matrices)]
        else:
            quantized = method == "qlora" and name in linears and _in_decoder_layers(name, prefix)
            out[name], trained = MemoryEstimate(weights=(NF4_BYTES if quantized else d) * n), []
            if _adapted(name, linears, prefix, lora_targets):  # lora_A (r x in) and lora_B (out x r), fp32
                n_in, n_out = linears[name]
                trained += [(lora_r * n_in, 4, True), (n_out * lora_r, 4, True)]
            if name in saved:  # peft's trainable copy beside the frozen module
                trained.append((n, d, name in matrices))
        for numel, element_bytes, matrix in trained:
            size = element_bytes * numel
            state = state_bytes(optimizer, numel, element_bytes, matrix)
            out[name] = out[name] + MemoryEstimate(weights=size, gradients=size, optimizer=state)
            if numel >= BNB_MIN_8BIT_SIZE and eight_bit is None:
                eight_bit = name
    if optimizer in ("adamw_8bit", "paged_adamw_8bit") and eight_bit is not None:
        # bitsandbytes' two quantization maps, shared: counted with the first tensor that has 8-bit moments.
        out[eight_bit] = out[eight_bit] + MemoryEstimate(optimizer=BNB_QMAPS_BYTES)
    return out


def saved_parameters(model, modules_to_save: list[str] | None) -> set[str]:
    """Names (as :func:`unique_parameters` gives them) of the parameters of the modules peft trains in full:
    those whose module name or its last part is in ``modules_to_save``. A tied head is the embedding's name."""
    if not modules_to_save:
        return set()
    wanted = set(modules_to_save)
    ids = {
        id(p)
        for module_name, module in model.named_modules()
        if module_name and (module_name in wanted or module_name.split(".")[-1] in wanted)
        for p in module.parameters()
    }
    return {name for name, p in unique_parameters(model).items() if id(p) in ids}


def muon_matrices(model) -> set[str]:
    """Names of the 2-D parameters that muon steps with Muon: all but the embeddings and the output head."""
    from aift.training.optimizers import embedding_and_head_params

    outside = embedding_and_head_params(model)
    return {name for name, p in unique_parameters(model).items() if p.ndim == 2 and id(p) not in outside}


def trainable_count(model, method: str, lora_r: int = LORA_R, lora_targets=None, modules_to_save=None) -> int:
    params = unique_parameters(model)
    if method == "full":
        return sum(p.numel() for p in params.values())
    linears, prefix = _linear_shapes(model), layer_prefix_of(model)
    copies = sum(params[n].numel() for n in saved_parameters(model, modules_to_save))
    return copies + sum(lora_r * sum(linears[n]) for n in params if _adapted(n, linears, prefix, lora_targets))


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes of one decoder layer and of the logits, for a batch."""

    tokens: int  # batch_size * max_length
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int
    checkpointing: bool
    element_bytes: int = 2  # the compute dtype's: bf16
    dropout_width: int = 0  # input features per layer that LoRA dropout copies (0 without dropout)
    mask_bytes: int = 1  # per dropped element (DROPOUT_MASK_BYTES)
    selective_layers: int = 0  # checkpointed layers that keep their GEMMs' outputs (gradient_checkpointing: selective)

    @property
    def full_layer(self) -> float:
        kept = self.element_bytes * (6 * self.hidden + 2 * self.kv_width + 4 * self.intermediate)
        # peft's dropout keeps each adapted layer's dropped input (for the adapter's matmul) and its mask.
        dropout = (self.element_bytes + self.mask_bytes) * self.dropout_width
        return self.tokens * (kept + dropout)

    @property
    def selective_layer(self) -> float:
        """A selectively checkpointed layer: its input (h) and what its recompute would redo GEMMs for, the outputs
        of q, k, v, o, gate, up, down and of attention (5h + 2kv + 2i); norms, rotary, SiLU are recomputed."""
        return self.tokens * self.element_bytes * (5 * self.hidden + 2 * self.kv_width + 2 * self.intermediate)

    def layers(self, n_layers: int) -> float:
        """Activations kept for n layers on one device (one recomputed layer on top with checkpointing)."""
        if n_layers == 0:
            return 0.0
        if self.checkpointing:
            layer_input = self.tokens * self.element_bytes * self.hidden
            selective = min(n_layers, self.selective_layers) * (self.selective_layer - layer_input)
            return n_layers * layer_input + selective + self.full_layer
        return n_layers * self.full_layer

    @property
    def logits(self) -> float:
        return self.tokens * self.vocab * (self.element_bytes + LOSS_FP32_BYTES)


def activation_model(
    config,
    batch_size: int,
    max_length: int,
    checkpointing: bool,
    dtype: str = "bf16",
    dropout_width: int = 0,
    selective_layers: int = 0,
) -> ActivationModel:
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return ActivationModel(
        batch_size * max_length,
        hidden,
        kv_heads * head_dim,
        intermediate,
        config.vocab_size,
        checkpointing,
        dtype_bytes(dtype),
        dropout_width,
        DROPOUT_MASK_BYTES[dtype],
        selective_layers,
    )


def dropout_width(model, method: str, lora_dropout: float, lora_targets=None) -> int:
    """Input features of one decoder layer's adapted linears: what LoRA dropout copies per token (0 without)."""
    if method == "full" or lora_dropout == 0:
        return 0
    first_layer = layer_prefix_of(model) + ".0."
    return sum(
        n_in
        for name, (n_in, _) in _linear_shapes(model).items()
        if name.startswith(first_layer) and _is_target(name, lora_targets)
    )


def gradient_in_flight(model, per_param: Mapping[str, MemoryEstimate]) -> float:
    """Bytes of gradients computed in backward but not yet added into ``.grad``.

    With gradient accumulation ``.grad`` holds the earlier micro-batches' sum, and each new gradient is a
    temporary until it is added: at most the largest trained parameter's. A head tied to the embedding gets
    two: autograd holds the head's until the embedding's arrives at the end of backward.
    """
    largest = max((e.gradients for e in per_param.values()), default=0.0)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    return largest + (per_param[head_param_name(model)].gradients if tied else 0.0)


def head_param_name(model) -> str:
    """The name under which the output head's weight is counted (the embedding's when tied)."""
    params = unique_parameters(model)
    head = model.get_output_embeddings()
    for name, p in params.items():
        if head is not None and p is head.weight:
            return name
    return next(reversed(params))


def one_device_estimate(model, per_param: Mapping[str, MemoryEstimate], acts: ActivationModel) -> MemoryEstimate:
    """Memory of training the whole model on one device: every parameter, layer, the logits and a gradient in flight.

    The sum in the order the planner's per-device estimate takes it, so that both give the same bytes.
    """
    total = MemoryEstimate()
    for est in per_param.values():
        total = total + est
    total = total + MemoryEstimate(activations=acts.layers(len(model.get_submodule(layer_prefix_of(model)))))
    return total + MemoryEstimate(gradients=gradient_in_flight(model, per_param), activations=acts.logits)


def load_model_config(model: Any, trust_remote_code: bool = False):
    """A transformers config from a config object, a registered alias, a folder or a hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    from aift.models.loading import check_trust_remote_code, explain_load_failure, resolve_model_path

    check_trust_remote_code(str(model), trust_remote_code)
    path = resolve_model_path(str(model))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise explain_load_failure(str(model), e) from e


def empty_model(config):
    """The model of ``config`` on the meta device, with tied weights tied (so they count once)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model
