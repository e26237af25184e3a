"""Memory planning and device maps, on meta-device models with synthetic GPU budgets (no GPU needed)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from aift.cli import main
from aift.distributed.planning import GB, PlanningError, plan_training
from aift.training.memory import (
    CUDA_CONTEXT_BYTES,
    activation_model,
    dropout_width,
    empty_model,
    gradient_in_flight,
    load_model_config,
    parameter_bytes,
)


@pytest.fixture(scope="module")
def llama8b() -> LlamaConfig:
    """The shape of Llama-3-8B (and ELYZA-JP-8B): 32 layers, hidden 4096, GQA 8 kv heads, vocab 128256."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )


def test_parameter_count_matches_a_real_model(embedded_model, embedded_dir):
    plan = plan_training(str(embedded_dir), gpus=1, gpu_memory_gb=24, method="full", batch_size=1, max_length=64)
    real = sum(p.numel() for p in embedded_model.parameters())  # tied embeddings counted once
    assert plan.params == real
    assert plan.trainable_params == real
    assert plan.fits and plan.device_map == {"": 0}


def test_bytes_per_parameter_by_method(llama8b):
    model = empty_model(llama8b)
    n = sum(p.numel() for p in model.parameters())
    steps = 4 * len(list(model.parameters()))  # AdamW's step count: an fp32 scalar tensor per parameter tensor
    full = sum(e.total for e in parameter_bytes(model, "full", dtype="fp32").values())
    assert full == 16 * n + steps  # fp32 weights + grads + two AdamW moments
    full_bf16 = sum(e.total for e in parameter_bytes(model, "full", dtype="bf16").values())
    assert full_bf16 == 8 * n + steps  # aift on a GPU: the model loaded in bf16, its grads and AdamW moments too
    lora = parameter_bytes(model, "lora", lora_r=16)
    adapters = 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096))
    assert sum(e.gradients for e in lora.values()) == 4 * adapters
    qlora_weights = sum(e.weights for e in parameter_bytes(model, "qlora").values())
    lora_weights = sum(e.weights for e in lora.values())
    assert qlora_weights < 0.45 * lora_weights  # 4-bit decoder linears; embeddings and head stay bf16
    with pytest.raises(PlanningError, match="method must be one of"):
        parameter_bytes(model, "dora")


def test_activation_estimate_scales_with_tokens_and_checkpointing(llama8b):
    on = activation_model(llama8b, batch_size=4, max_length=2048, checkpointing=True)
    off = activation_model(llama8b, batch_size=4, max_length=2048, checkpointing=False)
    half = activation_model(llama8b, batch_size=2, max_length=2048, checkpointing=False)
    assert off.layers(32) == 2 * half.layers(32)
    assert on.layers(32) < off.layers(32) / 5
    assert on.logits == 4 * 2048 * 128256 * 10


def test_one_gpu_plan_counts_every_layers_activations(llama8b):
    # The whole model on one GPU is the device map {"": 0}: its layers have no entries of their own.
    plan = plan_training(
        llama8b, gpus=1, gpu_memory_gb=1000, method="lora", batch_size=1, max_length=512, gradient_checkpointing=False
    )
    assert plan.device_map == {"": 0}
    model = empty_model(llama8b)
    acts = activation_model(
        llama8b, 1, 512, checkpointing=False, dropout_width=dropout_width(model, "lora", lora_dropout=0.05)
    )
    assert plan.devices[0].estimate.activations == acts.layers(32) + acts.logits


def test_lora_dropout_keeps_each_adapted_input(llama8b):
    model = empty_model(llama8b)
    assert dropout_width(model, "lora", 0.05) == 6 * 4096 + 14336  # q, k, v, o, gate, up read h; down reads i
    assert dropout_width(model, "lora", 0.0) == 0 and dropout_width(model, "full", 0.05) == 0
    with_dropout = activation_model(llama8b, 1, 1024, False, "bf16", dropout_width(model, "lora", 0.05))
    without = activation_model(llama8b, 1, 1024, False, "bf16")
    assert with_dropout.full_layer - without.full_layer == 1024 * (2 + 1) * (6 * 4096 + 14336)  # bf16 copy + bool mask


def test_a_plan_adapts_the_target_modules_it_is_given(llama8b):
    """q_proj,v_proj only: fewer adapter parameters, bytes and dropout copies than all-linear."""

    def lora_plan(targets):
        return plan_training(llama8b, gpus=1, gpu_memory_gb=1000, method="lora", max_length=512, lora_targets=targets)

    every, qv = lora_plan(None), lora_plan(["q_proj", "v_proj"])
    assert lora_plan("all-linear").to_dict() == every.to_dict()
    layers, r = 32, 16
    assert qv.trainable_params == layers * r * ((4096 + 4096) + (4096 + 1024))  # q: h -> h, v: h -> kv width
    every_layer = 2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)  # q, o; k, v; gate, up, down
    assert every.trainable_params == layers * r * every_layer > qv.trainable_params
    assert qv.devices[0].estimate.total < every.devices[0].estimate.total
    model = empty_model(llama8b)
    assert dropout_width(model, "lora", 0.05, ["q_proj", "v_proj"]) == 2 * 4096
    assert parameter_bytes(model, "lora", lora_targets="q_proj,v_proj") == parameter_bytes(
        model, "lora", lora_targets=["q_proj", "v_proj"]
    )


