"""Moved to :mod:`aift.training.batching`; kept for training.loop and training.pipeline_loop, which import it here."""

from aift.training.batching import (  # noqa: F401
    BatchPlanner,
    DatasetError,
    Example,
    Examples,
    check_trainable,
    eval_batches,
    to_examples,
)
