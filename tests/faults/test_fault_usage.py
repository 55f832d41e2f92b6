"""Messy input to the launchers and the example, in-process (the trainer's launcher cases are in
test_fault_input.py): each gives one line naming the thing, exit status 2, before a model is loaded where
the input allows it."""

from __future__ import annotations

import shutil

import pytest
from runs import REPO, load_script

from acomp.config import ConfigError, config_from_dict, load_config

TINY = REPO / "configs" / "tiny.yaml"


def refusal(main, args: list[str], capsys) -> str:
    """The one `error: ` line of a command that exits 2."""
    capsys.readouterr()
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0][len("error: ") :]


# ------------------------------------------------------------------------------------------ run config
def test_a_misspelt_model_arch_key_is_refused_with_the_close_key():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["model.arch.hidden_sise=64"])
    assert str(e.value) == (
        "unknown config key 'model.arch.hidden_sise': not a setting of LlamaConfig (model.family='llama') "
        "(did you mean 'model.arch.hidden_size'?)"
    )
    with pytest.raises(ConfigError, match=r"'model.arch.ffn_dim': not a setting of LlamaConfig"):
        load_config(TINY, ["model.arch.ffn_dim=64"])  # an OPT key on a Llama model
    opt = {"family": "opt", "arch": {"ffn_dim": 64, "word_embed_proj_dim": 32, "tie_word_embeddings": True}}
    assert config_from_dict({"model": opt}).model.arch["ffn_dim"] == 64  # keys of the family's config class


def test_model_arch_values_its_config_class_refuses_are_a_config_error():
    """transformers' own checks (here Qwen2's layer_types against num_hidden_layers) become one line naming
    model.arch, not the model-source error of a pretrained name."""
    from acomp.train.engine import base_model_config

    class Tokenizer:
        bos_token_id = eos_token_id = pad_token_id = None

        def __len__(self):
            return 100

    arch = {"hidden_size": 32, "num_hidden_layers": 1, "layer_types": ["full_attention", "full_attention"]}
    cfg = config_from_dict({"model": {"family": "qwen2", "arch": arch}})
    with pytest.raises(ConfigError, match=r"^model.arch does not fit a qwen2 config: .*num_hidden_layers"):
        base_model_config(cfg, Tokenizer())


def test_bad_build_if_missing_options_are_a_config_error(tmp_path):
    from acomp.train.data import ensure_corpus

    for options, message in [
        ({"source": "stdlib", "block_size": 1}, r"block_size must be an integer >= 2, got 1"),
        (
            {"source": str(tmp_path / "none"), "block_size": 128, "train_tokenizer_vocab": 512},
            r"does not exist",
        ),
    ]:
        cfg = load_config(TINY, [f"data.path={tmp_path / 'corpus'}"])
        cfg.data.build_if_missing = options
        with pytest.raises(ConfigError, match=r"^data.build_if_missing: .*" + message):
            ensure_corpus(cfg, True)


def test_an_output_dir_that_cannot_be_written_is_a_config_error(tmp_path):
    """A file of that name (or a path under /proc): one config line, exit 2, before the model is built."""
    import torch

    from acomp.train.distributed import Dist
    from acomp.train.runlock import output_dir_lock

    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ConfigError, match=r"^train.output_dir='.*/file': cannot write there \(File exists\)$"
    ):
        with output_dir_lock(tmp_path / "file", Dist(0, 1, 0, torch.device("cpu"))):
            pass


def test_a_section_given_twice_in_a_yaml_file_is_refused(tmp_path):
    text = TINY.read_text() + "\ntrain:\n  max_steps: 5\n"
    (tmp_path / "twice.yaml").write_text(text)
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line == "train:")
    second = len(text.splitlines()) - 1
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "twice.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'twice.yaml'}: 'train' is given twice in one mapping (lines {first} and {second}); only "
        f"the last would be read: merge them into one"
    )
    (tmp_path / "broken.yaml").write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML: "):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_config(tmp_path)


