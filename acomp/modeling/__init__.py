"""AutoCompressor models: a compressor core plus one thin adapter per model family."""

from .compressor import AutoCompressorMixin, AutoCompressorOutput, split_lengths
from .config import COMPRESSION_DEFAULTS, apply_compression_fields
from .generation import DecodeGraphs
from .models import (
    MODEL_CLASSES,
    AutoCompressorModel,
    LlamaAutoCompressorModel,
    MistralAutoCompressorModel,
    OPTAutoCompressorModel,
    Qwen2AutoCompressorModel,
    Qwen3AutoCompressorModel,
    autocompressor_class,
)

__all__ = [
    "AutoCompressorMixin",
    "AutoCompressorModel",
    "AutoCompressorOutput",
    "COMPRESSION_DEFAULTS",
    "DecodeGraphs",
    "LlamaAutoCompressorModel",
    "MODEL_CLASSES",
    "MistralAutoCompressorModel",
    "OPTAutoCompressorModel",
    "Qwen2AutoCompressorModel",
    "Qwen3AutoCompressorModel",
    "apply_compression_fields",
    "autocompressor_class",
    "split_lengths",
]
