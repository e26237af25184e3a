import torch

from aift.utils.gpu import (
    clear_gpu_memory,
    get_available_device,
    get_gpu_memory_info,
    optimize_model_for_gpu,
    peak_memory_gb,
    set_memory_fraction,
)


def test_device_and_memory_info_are_consistent():
    info = get_gpu_memory_info()
    assert set(info) == {"available", "device_count", "devices"}
    assert info["device_count"] == len(info["devices"]) == (torch.cuda.device_count() if info["available"] else 0)
    assert get_available_device() == ("cuda" if torch.cuda.is_available() else get_available_device())
    if not torch.cuda.is_available():
        assert get_available_device() in ("cpu", "mps")


def test_helpers_are_silent_without_gpu(capsys):
    clear_gpu_memory()
    set_memory_fraction(0.5)
    model = optimize_model_for_gpu(torch.nn.Linear(4, 4), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert peak_memory_gb() > 0.01
    assert capsys.readouterr() == ("", "")


def test_set_memory_fraction_rejects_bad_values():
    import pytest

    with pytest.raises(ValueError):
        set_memory_fraction(1.5)


def test_one_precision_rule_for_supports_bf16_default_dtype_and_training(monkeypatch):
    """supports_bf16 is the rule; the dtype models load in and training's autocast agree with it on a CPU."""
    import pytest

    from aift.config import TrainingConfig
    from aift.models.loading import default_dtype
    from aift.training.backends import resolve_precision
    from aift.utils import gpu

    for native, dtype, precision in ((False, torch.float32, "no"), (True, torch.bfloat16, "bf16")):
        monkeypatch.setattr(gpu, "cpu_has_native_bf16", lambda native=native: native)
        assert gpu.supports_bf16("cpu") is native
        assert default_dtype("cpu") == dtype
        assert resolve_precision(TrainingConfig(bf16=True), "cpu") == precision
    assert gpu.supports_bf16("mps") is False
    assert default_dtype("mps") == torch.float32
    if not torch.cuda.is_available():
        assert gpu.supports_bf16("cuda") is False
        assert gpu.supports_bf16("cuda:0") is False
    else:
        pytest.skip("the CUDA path is checked on a GPU machine")


def test_gradient_checkpointing_is_turned_on_by_optimize_model_for_gpu(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = optimize_model_for_gpu(model, device="cpu", gradient_checkpointing=True)
    name = (
        "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    )
    assert getattr(model, name) and model.config.use_cache is False
