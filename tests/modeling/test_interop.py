"""Loading the released AutoCompressor checkpoint format (princeton-nlp/AutoCompressor-2.7b-6k/-30k and
AutoCompressor-Llama-2-7b-6k) from local directories.

No weights can be downloaded here, so each test writes a tiny checkpoint directory in exactly the
released layout (config keys, `architectures`, `.bin` weights, sharded index for Llama, top-level
`embed_summary.weight`) from a reference model, loads it with our classes, and checks that every
tensor arrived (nothing re-initialised) and the outputs are identical.
"""

from __future__ import annotations

import json

import torch
from tiny_models import random_ids, tiny_model

from acomp import AutoCompressorModel, LlamaAutoCompressorModel, OPTAutoCompressorModel


def write_released_layout(model, directory, architectures, transformers_version, dtype, shards=1):
    """The released checkpoints: config.json (base config + 3 keys) and pytorch_model*.bin files."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    # The released configs carry only these three compression keys.
    for key in ("compression_mode", "compression_max_len", "compression_lambda", "compression_alpha"):
        config.pop(key, None)
    for key in ("compress_stop_threshold", "sdpa_backend", "summary_init"):
        config.pop(key, None)
    config.update(
        architectures=architectures,
        summary_length=model.config.summary_length,
        accumulate_summary=True,
        segment_gradient_checkpointing=True,
        torch_dtype=str(dtype).removeprefix("torch."),
        transformers_version=transformers_version,
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.to(dtype).clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}}
    index["weight_map"] = weight_map
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_released_opt_layout_loads_with_identical_outputs(tmp_path):
    ref = tiny_model("opt", summary_length=5)
    write_released_layout(ref, tmp_path / "ac-opt", ["AutoCompressorModel"], "4.28.1", torch.float32)
    loaded, info = AutoCompressorModel.from_pretrained(tmp_path / "ac-opt", output_loading_info=True)
    assert type(loaded) is OPTAutoCompressorModel
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert torch.equal(loaded.embed_summary.weight, ref.embed_summary.weight)  # not re-initialised from EOS
    assert loaded.config.summary_length == 5 and loaded.config.segment_gradient_checkpointing is True
    ids = random_ids(2, 20)
    a = ref(ids, labels=ids, segment_lengths=[10, 10], output_softprompt=True)
    b = loaded.eval()(ids, labels=ids, segment_lengths=[10, 10], output_softprompt=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.softprompt, b.softprompt)


def test_released_llama_sharded_bf16_layout_loads_with_identical_outputs(tmp_path):
    ref = tiny_model("llama", summary_length=5)
    write_released_layout(
        ref, tmp_path / "ac-llama", ["LlamaAutoCompressorModel"], "4.34.0.dev0", torch.bfloat16, shards=2
    )
    loaded, info = LlamaAutoCompressorModel.from_pretrained(
        tmp_path / "ac-llama", dtype=torch.bfloat16, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert loaded.dtype == torch.bfloat16
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    # Same outputs as the same weights saved in our own (safetensors) format and loaded the same way.
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "native")
    native = LlamaAutoCompressorModel.from_pretrained(tmp_path / "native", dtype=torch.bfloat16).eval()
    ids = random_ids(1, 16)
    a = native(ids, segment_lengths=[8, 8], output_softprompt=True)
    b = loaded.eval()(ids, segment_lengths=[8, 8], output_softprompt=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.softprompt, b.softprompt)
