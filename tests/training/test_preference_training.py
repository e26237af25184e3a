"""`aift train --method dpo|orpo|simpo|kto` through the one loop: CLI end to end, metrics, exact resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aift.cli import main

PAIRS = [
    {"prompt": f"Which number is larger, {a} or {b}?", "chosen": str(max(a, b)), "rejected": str(min(a, b))}
    for a, b in [(12, 57), (83, 41), (25, 66), (90, 14), (33, 72), (48, 19), (61, 86), (77, 28)]
]


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory, tiny_model_dir) -> Path:
    """8 pairs prepared through the CLI for the tiny model (6 train, 2 test)."""
    tmp = tmp_path_factory.mktemp("pairs")
    src = tmp / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    out = tmp / "prepared"
    args = ["prepare", "--task", "preference", "--model", str(tiny_model_dir), "--source-path", str(src),
            "--output-dir", str(out), "--val-ratio", "0.25", "--max-length", "64"]  # fmt: skip
    assert main(args) == 0
    return out


def _train(tiny_model_dir, data, out, *extra) -> list[str]:
    return [
        "train", "--model-name", str(tiny_model_dir), "--dataset-path", str(data), "--output-dir", str(out),
        "--max-steps", "3", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3",
        "--warmup-steps", "0", "--logging-steps", "1", "--eval-steps", "0", "--save-steps", "0",
        "--report-to", "none", "--seed", "1", *extra,
    ]  # fmt: skip


def _records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


LORA = ["--use-lora", "--lora-r", "4", "--lora-dropout", "0.1"]


def test_cli_dpo_lora_end_to_end_logs_rewards(tiny_model_dir, tiny_pairs, tmp_path, capsys):
    """Defaults on (bf16 autocast, gradient checkpointing, LoRA dropout): the reference is the adapter-off base."""
    out = tmp_path / "dpo"
    assert (
        main(
            [
                *_train(
                    tiny_model_dir, tiny_pairs, out, "--method", "dpo", "--beta", "0.5", "--report-to", "tensorboard"
                ),
                *LORA,
            ]
        )
        == 0
    )
    assert "trained 3 steps (dpo, lora)" in capsys.readouterr().out
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(key in r for r in records), key
    # Step 1 runs before any update and the adapter starts at zero: the policy is the reference.
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert records[-1]["rewards/margins"] != 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["method"] == "lora"
    evals = _records(out, "eval")
    assert "eval_rewards/accuracies" in evals[-1]
    assert (out / "final" / "adapter_config.json").is_file()
    config = (out / "config.yaml").read_text()
    assert "packing: false" in config and "PreferenceConfig:" in config and "beta: 0.5" in config
    from aift.eval.report import load_run, run_row

    row = run_row(load_run(out))  # what `aift report` tabulates
    assert row["objective"] == "dpo" and row["reward_accuracy"] == records[-1]["rewards/accuracies"]
    assert row["eval_reward_accuracy"] is not None
    assert list((out / "tensorboard").iterdir())  # TensorBoard got the same scalars


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("orpo", []),
        ("simpo", ["--simpo-gamma", "0.3"]),
        ("kto", ["--undesirable-weight", "1.5"]),
        ("dpo", ["--loss-type", "ipo"]),
        ("dpo", ["--use-4bit"]),  # QLoRA: the reference is the 4-bit base with the adapter off
    ],
)
def test_other_methods_train(method, extra, tiny_model_dir, tiny_pairs, tmp_path):
    out = tmp_path / method
    args = _train(tiny_model_dir, tiny_pairs, out, "--method", method, "--max-steps", "2", "--no-bf16",
                  "--no-fp16", "--no-gradient-checkpointing", *extra)  # fmt: skip
    assert main([*args, *LORA]) == 0
    records = _records(out)
    assert len(records) == 2 and all(r["loss"] == r["loss"] for r in records)  # not NaN
    assert "rewards/chosen" in records[0]


def test_full_fine_tune_dpo_precomputes_the_reference(tiny_model_dir, tiny_pairs, tmp_path):
    out = tmp_path / "full"
    assert main(_train(tiny_model_dir, tiny_pairs, out, "--method", "dpo", "--max-steps", "2", "--no-fp16")) == 0
    records = _records(out)
    assert records[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)  # reference = the model before training
    assert records[1]["rewards/margins"] != pytest.approx(0, abs=1e-6)
    assert (out / "final" / "model.safetensors").is_file()


def test_dpo_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tiny_model_dir, tiny_pairs, tmp_path):
    """With dropout on (--no-disable-dropout), so that its random state must resume too."""
    common = ["--method", "dpo", "--max-steps", "4", "--batch-size", "1", "--save-steps", "2",
              "--save-total-limit", "5", "--no-fp16", "--no-gradient-checkpointing", *LORA,
              "--no-disable-dropout"]  # fmt: skip
    straight = tmp_path / "straight"
    assert main(_train(tiny_model_dir, tiny_pairs, straight, *common)) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", broken / "checkpoints" / "checkpoint-2")
    assert main([*_train(tiny_model_dir, tiny_pairs, broken, *common), "--resume-from-checkpoint", "latest"]) == 0
    expected = {r["step"]: r for r in _records(straight)}
    resumed = {r["step"]: r for r in _records(broken)}
    for step in (3, 4):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert resumed[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)


def test_unservable_combinations_are_clear_errors(tiny_model_dir, tiny_pairs, tmp_path, capsys):
    assert main([*_train(tiny_model_dir, tiny_pairs, tmp_path / "p", "--method", "dpo"), "strategy=pipeline"]) == 2
    assert "strategy pipeline cannot serve it" in capsys.readouterr().err
    assert main([*_train(tiny_model_dir, tiny_pairs, tmp_path / "q"), "--beta", "0.2"]) == 2
    assert "need --method" in capsys.readouterr().err
    assert main([*_train(tiny_model_dir, tiny_pairs, tmp_path / "r", "--method", "orpo", "--loss-type", "ipo")]) == 2
    assert "applies to method dpo" in capsys.readouterr().err


def test_dpo_accumulated_micro_batches_equal_one_batch(tiny_model_dir, tiny_pairs, tmp_path):
    """The loss is the mean over the pairs of the whole step: 3 micro-batches of 2 pairs = 1 batch of 6."""
    runs = {}
    for name, batch, accumulation in (("one", "6", "1"), ("three", "2", "3")):
        out = tmp_path / name
        args = _train(
            tiny_model_dir,
            tiny_pairs,
            out,
            "--method",
            "dpo",
            "--max-steps",
            "2",
            "--batch-size",
            batch,
            "--gradient-accumulation-steps",
            accumulation,
            "--no-fp16",
            "--no-gradient-checkpointing",
        )
        assert main([*args, *LORA]) == 0  # fmt: skip
        runs[name] = _records(out)
    for key in ("grad_norm", "rewards/margins"):
        assert runs["three"][0][key] == pytest.approx(runs["one"][0][key], rel=1e-4, abs=1e-7), key
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert runs["three"][1][key] == pytest.approx(runs["one"][1][key], rel=1e-4, abs=1e-6), key


def test_fused_log_probs_train_like_the_logits_path(tiny_model_dir, tiny_pairs, tmp_path):
    """loss_chunk_size: each row's log-prob from chunks of answer positions, no full-vocabulary logits; same run."""
    runs = {}
    for chunk in ("0", "16"):
        out = tmp_path / chunk
        args = _train(tiny_model_dir, tiny_pairs, out, "--method", "dpo", "--max-steps", "2", "--no-fp16",
                      "--no-gradient-checkpointing", "--loss-chunk-size", chunk)  # fmt: skip
        assert main([*args, *LORA]) == 0
        runs[chunk] = _records(out)
    for step in (0, 1):
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert runs["16"][step][key] == pytest.approx(runs["0"][step][key], rel=1e-4, abs=1e-5), (step, key)


