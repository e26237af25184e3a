"""`aift bench`: aift's trainer against TRL's SFTTrainer on the same data, each run in a fresh process.

Pieces: :mod:`data` (synthetic rows, tokenization), :mod:`peak` (matmul peak, model FLOPs), :mod:`worker`
(one run per process), :mod:`measure` (memory, allocator, held-out loss), :mod:`core` (orchestration),
:mod:`report` (result.json, results.md, chart.png).
"""

from aift.bench.core import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench"]
