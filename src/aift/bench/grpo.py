"""`aift bench --method grpo [--compare trl]`: aift's LoRA GRPO against TRL's GRPOTrainer on the same prompts.

Each trainer runs in its own process (``python -m aift.bench.grpo SPEC.json RESULT.json``, :mod:`.process`), so its
peak memory (the process's peak RSS; the GPU's max allocated on a GPU) is its own. Both get the same prompts in
the same order (``tasks.json``: sums with the number as the answer, or ``--data``; prepared by ``aift prepare``,
rendered with the model's chat template), the same model, LoRA, precision, gradient checkpointing,
``num_generations``, ``max_completion_length``, completions per step, learning rate and reward (``exact_match`` of
:mod:`aift.training.rewards`, the same function object for both), one pass over the prompts.

Per step, both trainers' own numbers: aift's ``metrics.jsonl`` (``rollout_s`` / ``train_s``, ``reward``,
``completions/mean_length``, real tokens); TRL's log history (``reward``, ``completions/mean_length``,
``num_tokens``), its step time taken between the ``on_step_begin`` and ``on_step_end`` callbacks (the optimizer step
included, as in aift's), and its rollout time by timing ``_generate_and_score_completions`` (sampling, rewards,
advantages: what aift's ``rollout_s`` covers) in a subclass that only wraps it, since TRL logs that time to
wandb/mlflow/trackio only.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aift.bench import measure, report
from aift.bench.core import load_average, worker_env
from aift.bench.process import run_worker, worker_main
from aift.bench.settings import aift_settings, settings_markdown, trl_settings
from aift.bench.worker import LORA
from aift.errors import AiftError
from aift.models.run_folder import BENCH_RESULT_FILE
from aift.utils.files import write_json_atomic, write_text_atomic

TRAINED_TOKENS = "the completion tokens (the prompt forwarded, not trained)"
REWARD = "exact_match"
MAX_LENGTH = 256  # of a prepared prompt; the sums' prompts are ~45 tokens
# Issue #25's targets: name -> (how the figure is read, the target, whether higher is better).
TARGETS = {
    "steps_per_s": ("aift steps/s over TRL steps/s", 3.0, True),
    "peak_mem": ("aift peak memory over TRL peak memory", 0.5, False),
    "reward_gap_in_noise": ("|mean reward difference| over 2 standard errors (within noise: <= 1)", 1.0, False),
}


@dataclass
class GRPOBenchOptions:
    model: str = "smollm2-135m-instruct"
    examples: int = 10  # prompts, one pass: examples x num_generations / batch_size steps
    batch_size: int = 16  # completions per step (TRL's per_device_train_batch_size)
    num_generations: int = 8  # TRL's default
    max_completion_length: int = 16  # an answer is a number: its tokens and EOS fit
    learning_rate: float = 5e-5
    compare: str | None = None
    output: str = "bench/results/grpo-vs-trl"
    data: str | None = None  # question/answer rows (examples/tasks.json's shape); default: sums, seeded
    seed: int = 0
    gradient_checkpointing: bool = True  # the same for both trainers; on is the default of TRL and aift train
    precision: str = "auto"  # both trainers alike: bf16 where the device has it in hardware, else fp32

    def __post_init__(self) -> None:
        for name in ("examples", "batch_size", "max_completion_length"):
            if getattr(self, name) <= 0:
                raise AiftError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        if self.num_generations < 2 or self.batch_size % self.num_generations:
            raise AiftError(
                f"--batch-size {self.batch_size} counts completions and must be a multiple of --num-generations "
                f"{self.num_generations} (at least 2)"
            )
        if self.examples * self.num_generations % self.batch_size:
            raise AiftError(
                f"--examples {self.examples} prompts x {self.num_generations} generations must fill whole steps of "
                f"--batch-size {self.batch_size} completions"
            )

    @property
    def steps(self) -> int:
        return self.examples * self.num_generations // self.batch_size


def sum_tasks(n: int, seed: int) -> list[dict]:
    """Sums of two numbers with the number as the answer, the shape of examples/tasks.json."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        rows.append({"question": f"{a} + {b} = ? Answer with the number only.", "answer": str(a + b)})
    return rows


