import pytest

from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS, get_spec, recommend

REQUIRED = [
    "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B",
    "elyza/Llama-3-ELYZA-JP-8B",
    "stabilityai/japanese-stablelm-3b-4e1t-instruct",
    "rinna/japanese-gpt-neox-3.6b-instruction-sft",
    "tokyotech-llm/Swallow-13b-hf",
    "codellama/CodeLlama-34b-hf",
    "mistralai/Mixtral-8x7B-v0.1",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-hf",
    "gpt2",
    "EleutherAI/gpt-neo-125M",
    "microsoft/phi-2",
    "mistralai/Mistral-7B-v0.1",
    "tiiuae/falcon-7b",
    "google/gemma-7b",
    EMBEDDED_MODEL,
]


def test_registry_holds_the_required_models_with_their_facts():
    for name in REQUIRED:
        spec = SUPPORTED_MODELS[name]
        assert spec.display_name and spec.params_b > 0 and spec.min_gpu_memory_gb > 0
        assert spec.recommended_method in ("full", "lora", "qlora")
    assert SUPPORTED_MODELS["meta-llama/Llama-2-7b-hf"].gated
    assert not SUPPORTED_MODELS["elyza/Llama-3-ELYZA-JP-8B"].gated
    assert get_spec("ELYZA/llama-3-elyza-jp-8b").name == "elyza/Llama-3-ELYZA-JP-8B"


@pytest.mark.parametrize(
    ("memory", "gpus", "model", "method"),
    [
        (8, 1, "stabilityai/japanese-stablelm-3b-4e1t-instruct", "LoRA/QLoRA"),
        (16, 1, "elyza/Llama-3-ELYZA-JP-8B", "LoRA/QLoRA"),
        (24, 1, "elyza/Llama-3-ELYZA-JP-8B", "Full/LoRA"),
        (32, 1, "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B", "QLoRA"),
        (80, 1, "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B", "Full/LoRA"),
        (16, 2, "cyberagent/calm3-DeepSeek-R1-Distill-Qwen-32B", "QLoRA"),
        (4, 1, EMBEDDED_MODEL, "LoRA/Full"),
    ],
)
def test_recommend_follows_the_table(memory, gpus, model, method):
    rec = recommend(memory, gpus)
    assert (rec.model, rec.method) == (model, method)
    assert "GB" in rec.reason
