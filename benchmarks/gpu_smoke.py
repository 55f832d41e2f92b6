"""GPU sanity check of the model core (bf16, SDPA with cudnn first): a Llama-shaped AutoCompressor with
summary_length 0 matches the plain base model, and segment/summary forward+backward runs.

    python benchmarks/gpu_smoke.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from acomp import LlamaAutoCompressorModel


def main() -> None:
    cfg = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    ours = LlamaAutoCompressorModel(LlamaConfig(**cfg, summary_length=0)).cuda().to(torch.bfloat16).eval()
    base = LlamaForCausalLM(LlamaConfig(**cfg)).cuda().to(torch.bfloat16).eval()
    base.load_state_dict(ours.state_dict(), strict=False)
    ids = torch.randint(3, 32000, (2, 2048), device="cuda")
    with torch.no_grad():
        diff = (ours(ids).logits.float() - base(ids).logits.float()).abs().max().item()
    print(f"summary_length=0 vs base, bf16 cuda: max |logit diff| = {diff:.3g}")
    assert diff < 0.1, diff
    model = LlamaAutoCompressorModel(
        LlamaConfig(**cfg, summary_length=50, segment_gradient_checkpointing=True)
    )
    model = model.cuda().to(torch.bfloat16).train()
    ids = torch.randint(3, 32000, (2, 6144), device="cuda")
    out = model(ids, labels=ids, segment_lengths=[2048] * 3, output_softprompt=True, return_logits=False)
    out.loss.backward()
    print(
        f"6K block, 3 segments: loss {out.loss.item():.3f}, softprompt {tuple(out.softprompt.shape)}, "
        f"summary grad {model.embed_summary.weight.grad.abs().sum().item():.3g}, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )


if __name__ == "__main__":
    main()
