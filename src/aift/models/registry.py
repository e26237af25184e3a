"""The models aift knows by name, with what a user needs to choose one."""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: Hugging Face id (or alias for the embedded model).
        display_name: Human-readable name.
        params_b: Parameter count in billions.
        min_gpu_memory_gb: GPU memory needed for LoRA fine-tuning in bf16 (QLoRA needs about a third).
        gated: Whether the hub asks for an accepted licence and a token.
        recommended_method: full, lora or qlora.
        prompt_format: Prompt format used for training and inference (see aift.data.formats).
        trust_remote_code: The model card loads it with trust_remote_code=True.
        japanese: Trained for Japanese.
    """

    name: str
    display_name: str
    params_b: float
    min_gpu_memory_gb: float
    gated: bool = False
    recommended_method: str = "lora"
    prompt_format: str = "template"
    trust_remote_code: bool = False
    japanese: bool = False


_MODELS = [
    ModelSpec(EMBEDDED_MODEL, "SmolLM2 135M Instruct (embedded)", 0.135, 1, False, "full", "template"),
    ModelSpec(
        "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B",
        "CALM3 DeepSeek-R1 Distill Qwen 32B",
        32.8,
        64,
        False,
        "qlora",
        "template",
        japanese=True,
    ),
    ModelSpec("elyza/Llama-3-ELYZA-JP-8B", "ELYZA Llama-3 JP 8B", 8.0, 16, False, "lora", "template", japanese=True),
    ModelSpec(
        "stabilityai/japanese-stablelm-3b-4e1t-instruct",
        "Japanese StableLM 3B 4E1T Instruct",
        2.8,
        8,
        False,
        "lora",
        "stablelm-ja",
        trust_remote_code=True,
        japanese=True,
    ),
    ModelSpec(
        "rinna/japanese-gpt-neox-3.6b-instruction-sft",
        "rinna Japanese GPT-NeoX 3.6B Instruction SFT",
        3.6,
        8,
        False,
        "lora",
        "rinna",
        japanese=True,
    ),
    ModelSpec("tokyotech-llm/Swallow-13b-hf", "Swallow 13B", 13.1, 28, False, "qlora", "alpaca", japanese=True),
    ModelSpec("codellama/CodeLlama-34b-hf", "Code Llama 34B", 33.7, 70, False, "qlora", "completion"),
    ModelSpec("mistralai/Mixtral-8x7B-v0.1", "Mixtral 8x7B", 46.7, 96, False, "qlora", "completion"),
    ModelSpec("meta-llama/Llama-2-7b-hf", "Llama 2 7B", 6.7, 16, True, "lora", "llama2"),
    ModelSpec("meta-llama/Llama-2-13b-hf", "Llama 2 13B", 13.0, 28, True, "qlora", "llama2"),
    ModelSpec("meta-llama/Llama-2-70b-hf", "Llama 2 70B", 69.0, 140, True, "qlora", "llama2"),
    ModelSpec("gpt2", "GPT-2 124M", 0.124, 2, False, "full", "completion"),
    ModelSpec("EleutherAI/gpt-neo-125M", "GPT-Neo 125M", 0.125, 2, False, "full", "completion"),
    ModelSpec("microsoft/phi-2", "Phi-2 2.7B", 2.7, 8, False, "lora", "completion"),
    ModelSpec("mistralai/Mistral-7B-v0.1", "Mistral 7B", 7.2, 16, False, "lora", "completion"),
    ModelSpec("tiiuae/falcon-7b", "Falcon 7B", 7.2, 16, False, "lora", "completion"),
    ModelSpec("google/gemma-7b", "Gemma 7B", 8.5, 20, True, "lora", "completion"),
]

SUPPORTED_MODELS: dict[str, ModelSpec] = {m.name: m for m in _MODELS}


def get_spec(name: str) -> ModelSpec | None:
    """The registered spec for a name (case-insensitive), or None."""
    if name in SUPPORTED_MODELS:
        return SUPPORTED_MODELS[name]
    lowered = {k.lower(): v for k, v in SUPPORTED_MODELS.items()}
    return lowered.get(name.lower())


# GPU memory (GB, per GPU, summed over GPUs) -> (model, method, why). Ordered from largest budget down.
_RECOMMENDATIONS = [
    (
        64,
        "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B",
        "Full/LoRA",
        "64 GB holds a 32B model's bf16 weights with LoRA adapters (full fine-tuning needs ZeRO-3 or several GPUs).",
    ),
    (
        32,
        "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B",
        "QLoRA",
        "a 32B model in 4-bit NF4 takes about 18 GB, leaving room for adapters and activations.",
    ),
    (
        24,
        "elyza/Llama-3-ELYZA-JP-8B",
        "Full/LoRA",
        "an 8B model in bf16 takes 16 GB; LoRA fits comfortably, full fine-tuning with gradient checkpointing and "
        "8-bit optimizers or DeepSpeed offload.",
    ),
    (
        16,
        "elyza/Llama-3-ELYZA-JP-8B",
        "LoRA/QLoRA",
        "an 8B model's bf16 weights take 16 GB, so LoRA is tight; QLoRA (about 5 GB of weights) is the safe choice.",
    ),
    (
        8,
        "stabilityai/japanese-stablelm-3b-4e1t-instruct",
        "LoRA/QLoRA",
        "a 3B model in bf16 takes about 6 GB; LoRA fits with gradient checkpointing, QLoRA with room to spare.",
    ),
]


@dataclass(frozen=True)
class Recommendation:
    model: str
    method: str
    reason: str


def recommend(gpu_memory_gb: float, gpus: int = 1) -> Recommendation:
    """Picks a model and method for the given memory per GPU and number of GPUs."""
    total = gpu_memory_gb * max(gpus, 1)
    for threshold, model, method, why in _RECOMMENDATIONS:
        if total >= threshold:
            spread = f" ({gpus} x {gpu_memory_gb:g} GB = {total:g} GB in all)" if gpus > 1 else ""
            return Recommendation(model, method, f"{total:g} GB{spread} >= {threshold} GB: {why}")
    return Recommendation(
        EMBEDDED_MODEL,
        "LoRA/Full",
        f"{total:g} GB is under 8 GB: the embedded 135M model trains on it (or on the CPU).",
    )
