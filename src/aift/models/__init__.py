"""Models: the registry, loading by name, the embedded default, and JapaneseModel."""

from aift.models.japanese import BaseModel, JapaneseModel
from aift.models.loading import ModelNotAvailableError
from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS, ModelSpec

__all__ = ["EMBEDDED_MODEL", "SUPPORTED_MODELS", "BaseModel", "JapaneseModel", "ModelNotAvailableError", "ModelSpec"]
