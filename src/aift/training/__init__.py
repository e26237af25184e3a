"""Training: the one loop (`loop.py`), the trainers around it, data plans, checkpoints and metrics.

:func:`train` is the one entry every front door calls (CLI, web UI runs, Python): typed configs -> the trainer.
"""

from aift.training.entry import train

__all__ = ["train"]
