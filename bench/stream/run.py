"""Streaming a corpus larger than memory: the resident set while `aift train` reads a multi-GB corpus.

    python bench/stream/run.py [--corpus-gb 2] [--corpus-dir DIR] [--keep] [--out bench/results/stream]

1. Generates a seeded corpus of Japanese-like text (``--corpus-gb``, in JSON Lines files and ``.txt`` files of one
   document each) under a temporary folder or ``--corpus-dir``, removed afterwards unless ``--keep``, and records it
   with `aift prepare --task pretrain --streaming` (aift.data.streaming.prepare_streaming).
2. Stream: one whole pass over the corpus through what `aift train` runs for each micro-batch (the reader, the
   tokenizer 64 documents or 1 MB at a time, the packer and the collator: aift.training.streaming.StreamPlanner),
   in this process, its RSS (psutil) sampled every ``--sample-every`` blocks against the bytes read (from the stream's
   cursor). Reported: RSS at the start, after the warm-up (the first ``--warmup-mb`` read), at the end and its
   peak; growth per GB read after the warm-up; documents, tokens, blocks; MB/s and tokens/s.
3. Train: a short real `python -m aift train` (LoRA on the embedded model, ``--train-steps`` steps) on the same
   prepared folder, the RSS of its process tree sampled every 0.5 s: RSS after the model loaded (the first step
   logged), at the end, and the peak.

Writes result.json, results.md and chart.png (RSS against bytes read) to --out, with the CPU's flags and the load
before and after. It is mostly tokenizer CPU: run it niced on a quiet machine (2 GB take ~15-30 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from aift.bench.core import cpu_flags, load_average

ROOT = Path(__file__).resolve().parents[2]
JSONL_FILES = 6  # the corpus: most bytes in JSON Lines files of many documents ...
TEXT_SHARE = 0.15  # ... and this share in .txt files of one long document each (50 KB - 2 MB)
# Pieces of Japanese prose the generator draws from: kanji, hiragana, katakana and some ASCII, as a domain corpus has.
NOUNS = ("酒蔵", "杜氏", "麹", "酒母", "米", "水", "発酵", "温度", "季節", "仕込み", "香り", "味わい", "精米", "蒸し米",
         "タンク", "ラベル", "出荷", "地域", "歴史", "職人", "技術", "研究", "データ", "記録", "東京", "京都", "新潟",
         "システム", "モデル", "学習", "文章", "言語", "日本語", "翻訳", "情報", "会議", "計画", "報告", "市場", "製品")  # fmt: skip
VERBS = ("を仕込む", "を管理する", "が変わる", "を記録した", "を調べる", "が広がる", "を守ってきた", "を試す",
         "が上がった", "を比べる", "を説明する", "が進む", "を改良した", "を分析する", "が求められる")  # fmt: skip
LINKS = ("は", "の", "と", "では", "にとって", "によって", "について", "から", "まで", "も")
TAILS = ("。", "。", "。", "、そして", "が、", "ため、", "ので、")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-gb", type=float, default=2.0, help="size of the generated corpus (GB, 1e9 bytes)")
    parser.add_argument("--corpus-dir", type=Path, default=None, help="generate here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per block of the stream")
    parser.add_argument("--sample-every", type=int, default=500, help="blocks between RSS samples of the stream")
    parser.add_argument("--warmup-mb", type=float, default=100.0, help="read before the warm-up RSS is taken")
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the aift train run (0: no run)")
    parser.add_argument("--train-max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/stream")
    args = parser.parse_args(argv)
    load_before = load_average()
    made_dir = args.corpus_dir is None
    corpus_dir = Path(tempfile.mkdtemp(prefix="aift-stream-")) if made_dir else args.corpus_dir
    try:
        result = run(args, corpus_dir, load_before)
    finally:
        if not args.keep:
            shutil.rmtree(corpus_dir if made_dir else corpus_dir / "corpus", ignore_errors=True)
            shutil.rmtree(corpus_dir / "prepared", ignore_errors=True)
            shutil.rmtree(corpus_dir / "train-run", ignore_errors=True)
    write(result, args.out)
    print(markdown(result))
    return 0


def run(args, corpus_dir: Path, load_before: list[float]) -> dict:
    from aift.bench.core import environment
    from aift.data.streaming import prepare_streaming
    from aift.models.embedded import embedded_model_dir

    model = args.model or str(embedded_model_dir())
    started = time.monotonic()
    corpus = generate_corpus(corpus_dir / "corpus", int(args.corpus_gb * 1e9), args.seed)
    corpus["generate_s"] = time.monotonic() - started
    prepared = prepare_streaming(model, corpus_dir / "corpus", output_dir=corpus_dir / "prepared",
                                 max_length=args.max_length, seed=args.seed, eval_documents=4)  # fmt: skip
    # The short training run first: its figures exist early if the long pass is stopped.
    train = (
        train_run(prepared, model, args.train_steps, args.train_max_length, corpus_dir) if args.train_steps else None
    )
    stream = stream_pass(prepared, model, args.max_length, args.sample_every, args.warmup_mb * 1e6)
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": Path(model).name,
        "corpus": corpus,
        "stream": stream,
        "train": train,
        "cpu_flags": cpu_flags(),
        "environment": environment(load_before),
    }


# ---------------------------------------------------------------------- the corpus


def generate_corpus(folder: Path, target_bytes: int, seed: int) -> dict:
    """JSON Lines files (a document per line, 200 B - 8 KB) and .txt files (one document, 50 KB - 2 MB), seeded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = [_sentence(rng) for _ in range(8192)]
    text_bytes, documents = int(target_bytes * TEXT_SHARE), {"jsonl": 0, "txt": 0}
    written = 0
    (folder / "txt").mkdir(exist_ok=True)
    while written < text_bytes:
        doc = _document(rng, pool, rng.randint(50_000, 2_000_000) if target_bytes > 50_000_000 else 20_000)
        path = folder / "txt" / f"doc-{documents['txt']:05d}.txt"
        written += path.write_bytes(doc.encode())
        documents["txt"] += 1
    per_file = (target_bytes - written) / JSONL_FILES
    for f in range(JSONL_FILES):
        with open(folder / f"part-{f:02d}.jsonl", "wb") as out:
            size = 0
            while size < per_file:
                doc = _document(rng, pool, rng.randint(200, 8000))
                size += out.write(
                    (json.dumps({"id": documents["jsonl"], "text": doc}, ensure_ascii=False) + "\n").encode()
                )
                documents["jsonl"] += 1
            written += size
    return {"bytes": written, "files": JSONL_FILES + documents["txt"], "documents": documents, "seed": seed}


