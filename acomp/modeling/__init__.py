"""AutoCompressor models: a compressor core plus one thin adapter per model family."""

from .compressor import AutoCompressorMixin, AutoCompressorOutput, split_lengths
from .config import COMPRESSION_DEFAULTS, apply_compression_fields
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
from .softprompt import Softprompt

__all__ = [
    "AutoCompressorMixin",
    "AutoCompressorModel",
    "AutoCompressorOutput",
    "COMPRESSION_DEFAULTS",
    "LlamaAutoCompressorModel",
    "MODEL_CLASSES",
    "MistralAutoCompressorModel",
    "OPTAutoCompressorModel",
    "Qwen2AutoCompressorModel",
    "Qwen3AutoCompressorModel",
    "Softprompt",
    "apply_compression_fields",
    "autocompressor_class",
    "split_lengths",
]
