"""Concrete AutoCompressor classes, one per model family, and a dispatcher by `model_type`.

Each class is the transformers `*ForCausalLM` class with the compressor mixed in and a position
rule chosen (the family adapter). State-dict names stay the base model's, plus `embed_summary.weight`,
so a checkpoint loads into the plain base class too.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .compressor import AutoCompressorMixin
from .config import apply_compression_fields
from .positions import OPTPositions, RotaryPositions


class OPTAutoCompressorModel(AutoCompressorMixin, OPTForCausalLM):
    position_rule = OPTPositions()


class LlamaAutoCompressorModel(AutoCompressorMixin, LlamaForCausalLM):
    position_rule = RotaryPositions()


class MistralAutoCompressorModel(AutoCompressorMixin, MistralForCausalLM):
    position_rule = RotaryPositions()


class Qwen2AutoCompressorModel(AutoCompressorMixin, Qwen2ForCausalLM):
    position_rule = RotaryPositions()


class Qwen3AutoCompressorModel(AutoCompressorMixin, Qwen3ForCausalLM):
    position_rule = RotaryPositions()


# Families whose decoders take inputs_embeds + position_ids unchanged. (Gemma is left out on purpose:
# it rescales inputs_embeds by sqrt(d), which would rescale fed-back summary vectors too.)
MODEL_CLASSES = {
    "opt": OPTAutoCompressorModel,
    "llama": LlamaAutoCompressorModel,
    "mistral": MistralAutoCompressorModel,
    "qwen2": Qwen2AutoCompressorModel,
    "qwen3": Qwen3AutoCompressorModel,
}


def autocompressor_class(model_type: str):
    try:
        return MODEL_CLASSES[model_type]
    except KeyError:
        raise ValueError(
            f"no AutoCompressor for model_type {model_type!r}; supported: {sorted(MODEL_CLASSES)}"
        ) from None


class AutoCompressorModel:
    """Picks the AutoCompressor class from a config's `model_type` (like transformers' Auto classes).

    Also loads the released checkpoints, whose config says `architectures: ["AutoCompressorModel"]`
    (OPT) or `["LlamaAutoCompressorModel"]`.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "use AutoCompressorModel.from_pretrained(...) or AutoCompressorModel.from_config(...)"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if config is None:
            hub = {
                k: kwargs[k]
                for k in ("cache_dir", "local_files_only", "token", "revision", "subfolder")
                if k in kwargs
            }
            config = kwargs["config"] = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        return autocompressor_class(config.model_type).from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs
        )

    @classmethod
    def from_config(cls, config, **compression_fields):
        apply_compression_fields(config, **compression_fields)
        return autocompressor_class(config.model_type)(config)
