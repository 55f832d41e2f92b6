"""Multi-rank training through the real launcher: ZeRO-3 on 2 CPU ranks (gloo) vs 1 rank, and LoRA + ZeRO-3."""

from __future__ import annotations

import json

import pytest
import torch
from runs import REPO, launch, losses, read_metrics, tiny_config, tiny_corpus, write_config

pytestmark = pytest.mark.slow

# Same global batch (2 sequences) and the same samples per step, split 2 x 1 over ranks instead of 1 x 2:
# only the order of floating-point reductions differs (fp32), so losses agree to ~1e-7 relative (measured 4e-8).
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def test_two_rank_zero3_matches_one_rank(corpus, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    cfg1 = write_config(tmp_path / "one.yaml", tiny_config(corpus, one, train={"micro_batch_size": 2}))
    cfg2 = write_config(tmp_path / "two.yaml", tiny_config(corpus, two, train={"micro_batch_size": 1}))
    # The same 3 blocks, dealt to the 2 ranks: the second rank scores one block twice and counts it once.
    heldout = ["train.eval_every=4", "train.eval_blocks=3"]
    launch(cfg1, ["train.max_steps=4", *heldout])
    proc = launch(cfg2, ["train.max_steps=4", *heldout], nproc=2)
    assert "FutureWarning" not in proc.stderr  # DeepSpeed's deprecated collective names, several per step
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=LOSS_RTOL), (step, a, b)
    assert a[4] < a[1]  # and it learns
    evals = [read_metrics(out)[-1] for out in (one, two)]
    for key in ("eval_no_context_ppl", "eval_summary_ppl"):
        assert evals[0][key] == pytest.approx(evals[1][key], rel=LOSS_RTOL), (key, evals)


def test_zero3_ranks_whose_segments_need_different_loss_slices_train_as_one_pass(corpus, tmp_path):
    """Each rank draws its own random boundaries, so with a small `loss_chunk_size` the ranks' segments need
    different numbers of loss slices. ZeRO-3 gathers weights collectively, module call by module call, so
    the ranks must call the LM head equally often (a collective mismatch crashed gloo before the trainer fixed
    the slice count): the run gives the losses of the unchunked loss, step by step."""
    random = {"randomize_segments": True, "segment_lengths": []}
    runs = {}
    for name, chunk in (("chunked", 4), ("whole", 0)):  # 4 tokens: 1-16 slices per segment of 2-62 tokens
        cfg = tiny_config(
            corpus, tmp_path / name, compression=random, model={"loss_chunk_size": chunk},
            train={"micro_batch_size": 1},
        )  # fmt: skip
        launch(write_config(tmp_path / f"{name}.yaml", cfg), ["train.max_steps=3"], nproc=2, timeout=600)
        runs[name] = losses(tmp_path / name)
    assert sorted(runs["chunked"]) == sorted(runs["whole"]) == [1, 2, 3]
    for step, loss in runs["whole"].items():
        assert runs["chunked"][step] == pytest.approx(loss, rel=LOSS_RTOL), (step, runs)


@pytest.mark.parametrize("zero", ["zero3.json", "zero2.json", "zero1.json"])
def test_coalesced_gradient_reduction_matches_reduction_per_backward(corpus, tmp_path, zero):
    """2 micro-batches x 2 substeps per step: the four backward passes reduced once at the end of the step give
    the losses of reducing after each one (fp32), on one rank and, under ZeRO-3, over two."""
    ds = str(REPO / "ds_configs" / zero)
    runs = {}
    for name, nproc, extra in [
        ("plain", 1, ["train.coalesce_grad_reduction=false"]),
        ("coalesced", 1, []),  # the default
        ("coalesced2", 2, []),
    ]:
        if nproc == 2 and zero != "zero3.json":
            continue
        out = tmp_path / name
        train = {"micro_batch_size": 1, "global_batch_size": 2, "deepspeed": ds}
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_config(corpus, out, train=train))
        launch(cfg, ["train.max_steps=3", *extra], nproc=nproc)
        runs[name] = losses(out)
    plain = runs.pop("plain")
    assert sorted(plain) == [1, 2, 3]
    for name, got in runs.items():
        assert sorted(got) == [1, 2, 3], name
        for step in plain:
            assert got[step] == pytest.approx(plain[step], rel=LOSS_RTOL), (name, step, plain, got)


