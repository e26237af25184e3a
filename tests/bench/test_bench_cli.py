"""`aift bench` end to end on the tiny model: every run in its own process, a complete result written."""

from __future__ import annotations

import json
import math

import pytest

from aift.cli import main
from aift.utils.allocator import find_tcmalloc

REQUIRED = [
    "aift.tokens_per_s", "aift.peak_mem_gb", "aift.eval_loss", "trl.tokens_per_s", "trl.peak_mem_gb",
    "trl.eval_loss", "speedup", "memory_ratio", "mfu", "matmul_peak_gflops", "environment",
]  # fmt: skip


def lookup(result: dict, dotted: str):
    value = result
    for part in dotted.split("."):
        value = value[part]
    return value


def test_bench_against_trl_writes_a_complete_result(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "--model", str(tiny_model_dir), "--examples", "4", "--seq-len", "64", "--batch-size", "2",
            "--compare", "trl", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    for key in REQUIRED:
        value = lookup(result, key)
        if isinstance(value, float):
            assert math.isfinite(value) and value > 0, key
    assert result["aift"]["tokens"] == result["trl"]["tokens"]  # both trained on the same tokens
    assert result["trl"]["tokens_match_aift_tokenization"]
    assert result["eval_loss_gap"] < 0.05  # a random-init tiny model after two steps: both near ln(vocab)
    assert result["speedup"] == pytest.approx(result["aift"]["tokens_per_s"] / result["trl"]["tokens_per_s"])
    assert set(result["matmul_peak_gflops"]) == {"bf16", "fp32"}
    assert result["trl"]["allocator"] == "system"  # TRL as a user runs it
    assert result["aift"]["allocator"] == ("tcmalloc" if find_tcmalloc() else "system")
    assert result["environment"]["torch"] and result["settings"]["examples"] == 4
    assert {t["name"] for t in result["targets"]} == {"speedup", "mfu", "memory_ratio", "eval_loss_gap"}
    assert (out / "results.md").is_file() and (out / "chart.png").is_file()
    # Every setting read from each trainer's own config objects; the headline's shared ones are equal.
    aift_settings, trl_settings = result["aift"]["settings"], result["trl"]["settings"]
    assert aift_settings["gradient checkpointing"] == trl_settings["gradient checkpointing"] == "True"
    assert aift_settings["learning rate"] == trl_settings["learning rate"]
    assert (aift_settings["packing"], trl_settings["packing"]) == ("True", "False")
    # One precision for both: bf16 only where the device has it in hardware (else both would pay emulation).
    first_word = {name: s["precision"].split(",")[0] for name, s in (("aift", aift_settings), ("trl", trl_settings))}
    assert first_word["aift"] == first_word["trl"] == ("bf16 autocast" if result["precision"] == "bf16" else "fp32")
    if result["precision"] == "fp32":
        assert aift_settings["precision"] == trl_settings["precision"] == "fp32, weights fp32"
    assert aift_settings["LoRA"] == trl_settings["LoRA"]  # the adapter as written, all-linear for both
    assert "| packing | True | False | **yes** |" in (out / "results.md").read_text()
    assert (out / "logs" / "aift.log").is_file() and (out / "logs" / "trl.log").is_file()
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("bench: aift ") and "speedup" in last_line


BF16_LEVERS = ({"frozen_base_bf16"}, {"bf16", "frozen_base_bf16"})


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_ablation_switches_each_lever_off_alone(precision, tmp_path, monkeypatch):
    """The orchestration of --ablation (the runs themselves are those of the test above): one run per lever,
    each with only that lever off, tcmalloc taken away through the worker's environment. In fp32 (a CPU
    without bf16 instructions) the bf16 levers are off in the main run and have no ablation row."""
    from aift.bench import core

    calls = []

    def fake_run(tag, spec, work, logs, tcmalloc):
        calls.append((tag, spec, tcmalloc))
        run = {
            "tokens": 100,
            "train_time_s": 1.0,
            "tokens_per_s": 100.0,
            "steps": 1,
            "peak_mem_gb": 1.0,
            "eval_loss": 2.0,
            "allocator": "tcmalloc" if tcmalloc else "system",
            "threads": 2,
            "optimizer": spec.get("optimizer", "adamw"),
        }  # fmt: skip  (the worker says which optimizer ran)
        if spec.get("measure_peak"):
            run["peak"] = {"bf16_gflops": 1.0, "fp32_gflops": 1.0, "body_params": 1, "head_params": 1}
        return run

    monkeypatch.setattr(core, "_run", fake_run)
    monkeypatch.setattr("aift.models.loading.resolve_model_path", lambda name: "/m")
    options = core.BenchOptions(examples=4, ablation=True, output=str(tmp_path / "out"), precision=precision)
    result = core.run_bench(options)
    main_levers = calls[0][1]["levers"]
    levers_on = ("packing", "fused_lora", "segment_attention")
    assert calls[0][0] == "aift" and all(main_levers[k] for k in levers_on)
    assert main_levers["bf16"] == main_levers["frozen_base_bf16"] == (precision == "bf16")
    assert all(spec["bf16"] == (precision == "bf16") for _, spec, _ in calls)  # TRL's precision too
    ablated = {tag: (spec["levers"], tcmalloc) for tag, spec, tcmalloc in calls[1:]}
    expected = [{"packing"}, {"loss_chunk_size"}, {"tcmalloc"}, {"fused_lora"}, {"segment_attention"}]
    expected += [{"fused_ops"}, {"fused_projections"}]  # off in the main run: their rows switch them on
    expected += list(BF16_LEVERS) if precision == "bf16" else []
    assert len(ablated) == len(expected) == len(result["ablation"])
    for levers, tcmalloc in ablated.values():
        changed = {k for k in levers if levers[k] != main_levers[k]} | ({"tcmalloc"} if not tcmalloc else set())
        assert changed in expected
    assert "## Ablation" in (tmp_path / "out" / "results.md").read_text()


def test_bench_rejects_too_few_rows(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Q?", "output": "A."}\n')
    assert main(["bench", "--data", str(data), "--examples", "4", "--output", str(tmp_path / "x")]) == 2
    assert "need 6" in capsys.readouterr().err


def test_dpo_bench_against_trl_writes_a_complete_result(tiny_model_dir, tmp_path, capsys):
    """`aift bench --method dpo --compare trl`: both trainers on the same pairs, the same tokens counted."""
    out = tmp_path / "dpo"
    argv = ["bench", "--method", "dpo", "--model", str(tiny_model_dir), "--examples", "4", "--eval-examples", "4",
            "--batch-size", "2", "--numbers", "4", "--seq-len", "96", "--compare", "trl", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    aift, trl = result["runs"]["aift"], result["runs"]["trl"]
    assert aift["tokens"] == trl["tokens"] > 0  # the pairs' prompt + answer tokens, counted alike
    assert aift["steps"] == trl["steps"] == 2
    for run in (aift, trl):
        assert math.isfinite(run["final_train_loss"]) and run["peak_mem_gb"] > 0
        assert 0 <= run["eval_reward_accuracy"] <= 1
    assert result["ratios"]["tokens_per_s"] == pytest.approx(aift["tokens_per_s"] / trl["tokens_per_s"])
    assert result["options"]["gradient_checkpointing"] is True  # both trainers' default, the same for both
    assert f"gradient checkpointing on and {result['precision']} for both" in (out / "results.md").read_text()
    assert aift["settings"]["precision"].split(",")[0] == trl["settings"]["precision"].split(",")[0]
    assert aift["settings"]["beta"] == trl["settings"]["beta"] == "0.1"
    assert aift["settings"]["gradient checkpointing"] == trl["settings"]["gradient checkpointing"] == "True"
    assert "| forward of a pair |" in (out / "results.md").read_text()
    assert "aift DPO:" in capsys.readouterr().out


@pytest.mark.slow
def test_grpo_bench_against_trl_writes_a_complete_result(tiny_model_dir, tmp_path, capsys):
    """`aift bench --method grpo --compare trl`: both trainers on the same prompts in the same order, each step
    timed in generation and training, the reward curves, and a results.md / chart.png from them."""
    out = tmp_path / "grpo"
    argv = ["bench", "--method", "grpo", "--model", str(tiny_model_dir), "--examples", "2", "--batch-size", "2",
            "--num-generations", "2", "--max-completion-length", "4", "--compare", "trl", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    aift, trl = result["runs"]["aift"], result["runs"]["trl"]
    assert result["steps"] == 2 and len(json.loads((out / "tasks.json").read_text())) == 2
    assert trl["prompts_match_aift"]  # TRL's chat-template rendering gives aift's prompt ids
    for run in (aift, trl):
        assert len(run["step_s"]) == len(run["generation_s"]) == len(run["reward"]) == 2
        assert all(0 < g < s for g, s in zip(run["generation_s"], run["step_s"], strict=True))
        assert all(0 <= r <= 1 for r in run["reward"]) and run["completions"] == 4
        assert all(0 < n <= 2 * 4 for n in run["generated_tokens"])  # 2 completions of at most 4 tokens
        summary = run["summary"]
        for key in ("steps_per_s", "generated_tokens_per_s", "trained_tokens_per_s", "peak_mem_gb"):
            assert math.isfinite(summary[key]) and summary[key] > 0, key
        assert summary["step_s"] == pytest.approx(summary["generation_s"] + summary["train_s"])
    # Both count the real prompt + completion tokens of a step's rows; the same prompts, so at least those.
    prompt_tokens = aift["trained_tokens"][0] - aift["generated_tokens"][0]
    assert trl["trained_tokens"][0] - trl["generated_tokens"][0] == pytest.approx(prompt_tokens)
    ratios = result["ratios"]
    assert ratios["steps_per_s"] == pytest.approx(aift["summary"]["steps_per_s"] / trl["summary"]["steps_per_s"])
    assert {t["name"] for t in result["targets"]} == {"steps_per_s", "peak_mem", "reward_gap_in_noise"}
    for name in ("num_generations", "max_completion_length", "LoRA", "gradient checkpointing", "learning rate",
                 "loss", "reward", "beta"):  # fmt: skip
        assert aift["settings"][name] == trl["settings"][name], name
    assert aift["settings"]["precision"] == trl["settings"]["precision"]
    assert trl["settings"]["allocator"] == "system"  # TRL as its users run it
    text = (out / "results.md").read_text()
    assert "| step | aift reward | trl reward |" in text and "| generation |" in text
    assert (out / "chart.png").stat().st_size > 0 and (out / "logs" / "trl.log").is_file()
    assert "aift GRPO:" in capsys.readouterr().out