def _sentence(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice(NOUNS), rng.choice(LINKS), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(TAILS)]
    if rng.random() < 0.2:
        parts.append(f"（{rng.randint(1, 2026)}年、{rng.choice(('ver.', 'No.', 'ID '))}{rng.randint(1, 999)}）")
    return "".join(parts)


def _document(rng: random.Random, pool: list[str], approx_bytes: int) -> str:
    """About ``approx_bytes`` of UTF-8 (a sentence is ~40-150 bytes), in paragraphs."""
    sentences = rng.choices(pool, k=max(1, approx_bytes // 90))
    paragraphs = ["".join(sentences[i : i + 12]) for i in range(0, len(sentences), 12)]
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------- the stream


def rss() -> int:
    return psutil.Process().memory_info().rss


def bytes_read(corpus, cursor) -> int:
    """Bytes of the first pass read up to ``cursor`` (the files before it in the pass's order, and its offset)."""
    sizes = [corpus.files[i].size for i in corpus.order(0)]
    if cursor.epoch > 0:
        return sum(sizes)
    return sum(sizes[: cursor.file]) + (min(cursor.offset, sizes[cursor.file]) if cursor.file < len(sizes) else 0)


def stream_pass(prepared: Path, model: str, max_length: int, sample_every: int, warmup_bytes: float) -> dict:
    """One pass through what `aift train` runs per micro-batch (one block each), RSS sampled against bytes read."""
    from aift.config import TrainingConfig
    from aift.models.loading import load_tokenizer
    from aift.training.batching import to_examples
    from aift.training.streaming import StreamPlanner

    tokenizer = load_tokenizer(model)
    examples = to_examples(prepared, tokenizer, max_length, "training")
    config = TrainingConfig(max_steps=1, batch_size=1, gradient_accumulation_steps=1, max_length=max_length)
    # The mask of aift train on CPU (segment attention): position ids, no 4-D mask.
    planner = StreamPlanner(examples, config, tokenizer.pad_token_id or 0, "position_ids", 1)
    stream, corpus = planner.stream, examples.corpus
    samples = [(0, rss())]  # (bytes read, RSS)
    started, index = time.monotonic(), 0
    while not stream.stats["passes"]:
        planner.collate(index)
        index += 1
        if index % sample_every == 0:
            samples.append((bytes_read(corpus, stream.cursor), rss()))
            if len(samples) % 20 == 0:  # progress, for a long pass
                print(f"{time.monotonic() - started:.0f} s: {samples[-1][0] / 1e6:.0f} MB read, RSS "
                      f"{samples[-1][1] / 1e6:.0f} MB, {dict(stream.stats)}", flush=True)  # fmt: skip
    seconds = time.monotonic() - started
    samples.append((bytes_read(corpus, stream.cursor), rss()))
    return {**memory_figures(samples, warmup_bytes), "seconds": seconds, "samples": samples,
            "stats": dict(stream.stats), "max_length": max_length,
            "mb_per_s": samples[-1][0] / 1e6 / seconds, "tokens_per_s": stream.stats["tokens"] / seconds}  # fmt: skip


def memory_figures(samples: list[tuple[int, int]], warmup_bytes: float) -> dict:
    """RSS at the start, after the warm-up, at the end and its peak (MB), and the growth per GB read after it."""
    warm = next((s for s in samples if s[0] >= warmup_bytes), samples[-1])
    end = samples[-1]
    read_after = (end[0] - warm[0]) / 1e9
    return {
        "bytes_read": end[0],
        "rss_start_mb": samples[0][1] / 1e6,
        "rss_warm_mb": warm[1] / 1e6,
        "rss_end_mb": end[1] / 1e6,
        "rss_peak_mb": max(r for _, r in samples) / 1e6,
        "warm_at_bytes": warm[0],
        "growth_mb_per_gb": (end[1] - warm[1]) / 1e6 / read_after if read_after > 0 else None,
    }


# ---------------------------------------------------------------------- the training run


def tree_rss(proc: psutil.Process) -> int:
    try:
        return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True)))
    except psutil.Error:
        return 0


