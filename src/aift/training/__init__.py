"""Training: the one loop (`loop.py`), the trainers around it, data plans, checkpoints and metrics."""
