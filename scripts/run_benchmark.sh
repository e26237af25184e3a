#!/usr/bin/env bash
# Multi-process scaling: tokens/s of aift's LoRA training with 1, 2, ... NPROC processes on this machine.
#
#   scripts/run_benchmark.sh [MODEL] [NPROC] [EXAMPLES] [SEQ_LEN] [OUTPUT]
#   scripts/run_benchmark.sh smollm2-135m-instruct 2 96 512
#
# A thin wrapper over `aift bench --nproc 1,2,...,NPROC`: each process count trains the same EXAMPLES once
# (one epoch, DDP over gloo on CPU / NCCL on GPUs, each process with its share of the cores), and the result
# records real (non-padding) tokens of all ranks over the slowest rank's train time, peak memory per rank,
# speedup and efficiency. Writes OUTPUT (default bench/multi_gpu/<model>): result.json, results.md,
# scaling.png, chart.png, logs/. On a CPU the processes share the same cores, so this measures what DDP
# costs there, not a speed-up; on GPUs each process has its own device.
set -euo pipefail

MODEL="${1:-smollm2-135m-instruct}"
NPROC="${2:-2}"
EXAMPLES="${3:-96}"
SEQ_LEN="${4:-512}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTPUT="${5:-$ROOT/bench/multi_gpu/$(basename "$MODEL")}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"

counts="$(seq -s, 1 "$NPROC")"
exec "$PY" -m aift bench --model "$MODEL" --nproc "$counts" --examples "$EXAMPLES" --seq-len "$SEQ_LEN" \
  --output "$OUTPUT"
