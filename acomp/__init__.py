"""acomp: AutoCompressor language models (compress long contexts into summary vectors) and their trainer."""

from .modeling import (
    AutoCompressorModel,
    AutoCompressorOutput,
    LlamaAutoCompressorModel,
    MistralAutoCompressorModel,
    OPTAutoCompressorModel,
    Qwen2AutoCompressorModel,
    Qwen3AutoCompressorModel,
    Softprompt,
)

__version__ = "0.1.0"

__all__ = [
    "AutoCompressorModel",
    "AutoCompressorOutput",
    "LlamaAutoCompressorModel",
    "MistralAutoCompressorModel",
    "OPTAutoCompressorModel",
    "Qwen2AutoCompressorModel",
    "Qwen3AutoCompressorModel",
    "Softprompt",
]
