"""Data: raw rows -> conversations (sources) -> rendered text with trained spans (formats) -> token ids with
labels (masking) -> prepared dataset on disk (prepare) -> packed batches (packing); preview shows what is trained."""

from aift.errors import AiftError


class DataError(AiftError, ValueError):
    """Bad input data or options: the message names the file, the row and what was expected."""


class DatasetError(DataError):
    """The training or evaluation data cannot be used; the message says why."""