def test_default_dpo_run_trains_like_two_rows_per_pair(tiny_model_dir, tiny_pairs, tmp_path):
    """With the defaults (bf16, gradient checkpointing, fused log-probs, LoRA dropout) the runs agree."""
    runs = {}
    for name in ("--share-prompt", "--no-share-prompt"):
        out = tmp_path / name
        assert main([*_train(tiny_model_dir, tiny_pairs, out, "--method", "dpo", "--max-steps", "2", name), *LORA]) == 0
        runs[name] = _records(out)
    for step in (0, 1):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            got, want = runs["--share-prompt"][step][key], runs["--no-share-prompt"][step][key]
            assert got == pytest.approx(want, rel=2e-2, abs=2e-2), (step, key)
        assert runs["--share-prompt"][step]["tokens"] == runs["--no-share-prompt"][step]["tokens"]


def test_preference_options_from_yaml_overrides_and_flags(tmp_path):
    import argparse

    import yaml

    from aift.cli.train import add_arguments, resolve
    from aift.config import ConfigError

    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 5e-6, "method": "dpo", "preference": {"beta": 0.3}}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    configs = resolve(parser.parse_args([str(path), "preference.loss_type=robust", "--label-smoothing", "0.1"]))
    preference = configs.preference
    assert (preference.method, preference.beta, preference.loss_type, preference.label_smoothing) == (
        "dpo", 0.3, "robust", 0.1
    )  # fmt: skip
    assert configs.training.learning_rate == 5e-6  # the preference keys do not reach TrainingConfig
    assert resolve(parser.parse_args(["--method", "simpo"])).preference.resolved_beta == 2.0
    assert resolve(parser.parse_args([])).preference is None
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        resolve(parser.parse_args(["method=kto", "preference.betta=1"]))
