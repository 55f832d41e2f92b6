"""Variable-length compression through the trainer: bias carried across substeps, logged lengths, penalty."""

from __future__ import annotations

import json

import pytest
import torch
from runs import launch, read_metrics, tiny_config, tiny_corpus, write_config
from tiny_models import PlainEngine, random_ids, tiny_model

from acomp.train import loop, train_substep
from acomp.train.loop import length_penalty_scale, summary_length_stats
from acomp.train.segments import Substep

MAX_LEN = 4


def test_presence_bias_is_carried_detached_to_the_next_substep():
    model = tiny_model("llama", compression_mode="variable", compression_max_len=MAX_LEN).train()
    engine = PlainEngine(model)
    ids = random_ids(2, 24)
    first = train_substep(engine, Substep(ids[:, :12], [6, 6]), None, carry=True)
    # Two compressing segments of MAX_LEN slots each (the <sum> position is not a summary vector).
    carried = first.softprompt
    assert carried.vectors.shape[:2] == (2, 2 * MAX_LEN) and not carried.vectors.requires_grad
    assert carried.bias.shape == (2, 2 * MAX_LEN) and not carried.bias.requires_grad
    assert first.summary_lengths.shape == (2, 2)
    assert ((first.summary_lengths >= 1) & (first.summary_lengths <= MAX_LEN)).all()

    seen = {}
    forward = model.forward

    def spy(*args, **kwargs):
        seen["softprompt"] = kwargs.get("softprompt")
        return forward(*args, **kwargs)

    model.forward = spy
    last = train_substep(engine, Substep(ids[:, 12:], [6, 6]), carried, carry=False)
    assert torch.equal(seen["softprompt"].bias, carried.bias)
    assert last.softprompt is None
    # The last substep's final segment does not compress: one length per sample.
    assert last.summary_lengths.shape == (2, 1)


def test_summary_length_stats_mean_and_histogram():
    stats = summary_length_stats([torch.tensor([1.0, 2.2]), torch.tensor([3.9, 4.0])], max_len=4)
    assert stats[0] == pytest.approx((1.0 + 2.2 + 3.9 + 4.0) / 4)
    assert stats[1:] == [0.0, 0.25, 0.25, 0.0, 0.5]
    assert summary_length_stats([], max_len=4) == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def variable_run(corpus, out, lam: float, steps: int, lambda_warmup_steps: int = 0):
    return tiny_config(
        corpus,
        out,
        compression={
            "compression_mode": "variable",
            "compression_max_len": MAX_LEN,
            "compression_lambda": lam,
            "lambda_warmup_steps": lambda_warmup_steps,
        },
        optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        train={"max_steps": steps, "deepspeed": "ds_configs/zero1.json", "export_final": True},
    )


def mean_length(records, steps):
    return sum(r["summary_length"] for r in records if r["step"] in steps) / len(steps)