def train_run(prepared: Path, model: str, steps: int, max_length: int, work: Path) -> dict:
    """A real `aift train` (LoRA) of ``steps`` steps on the streamed folder, its process tree's RSS sampled."""
    out = work / "train-run"
    command = [sys.executable, "-m", "aift", "train", "--use-lora", f"model_name={model}", f"dataset_path={prepared}",
               f"output_dir={out}", f"max_steps={steps}", f"max_length={max_length}", "batch_size=1",
               "gradient_accumulation_steps=1", "logging_steps=1", "eval_steps=0", f"save_steps={steps}",
               "warmup_steps=1", "report_to=none", "fp16=false", "bf16=false"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    samples: list[tuple[float, int, int]] = []  # (seconds, RSS, steps logged)
    metrics = out / "metrics.jsonl"
    log = work / "train.log"
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        watched, done = psutil.Process(proc.pid), threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                steps = metrics.read_text().count('"type": "train"') if metrics.exists() else 0
                samples.append((time.monotonic() - started, tree_rss(watched), steps))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code:
        raise RuntimeError(f"aift train exited with {code}:\n{log.read_text()[-3000:]}")
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("type") == "train"]
    summary = json.loads((out / "train_summary.json").read_text())
    live = [r for _, r, _ in samples if r]
    loaded = next((r for _, r, steps in samples if steps and r), live[-1] if live else 0)
    return {
        "steps": steps,
        "max_length": max_length,
        "seconds": time.monotonic() - started,
        "rss_after_first_step_mb": loaded / 1e6,
        "rss_end_mb": live[-1] / 1e6 if live else None,
        "rss_peak_mb": max(live) / 1e6 if live else None,
        "losses": [r["loss"] for r in train],
        "stream": summary.get("stream"),
        "samples": samples,
    }


