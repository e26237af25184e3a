#!/usr/bin/env bash
# Multi-process scaling: tokens/s of `aift train` (LoRA) with 1, 2, ... NPROC processes on this machine.
#
#   scripts/run_benchmark.sh [MODEL] [NPROC] [STEPS] [LENGTH]
#   scripts/run_benchmark.sh smollm2-135m-instruct 2 20 256
#
# Each run trains STEPS optimizer steps of the same global batch (NPROC x batch 2 x accumulation, kept equal
# across runs), packed rows of LENGTH tokens, bf16 autocast, no gradient checkpointing, on the bundled Japanese Q&A data. Each run gets
# the machine's cores split between its processes (OMP_NUM_THREADS = cores / processes). Throughput is
# real (non-padding) tokens over training time, summed over processes, read from train_summary.json.
# Results: bench/multi_gpu/scaling-<model>.json and .md. On CPU, processes share the same cores, so
# 2 processes cannot beat 1: the result measures the overhead of DDP over gloo, not a speed-up.
set -euo pipefail

MODEL="${1:-smollm2-135m-instruct}"
NPROC="${2:-2}"
STEPS="${3:-20}"
LENGTH="${4:-256}"
CORES="$(nproc)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
NAME="$(basename "$MODEL")"
OUT="$ROOT/bench/multi_gpu"
mkdir -p "$OUT"

"$PY" -m aift prepare --model "$MODEL" --source-path "$ROOT/data/ja_qa.jsonl" --output-dir "$WORK/data" \
  --max-length "$LENGTH" >/dev/null

RESULTS=()
for ((n = 1; n <= NPROC; n++)); do
  if ((NPROC % n)); then continue; fi
  accum=$((NPROC / n))  # the same global batch for every process count
  launch=()
  if ((n > 1)); then launch=(--nproc-per-node "$n"); fi
  OMP_NUM_THREADS=$((CORES / n > 0 ? CORES / n : 1)) timeout 3600 "$PY" -m aift train --model-name "$MODEL" --dataset-path "$WORK/data" --output-dir "$WORK/run-$n" \
    --use-lora --batch-size 2 --gradient-accumulation-steps "$accum" --max-steps "$STEPS" --max-length "$LENGTH" \
    --warmup-steps 0 --eval-steps 0 --save-steps 0 --logging-steps 5 --report-to none --bf16 --no-gradient-checkpointing \
    "${launch[@]}" \
    >"$WORK/log-$n.txt" 2>&1 || { tail -20 "$WORK/log-$n.txt"; exit 1; }
  RESULTS+=("$n:$WORK/run-$n/train_summary.json")
done

"$PY" - "$MODEL" "$OUT/scaling-$NAME" "$CORES" "$LENGTH" "$(cut -d' ' -f1-3 /proc/loadavg)" "${RESULTS[@]}" <<'PY'
import json, platform, sys
model, stem, cores, length, load, *runs = sys.argv[1:]
rows = []
for run in runs:
    n, path = run.split(":", 1)
    s = json.load(open(path))
    rows.append({"processes": int(n), "tokens_per_s": round(s["train_tokens_per_s"], 1), "steps": s["steps"],
                 "tokens": s["tokens"], "peak_mem_gb_rank0": s["peak_mem_gb"], "wall_time_s": s["wall_time_s"]})
base = rows[0]["tokens_per_s"]
for r in rows:
    r["vs_1_process"] = round(r["tokens_per_s"] / base, 3)
result = {"model": model, "method": "lora", "cpu_cores": int(cores), "row_tokens": int(length),
          "machine": platform.processor() or platform.machine(), "backend": "gloo (CPU)",
          "load_average_at_end": load, "runs": rows}
json.dump(result, open(stem + ".json", "w"), indent=2)
lines = [f"# DDP scaling, {model} (LoRA, rows of {length} tokens), {cores} CPU cores, load average {load}", "",
         "| processes | tokens/s | vs 1 process | peak RSS rank 0 (GB) |", "| --- | --- | --- | --- |"]
lines += [f"| {r['processes']} | {r['tokens_per_s']} | {r['vs_1_process']} | {r['peak_mem_gb_rank0']} |" for r in rows]
open(stem + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