@pytest.mark.slow
def test_trainer_logs_lengths_and_a_large_lambda_shortens_them(corpus, tmp_path):
    steps = 30
    runs = {}
    for lam in (0.0, 20.0):
        out = tmp_path / f"lambda_{lam}"
        warmup = 2 if lam else 0  # the penalty's weight: lambda / 2 at step 1, then lambda
        launch(write_config(tmp_path / f"{lam}.yaml", variable_run(corpus, out, lam, steps, warmup)))
        runs[lam] = read_metrics(out)
    logged = [r["compression_lambda"] for r in runs[20.0] if "loss" in r]
    assert logged[:3] == [10.0, 20.0, 20.0] and set(logged[3:]) == {20.0}
    for records in runs.values():
        train = [r for r in records if "loss" in r]
        assert len(train) == steps
        for r in train:
            assert 1.0 <= r["summary_length"] <= MAX_LEN
            assert len(r["summary_length_hist"]) == MAX_LEN + 1
            assert sum(r["summary_length_hist"]) == pytest.approx(1.0)
    first, last = range(1, 6), range(steps - 4, steps + 1)
    shortened = mean_length(runs[20.0], first) - mean_length(runs[20.0], last)
    unpenalised = mean_length(runs[0.0], first) - mean_length(runs[0.0], last)
    assert shortened > 1.0, shortened
    assert unpenalised < 0.5 * shortened, (unpenalised, shortened)

    # The exported model's control rows are the corpus tokenizer's <sum>/<eoc>.
    exported = tmp_path / "lambda_20.0" / "final"
    config = json.loads((exported / "config.json").read_text())
    vocab = json.loads((corpus / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert (config["sum_token_id"], config["eoc_token_id"]) == (ids["<sum>"], ids["<eoc>"])
    assert config["compression_mode"] == "variable"


@pytest.mark.parametrize("new_rows", [False, True], ids=["base-has-the-tokens", "corpus-adds-them"])
def test_variable_training_from_a_base_starts_with_a_zero_stop_row(tmp_path, new_rows):
    """The trainer's model: the <eoc> output row is zero whether the base has the control tokens (and learned
    never to predict them) or the corpus adds them (the resize gives new rows the mean row)."""
    from types import SimpleNamespace

    from tiny_models import VOCAB

    from acomp.config import RunConfig
    from acomp.train.engine import build_model

    base = tiny_model("llama", summary_length=0)
    with torch.no_grad():
        base.lm_head.weight.sub_(1.0)  # every row, the control tokens' included, away from zero
    base.save_pretrained(tmp_path / "base")
    sum_id, eoc_id = (VOCAB, VOCAB + 1) if new_rows else (5, 6)
    tokenizer = SimpleNamespace(get_vocab=lambda: {"<sum>": sum_id, "<eoc>": eoc_id})
    cfg = RunConfig()
    cfg.model.name_or_path = str(tmp_path / "base")
    cfg.compression.compression_mode, cfg.compression.compression_max_len = "variable", MAX_LEN
    model = build_model(cfg, tokenizer, {}, torch.float32, VOCAB + 2 if new_rows else None)
    head = model.get_output_embeddings().weight
    assert (model.config.sum_token_id, model.config.eoc_token_id) == (sum_id, eoc_id)
    assert torch.all(head[eoc_id] == 0) and torch.all(head[sum_id] != 0)
    torch.testing.assert_close(
        head[:VOCAB][torch.arange(VOCAB) != eoc_id],
        base.lm_head.weight[:VOCAB][torch.arange(VOCAB) != eoc_id],
    )


def test_lora_keeps_the_control_token_rows_trainable_in_variable_mode(tmp_path):
    """Under LoRA the base's own <sum>/<eoc> rows would be frozen, and with them a zero stop row: the stop
    logit would stay 0. They are trained as peft trainable tokens, as the rows of new tokens are."""
    from types import SimpleNamespace

    from acomp.config import RunConfig
    from acomp.train.engine import build_model

    tiny_model("llama", summary_length=0).save_pretrained(tmp_path / "base")
    cfg = RunConfig()
    cfg.model.name_or_path = str(tmp_path / "base")
    cfg.compression.compression_mode, cfg.compression.compression_max_len = "variable", MAX_LEN
    cfg.lora.enabled, cfg.lora.target_modules = True, ["q_proj", "v_proj"]
    tokenizer = SimpleNamespace(get_vocab=lambda: {"<sum>": 5, "<eoc>": 6})
    model = build_model(cfg, tokenizer, {}, torch.float32).train()
    head = model.get_output_embeddings()
    assert torch.all(head(torch.randn(3, 32))[:, 6] == 0)  # the stop logit starts at 0

    ids = random_ids(2, 12)
    model(ids, labels=ids, segment_lengths=[6, 6]).loss.backward()
    rows = dict(model.named_parameters())
    delta = rows["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert delta.shape[0] == 2 and delta.grad[1].abs().sum() > 0  # rows [5, 6]: <eoc> learns
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default" in rows


def test_wandb_offline_gets_the_length_histogram(tmp_path, monkeypatch):
    from acomp.config import RunConfig
    from acomp.train.metrics import MetricsLog

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = RunConfig()
    cfg.logging.wandb, cfg.logging.progress = "offline", False
    log = MetricsLog(tmp_path, cfg, is_main=True, start_step=0, total_steps=1)
    record = {"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "memory_gib": 0.0}
    record.update(summary_length=2.5, summary_length_hist=[0.0, 0.5, 0.0, 0.5, 0.0])
    logged = log._for_wandb(record)
    assert logged["summary_length_hist"].histogram == [0.0, 0.5, 0.0, 0.5, 0.0]
    log.log(record)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["summary_length_hist"][1] == 0.5


def test_lambda_warmup_ramps_the_penalty_linearly():
    assert [length_penalty_scale(4, step) for step in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert length_penalty_scale(0, 1) == 1.0


def test_a_scaled_penalty_gives_the_loss_and_gradients_of_a_proportionally_smaller_lambda():
    """Warmup step s of N optimizes lm_loss + (s/N) * penalty: what lambda * s/N with no warmup optimizes."""
    ids = random_ids(2, 12)
    runs = []
    for lam, scale in ((0.8, 0.25), (0.2, 1.0), (0.8, 1.0)):
        model = tiny_model(
            "llama", compression_mode="variable", compression_max_len=MAX_LEN, compression_lambda=lam
        ).train()
        result = train_substep(
            PlainEngine(model), Substep(ids, [6, 6]), None, carry=False, penalty_scale=scale
        )
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        runs.append((result.loss, grads))
    (warm_loss, warm), (small_loss, small), (full_loss, _) = runs
    torch.testing.assert_close(warm_loss, small_loss)
    assert warm.keys() == small.keys()
    for name in small:
        torch.testing.assert_close(warm[name], small[name], msg=name)
    assert full_loss > warm_loss + 1e-4  # the penalty counts: at full weight the loss is higher


def test_train_step_passes_the_warmup_scale_of_its_step(monkeypatch):
    from types import SimpleNamespace

    from acomp.config import RunConfig

    cfg = RunConfig()
    cfg.compression.lambda_warmup_steps = 4
    seen = []

    def substep(engine, substep, softprompt, carry, penalty_scale=1.0, step_engine=True, forward_done=None):
        seen.append(penalty_scale)
        return SimpleNamespace(loss=torch.tensor(1.0), softprompt=None, summary_lengths=None)

    monkeypatch.setattr(loop, "train_substep", substep)
    trainer = SimpleNamespace(
        cfg=cfg,
        engine=SimpleNamespace(device=torch.device("cpu")),
        batches=iter([{"input_ids": random_ids(1, 64)}] * 2),
        dist=SimpleNamespace(rank=0),
        plan=SimpleNamespace(accumulation=1),
        max_segment=64,
        coalesce=False,  # the stand-in engine reduces nothing
        checkpointing_probe=None,
    )
    loop.train_step(trainer, 0)  # optimizer step 1 of 4
    loop.train_step(trainer, 5)  # step 6: past the warmup
    substeps = cfg.compression.training_substeps
    assert seen == [0.25] * substeps + [1.0] * substeps