# ---------------------------------------------------------------------- reporting


def markdown(r: dict) -> str:
    s, c, env = r["stream"], r["corpus"], r["environment"]
    growth = "n/a" if s["growth_mb_per_gb"] is None else f"{s['growth_mb_per_gb']:+.1f} MB"
    lines = [
        f"# Streaming a {c['bytes'] / 1e9:.2f} GB corpus ({env['date']})",
        "",
        f"{c['files']} files ({JSONL_FILES} JSON Lines, {c['documents']['txt']} .txt), {c['documents']['jsonl']:,} + "
        f"{c['documents']['txt']} documents of generated Japanese-like text (seed {c['seed']}); tokenizer of "
        f"{r['model']}, blocks of {s['max_length']} tokens; CPU {env['cpu']} ({env['cores']} cores, flags "
        f"{', '.join(r['cpu_flags'])}); load average before {env['load_before']}, after {env['load_after']}.",
        "",
        "## One pass: reader, tokenizer, packer and collator, as `aift train` runs them per micro-batch",
        "",
        "| read | documents | tokens | blocks | seconds | MB/s | tokens/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['bytes_read'] / 1e9:.2f} GB | {s['stats'].get('documents', 0):,} | {s['stats'].get('tokens', 0):,} | "
        f"{s['stats'].get('blocks', 0):,} | {s['seconds']:.0f} | {s['mb_per_s']:.2f} | {s['tokens_per_s']:,.0f} |",
        "",
        "| RSS at start | after warm-up | at the end | peak | growth per GB read after warm-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {s['rss_start_mb']:.0f} MB | {s['rss_warm_mb']:.0f} MB (at {s['warm_at_bytes'] / 1e6:.0f} MB read) | "
        f"{s['rss_end_mb']:.0f} MB | {s['rss_peak_mb']:.0f} MB | {growth} |",
    ]
    t = r["train"]
    if t:
        st = t["stream"] or {}
        lines += [
            "",
            f"## `aift train --use-lora`, {t['steps']} steps of 1 block of {t['max_length']} tokens",
            "",
            "| RSS after the first step | at the end | peak | seconds | blocks streamed | documents | first / last loss |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {t['rss_after_first_step_mb']:.0f} MB | {t['rss_end_mb']:.0f} MB | {t['rss_peak_mb']:.0f} MB | "
            f"{t['seconds']:.0f} | {st.get('blocks', 0)} | {st.get('documents', 0)} | "
            f"{t['losses'][0]:.3f} / {t['losses'][-1]:.3f} |",
        ]
    return "\n".join(lines) + "\n"


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if r["train"] else 1, figsize=(10 if r["train"] else 5.5, 3.6), squeeze=False)
    read, resident = zip(*r["stream"]["samples"], strict=True)
    axes[0][0].plot([b / 1e9 for b in read], [x / 1e6 for x in resident], color="#2a7ab0")
    axes[0][0].set_xlabel("GB of the corpus read")
    axes[0][0].set_ylabel("RSS (MB)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][0].set_title("stream pass: process RSS", fontsize=9)
    if r["train"] and r["train"]["samples"]:
        t, resident, _ = zip(*r["train"]["samples"], strict=True)
        axes[0][1].plot(t, [x / 1e6 for x in resident], color="#b05a2a")
        axes[0][1].set_xlabel("s into `aift train`")
        axes[0][1].set_ylim(bottom=0)
        axes[0][1].set_title("aift train: RSS of the process tree", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    from aift.utils.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(result))
    chart(result, out / "chart.png")


if __name__ == "__main__":
    sys.exit(main())
