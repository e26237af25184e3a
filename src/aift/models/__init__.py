"""Models: the registry, loading by name, and the embedded default (JapaneseModel is in aift.inference)."""

from aift.models.loading import ModelNotAvailableError
from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS, ModelSpec

__all__ = ["EMBEDDED_MODEL", "SUPPORTED_MODELS", "ModelNotAvailableError", "ModelSpec"]
