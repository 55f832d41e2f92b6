"""Interim demo (until the trainer lands): compress a context into summary vectors and generate.

Builds a tiny random-init Llama AutoCompressor over a byte-level vocabulary, compresses a real
long document (a stdlib source file) segment by segment, and generates from the summary vectors
with a KV cache. Random weights produce gibberish; the point is the data flow and the API.
"""

from __future__ import annotations

import inspect
import json

import torch
from transformers import LlamaConfig

from acomp import LlamaAutoCompressorModel


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=259,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        summary_length=8,
    )
    model = LlamaAutoCompressorModel(config).eval()
    text = inspect.getsource(json)[:1536]
    context = torch.tensor([list(text.encode())])
    summary = model.compress(context, segment_lengths=[512, 512, 512])
    prompt = torch.tensor([list(b"def dumps(")])
    out = model.generate(prompt, softprompt=summary, max_new_tokens=16)
    print(
        f"compressed {context.shape[1]} tokens into {summary.shape[1]} summary vectors of width {summary.shape[2]}"
    )
    print("generated ids:", out[0, prompt.shape[1] :].tolist())


if __name__ == "__main__":
    main()