def run_bench(options: GRPOBenchOptions) -> dict:
    """Writes the prompts, runs each trainer in a fresh process, writes result.json, results.md and chart.png."""
    from aift.models.loading import resolve_model_path

    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = _task_rows(options)
    data = out / "tasks.json"
    data.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    runs, load_before = {}, load_average()
    precision = measure.bench_precision(options.precision)
    model = str(resolve_model_path(options.model))
    for trainer in ["aift", *([options.compare] if options.compare else [])]:
        spec = {**asdict(options), "trainer": trainer, "model": model, "data": str(data),
                "bf16": precision == "bf16", "steps": options.steps}  # fmt: skip
        # aift on tcmalloc where installed, as `aift train` runs; TRL on the system allocator, as its users run it.
        env = worker_env(tcmalloc=trainer == "aift")
        runs[trainer] = run_worker("aift.bench.grpo", spec, out / "logs", "GRPO", env)
        runs[trainer]["summary"] = summarize(runs[trainer])
    result = {"options": asdict(options), "steps": options.steps, "precision": precision, "runs": runs,
              "load_average": {"before": load_before, "after": load_average()}}  # fmt: skip
    if "trl" in runs:
        result["ratios"] = ratios(runs["aift"]["summary"], runs["trl"]["summary"])
        result["targets"] = target_rows(result["ratios"])
    write_json_atomic(out / BENCH_RESULT_FILE, result, ensure_ascii=True)  # what `aift report` reads
    write_text_atomic(out / "results.md", markdown(result))
    chart(result, out / "chart.png")
    return result


def _task_rows(options: GRPOBenchOptions) -> list[dict]:
    if options.data is None:
        return sum_tasks(options.examples, options.seed)
    rows = json.loads(Path(options.data).read_text(encoding="utf-8"))
    if len(rows) < options.examples:
        raise AiftError(f"--data {options.data} has {len(rows)} rows; --examples {options.examples} needs as many")
    return rows[: options.examples]


def summarize(run: dict) -> dict[str, float]:
    """A run's per-step lists -> steps/s, seconds per step (generation, training), tokens/s, mean reward."""
    steps, total, generation = len(run["step_s"]), sum(run["step_s"]), sum(run["generation_s"])
    train = total - generation
    rewards = run["reward"]
    return {
        "steps_per_s": steps / total,
        "step_s": total / steps,
        "generation_s": generation / steps,
        "train_s": train / steps,
        "generated_tokens_per_s": sum(run["generated_tokens"]) / generation,
        "trained_tokens_per_s": sum(run["trained_tokens"]) / train,
        "reward_mean": sum(rewards) / len(rewards),
        "completions": run["completions"],
        "peak_mem_gb": run["peak_mem_gb"],
    }


def ratios(aift: dict, trl: dict) -> dict[str, float]:
    """aift over TRL, and the mean-reward gap in units of 2 standard errors of a difference of two 0/1 means."""
    out = {key: aift[key] / trl[key] for key in ("steps_per_s", "generated_tokens_per_s", "trained_tokens_per_s")}
    out["peak_mem"] = aift["peak_mem_gb"] / trl["peak_mem_gb"]
    out["reward_gap"] = aift["reward_mean"] - trl["reward_mean"]
    out["reward_noise"] = 2 * math.sqrt(sum(r["reward_mean"] * (1 - r["reward_mean"]) / r["completions"]
                                            for r in (aift, trl)))  # fmt: skip
    out["reward_gap_in_noise"] = abs(out["reward_gap"]) / out["reward_noise"] if out["reward_noise"] else 0.0
    return out