def test_summary_vectors_beyond_the_positions_are_a_config_error():
    """Checked on the model's config before the model is built (acomp.train.loop.build)."""
    from transformers import LlamaConfig

    from acomp.train.preflight import check_segments, position_budget

    cfg = load_config(TINY, ["compression.summary_length=200"])
    base = LlamaConfig(**cfg.model.arch)
    with pytest.raises(ConfigError) as e:
        position_budget(cfg, base)
    assert str(e.value) == (
        "compression.summary_length=200 (compression_mode=fixed, 2 substeps x 2 segments) does not fit the "
        "model: max_position_embeddings=512 leaves no room for segments after 4 summaries of 200 positions "
        "each; lower compression.summary_length or the number of segments"
    )
    # Variable mode: a segment's summary takes <sum> plus compression_max_len slots; the error names that key.
    cfg = load_config(TINY, ["compression.compression_mode=variable", "compression.compression_max_len=199"])
    with pytest.raises(ConfigError) as e:
        position_budget(cfg, base)
    assert str(e.value).startswith("compression.compression_max_len=199 (compression_mode=variable, ")
    assert str(e.value).endswith(
        "4 summaries of 200 positions each; lower compression.compression_max_len or the number of segments"
    )
    cfg = load_config(TINY, ["compression.summary_length=100"])  # room for 112 per segment, not 128
    with pytest.raises(
        ConfigError, match=r"segment_lengths=\[128, 128\] has a segment of 128 tokens, but the"
    ):
        check_segments(cfg, 512, position_budget(cfg, base))


def test_a_missing_model_or_tokenizer_is_named(corpus, tmp_path, monkeypatch):
    from acomp.train.data import DataError, open_corpus
    from acomp.train.preflight import check_model_source, model_source_error

    cfg = load_config(TINY, [f"model.name_or_path={tmp_path / 'nothing'}"])
    with pytest.raises(
        ConfigError, match=f"^model.name_or_path='{tmp_path}/nothing': no such model directory$"
    ):
        check_model_source(cfg)
    for hub_id in ("org/model", "gpt2"):  # hub ids, with or without an organisation: transformers decides
        check_model_source(load_config(TINY, [f"model.name_or_path={hub_id}"]))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # runs/nope: of a hub id's form, but under a local directory (no hub retries)
    with pytest.raises(ConfigError, match="^model.name_or_path='runs/nope': no such model directory$"):
        check_model_source(load_config(TINY, ["model.name_or_path=runs/nope"]))
    error = model_source_error("org/model", OSError("org/model is not a local folder\nmore"))
    assert str(error) == (
        "model.name_or_path='org/model': neither a local model directory nor a model on the Hugging Face hub "
        "(org/model is not a local folder)"
    )
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(DataError, match=f"^data.path='{copy}': its tokenizer/ directory is missing"):
        open_corpus(copy)


# ------------------------------------------------------------------------------------------ launchers/eval.py
def test_eval_names_a_missing_model_or_corpus_and_exits_2(corpus, tmp_path, capsys):
    main = load_script("launchers/eval.py").main
    args = ["--out", str(tmp_path / "eval"), "--eval-segment", "32"]
    line = refusal(main, ["--model", str(tmp_path / "none"), "--data", str(corpus), *args], capsys)
    assert line == f"--model {tmp_path / 'none'}: no such model directory"
    (tmp_path / "model").mkdir()
    line = refusal(main, ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "x"), *args], capsys)
    assert (
        line
        == f"--data {tmp_path / 'x'}: no such corpus directory (build one with preprocess/build_corpus.py)"
    )
    line = refusal(
        main, ["--model", str(tmp_path / "model"), "--data", str(corpus), "--split", "test", *args], capsys
    )
    assert line == f"--split test: the corpus at {corpus} has the splits train, val"
    (tmp_path / "afile").write_text("x")
    bad_out = ["--out", str(tmp_path / "afile"), "--eval-segment", "32"]
    line = refusal(main, ["--model", str(tmp_path / "model"), "--data", str(corpus), *bad_out], capsys)
    assert line == f"--out {tmp_path / 'afile'}: cannot create it (File exists)"
    line = refusal(main, ["--model", str(tmp_path / "model"), "--data", str(corpus), *args], capsys)
    assert (
        line == f"--model {tmp_path / 'model'}: cannot load it (Unrecognized model in {tmp_path / 'model'})"
    )


def test_eval_names_a_missing_remote_corpus_and_exits_2(s3, tmp_path, capsys, monkeypatch):
    """A remote --data is read after the model loads: no corpus there is still one line, exit 2."""
    from s3_server import BUCKET
    from tiny_models import tiny_model

    s3.apply(monkeypatch)
    tiny_model("llama").save_pretrained(tmp_path / "model")
    main = load_script("launchers/eval.py").main
    uri = f"s3://{BUCKET}/missing"
    args = ["--model", str(tmp_path / "model"), "--data", uri, "--eval-segment", "32", "--no-progress"]
    line = refusal(main, [*args, "--out", str(tmp_path / "eval")], capsys)
    assert line.startswith(f"no corpus at {uri}"), line


