"""Bad input: each case gives exit status 2 and one clear error line naming the thing, before any training step
(no metrics.jsonl, no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fault_helpers import assert_no_traceback, error_lines, reference_config
from runs import launch, write_config

pytestmark = pytest.mark.slow


def damaged_copy(corpus: Path, root: Path, how: str) -> Path:
    copy = root / f"corpus-{how}"
    shutil.copytree(corpus, copy)
    shard = next((copy / "train").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    if how == "truncated":
        del data[-1000:]
    else:  # one flipped bit: the size check passes, the checksum does not
        data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return copy


def model_with_other_tokenizer(corpus: Path, root: Path) -> Path:
    """A model directory whose tokenizer has the corpus tokenizer's size but two ids swapped."""
    from transformers import LlamaConfig

    model = root / "model-other-tokenizer"
    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2).save_pretrained(
        model
    )
    for f in (corpus / "tokenizer").iterdir():
        shutil.copy(f, model / f.name)
    spec = json.loads((model / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (tok for tok, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(spec))
    return model


def empty_corpus(corpus: Path, root: Path) -> Path:
    """A valid corpus whose documents all went to the validation split (0 training blocks)."""
    from acomp.data import build_corpus

    out = root / "corpus-empty"
    build_corpus(
        source="stdlib",
        out=out,
        tokenizer=str(corpus / "tokenizer"),
        block_size=128,
        limit_docs=5,
        val_fraction=1.0,
        progress=False,
    )
    return out


# case -> (overrides from the fixtures' paths, expected prefix, text(s) the error must contain)
CASES = {
    "unknown_config_key": (
        lambda p: ["train.max_stpes=3"],
        "config error",
        "unknown config key 'train.max_stpes' (did you mean 'train.max_steps'?)",
    ),
    "misspelt_model_arch_key": (
        lambda p: ["model.arch.hidden_sise=64"],
        "config error",
        "unknown config key 'model.arch.hidden_sise': not a setting of LlamaConfig (model.family='llama') (did "
        "you mean 'model.arch.hidden_size'?)",
    ),
    "summary_beyond_positions": (
        lambda p: ["compression.summary_length=100"],
        "config error",
        "compression.summary_length=100 (compression_mode=fixed, 2 substeps x 2 segments) does not fit the "
        "model: max_position_embeddings=256 leaves no room",
    ),
    "wrong_config_type": (
        lambda p: ["train.max_steps=many"],
        "config error",
        "config key 'train.max_steps' must be an integer, got str: 'many'",
    ),
    "truncated_shard": (
        lambda p: [f"data.path={p['truncated']}"],
        "data error",
        ("train/shard.00000.mds is", "bytes but", "truncated or corrupted"),
    ),
    "corrupted_shard": (
        lambda p: [f"data.path={p['flipped']}", "data.verify=hash"],
        "data error",
        "train/shard.00000.mds fails its xxh64 checksum",
    ),
    "wrong_tokenizer": (
        lambda p: [f"model.name_or_path={p['model']}"],
        "data error",
        "was tokenized with a different tokenizer than model.name_or_path=",
    ),
    "block_size_mismatch": (
        lambda p: ["data.block_size=256"],
        "data error",
        "block_size mismatch: the corpus holds blocks of 128 tokens but the run expects 256",
    ),
    "blocks_too_short_for_segments": (
        lambda p: ["compression.segment_lengths=[64,64]"],
        "config error",
        "blocks have 128 tokens but compression.segment_lengths=[64, 64] x training_substeps=2 needs 256",
    ),
    "empty_corpus": (
        lambda p: [f"data.path={p['empty']}"],
        "data error",
        "the corpus is empty: its train split has 0 blocks",
    ),
    "no_corpus": (
        lambda p: [f"data.path={p['nothing']}"],
        "data error",
        "no corpus manifest at",
    ),
}


@pytest.fixture(scope="module")
def bad_inputs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "nothing").mkdir()
    return {
        "truncated": damaged_copy(corpus, root, "truncated"),
        "flipped": damaged_copy(corpus, root, "flipped"),
        "model": model_with_other_tokenizer(corpus, root),
        "empty": empty_corpus(corpus, root),
        "nothing": root / "nothing",
    }


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_error_before_training(case, corpus, bad_inputs, tmp_path):
    overrides, prefix, text = CASES[case]
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out))
    proc = launch(config, overrides(bad_inputs), expect_rc=2, timeout=240)
    output = proc.stdout + proc.stderr
    assert_no_traceback(output)
    lines = error_lines(output)
    texts = (text,) if isinstance(text, str) else text
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: "), output[-3000:]
    assert all(t in lines[0] for t in texts), lines[0]
    assert not (out / "metrics.jsonl").exists()  # no training step ran


def test_resuming_on_another_corpus_is_refused(corpus, tmp_path):
    """A checkpoint records its corpus (corpus.json); resuming it on a corpus with another tokenizer, block size
    or content would feed the model ids it reads differently and restore a data position that means nothing."""
    from acomp.train.checkpoint import CORPUS_FILE
    from acomp.train.data import DataError, open_corpus
    from acomp.train.preflight import check_resumed_corpus, corpus_identity

    opened = open_corpus(corpus)
    checkpoint = tmp_path / "step_00000004"
    checkpoint.mkdir()
    check_resumed_corpus(checkpoint, opened)  # an older checkpoint without corpus.json: nothing to compare
    older = {k: v for k, v in corpus_identity(opened).items() if k != "corpus_id"}
    (checkpoint / CORPUS_FILE).write_text(json.dumps(older))
    check_resumed_corpus(checkpoint, opened)  # written before corpus_id was recorded: the rest is compared
    changed = (
        ("tokenizer_sha256", "0" * 64),
        ("block_size", 256),
        ("fingerprint", "f" * 64),
        ("corpus_id", "c"),
    )
    for key, value in changed:
        saved = {**corpus_identity(opened), key: value}
        (checkpoint / CORPUS_FILE).write_text(json.dumps(saved))
        with pytest.raises(DataError, match=f"is another corpus than the one checkpoint .* {key}"):
            check_resumed_corpus(checkpoint, opened)
    (checkpoint / CORPUS_FILE).write_text(json.dumps(corpus_identity(opened)))
    check_resumed_corpus(checkpoint, opened)


def test_a_model_without_tokenizer_gets_at_most_the_control_tokens_added(corpus, tmp_path):
    """A bare weights directory cannot be compared token by token: the corpus may then add only acomp's
    control tokens (<sum>, <eoc>) to the model's vocabulary, not a whole other tokenizer's worth."""
    from transformers import LlamaConfig

    from acomp.config import config_from_dict
    from acomp.train.data import DataError, open_corpus
    from acomp.train.preflight import check_tokenizer

    LlamaConfig(vocab_size=500).save_pretrained(tmp_path / "bare")
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "bare")}, "data": {"path": str(corpus)}})
    opened = open_corpus(corpus)
    check_tokenizer(cfg, opened, base_vocab_size=510)  # 512 = 510 + <sum> + <eoc>
    with pytest.raises(DataError, match="12 more than the 2 control tokens acomp adds"):
        check_tokenizer(cfg, opened, base_vocab_size=500)
