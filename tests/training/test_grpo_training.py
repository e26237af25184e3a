"""GRPO end to end on the tiny model: the CLI writes reward metrics and completions.jsonl, a resume samples the
same completions and logs the same losses, QLoRA trains, and a broken reward stops the run clearly."""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path

import pytest
from optional_pieces import import_optional

from aift.cli import main

REPO = Path(__file__).resolve().parents[2]


def _grpo_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--method", "grpo", "--model-name", str(model_dir), "--dataset-path", str(data),
        "--output-dir", str(out), "--use-lora", "--lora-r", "4", "--lora-dropout", "0",
        "--reward", "exact_match", "--reward", r"format:^\d+$", "--reward-weights", "1,0.2",
        "--num-generations", "2", "--batch-size", "4", "--max-completion-length", "6", "--max-length", "64",
        "--max-steps", "2", "--save-steps", "1", "--logging-steps", "1", "--log-completions-steps", "1",
        "--gradient-accumulation-steps", "1",
        "--learning-rate", "1e-2", "--warmup-steps", "0", "--report-to", "none", "--seed", "3",
        "--no-bf16", "--no-fp16", "--no-gradient-checkpointing", *extra,
    ]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _train_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _lines(out / "metrics.jsonl") if r["type"] == "train"}


def test_cli_grpo_run_logs_rewards_and_completions_and_resumes_exactly(tmp_path, tiny_model_dir, tasks):
    out = tmp_path / "run"
    assert main(_grpo_args(tiny_model_dir, tasks, out, "--temperature", "1.0")) == 0

    records = _train_records(out)
    assert sorted(records) == [1, 2]
    for key in ("reward", "reward_std", "rewards/exact_match/mean", "rewards/format/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "entropy", "rollout_s", "train_s"):  # fmt: skip
        assert key in records[1], key
    assert 0 < records[1]["completions/mean_length"] <= 6
    entries = _lines(out / "completions.jsonl")
    assert {e["step"] for e in entries} == {1, 2}
    first = [e for e in entries if e["step"] == 1]
    assert [e["group"] for e in first] == [0, 0, 1, 1]  # whole groups of num_generations completions
    assert set(first[0]["rewards"]) == {"exact_match", "format"} and "= ?" in first[0]["prompt"]

    # aift report shows the last logged step's completions with their rewards, and the reward curve.
    assert main(["report", str(out), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    last = [e for e in entries if e["step"] == 2]
    assert "Sampled completions (GRPO)" in page and "step 2" in page
    assert all(html.escape(e["completion"]) in page for e in last)
    assert (tmp_path / "report" / "reward.png").is_file()

    # Resume from step 1 in a copy of the run: step 2 samples the same completions and logs the same loss.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-2", ignore_errors=True)
    (resumed / "completions.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in first), encoding="utf-8"
    )
    checkpoint = resumed / "checkpoints" / "checkpoint-1"
    args = _grpo_args(
        tiny_model_dir, tasks, resumed, "--temperature", "1.0", "--resume-from-checkpoint", str(checkpoint)
    )
    assert main(args) == 0
    again = [e for e in _lines(resumed / "completions.jsonl") if e["step"] == 2]
    assert [(e["completion"], e["reward"]) for e in again] == [
        (e["completion"], e["reward"]) for e in entries if e["step"] == 2
    ]
    assert _train_records(resumed)[2]["loss"] == pytest.approx(records[2]["loss"], abs=1e-6)
    assert _train_records(resumed)[2]["grad_norm"] == pytest.approx(records[2]["grad_norm"], rel=1e-4)


def test_a_reward_that_raises_stops_the_run_naming_function_step_and_sample(tmp_path, tiny_model_dir, tasks):
    from aift import GRPOConfig, GRPOTrainer, LoRAConfig
    from aift.config import TrainingConfig
    from aift.training.checkpoint import list_checkpoints, verify_checkpoint
    from aift.training.rewards import RewardError

    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(
        "def picky(prompts, completions, trainer_state=None, **kwargs):\n"
        "    if trainer_state.global_step >= 1:\n"
        "        raise ValueError('no scores today')\n"
        "    return [0.0 for _ in completions]\n",
        encoding="utf-8",
    )
    config = TrainingConfig(
        model_name=str(tiny_model_dir), dataset_path=str(tasks), output_dir=str(tmp_path / "run"), batch_size=4,
        max_steps=3, save_steps=1, gradient_accumulation_steps=1, max_length=64, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to=["none"], warmup_steps=0,
    )  # fmt: skip
    grpo = GRPOConfig(rewards=[f"python:{rewards}:picky"], num_generations=2, max_completion_length=4)
    trainer = GRPOTrainer(str(tiny_model_dir), grpo, LoRAConfig(r=4, lora_dropout=0.0), config)
    with pytest.raises(RewardError) as error:
        trainer.train()
    message = str(error.value)
    assert "'picky'" in message and "at step 2" in message and "no scores today" in message
    assert "on sample 0 (prompt '" in message
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-1"]
    assert verify_checkpoint(checkpoints[0]) is None


def test_qlora_grpo_trains_a_step(tmp_path, tiny_model_dir, tasks):
    import_optional("bitsandbytes", "QLoRA needs bitsandbytes")
    out = tmp_path / "qlora"
    graded = ["--reward", "length:30", "--reward-weights", "1,0.2,1"]  # random completions differ in length
    assert main([*_grpo_args(tiny_model_dir, tasks, out, "--use-4bit", *graded), "--max-steps", "1"]) == 0
    record = _train_records(out)[1]
    assert record["reward_std"] > 0 and record["grad_norm"] > 0  # the gradient reached the adapters


def test_num_iterations_replays_the_completions_and_beta_logs_the_kl(tmp_path, tiny_model_dir, tasks):
    """μ = 2: step 2 trains on step 1's completions again (the old log-probs kept); β > 0: KL to the base."""
    out = tmp_path / "mu"
    extra = ["--num-iterations", "2", "--beta", "0.04", "--reward", "length:30", "--reward-weights", "1,0.2,1"]
    assert main([*_grpo_args(tiny_model_dir, tasks, out, *extra), "--save-steps", "0"]) == 0
    assert {e["step"] for e in _lines(out / "completions.jsonl")} == {1}  # step 2 generated nothing new
    records = _train_records(out)
    for key in ("reward", "reward_std", "completions/mean_length"):  # the same completions, scored once
        assert records[2][key] == records[1][key], key
    assert records[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy = reference
    assert records[2]["kl"] > 0  # after one step at lr 1e-2 the policy has moved from the base


# Each loss type, GSPO's sequence-level ratio, clip-higher and each advantage scaling, through `aift train`.
# Paired so that four 1-step runs cover the eight settings; a length reward makes the rewards of a group differ.
LOSS_VARIANTS = [
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    {"loss_type": "dr_grpo", "scale_rewards": "none"},
    {"loss_type": "bnpo", "scale_rewards": "batch"},
    {"loss_type": "dapo", "epsilon_high": 0.28},
]


@pytest.mark.parametrize("options", LOSS_VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_each_loss_type_and_option_trains_through_the_cli(tmp_path, tiny_model_dir, tasks, options):
    import yaml

    out = tmp_path / "run"
    flags = [f for key, value in options.items() for f in (f"--{key.replace('_', '-')}", str(value))]
    graded = ["--reward", "length:30", "--reward-weights", "1,0.2,1"]
    argv = [*_grpo_args(tiny_model_dir, tasks, out, *graded, *flags), "--max-steps", "1", "--save-steps", "0"]
    assert main(argv) == 0

    written = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    grpo = next(section for section in written.values() if isinstance(section, dict) and "loss_type" in section)
    assert {key: grpo[key] for key in options} == options  # the flag reached the run's GRPOConfig
    record = _train_records(out)[1]
    assert math.isfinite(record["loss"]) and record["grad_norm"] > 0  # a loss, and a gradient to the adapters
    assert record["reward_std"] > 0 and 0 <= record["clip_ratio/region_mean"] <= 1
    assert all(math.isfinite(record[key]) for key in ("reward", "entropy", "completions/mean_length"))


SHAPE_REWARDS = """
from pathlib import Path

CALLS = Path(__file__).with_suffix(".calls")


def _log(kind, n):
    with CALLS.open("a", encoding="utf-8") as f:
        f.write(f"{kind} {n}\\n")


def chat_shape(prompts, completions, reference, **kwargs):
    for prompt, completion in zip(prompts, completions, strict=True):
        assert isinstance(prompt, list) and prompt[-1]["role"] == "user" and "= ?" in prompt[-1]["content"], prompt
        assert isinstance(completion, list) and len(completion) == 1, completion
        assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str), completion
    _log("chat", len(completions))
    return [float(c[0]["content"].strip() == r) for c, r in zip(completions, reference)]


def text_shape(prompts, completions, reference, **kwargs):
    assert all(isinstance(p, str) and "= ?" in p for p in prompts), prompts
    assert all(isinstance(c, str) for c in completions), completions
    _log("text", len(completions))
    return [float(c.strip() == r) for c, r in zip(completions, reference)]
"""


def test_rewards_get_message_lists_for_conversational_data_and_strings_for_text(tmp_path, tiny_model_dir, tasks):
    """TRL's interface: a prompt column of messages makes the data conversational; the prompt is rendered as
    `aift prepare` renders it (the same system prompt and format), and the rewards get message lists."""
    from aift import GRPOConfig, GRPOTrainer, LoRAConfig
    from aift.config import TrainingConfig
    from aift.data.prepared import read_prepared

    rewards = tmp_path / "shapes.py"
    rewards.write_text(SHAPE_REWARDS, encoding="utf-8")
    source = json.loads((REPO / "examples" / "tasks.json").read_text(encoding="utf-8"))
    chat_rows = [{"prompt": [{"role": "user", "content": r["question"]}], "reference": r["answer"]} for r in source]

    def run(name: str, reward: str, data) -> Path:
        out = tmp_path / name
        config = TrainingConfig(
            model_name=str(tiny_model_dir), dataset_path=str(tasks), output_dir=str(out), batch_size=4, max_steps=1,
            save_steps=0, gradient_accumulation_steps=1, max_length=64, bf16=False, fp16=False,
            gradient_checkpointing=False, report_to=["none"], warmup_steps=0, logging_steps=1,
        )  # fmt: skip
        grpo = GRPOConfig(rewards=[f"python:{rewards}:{reward}"], num_generations=2, max_completion_length=4,
                          log_completions_steps=1)  # fmt: skip
        GRPOTrainer(str(tiny_model_dir), grpo, LoRAConfig(r=4, lora_dropout=0.0), config, train_dataset=data).train()
        return out

    chat = run("chat", "chat_shape", chat_rows)
    text = run("text", "text_shape", None)  # the prepared folder: text prompts
    assert rewards.with_suffix(".calls").read_text(encoding="utf-8").split() == ["chat", "4", "text", "4"]
    prepared_prompts = set(read_prepared(tasks)[0]["train"]["prompt"])
    for out in (chat, text):
        logged = {e["prompt"] for e in _lines(out / "completions.jsonl")}
        assert logged and logged <= prepared_prompts  # rendered messages = the prepared column, character for character


PREPARED_CHAT_REWARD = """
import json
from pathlib import Path

SEEN = Path(__file__).with_suffix(".seen")


def prepared_chat(prompts, completions, reference, **kwargs):
    assert "prompt_messages" not in kwargs, sorted(kwargs)  # the column is the prompts, not one more column
    assert all(isinstance(p, list) and all(isinstance(m, dict) for m in p) for p in prompts), prompts
    for completion in completions:
        assert isinstance(completion, list) and len(completion) == 1, completion
        assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str), completion
    with SEEN.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\\n" for p in prompts)
    return [float(c[0]["content"].strip() == r) for c, r in zip(completions, reference)]
"""


def test_a_folder_prepared_from_chat_messages_is_conversational_for_the_rewards(tmp_path, tiny_model_dir, embedded_dir):
    """`aift prepare` of chat `messages` keeps each prompt's messages (all before the last assistant turn, the
    source's own, no added system prompt): `aift train --method grpo` hands them to the rewards as message
    lists, and each completion as [{"role": "assistant", "content": text}], as TRL does for such data."""
    from aift.data.prepared import read_prepared

    source = json.loads((REPO / "examples" / "tasks.json").read_text(encoding="utf-8"))
    chats = [
        [{"role": "user", "content": f"I have sum number {i} for you."}, {"role": "assistant", "content": "Go ahead."},
         {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        for i, r in enumerate(source)
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    prepared = tmp_path / "prepared"
    prepare = ["prepare", "--model", str(embedded_dir), "--source-path", str(data), "--output-dir", str(prepared),
               "--max-length", "64", "--val-ratio", "0"]  # fmt: skip
    assert main(prepare) == 0
    rewards = tmp_path / "chat_rewards.py"
    rewards.write_text(PREPARED_CHAT_REWARD, encoding="utf-8")
    out = tmp_path / "run"
    args = _grpo_args(tiny_model_dir, prepared, out, "--max-steps", "1", "--save-steps", "0")
    at = args.index("--reward")  # one reward, this file's, instead of _grpo_args's two and their weights
    args[at : at + 6] = ["--reward", f"python:{rewards}:prepared_chat"]
    assert main(args) == 0
    seen = _lines(rewards.with_suffix(".seen"))
    assert len(seen) == 4 and all(prompt in [c[:-1] for c in chats] for prompt in seen)  # 2 prompts x 2 completions
    logged = {e["prompt"] for e in _lines(out / "completions.jsonl")}
    assert logged and logged <= set(read_prepared(prepared)[0]["train"]["prompt"])  # the model gets the rendered text
