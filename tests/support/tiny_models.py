"""Tiny model builders shared by the modeling tests (CPU, fp32, seconds)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from acomp import (
    LlamaAutoCompressorModel,
    MistralAutoCompressorModel,
    OPTAutoCompressorModel,
    Qwen2AutoCompressorModel,
)

VOCAB = 97
FAMILIES = ["llama", "opt", "mistral", "qwen2"]


def tiny_config(family: str, **fields):
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, eos_token_id=2
    )
    common.update(bos_token_id=1, pad_token_id=0)
    fields.setdefault("summary_length", 3)
    if family == "opt":
        cfg = OPTConfig(
            ffn_dim=64,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        cfg = cls(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **common)
    for k, v in fields.items():
        setattr(cfg, k, v)
    return cfg


MODEL_CLASS = {
    "llama": LlamaAutoCompressorModel,
    "opt": OPTAutoCompressorModel,
    "mistral": MistralAutoCompressorModel,
    "qwen2": Qwen2AutoCompressorModel,
}


def tiny_model(family: str, seed: int = 0, **fields):
    torch.manual_seed(seed)
    model = MODEL_CLASS[family](tiny_config(family, **fields))
    # Give summary rows distinct values so tests can tell them apart (training would do this).
    with torch.no_grad():
        model.embed_summary.weight.add_(0.02 * torch.randn_like(model.embed_summary.weight))
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


class PlainEngine:
    """What train_substep needs from a DeepSpeed engine, on a plain module. `target_last_segment` makes the
    loss the last segment's only, so any gradient reaching earlier tokens went through summary vectors."""

    def __init__(self, model, target_last_segment=False):
        self.model, self.device, self.target_last = model, torch.device("cpu"), target_last_segment

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if self.target_last:
            out.loss = out.segment_nll[:, -1].sum() / out.segment_tokens[:, -1].sum()
        return out

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass
