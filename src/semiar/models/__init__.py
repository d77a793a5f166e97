"""Target-model backends: the native decoder, the transformers adapter, and loading (GGUF,
safetensors directories, offline packages)."""

from .loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