def save_base_llama(path, vocab_size: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=0,
        bos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def lora_train(corpus, tmp_path, vocab_size: int, deepspeed: str, nproc: int, compression=None, **train):
    """Train a LoRA AutoCompressor from a plain Llama checkpoint (no summary table) for 3 steps and export it;
    return the base's directory, the run's, and the launcher's process."""
    base_dir = tmp_path / "base"
    save_base_llama(base_dir, vocab_size)
    out = tmp_path / "lora"
    train = {
        "micro_batch_size": 2 // nproc,
        "export_final": True,
        "max_steps": 3,
        "deepspeed": deepspeed,
        **train,
    }
    cfg = tiny_config(
        corpus,
        out,
        model={"name_or_path": str(base_dir)},
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        compression=compression or {},
        train=train,
        optim={"lr": 1e-2, "warmup_steps": 0},
    )
    return base_dir, out, launch(write_config(tmp_path / "lora.yaml", cfg), nproc=nproc)


def lora_run(corpus, tmp_path, vocab_size: int, deepspeed: str, nproc: int, compression=None):
    """lora_train's weights before and after (merged export)."""
    from safetensors.torch import load_file

    base_dir, out, proc = lora_train(corpus, tmp_path, vocab_size, deepspeed, nproc, compression)
    assert f"exported HF weights to {out / 'final'}" in proc.stdout + proc.stderr
    return load_file(base_dir / "model.safetensors"), load_file(out / "final" / "model.safetensors"), out


def check_only_lora_and_summary_changed(before, after):
    assert set(after) == set(before) | {"embed_summary.weight"}
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    for name, weight in before.items():
        if any(p in name for p in attention):
            assert not torch.equal(after[name], weight), (
                f"{name} did not change (LoRA not merged or not trained)"
            )
        else:
            assert torch.equal(after[name], weight), f"{name} changed but is not trainable under LoRA"
    eos_row = before["model.embed_tokens.weight"][0]
    summary = after["embed_summary.weight"]
    assert summary.shape == (4, 64)
    assert not torch.allclose(summary, eos_row.expand_as(summary)), "embed_summary was not trained"
    assert torch.allclose(summary, eos_row.expand_as(summary), atol=0.2), "embed_summary did not start at EOS"


def test_lora_zero3_trains_only_lora_and_summary(corpus, tmp_path):
    """2 ranks, base loaded partitioned under ZeRO-3, summary table initialised from the EOS row on gathered
    parameters, LoRA on q/k/v/o. After training and a merged export, only the attention projections (LoRA
    merged in) and embed_summary differ from the base weights, and the export loads with from_pretrained."""
    from acomp import AutoCompressorModel

    zero3 = str(REPO / "ds_configs" / "zero3.json")
    before, after, out = lora_run(corpus, tmp_path, vocab_size=512, deepspeed=zero3, nproc=2)
    check_only_lora_and_summary_changed(before, after)
    model = AutoCompressorModel.from_pretrained(out / "final")
    assert model.config.summary_length == 4
    assert torch.equal(model.embed_summary.weight.detach(), after["embed_summary.weight"])


def test_an_unmerged_lora_export_is_the_adapter_and_says_so(corpus, tmp_path):
    zero1 = str(REPO / "ds_configs" / "zero1.json")
    _, out, proc = lora_train(corpus, tmp_path, 512, zero1, nproc=1, export_merge_lora=False)
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert f"exported the LoRA adapter to {final}" in proc.stdout + proc.stderr


def test_lora_keeps_new_token_rows_trainable(corpus, tmp_path):
    """The base has 2 tokens fewer than the corpus tokenizer: the trainer grows the embeddings and LM head and,
    under LoRA, trains exactly those rows too (peft trainable_token_indices). One rank, ZeRO-1: peft's ZeRO-3
    path for token rows needs CUDA."""
    zero1 = str(REPO / "ds_configs" / "zero1.json")
    before, after, _ = lora_run(corpus, tmp_path, vocab_size=510, deepspeed=zero1, nproc=1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == (512, 64)
        assert torch.equal(after[name][:510], before[name]), f"{name}: old rows changed"
        after[name] = after[name][:510]
    check_only_lora_and_summary_changed(before, after)


def test_lora_in_variable_mode_trains_and_exports_the_stop_row(corpus, tmp_path):
    """A variable-mode LoRA run from a base that has the corpus' <sum>/<eoc> already: the <eoc> row of the LM
    head, which the new summary table starts at zero, is trained and merged into the export; no other row of
    the token tables changes but <sum>'s."""
    zero1 = str(REPO / "ds_configs" / "zero1.json")
    variable = {"compression_mode": "variable", "compression_max_len": 4, "compression_lambda": 1.0}
    before, after, _ = lora_run(corpus, tmp_path, 512, zero1, nproc=1, compression=variable)
    vocab = json.loads((corpus / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    stop, start = ids["<eoc>"], ids["<sum>"]
    head = after["lm_head.weight"]
    assert head[stop].abs().sum() > 0 and not torch.allclose(head[stop], before["lm_head.weight"][stop])
    assert torch.allclose(head[stop], torch.zeros_like(head[stop]), atol=0.2)  # moved from zero by training
    untouched = [i for i in range(512) if i not in (stop, start)]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name][untouched], before[name][untouched]), name