def test_eval_refuses_a_zero_segment_length(corpus, tmp_path, capsys):
    main = load_script("launchers/eval.py").main
    args = ["--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "eval")]
    line = refusal(main, [*args, "--eval-segment", "32", "--segment-length", "0"], capsys)
    assert line == "segment_length must be a positive integer, got 0"  # not "use --eval-segment's 32"


# ------------------------------------------------------------------------------------------ launchers/demo.py
@pytest.mark.parametrize(
    "args, line",
    [
        (["--eval-blocks", "0"], "error: --eval-blocks must be a positive integer, got 0"),
        (
            ["compression.summary_length=-3"],
            "config error: config key 'compression.summary_length' must be >= 0",
        ),
        (["--config", "configs/nope.yaml"], "config error: configs/nope.yaml: no such config file"),
    ],
)
def test_the_demo_refuses_bad_input_in_one_line_before_training(args, line, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the demo moves to the repository; this puts the test's directory back after
    assert load_script("launchers/demo.py").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(line) and "\n" not in err, err


def test_the_demo_evaluates_only_a_finished_run(monkeypatch, capsys):
    """A run stopped by SIGTERM checkpoints and exits with train.preempt_exit_code, 0 by default: the demo
    must not go on to score runs/tiny/final (absent, or an older export)."""
    monkeypatch.chdir(REPO)
    main = load_script("launchers/demo.py").main
    import launchers.train

    monkeypatch.setattr(launchers.train, "train", lambda cfg: (0, False))
    assert main([]) == 0
    assert "held-out" not in capsys.readouterr().out
    monkeypatch.setattr(launchers.train, "train", lambda cfg: (3, False))
    assert main([]) == 3


def test_the_demo_scores_segments_of_the_corpus_blocks_it_reads(corpus, tmp_path, monkeypatch, capsys):
    """--config on a corpus built beforehand (no build_if_missing; 128-token blocks, not the demo's 512): the
    held-out segments cut the corpus' own blocks (they were cut from 512 and failed after training)."""
    import acomp.train
    import launchers.train

    monkeypatch.chdir(REPO)
    main = load_script("launchers/demo.py").main
    monkeypatch.setattr(launchers.train, "train", lambda cfg: (0, True))
    seen = {}

    def scored(model_dir, data_path, lengths, max_blocks):
        seen["lengths"] = lengths
        return {"blocks": 1, "tokens": 1, "no_context_ppl": 2.0, "summary_ppl": 1.5}

    monkeypatch.setattr(acomp.train, "heldout_ppl_of_export", scored)
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=512).save_pretrained(tmp_path / "run" / "final")
    args = [f"data.path={corpus}", "data.build_if_missing={}", f"train.output_dir={tmp_path / 'run'}"]
    assert main([*args, "compression.segment_lengths=[32,32]"]) == 0
    assert seen["lengths"] == [32, 32, 32, 32]
    assert "with 3 segments of summary vectors 1.50" in capsys.readouterr().out


# ------------------------------------------------------------------------------ examples/compressed_generation.py
@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    """A tiny AutoCompressor and a plain Llama (no summary table), each with the corpus tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from acomp import LlamaAutoCompressorModel

    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "plain")
    config.summary_length = 4
    LlamaAutoCompressorModel(config).save_pretrained(root / "ac")
    for name in ("plain", "ac"):
        tok.save_pretrained(root / name)
    return root


def test_the_example_names_missing_files_a_plain_model_and_a_prompt_too_long(models, tmp_path, capsys):
    main = load_script("examples/compressed_generation.py").main
    out = ["--out", str(tmp_path / "s.pt"), "--segment-length", "32"]
    line = refusal(main, ["compress", "--model", str(tmp_path / "none"), *out], capsys)
    assert line == f"--model {tmp_path / 'none'}: no such model directory"
    line = refusal(
        main, ["compress", "--model", str(models / "ac"), "--document", "/no/such.txt", *out], capsys
    )
    assert line == "--document /no/such.txt: no such file"
    line = refusal(main, ["answer", "--summary", str(tmp_path / "none.pt")], capsys)
    assert line == f"--summary {tmp_path / 'none.pt'}: no such file (write one with `compress --out`)"

    capsys.readouterr()
    assert main(["compress", "--model", str(models / "plain"), *out]) == 0  # works, but says what it is
    err = capsys.readouterr().err
    assert (
        f"warning: {models / 'plain'} has no trained summary table (embed_summary.weight; a plain base" in err
    )

    long_prompt = "x = 1\n" * 400
    line = refusal(main, ["answer", "--summary", str(tmp_path / "s.pt"), "--prompt", long_prompt], capsys)
    assert line.startswith("the prompt has ") and line.endswith(
        f"positions, more than the 256 of {models / 'plain'}; shorten the prompt (compress a long text with "
        "`compress` instead)"
    )
