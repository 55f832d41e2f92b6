"""examples/compressed_generation.py end to end: compress once to a file, answer later from the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from runs import load_script
from transformers import LlamaConfig

from acomp import LlamaAutoCompressorModel
from acomp.data import stdlib_root
from acomp.data.tokenizer import train_bpe_tokenizer


def _example():
    return load_script("examples/compressed_generation.py")


def _save_model(path: Path, tok, hidden: int = 32, **fields) -> None:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
    )
    config.summary_length = 4
    for key, value in fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = LlamaAutoCompressorModel(config)
    with torch.no_grad():
        model.embed_summary.weight.normal_(0, 0.5)  # distinct summary tokens, as training would make them
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [(stdlib_root() / name).read_text() for name in ("argparse.py", "textwrap.py")]
    return train_bpe_tokenizer(texts, 300, show_progress=False)


def test_compress_to_a_file_then_answer_from_it(tmp_path, tokenizer, capsys):
    example = _example()
    _save_model(tmp_path / "model", tokenizer)
    summary = tmp_path / "argparse.pt"
    args = ["compress", "--model", str(tmp_path / "model"), "--out", str(summary), "--segment-length", "32"]
    assert example.main(args) == 0
    record = torch.load(summary, weights_only=False)
    assert record["softprompt"].shape == (1, 12, 32)  # 3 segments x 4 summary vectors
    assert record["segment_lengths"] == [32, 32, 32] and record["model"] == str(
        (tmp_path / "model").resolve()
    )
    capsys.readouterr()

    assert example.main(["answer", "--summary", str(summary), "--max-new-tokens", "8", "--compare"]) == 0
    printed = capsys.readouterr().out
    with_line = next(line for line in printed.splitlines() if line.startswith("with summary vectors:"))
    assert "without:" in printed

    # The same answer computed in one process with the API: the saved vectors round-trip exactly.
    model = LlamaAutoCompressorModel.from_pretrained(tmp_path / "model").eval()
    ids = tokenizer(
        Path(record["document"]).read_text(), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    softprompt = model.compress(ids[:, :96], segment_lengths=[32, 32, 32])
    assert torch.equal(softprompt, record["softprompt"])
    prompt = tokenizer(record["continuation"], add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(prompt, softprompt=softprompt, max_new_tokens=8)
    assert with_line == f"with summary vectors: {tokenizer.decode(out[0, prompt.shape[1] :])!r}"

    # The static-cache decoding mode answers the same.
    capsys.readouterr()
    assert (
        example.main(["answer", "--summary", str(summary), "--max-new-tokens", "8", "--decoding", "static"])
        == 0
    )
    assert with_line in capsys.readouterr().out.splitlines()
    if not torch.cuda.is_available():
        refused = ["answer", "--summary", str(summary), "--decoding", "cuda_graph"]
        assert (
            refusal(example, refused, capsys) == "--decoding cuda_graph needs a CUDA GPU; the model is on cpu"
        )
    refused = ["answer", "--summary", str(summary), "--compile-step"]
    assert refusal(example, refused, capsys) == "--compile-step needs --decoding static or cuda_graph"
    refused = ["answer", "--summary", str(summary), "--decoding", "static", "--freeze-weights"]
    assert refusal(example, refused, capsys) == "--freeze-weights needs --compile-step"


def refusal(example, args: list[str], capsys) -> str:
    """The one `error:` line (exit status 2) of a refused command, without its prefix."""
    capsys.readouterr()
    assert example.main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0][len("error: ") :]


def test_a_variable_length_model_saves_only_the_vectors_it_keeps(tmp_path, tokenizer, capsys):
    """`compress` saves the compacted summary by default (threshold 0: one of 4 slots per segment) and every
    slot with `--padded`; `answer` gives the same continuation from either file."""
    example = _example()
    variable = dict(compression_mode="variable", compression_max_len=4, compress_stop_threshold=0.0)
    _save_model(tmp_path / "model", tokenizer, **variable)
    base = ["compress", "--model", str(tmp_path / "model"), "--segment-length", "32"]
    assert example.main([*base, "--out", str(tmp_path / "compact.pt")]) == 0
    assert "into 3 summary vectors ->" in capsys.readouterr().out
    assert example.main([*base, "--out", str(tmp_path / "padded.pt"), "--padded"]) == 0
    assert "into 12 slots, 3 summary vectors kept ->" in capsys.readouterr().out
    compact, padded = (torch.load(tmp_path / f, weights_only=False) for f in ("compact.pt", "padded.pt"))
    assert compact["softprompt"].shape == (1, 3, 32) and compact["softprompt_bias"] is None
    assert compact["softprompt_positions"].tolist() == [[0, 4, 8]] and compact["softprompt_span"] == 12
    assert padded["softprompt"].shape == (1, 12, 32) and int((padded["softprompt_bias"] == 0).sum()) == 3
    assert torch.equal(compact["softprompt"][0], padded["softprompt"][0, [0, 4, 8]])
    capsys.readouterr()
    lines = []
    for name in ("compact.pt", "padded.pt"):
        assert example.main(["answer", "--summary", str(tmp_path / name), "--max-new-tokens", "8"]) == 0
        printed = capsys.readouterr().out.splitlines()
        lines.append(next(line for line in printed if line.startswith("with summary vectors:")))
        assert printed[0].startswith(
            "[3 summary vectors of" if name == "compact.pt" else "[12 slots, 3 summary"
        )
    assert lines[0] == lines[1]


def test_answer_refuses_vectors_of_another_model(tmp_path, tokenizer, capsys):
    example = _example()
    _save_model(tmp_path / "small", tokenizer)
    _save_model(tmp_path / "wide", tokenizer, hidden=64)
    summary = tmp_path / "s.pt"
    example.main(
        ["compress", "--model", str(tmp_path / "small"), "--out", str(summary), "--segment-length", "32"]
    )
    line = refusal(example, ["answer", "--summary", str(summary), "--model", str(tmp_path / "wide")], capsys)
    assert re.fullmatch(r"the summary vectors are 32 wide but .* has hidden_size 64: they belong to .*", line)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["compress", "--out", "s.pt", "--segment-length", "0"],
            "argument --segment-length: expected an integer >= 1, got 0",
        ),
        (
            ["compress", "--out", "s.pt", "--segments", "0"],
            "argument --segments: expected an integer >= 1, got 0",
        ),
        (
            ["compress", "--out", "s.pt", "--prompt-tokens", "0"],
            "argument --prompt-tokens: expected an integer >= 1, got 0",
        ),
        (
            ["answer", "--summary", "s.pt", "--max-new-tokens", "-3"],
            "argument --max-new-tokens: expected an integer >= 1, got -3",
        ),
    ],
)
def test_bad_counts_are_refused_before_any_model_is_loaded(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_bad_temperature_or_out_is_refused_before_any_model_is_loaded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["answer", "--summary", "s.pt", "--sample", "--temperature", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --temperature: expected a number > 0, got 0")
    line = refusal(
        _example(), ["compress", "--model", str(tmp_path / "none"), "--out", str(tmp_path)], capsys
    )
    assert line == f"--out {tmp_path} is a directory: give the summary file's name"
