"""One configuration's peak memory, in its own process: `python bench/plan/measure.py SPEC.json RESULT.json`.

SPEC: {"model", "method" (full | lora | qlora), "batch_size", "max_length", "gradient_checkpointing", "dtype"}.
The process trains as `aift train` does on this machine (tcmalloc when the parent preloads it, TrainingConfig's
defaults: packing, the model's own loss, LoRA r=16 all-linear with dropout 0.05) with two micro-batches per optimizer step, and stops at the fifth forward: by then
two optimizer steps have run (AdamW's moments exist) and the fourth micro-batch ran its backward while the
third one's gradients were held, which is the steady state of every later step. It runs on one thread
(SPEC "threads"): memory does not depend on it, and two OpenMP threads on two cores shared with other jobs
wait for each other at every operator's barrier (a step took minutes instead of seconds).
``dtype`` "fp32" turns autocast off (bf16: false, fp16: false): on a CPU without AVX512-BF16 (the one
these results were measured on) a bf16 autocast
step is about 16x slower than fp32, too slow for a grid; "bf16" keeps the default bf16 autocast.

Peak memory on a CPU is the process's resident set (as ``aift.utils.gpu.peak_memory_gb`` reads it), but
measured as VmHWM - VmRSS before the model was loaded, with the high-water mark reset once the model is in
memory (``/proc/self/clear_refs``): the libraries are not training memory, and loading reads the safetensors
file through a mapping whose pages would otherwise set the peak. ``ru_maxrss`` is not used because a child
process inherits its parent's high-water mark through exec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aift.config import LoRAConfig, TrainingConfig
from aift.inference.japanese import JapaneseModel
from aift.training.loop import run_training
from aift.training.objectives.sft import SFTObjective
from aift.training.trainers import FullFinetuningTrainer, LoRAFinetuningTrainer
from aift.utils.allocator import find_tcmalloc, tcmalloc_mapped

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STOP_AT_FORWARD = 5  # micro-batches 1-4 (two optimizer steps of 2) have run when the 5th forward starts


def proc_status_bytes(field: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Resets the resident-set high-water mark (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_bytes("VmHWM") <= proc_status_bytes("VmRSS") + 4 * 2**20


class Measured(Exception):
    """Raised by the probe to leave the loop once the steady-state steps have run."""


class PeakProbe(SFTObjective):
    """The loop's SFT objective, which records the high-water mark when the Nth forward starts, then stops."""

    def __init__(self, stop_at: int) -> None:
        super().__init__(loss_chunk_size=0)  # TrainingConfig's default: the model's own loss
        self.stop_at, self.calls, self.started = stop_at, 0, time.perf_counter()

    def loss_sum(self, model, batch, autocast):
        self.calls += 1
        if self.calls == self.stop_at:
            raise Measured(
                {"hwm": proc_status_bytes("VmHWM"), "rss": proc_status_bytes("VmRSS"), "seconds": self.elapsed()}
            )
        return super().loss_sum(model, batch, autocast)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def training_config(spec: dict, output_dir: str) -> TrainingConfig:
    return TrainingConfig(
        model_name=spec["model"],
        output_dir=output_dir,
        learning_rate=1e-5,
        batch_size=spec["batch_size"],
        gradient_accumulation_steps=2,  # gradients are held while the next micro-batch runs, as with the default 4
        max_steps=STOP_AT_FORWARD,  # never reached: the probe stops the run
        warmup_steps=0,
        eval_steps=0,
        save_steps=0,
        logging_steps=1,
        max_length=spec["max_length"],
        gradient_checkpointing=spec["gradient_checkpointing"],
        report_to=["none"],
        fp16=spec["dtype"] == "bf16",  # the default (fp16: true) means bf16 autocast on a CPU
        bf16=False,
    )


def trainer_for(spec: dict, holder: JapaneseModel, config: TrainingConfig):
    """Random token rows of exactly max_length tokens: every packed row is full, every token trained."""
    generator = torch.Generator().manual_seed(0)
    rows = spec["batch_size"] * 2 * (STOP_AT_FORWARD // 2 + 1)
    ids = torch.randint(10, 40000, (rows, spec["max_length"]), generator=generator).tolist()
    data = [{"input_ids": row, "labels": row} for row in ids]
    if spec["method"] == "full":
        return FullFinetuningTrainer(holder, config, train_dataset=data)
    return LoRAFinetuningTrainer(holder, LoRAConfig(use_qlora=spec["method"] == "qlora"), config, train_dataset=data)


def measure(spec: dict) -> dict:
    baseline = proc_status_bytes("VmRSS")
    holder = JapaneseModel(spec["model"], device="cpu", load_in_4bit=spec["method"] == "qlora")
    holder.load_tokenizer()
    holder.load_model()
    reset = reset_peak()
    loaded = proc_status_bytes("VmRSS")
    with tempfile.TemporaryDirectory(prefix="aift-plan-bench-") as out:
        config = training_config(spec, out)
        trainer = trainer_for(spec, holder, config)
        model, tokenizer, train_examples, _, info = trainer.prepare()
        probe = PeakProbe(STOP_AT_FORWARD)
        try:
            run_training(model, tokenizer, config, train_examples, None, info, objective=probe)
        except Measured as done:
            figures = done.args[0]
        else:
            raise RuntimeError("the run ended before the probe's forward")
    return {
        **spec,
        "baseline_rss_gb": baseline / 1e9,
        "after_load_rss_gb": loaded / 1e9,
        "peak_rss_gb": figures["hwm"] / 1e9,
        "measured_gb": (figures["hwm"] - baseline) / 1e9,
        "rss_between_steps_gb": (figures["rss"] - baseline) / 1e9,
        "peak_reset_after_load": reset,
        "train_seconds": figures["seconds"],
        "allocator": "tcmalloc" if tcmalloc_mapped() else "system malloc",
        "threads": torch.get_num_threads(),
    }


def child_env() -> dict[str, str]:
    """tcmalloc as `aift train` preloads it; one OpenMP thread; this checkout's sources; no hub access."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    library = find_tcmalloc()
    if library:
        env["LD_PRELOAD"] = library
    return env


def measure_in_child(spec: dict, workdir: Path) -> dict:
    """Runs this file for one configuration in a fresh process; its log goes to workdir."""
    name = "{method}-b{batch_size}-t{max_length}-ckpt{gradient_checkpointing:d}-{dtype}".format(**spec)
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    with open(workdir / f"{name}.log", "w", encoding="utf-8") as log:
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(result_path)],
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            cwd=REPO,
        )
    return json.loads(result_path.read_text(encoding="utf-8"))


def main(spec_path: str, result_path: str) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(spec.get("threads", 1))
    Path(result_path).write_text(json.dumps(measure(spec), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