def test_cli_plan_passes_the_target_modules(embedded_dir, capsys):
    def trained(*extra: str) -> int:
        assert main(["plan", "--model", str(embedded_dir), "--method", "lora", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["trainable_params"]

    every = trained()
    assert trained("--lora-target-modules", "all-linear") == every
    assert 0 < trained("--lora-target-modules", "q_proj,v_proj") < every


def test_gradients_in_flight_largest_one_and_two_for_a_tied_head(llama8b, embedded_dir):
    untied = empty_model(llama8b)
    full = parameter_bytes(untied, "full", dtype="bf16")
    assert gradient_in_flight(untied, full) == 128256 * 4096 * 2  # the embedding (or head), once
    lora = parameter_bytes(untied, "lora")
    assert gradient_in_flight(untied, lora) == max(e.gradients for e in lora.values())  # an adapter's
    tied = empty_model(load_model_config(str(embedded_dir)))
    head = tied.get_output_embeddings().weight
    assert head is tied.get_input_embeddings().weight
    assert gradient_in_flight(tied, parameter_bytes(tied, "full", dtype="fp32")) == 2 * 4 * head.numel()


def test_lora_8b_spreads_over_two_24gb_gpus_within_budget(llama8b):
    plan = plan_training(llama8b, gpus=2, gpu_memory_gb=24, method="lora", batch_size=4, max_length=2048)
    assert plan.fits and not plan.offloaded
    assert [d.device for d in plan.devices] == ["0", "1"]
    for d in plan.devices:
        assert d.needed <= 24 * GB
        assert d.needed == d.estimate.total + CUDA_CONTEXT_BYTES
    # Layers stay in order: GPU 0 holds a prefix of the decoder, GPU 1 the rest with the head.
    layers = [int(m.split(".")[2]) for m in plan.device_map if m.startswith("model.layers.")]
    assert layers == sorted(layers) and len(layers) == 32
    assert plan.device_map["lm_head"] == 1 and plan.device_map["model.embed_tokens"] == 0
    # The logits (10 B x 8192 tokens x 128256) sit with the head.
    assert plan.devices[1].estimate.activations > 4 * 2048 * 128256 * 10


def test_full_8b_does_not_fit_two_24gb_gpus_and_says_so(llama8b):
    plan = plan_training(llama8b, gpus=2, gpu_memory_gb=24, method="full", batch_size=1, max_length=512)
    assert not plan.fits and plan.offloaded
    text = plan.render()
    assert "fits: NO" in text and "offloaded" in text and "cpu" in text
    assert all(d.fits for d in plan.devices if d.is_gpu)  # the map itself respects the GPU budgets
    assert plan.per_gpu_by_strategy["fsdp / zero3"] < plan.per_gpu_by_strategy["ddp"]


def test_explicit_uneven_budgets_are_respected(llama8b):
    plan = plan_training(
        llama8b, method="lora", batch_size=1, max_length=1024, max_memory={"cuda:0": "10GB", 1: "30GB", "cpu": "8GB"}
    )
    by_device = {d.device: d for d in plan.devices}
    assert by_device["0"].budget == 10e9 and by_device["0"].needed <= 10e9  # accelerate: GB = 1e9, GiB = 2**30
    assert by_device["1"].needed <= 30e9
    assert plan.fits


def test_bad_budgets_are_clear_errors(llama8b):
    with pytest.raises(PlanningError, match="unknown device"):
        plan_training(llama8b, max_memory={"gpu0": "10GB"})
    with pytest.raises(PlanningError, match="cannot read memory budget"):
        plan_training(llama8b, max_memory={0: "lots"})
    with pytest.raises(PlanningError, match="gpus must be"):
        plan_training(llama8b, gpus=0)


def test_cli_plan_prints_the_map_and_fits(embedded_dir, capsys):
    code = main(["plan", "--model", str(embedded_dir), "--gpus", "2", "--gpu-memory", "24", "--method", "lora"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cuda:0" in out and "fits: yes" in out and "device map" in out


def test_cli_plan_json_and_exit_status_when_it_does_not_fit(embedded_dir, capsys):
    args = ["plan", "--model", str(embedded_dir), "--max-memory", "{0: 600MB, 1: 600MB}", "--method", "full", "--json"]
    code = main(args)
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["fits"] is False
    assert {d["device"] for d in data["devices"]} >= {"cpu"}


def test_cli_plan_unreadable_model_is_a_clear_error(tmp_path, capsys):
    code = main(["plan", "--model", str(tmp_path / "nope")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
