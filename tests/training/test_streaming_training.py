"""Training on a streamed corpus: processes share one stream exactly, a SIGKILLed run resumes at the same document
and token (the same losses), and the settings a stream cannot train with are named before the model loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from subprocess_helpers import child_env, wait_for

from aift.cli import main
from aift.config import TrainingConfig
from aift.data.streaming import prepare_streaming
from aift.training.batching import to_examples
from aift.training.checkpoint import TrainerState
from aift.training.streaming import StreamPlanner, describe

FORMATS = ("jsonl", "parquet", "txt")


def write_corpus(folder, kind: str) -> None:
    """The same 28 documents, longer and shorter than a block, as 2 JSON Lines files, 2 Parquet files of
    several row groups, or a folder of one .txt document each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    rng = random.Random(1)
    for f in range(2):
        docs = [f"記録{f}-{i}。" + "蔵で酒を仕込む。" * rng.randint(2, 30) for i in range(14)]
        if kind == "jsonl":
            lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
            (folder / f"part{f}.jsonl").write_text(lines, encoding="utf-8")
        elif kind == "parquet":
            pq.write_table(pa.table({"text": docs}), folder / f"part{f}.parquet", row_group_size=4)
        else:
            for i, doc in enumerate(docs):
                (folder / f"part{f}-{i:02d}.txt").write_text(doc, encoding="utf-8")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tiny_model_dir):
    """corpora(kind): the corpus of write_corpus in that format, prepared with --streaming (once per module)."""
    made = {}

    def prepared(kind: str):
        if kind not in made:
            work = tmp_path_factory.mktemp(f"streamed-{kind}")
            write_corpus(work / "corpus", kind)
            made[kind] = prepare_streaming(str(tiny_model_dir), work / "corpus", output_dir=work / "prepared",
                                           max_length=48, eval_documents=3)  # fmt: skip
        return made[kind]

    return prepared


@pytest.fixture(scope="module")
def streamed(corpora):
    return corpora("jsonl")


def _micro_batches(planner, indices):
    return [planner.collate(j)["input_ids"].tolist() for j in indices]


def test_two_processes_read_what_one_reads_with_accumulation(streamed, tokenizer):
    examples = to_examples(streamed, tokenizer, 48, "training")
    one = StreamPlanner(examples, TrainingConfig(max_steps=4, gradient_accumulation_steps=2, batch_size=2), 0, "4d", 1)
    two = [
        StreamPlanner(examples, TrainingConfig(max_steps=4, gradient_accumulation_steps=1, batch_size=2), 0, "4d", 2)
        for _ in range(2)
    ]
    assert one.num_micro_batches() == two[0].num_micro_batches() == 8
    reference = _micro_batches(one, range(8))
    for rank, planner in enumerate(two):  # the loop deals micro-batches round-robin: rank r takes r, r+2, ...
        assert _micro_batches(planner, range(8)[rank::2]) == reference[rank::2]
    # Saved at a step's end, every process's stream is at the same place.
    states = [p.state_dict(TrainerState(micro_batch=8)) for p in (one, *two)]
    assert states[0] == states[1] == states[2] and states[0]["stats"]["blocks"] == 16


def test_the_start_up_line_says_the_run_streams_and_what_is_known(streamed, tokenizer):
    examples = to_examples(streamed, tokenizer, 48, "training")
    size = sum(f.size for f in examples.corpus.files) / 1e6
    assert describe(examples) == (
        f"streamed from 2 file(s), {size:.1f} MB (its documents and tokens are counted as it is read: see the summary)"
    )
    held_out = to_examples(streamed, tokenizer, 48, "training", split="test")
    assert describe(held_out) == f"{len(held_out.rows)} examples" and len(held_out.rows) > 0


def test_a_stream_needs_max_steps_and_its_unchanged_files(streamed, tiny_model_dir, tmp_path, capsys):
    argv = ["train", "--model-name", str(tiny_model_dir), "--dataset-path", str(streamed), "--output-dir",
            str(tmp_path / "run"), "--max-length", "48", "--report-to", "none", "--no-tcmalloc"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a streamed corpus has no known length: set the number of steps (--max-steps N" in err
    part = streamed.parent / "corpus" / "part1.jsonl"
    stat = os.stat(part)
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert main([*argv, "--max-steps", "2"]) == 2
        assert f"{part} changed since `aift prepare --streaming`" in capsys.readouterr().err
    finally:
        os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _train_cmd(tiny_model_dir, streamed, output_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "aift", "train", "--no-tcmalloc", "--use-lora",
        f"model_name={tiny_model_dir}", f"dataset_path={streamed}", f"output_dir={output_dir}",
        "batch_size=1", "gradient_accumulation_steps=2", "max_steps=6", "max_length=48", "warmup_steps=1",
        "learning_rate=1e-3", "save_steps=2", "save_total_limit=3", "logging_steps=1", "eval_steps=0", "fp16=false",
        "bf16=false", "gradient_checkpointing=false", "report_to=none", "seed=5", "lora.lora_dropout=0.2", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", FORMATS)
def test_sigkilled_streaming_run_resumes_to_the_same_losses(tmp_path, tiny_model_dir, corpora, kind, read_metrics):
    streamed = corpora(kind)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(_train_cmd(tiny_model_dir, streamed, straight), check=True, env=child_env(), capture_output=True)
    reference = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert sorted(reference) == list(range(1, 7))
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, streamed, broken), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(broken / "checkpoints" / "checkpoint-2" / "manifest.json", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (broken / "train_summary.json").exists(), "the run finished before it could be killed"
    saved = torch.load(broken / "checkpoints" / "checkpoint-2" / "stream_state.pt", weights_only=True)
    assert saved["micro_batch"] == 4 and saved["stats"]["blocks"] == 4
    assert saved["cursor"]["token"] > 0  # killed in mid-document: the resumed run continues inside it
    done = subprocess.run(_train_cmd(tiny_model_dir, streamed, broken, "resume_from_checkpoint=latest"),
                          env=child_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    resumed = {r["step"]: r["loss"] for r in read_metrics(broken)}
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
    summaries = [json.loads((run / "train_summary.json").read_text())["stream"] for run in (straight, broken)]
    assert summaries[0] == summaries[1] and summaries[0]["blocks"] == 12
