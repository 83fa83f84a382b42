"""Models: one interface (``RetrievalModel``), one factory (``create_model``, with the device policy)."""

from tpas.models.base import ImageEncoding, ModelConfig, RetrievalModel, TextEncoding
from tpas.models.registry import create_model, from_pretrained, list_models, register_config, register_family

__all__ = [
    "ImageEncoding",
    "ModelConfig",
    "RetrievalModel",
    "TextEncoding",
    "create_model",
    "from_pretrained",
    "list_models",
    "register_config",
    "register_family",
]
