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
