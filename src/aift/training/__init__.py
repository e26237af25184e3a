"""Training: the one loop (`loop.py`), the trainers around it, data plans, checkpoints and metrics.

The entry every front door calls (CLI, web UI runs, Python), typed configs -> the trainer, is
:func:`aift.distributed.entry.train`: it may pick the multi-device trainer, which sits above this package.
"""