def target_rows(values: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key, (meaning, target, higher) in TARGETS.items():
        value = values[key]
        rows.append({"name": key, "meaning": meaning, "target": target, "value": value,
                     "met": value >= target if higher else value <= target})  # fmt: skip
    return rows


def markdown(result: dict) -> str:
    o, load = result["options"], result["load_average"]
    lines = [
        "# LoRA GRPO: aift vs TRL GRPOTrainer",
        "",
        f"{o['examples']} prompts, one pass ({result['steps']} steps of {o['batch_size']} completions, "
        f"{o['num_generations']} per prompt), at most {o['max_completion_length']} new tokens, lr {o['learning_rate']}, "
        f"reward {REWARD}, gradient checkpointing {'on' if o['gradient_checkpointing'] else 'off'} and "
        f"{result['precision']} for both. Load average (1, 5, 15 min) before {load['before']}, after {load['after']}.",
        "",
        "| trainer | steps/s | s/step | generation s/step | training s/step | generated tokens/s | trained tokens/s | "
        "peak memory (GB) | mean reward |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in result["runs"].items():
        s = run["summary"]
        lines.append(f"| {name} | {s['steps_per_s']:.3f} | {s['step_s']:.2f} | {s['generation_s']:.2f} | "
                     f"{s['train_s']:.2f} | {s['generated_tokens_per_s']:.1f} | {s['trained_tokens_per_s']:.1f} | "
                     f"{s['peak_mem_gb']:.2f} | {s['reward_mean']:.3f} |")  # fmt: skip
    lines += ["", "| step | " + " | ".join(f"{n} reward" for n in result["runs"]) + " |",
              "| ---: |" + " ---: |" * len(result["runs"])]  # fmt: skip
    for i in range(result["steps"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['reward'][i]:.3f}" for r in result["runs"].values()) + " |")
    if "targets" in result:
        lines += ["", "| target | meaning | value | target | met |", "| --- | --- | ---: | ---: | --- |"]
        for row in result["targets"]:
            op = ">=" if TARGETS[row["name"]][2] else "<="
            met = "yes" if row["met"] else "**no**"
            lines.append(f"| {row['name']} | {row['meaning']} | {row['value']:.3f} | {op} {row['target']} | {met} |")
        runs = result["runs"]
        lines += ["", "## Settings of the two runs", ""]
        lines += settings_markdown("aift", runs["aift"]["settings"], "TRL", runs["trl"]["settings"])
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """The reward per step of both trainers, and each one's seconds per step in generation and in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    colors = {"aift": "#2a7ab0", "trl": "#d9822b"}
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        curve.plot(range(1, len(run["reward"]) + 1), run["reward"], marker="o", label=name, color=colors.get(name))
    curve.set(xlabel="step", ylabel=f"mean reward ({REWARD})", title="reward of the sampled completions")
    curve.legend()
    names = list(runs)
    generation = [runs[n]["summary"]["generation_s"] for n in names]
    train = [runs[n]["summary"]["train_s"] for n in names]
    bars.bar(names, generation, color="#8fb8d8", label="generation (rollout)")
    bars.bar(names, train, bottom=generation, color="#2a7ab0", label="training")
    bars.set(ylabel="seconds per step (lower is better)", title="step time")
    bars.legend()
    o = result["options"]
    fig.suptitle(f"LoRA GRPO on {Path(str(o['model'])).name}: {o['num_generations']} generations, "
                 f"{o['batch_size']} completions/step, {o['max_completion_length']} new tokens", fontsize=10)  # fmt: skip
    fig.tight_layout()
    report.save_figure(fig, path)


def summary_line(result: dict) -> str:
    s = result["runs"]["aift"]["summary"]
    line = (f"aift GRPO: {s['steps_per_s']:.3f} steps/s ({s['generation_s']:.2f} s generation + {s['train_s']:.2f} s "
            f"training a step), peak {s['peak_mem_gb']:.2f} GB, mean reward {s['reward_mean']:.3f}")  # fmt: skip
    if "ratios" in result:
        x = result["ratios"]
        line += (f"; vs TRL {x['steps_per_s']:.2f}x steps/s, {x['peak_mem']:.2f}x memory, reward "
                 f"{x['reward_gap']:+.3f} (noise +-{x['reward_noise']:.3f})")  # fmt: skip
    return line


# ---------------------------------------------------------------------- the worker side


def _prepared(spec: dict, work: Path):
    """The prompts prepared by `aift prepare` (a folder), their GRPO rows, and the order aift's planner takes them."""
    from aift.data.prepare import prepare_dataset
    from aift.data.prepared import read_prepared
    from aift.models.loading import load_tokenizer
    from aift.training.objectives.grpo import GRPOPlanner, prompt_rows

    folder = prepare_dataset(model=spec["model"], source_path=spec["data"], output_dir=work / "data",
                             max_length=MAX_LENGTH, val_ratio=0)  # fmt: skip
    split = read_prepared(folder)[0]["train"]
    rows = prompt_rows(split, load_tokenizer(spec["model"]))
    planner = GRPOPlanner(rows, spec["batch_size"] // spec["num_generations"], spec["seed"], 1, 1)
    return folder, rows, [i for micro_batch in planner.base_epoch(0) for i in micro_batch]


def _grpo_settings(num_generations, max_completion_length, temperature, top_p, top_k, beta, epsilon, loss_type,
                   scale_rewards, num_iterations, generation: str) -> dict[str, Any]:  # fmt: skip
    return {
        "num_generations": num_generations,
        "max_completion_length": max_completion_length,
        "sampling (temperature, top_p, top_k)": f"{temperature}, {top_p}, {top_k}",
        "beta": beta,
        "epsilon": epsilon,
        "loss": f"GRPO clipped surrogate, loss_type {loss_type}",
        "scale_rewards": scale_rewards,
        "num_iterations": num_iterations,
        "reward": REWARD + " (aift.training.rewards)",
        "generation": generation,
        "prompt order": "aift's planner order (seed), the same prompts in each step",
    }


def run_aift(spec: dict) -> dict[str, Any]:
    from aift.config import LoRAConfig, TrainingConfig
    from aift.inference.japanese import JapaneseModel
    from aift.models.run_folder import METRICS_FILE
    from aift.training.grpo_config import GRPOConfig
    from aift.training.grpo_trainer import GRPOTrainer
    from aift.utils.files import read_jsonl
    from aift.utils.gpu import peak_memory_gb

    work = Path(tempfile.mkdtemp(prefix="aift-grpo-bench-"))
    folder, _, _ = _prepared(spec, work)
    config = TrainingConfig(
        model_name=spec["model"], output_dir=str(work / "run"), learning_rate=spec["learning_rate"],
        batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=spec["steps"], warmup_steps=0,
        eval_steps=0, save_steps=0, logging_steps=1, bf16=spec["bf16"], fp16=False,
        gradient_checkpointing=spec["gradient_checkpointing"], max_length=MAX_LENGTH, seed=spec["seed"],
        report_to=["none"],
    )  # fmt: skip
    grpo = GRPOConfig(rewards=[REWARD], num_generations=spec["num_generations"],
                      max_completion_length=spec["max_completion_length"], log_completions_steps=0)  # fmt: skip
    lora = LoRAConfig(**LORA)
    trainer = GRPOTrainer(JapaneseModel(spec["model"]), grpo, lora, config, train_dataset=str(folder))
    trainer.train()
    peak = peak_memory_gb()
    records = [r for r in read_jsonl(work / "run" / METRICS_FILE) if r.get("type") == "train"]
    tokens = [r["tokens"] for r in records]
    g = grpo
    return {
        "step_s": [r["rollout_s"] + r["train_s"] for r in records],
        "generation_s": [r["rollout_s"] for r in records],
        "reward": [r["reward"] for r in records],
        "generated_tokens": [r["completions/mean_length"] * spec["batch_size"] for r in records],
        "trained_tokens": [b - a for a, b in zip([0, *tokens], tokens, strict=False)],
        "completions": len(records) * spec["batch_size"],
        "peak_mem_gb": peak,
        "settings": aift_settings(config, lora, measure.allocator(), TRAINED_TOKENS, _grpo_settings(
            g.num_generations, g.max_completion_length, g.temperature, g.top_p, g.top_k, g.beta, g.epsilon,
            g.loss_type, g.scale_rewards, g.num_iterations, "aift's batched KV-cache decoder (generate_batch)")),
    }  # fmt: skip


def run_trl(spec: dict) -> dict[str, Any]:
    """TRL's GRPOTrainer as a user configures it: its defaults plus the bench's precision, LoRA, generations,
    completion length, batch, lr and reward; the prompts conversational, in aift's order (``shuffle_dataset``
    off)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from aift.training.rewards import exact_match
    from aift.utils.gpu import peak_memory_gb

    work = Path(tempfile.mkdtemp(prefix="trl-grpo-bench-"))
    _, rows, order = _prepared(spec, work)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset, prompts_match = _trl_dataset(spec["data"], tokenizer, [rows[i] for i in order])
    args = GRPOConfig(
        output_dir=str(work / "run"), per_device_train_batch_size=spec["batch_size"],
        num_generations=spec["num_generations"], max_completion_length=spec["max_completion_length"],
        learning_rate=spec["learning_rate"], max_steps=spec["steps"], shuffle_dataset=False, bf16=spec["bf16"],
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=1,
        dataloader_num_workers=0, seed=spec["seed"], gradient_checkpointing=spec["gradient_checkpointing"],
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = LoraConfig(**LORA, task_type="CAUSAL_LM")
    timer = _step_timer()
    trainer = _timed(GRPOTrainer)(model=model, reward_funcs=[exact_match], args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=copy.deepcopy(lora), callbacks=[timer])  # fmt: skip
    trainer.train()
    peak = peak_memory_gb()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    tokens = [r["num_tokens"] for r in logs]
    return {
        "step_s": timer.seconds,
        "generation_s": trainer.rollout_seconds,
        "reward": [r["reward"] for r in logs],
        "generated_tokens": [r["completions/mean_length"] * spec["batch_size"] for r in logs],
        "trained_tokens": [b - a for a, b in zip([0, *tokens], tokens, strict=False)],
        "completions": len(logs) * spec["batch_size"],
        "peak_mem_gb": peak,
        "prompts_match_aift": prompts_match,
        "settings": trl_settings(args, lora, trainer.model, measure.allocator(), TRAINED_TOKENS, _grpo_settings(
            args.num_generations, args.max_completion_length, args.temperature, args.top_p, args.top_k, args.beta,
            args.epsilon, args.loss_type, args.scale_rewards, args.num_iterations,
            "transformers generate (KV cache), no vLLM")),
    }  # fmt: skip


def _trl_dataset(source: str, tokenizer, rows: list[dict]):
    """The source rows as TRL's conversational prompts (``reference`` beside them), in the order of aift's ``rows``;
    and whether TRL's rendering of each gives aift's prompt token ids."""
    from datasets import Dataset

    by_prompt = {}
    for item in json.loads(Path(source).read_text(encoding="utf-8")):
        prompt = [{"role": "user", "content": item["question"]}]
        by_prompt[tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)] = prompt
    ordered = [{"prompt": by_prompt[r["prompt"]], "reference": r["columns"]["reference"]} for r in rows]
    ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
           ["input_ids"] for r in ordered]  # fmt: skip
    return Dataset.from_list(ordered), all(list(a) == r["prompt_input_ids"] for a, r in zip(ids, rows, strict=True))


def _step_timer():
    """A TrainerCallback that keeps each optimizer step's seconds, from ``on_step_begin`` to ``on_step_end``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds: list[float]

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = [*getattr(self, "seconds", []), time.perf_counter() - self.started]

    return StepTimer()


def _timed(trainer_cls):
    """TRL's trainer with its rollout (``_generate_and_score_completions``) timed; nothing else changed."""

    class TimedGRPOTrainer(trainer_cls):
        rollout_seconds: list[float]

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:  # eval rollouts are not steps
                self.rollout_seconds = [*getattr(self, "rollout_seconds", []), time.perf_counter() - started]
            return out

    return TimedGRPOTrainer


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"aift": run_aift, "trl": run_trl}))
