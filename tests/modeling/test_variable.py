"""Variable-length compression: control tokens, stopping semantics, gradients, batching, generation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_CLASS, VOCAB, random_ids, tiny_config, tiny_model

import acomp.modeling.attention as attention
import acomp.modeling.compressor as compressor
from acomp import Softprompt
from acomp.modeling.attention import folds_presence
from acomp.modeling.softprompt import is_absent
from acomp.modeling.variable import hard_lengths, sampled_presence, soft_presence

MAX_LEN = 4
PRESENCE = ("mask", "folded")


def variable_model(family="llama", seed=0, **fields):
    fields = {"compression_mode": "variable", "compression_max_len": MAX_LEN, **fields}
    return tiny_model(family, seed=seed, **fields)


@pytest.fixture
def forced_stops(monkeypatch):
    """Replace the learned stop probabilities by a fixed pattern per sample (rows of 0/1)."""

    def install(pattern):
        pattern = torch.tensor(pattern, dtype=torch.float32)
        monkeypatch.setattr(
            compressor, "stop_probabilities", lambda logits, eoc: pattern.expand(logits.shape[0], -1)
        )

    return install


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_control_tokens_are_appended_and_recorded(family):
    model = variable_model(family)
    cfg = model.config
    assert (cfg.sum_token_id, cfg.eoc_token_id) == (VOCAB, VOCAB + 1)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 2
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 2
    assert model.embed_summary.weight.shape[0] == MAX_LEN


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT ties the LM head to the input embeddings
def test_a_variable_model_made_from_a_base_starts_its_stop_logit_from_a_zero_row(family, tmp_path):
    """A base that learned never to predict <eoc> (its row pushed far down) would leave the stop probability
    near zero, where the length penalty's gradient vanishes; a new summary table comes with a zero row."""
    base = tiny_model(family, summary_length=0)
    base.config.sum_token_id, base.config.eoc_token_id = 5, 6  # a tokenizer's ids, inside the table
    with torch.no_grad():
        base.get_output_embeddings().weight[6] = -3.0 * base.get_output_embeddings().weight[6].abs()
    base.save_pretrained(tmp_path / "base")
    model = MODEL_CLASS[family].from_pretrained(tmp_path / "base", **variable_fields())
    head = model.get_output_embeddings().weight
    assert torch.equal(head[6], torch.zeros_like(head[6]))
    others = head.clone()
    others[6] = base.get_output_embeddings().weight[6]
    torch.testing.assert_close(others, base.get_output_embeddings().weight)  # only that row

    out = model(random_ids(2, 8), segment_lengths=[8], hard_stop=False, output_softprompt=True)
    logits = model.lm_head(out.softprompt)  # the summary vectors are the slots' outputs
    assert torch.all(logits[..., 6] == 0)
    _, expected = soft_presence(torch.softmax(logits, dim=-1)[..., 6])  # logit 0 against the others'
    torch.testing.assert_close(out.summary_lengths[:, 0], expected)

    # A variable-mode AutoCompressor keeps its trained row; a fixed-mode model from a base keeps the base's.
    with torch.no_grad():
        model.get_output_embeddings().weight[6] = 1.5
    model.save_pretrained(tmp_path / "trained")
    again = MODEL_CLASS[family].from_pretrained(tmp_path / "trained")
    assert torch.all(again.get_output_embeddings().weight[6] == 1.5)
    fixed = MODEL_CLASS[family].from_pretrained(tmp_path / "base", summary_length=3)
    torch.testing.assert_close(fixed.get_output_embeddings().weight, base.get_output_embeddings().weight)


def variable_fields() -> dict:
    return {"compression_mode": "variable", "compression_max_len": MAX_LEN, "summary_length": 0}


def test_opt_table_larger_than_tokenizer_is_never_shrunk():
    # A tokenizer with 90 tokens registers <sum>=90, <eoc>=91: rows inside OPT's 97-row table are reused.
    model = MODEL_CLASS["opt"](tiny_config("opt", summary_length=3))
    model.config.compression_mode = "variable"
    model.add_control_tokens(sum_token_id=90, eoc_token_id=91)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB
    assert (model.config.sum_token_id, model.config.eoc_token_id) == (90, 91)


def test_thresholds_zero_and_one_stop_at_one_and_at_max():
    ids = random_ids(2, 12)
    for threshold, expected in ((0.0, 1), (1.0, MAX_LEN)):
        model = variable_model(compress_stop_threshold=threshold)
        out = model.compress_context(ids, segment_lengths=[6, 6])
        assert out.summary_lengths.tolist() == [[expected, expected]] * 2
        present = (out.softprompt_bias == 0).sum(dim=1)
        assert present.tolist() == [2 * expected] * 2


def test_soft_and_hard_paths_agree_when_stop_probabilities_are_binary(forced_stops):
    forced_stops([0.0, 1.0, 0.0, 0.0])  # emit 2 vectors, then stop
    model = variable_model(compress_stop_threshold=0.5)
    ids = random_ids(2, 15)
    soft = model(ids, labels=ids, segment_lengths=[5, 5, 5], hard_stop=False, output_softprompt=True)
    hard = model(ids, labels=ids, segment_lengths=[5, 5, 5], hard_stop=True, output_softprompt=True)
    assert hard.summary_lengths.tolist() == [[2.0] * 3] * 2
    torch.testing.assert_close(soft.summary_lengths, hard.summary_lengths)
    torch.testing.assert_close(soft.logits, hard.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft.loss, hard.loss)


def test_hard_masking_equals_dropping_the_absent_vectors_opt(forced_stops):
    # OPT's softprompt takes no positions, so masked vectors must behave exactly as if never there.
    forced_stops([0.0, 0.0, 1.0, 0.0])
    model = variable_model("opt", compress_stop_threshold=0.5)
    ctx, nxt = random_ids(1, 8), random_ids(1, 6, seed=9)
    comp = model.compress_context(ctx)
    keep = comp.softprompt_bias[0] == 0
    assert int(keep.sum()) == 3
    masked = model(nxt, softprompt=comp.softprompt, softprompt_bias=comp.softprompt_bias).logits
    dropped = model(nxt, softprompt=comp.softprompt[:, keep]).logits
    torch.testing.assert_close(masked, dropped, rtol=1e-5, atol=1e-5)


def test_survival_and_expected_length():
    p = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    log_s, expected = soft_presence(p)
    torch.testing.assert_close(log_s.exp(), torch.tensor([[1.0, 0.5, 0.25, 0.125], [1.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(expected, torch.tensor([1.875, 4.0]))


def test_the_cumulative_rule_keeps_the_slots_training_gave_survival_above_one_minus_the_threshold():
    """cumulative: L = the number of slots with S_t >= 1 - threshold, computed here from soft_presence's
    survival (the training path), against the step rule that reads each p_t alone."""
    p = torch.tensor([[0.2] * 8, [0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0], [0.05] * 8, [0.0] * 8])
    survival = soft_presence(p)[0].exp()
    for threshold in (None, 0.3, 0.5, 0.9):
        level = 1.0 - (0.5 if threshold is None else threshold)
        expected = (survival >= level).sum(dim=1)
        assert hard_lengths(p, None, 0, threshold, "cumulative").tolist() == expected.tolist()
    # S = 1, .8, .64, .51, .41: the median length is 4; the step rule at 0.5 never fires on p = 0.2
    assert hard_lengths(p, None, 0, 0.5, "cumulative").tolist() == [4, 3, 8, 8]
    assert hard_lengths(p, None, 0, 0.5, "step").tolist() == [8, 3, 8, 8]
    # where the stops are sharp (0 or 1) the two rules agree at every threshold
    sharp = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    for threshold in (0.1, 0.5, 0.9):
        assert hard_lengths(sharp, None, 0, threshold, "cumulative").tolist() == [2, 4, 1]
        assert hard_lengths(sharp, None, 0, threshold, "step").tolist() == [2, 4, 1]


def test_the_stop_rule_reaches_compression_and_a_bad_rule_is_refused(forced_stops):
    forced_stops([0.3, 0.3, 0.3, 0.3])  # S = 1, .7, .49, .34
    ids = random_ids(2, 12)
    for rule, expected in (("step", MAX_LEN), ("cumulative", 2)):
        model = variable_model(compress_stop_threshold=0.5, compress_stop_rule=rule)
        out = model.compress_context(ids, segment_lengths=[6, 6])
        assert out.summary_lengths.tolist() == [[expected, expected]] * 2
    with pytest.raises(ValueError, match="compress_stop_rule must be one of .* got 'median'"):
        variable_model(compress_stop_rule="median")


def test_the_cumulative_rule_is_the_default_and_a_saved_rule_is_kept(forced_stops, tmp_path):
    forced_stops([0.3, 0.3, 0.3, 0.3])  # S = 1, .7, .49, .34: the median length is 2, p_t never beats 0.5
    ids = random_ids(1, 12)
    model = variable_model(compress_stop_threshold=0.5)
    assert model.config.compress_stop_rule == "cumulative"
    assert model.compress_context(ids, segment_lengths=[6, 6]).summary_lengths.tolist() == [[2, 2]]
    # A model saved with the step rule (the default before) loads with it: its lengths do not change.
    variable_model(compress_stop_threshold=0.5, compress_stop_rule="step").save_pretrained(tmp_path)
    loaded = MODEL_CLASS["llama"].from_pretrained(tmp_path)
    assert loaded.config.compress_stop_rule == "step"
    assert loaded.compress_context(ids, segment_lengths=[6, 6]).summary_lengths.tolist() == [
        [MAX_LEN, MAX_LEN]
    ]


def test_gradients_reach_the_stop_decision():
    model = variable_model().train()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :7] = -100  # LM loss of segment 2 only: it depends on stopping through the presence bias
    out = model(ids, labels=labels, segment_lengths=[6, 6])
    out.loss.backward()
    eoc = model.config.eoc_token_id
    assert model.lm_head.weight.grad[eoc].abs().sum() > 0

    model.zero_grad()
    model.config.compression_lambda = 1.0
    out = model(ids, segment_lengths=[6, 6], labels=torch.full_like(ids, -100))  # penalty only
    assert out.length_penalty > 0
    out.loss.backward()
    assert model.lm_head.weight.grad[eoc].abs().sum() > 0


def test_sampled_presence_draws_lengths_from_the_stop_distribution():
    p = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    bias, expected = sampled_presence(p)
    present = ~is_absent(bias)
    # Present slots form a prefix whose frequency per slot is its survival S_t: 1, 1/2, 1/4, 1/8.
    assert torch.equal(present, present.cummin(dim=1).values)
    assert set(bias[present].tolist()) == {0.0}
    torch.testing.assert_close(
        present[0::2].float().mean(0), torch.tensor([1.0, 0.5, 0.25, 0.125]), atol=0.02, rtol=0
    )
    assert present[1::2].sum(dim=1).eq(2).all()  # a certain stop after slot 2: always length 2
    torch.testing.assert_close(expected, soft_presence(p)[1])  # the penalty's E[L] is the soft one


def test_sampled_presence_is_hard_masking_forward_with_gradients_straight_through(monkeypatch):
    """The next segment's loss equals hard masking at the drawn length; the LM loss's gradient reaches the stop
    probabilities of the slots before the drawn length, and none from it on (they only move absent slots)."""
    model = variable_model(training_presence="sampled", compress_stop_threshold=0.5).train()
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :7] = -100  # segment 2's loss only
    stop = torch.full((2, MAX_LEN), 0.3, requires_grad=True)
    monkeypatch.setattr(compressor, "stop_probabilities", lambda logits, eoc: stop)
    torch.manual_seed(2)
    out = model(ids, labels=labels, segment_lengths=[6, 6], output_softprompt=True)
    lengths = (~is_absent(out.softprompt_bias[:, :MAX_LEN])).sum(dim=1).tolist()
    assert len(set(lengths)) == 2 and max(lengths) > 1  # this seed draws two different lengths
    out.lm_loss.backward()
    for b, length in enumerate(lengths):
        assert stop.grad[b, length - 1 :].abs().sum() == 0
        assert length == 1 or stop.grad[b, : length - 1].abs().sum() > 0

    stops = torch.tensor([[1.0 if t == n - 1 else 0.0 for t in range(MAX_LEN)] for n in lengths])
    monkeypatch.setattr(compressor, "stop_probabilities", lambda logits, eoc: stops)
    expected = model(ids, labels=labels, segment_lengths=[6, 6], hard_stop=True)
    torch.testing.assert_close(out.lm_loss, expected.lm_loss)


def test_sampled_presence_leaves_inference_alone(forced_stops):
    forced_stops([[0.0, 0.7, 0.0, 0.0]])
    soft = variable_model(compress_stop_threshold=0.5, training_presence="soft").eval()
    sampled = variable_model(compress_stop_threshold=0.5, training_presence="sampled").eval()
    ids = random_ids(1, 12)
    a, b = (m(ids, segment_lengths=[6, 6], output_softprompt=True) for m in (soft, sampled))
    torch.testing.assert_close(a.logits, b.logits)
    assert a.summary_lengths.tolist() == b.summary_lengths.tolist() == [[2.0, 2.0]]


def test_training_draws_lengths_by_default_and_soft_presence_stays_available(forced_stops):
    """By default training sees each slot as inference does, kept or absent; `soft` weights every slot's
    attention by its survival S_t instead."""
    forced_stops([[0.3, 0.3, 0.3, 0.3]])  # S = 1, .7, .49, .343
    ids = random_ids(64, 12)
    bias = {}
    for presence in ("sampled", "soft"):
        fields = {} if presence == "sampled" else {"training_presence": presence}
        model = variable_model(**fields).train()
        assert model.config.training_presence == presence
        torch.manual_seed(0)
        bias[presence] = model(
            ids, labels=ids, segment_lengths=[6, 6], output_softprompt=True
        ).softprompt_bias
    first = bias["sampled"][:, :MAX_LEN]
    assert ((first == 0) | is_absent(first)).all() and 1 < (first == 0).sum(dim=1).float().mean() < MAX_LEN
    survival = torch.tensor([1.0, 0.7, 0.49, 0.343])
    torch.testing.assert_close(bias["soft"][:, :MAX_LEN].exp(), survival.expand(64, -1))


def test_length_penalty_formula():
    model = variable_model(compression_lambda=0.3, compression_alpha=2.0).train()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids, segment_lengths=[8, 4], output_softprompt=True)
    n = torch.tensor([[8.0, 4.0]])
    expected = (0.3 * out.summary_lengths / (2.0 * n)).mean()
    torch.testing.assert_close(out.length_penalty, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + expected)


def test_batched_variable_lengths_match_single_samples(monkeypatch):
    # A data-dependent binary stop rule, so samples stop at different steps.
    monkeypatch.setattr(
        compressor, "stop_probabilities", lambda logits, eoc: (logits[..., 3] > -0.06).float()
    )
    model = variable_model(compress_stop_threshold=0.5)
    ids = random_ids(3, 12, seed=7)
    batched = model.compress_context(ids, segment_lengths=[6, 6])
    assert batched.summary_lengths.unique().numel() > 1, (
        "pick a threshold that makes samples stop differently"
    )
    nxt = random_ids(3, 5, seed=8)
    after = model(nxt, softprompt=batched.softprompt, softprompt_bias=batched.softprompt_bias).logits
    for i in range(3):
        single = model.compress_context(ids[i : i + 1], segment_lengths=[6, 6])
        assert torch.equal(single.summary_lengths[0], batched.summary_lengths[i])
        logits = model(
            nxt[i : i + 1], softprompt=single.softprompt, softprompt_bias=single.softprompt_bias
        ).logits
        torch.testing.assert_close(after[i], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_generation_with_variable_summaries_equals_argmax_loop_and_hides_eoc(monkeypatch, decoding):
    monkeypatch.setattr(
        compressor, "stop_probabilities", lambda logits, eoc: (logits[..., 3] > -0.06).float()
    )
    model = variable_model(compress_stop_threshold=0.5)
    ctx = model.compress_context(random_ids(2, 12, seed=7), segment_lengths=[6, 6])
    with torch.no_grad():  # make <eoc> the model's favourite token: it must still never be generated
        model.lm_head.weight[model.config.eoc_token_id] = 10 * model.lm_head.weight[5]
    prompt = random_ids(2, 4, seed=3)
    out = model.generate(
        prompt,
        softprompt=ctx.softprompt,
        softprompt_bias=ctx.softprompt_bias,
        max_new_tokens=6,
        eos_token_id=None,
        decoding=decoding,
    )
    ids = prompt
    for _ in range(6):
        logits = model(ids, softprompt=ctx.softprompt, softprompt_bias=ctx.softprompt_bias).logits[:, -1]
        logits[:, [model.config.sum_token_id, model.config.eoc_token_id]] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert not torch.isin(out, torch.tensor([model.config.eoc_token_id, model.config.sum_token_id])).any()


def test_variable_model_save_load_round_trip(tmp_path):
    model = variable_model()
    ids = random_ids(2, 12)
    before = model.compress_context(ids, segment_lengths=[6, 6])
    model.save_pretrained(tmp_path)
    loaded = MODEL_CLASS["llama"].from_pretrained(tmp_path).eval()
    assert (loaded.config.sum_token_id, loaded.config.eoc_token_id) == (VOCAB, VOCAB + 1)
    after = loaded.compress_context(ids, segment_lengths=[6, 6])
    assert torch.equal(before.softprompt, after.softprompt)
    assert torch.equal(before.summary_lengths, after.summary_lengths)


def test_a_stored_stop_threshold_is_overridden_by_none(tmp_path):
    """None is a threshold of its own (stop at the argmax): passed, it replaces the checkpoint's."""
    model = variable_model()
    model.config.compress_stop_threshold = 0.5
    model.save_pretrained(tmp_path)
    assert MODEL_CLASS["llama"].from_pretrained(tmp_path).config.compress_stop_threshold == 0.5
    loaded = MODEL_CLASS["llama"].from_pretrained(tmp_path, compress_stop_threshold=None)
    assert loaded.config.compress_stop_threshold is None


@pytest.mark.parametrize("lam, shortens", [(5.0, True), (0.0, False)])
def test_large_lambda_shortens_summaries_and_zero_lambda_does_not(lam, shortens):
    torch.manual_seed(0)
    model = variable_model(compression_lambda=lam, compression_max_len=6).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_ids(4, 24, seed=11)
    lengths = []
    for _ in range(40):
        out = model(ids, labels=ids, segment_lengths=[8, 8, 8])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        lengths.append(out.summary_lengths.mean().item())
    first, last = sum(lengths[:3]) / 3, sum(lengths[-3:]) / 3
    if shortens:
        assert last < 0.5 * first, (first, last)
    else:
        assert last > 0.9 * first, (first, last)


# ------------------------------------------------------------------------------------ compact summaries
def test_compact_keeps_present_vectors_in_order_with_their_positions():
    absent = torch.finfo(torch.float32).min
    vectors = torch.arange(8.0).view(2, 4, 1)
    bias = torch.tensor([[0.0, absent, 0.0, absent], [0.0, 0.0, -0.5, absent]])
    compact = Softprompt(vectors, bias).compact()
    assert compact.vectors[:, :, 0].tolist() == [[0.0, 2.0, 0.0], [4.0, 5.0, 6.0]]
    assert compact.bias.tolist() == [[0.0, 0.0, absent], [0.0, 0.0, -0.5]]  # padding; a soft presence stays
    assert compact.positions[0, :2].tolist() == [0, 2] and compact.positions[1].tolist() == [0, 1, 2]
    assert compact.span == 4
    one = Softprompt(vectors[:1], bias[:1]).compact()
    assert one.bias is None and one.vectors[0, :, 0].tolist() == [0.0, 2.0]
    fixed = Softprompt(vectors)
    assert fixed.compact() is fixed


def _stops_per_sample(monkeypatch):
    """Sample b of a batch keeps 1, 3, 2 vectors of every segment (b = 0, 1, 2)."""
    pattern = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(compressor, "stop_probabilities", lambda logits, eoc: pattern[: logits.shape[0]])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compact_summaries_give_the_masked_logits_and_tokens(family, monkeypatch):
    """Dropping the absent vectors changes nothing but the work: a later forward's logits, greedy tokens with
    both caches, and more context compressed behind them are those of the masked, full-width softprompt (RoPE
    families: the kept vectors keep their positions)."""
    _stops_per_sample(monkeypatch)
    model = variable_model(family, compress_stop_threshold=0.5)
    ctx = model.compress_context(random_ids(3, 12, seed=7), segment_lengths=[6, 6])
    padded = ctx.summary
    compact = padded.compact()
    assert ctx.summary_lengths.sum(dim=1).tolist() == [2.0, 6.0, 4.0]
    assert compact.length == 6 < padded.length == 8
    nxt = random_ids(3, 5, seed=8)
    torch.testing.assert_close(
        model(nxt, softprompt=compact).logits, model(nxt, softprompt=padded).logits, rtol=1e-5, atol=1e-5
    )
    for decoding in ("dynamic", "static"):
        gen = dict(max_new_tokens=6, eos_token_id=None, decoding=decoding)
        want = model.generate(nxt, softprompt=padded, **gen)
        assert torch.equal(model.generate(nxt, softprompt=compact, **gen), want)
    more = random_ids(3, 6, seed=9)
    after = [model.compress_context(more, softprompt=s).summary.compact() for s in (padded, compact)]
    torch.testing.assert_close(
        model(nxt, softprompt=after[1]).logits, model(nxt, softprompt=after[0]).logits, rtol=1e-5, atol=1e-5
    )


def test_a_single_compact_summary_has_no_bias_and_the_cache_holds_only_its_vectors(monkeypatch):
    _stops_per_sample(monkeypatch)
    model = variable_model(compress_stop_threshold=0.5)
    ctx = model.compress_context(random_ids(1, 12, seed=7), segment_lengths=[6, 6])
    compact = ctx.summary.compact()
    kept = 2  # one vector of each segment
    assert compact.bias is None and compact.length == kept < ctx.summary.length
    cached = []

    def prefill_cache(module, args, kwargs, output):
        cached.append(int(kwargs["past_key_values"].get_seq_length()))

    prompt = random_ids(1, 4, seed=3)
    handle = model.get_decoder().register_forward_hook(prefill_cache, with_kwargs=True)
    gen = dict(max_new_tokens=3, eos_token_id=None)
    try:
        out = model.generate(prompt, softprompt=compact, **gen)
        want = model.generate(prompt, softprompt=ctx.summary, **gen)
    finally:
        handle.remove()
    # After the prefill: the kept vectors and the 4 prompt tokens; then one column per decoded token.
    assert cached == [kept + 4, kept + 5, kept + 6, 8 + 4, 8 + 5, 8 + 6]
    assert torch.equal(out, want)
    # An empty prompt continues from the last present vector (the full width's last slot is absent).
    empty = prompt[:, :0]
    want = model.generate(empty, softprompt=ctx.summary, **gen)
    assert torch.equal(model.generate(empty, softprompt=compact, **gen), want)


def test_a_fixed_mode_summary_is_left_as_it_is():
    model = tiny_model("llama")
    out = model.compress_context(random_ids(2, 12), segment_lengths=[6, 6])
    assert out.summary.bias is None and out.softprompt_bias is None
    assert out.summary.compact() is out.summary
    assert torch.equal(out.summary.vectors, model.compress(random_ids(2, 12), segment_lengths=[6, 6]))


@pytest.mark.parametrize(
    "family, presence", [("llama", "soft"), ("opt", "soft"), ("qwen2", "soft"), ("llama", "sampled")]
)
def test_folded_presence_attention_equals_the_mask_with_gradients(family, presence):
    """`presence_attention: folded` (the presence bias as an extra key dimension, causal kernels) computes what
    the 4D mask does: logits, lengths, loss with its penalty, and every gradient, under soft stopping (or
    sampled lengths, the same draws in both) and left padding."""
    models = [
        variable_model(
            family, presence_attention=kind, compression_lambda=0.5, training_presence=presence
        ).train()
        for kind in PRESENCE
    ]
    row = torch.randn(models[0].config.hidden_size, generator=torch.Generator().manual_seed(3))
    for model in models:  # the same <eoc> row in both, one that stops the loop softly after 1-3 vectors
        with torch.no_grad():
            model.get_output_embeddings().weight[model.config.eoc_token_id] = row
    ids = random_ids(2, 18)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # the first sample is left-padded
    outs = []
    for m in models:
        torch.manual_seed(5)  # the same sampled lengths for both
        outs.append(m(ids, attention_mask=mask, labels=ids, segment_lengths=[6, 6, 6]))
    lengths = outs[0].summary_lengths
    assert ((lengths > 1.2) & (lengths < MAX_LEN - 0.2)).any()  # soft presence, not all 1s or all slots
    for out in outs:
        out.loss.backward()
    mask_out, folded_out = outs
    torch.testing.assert_close(folded_out.logits, mask_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded_out.summary_lengths, mask_out.summary_lengths)
    torch.testing.assert_close(folded_out.loss, mask_out.loss)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auto_presence_attention_folds_under_sdpa_and_masks_under_eager(monkeypatch):
    key_biases = []
    causal = attention.causal_attention

    def spy(*args, key_bias=None, **kwargs):
        key_biases.append(key_bias is not None)
        return causal(*args, key_bias=key_bias, **kwargs)

    monkeypatch.setattr(attention, "causal_attention", spy)
    ids = random_ids(2, 12)
    model = variable_model()
    assert model.config.presence_attention == "auto" and model.config._attn_implementation == "sdpa"
    assert folds_presence(model.config)
    model(ids, segment_lengths=[6, 6])  # the second segment reads the first's summaries through the fold
    layers = model.config.num_hidden_layers
    assert key_biases == [False] * layers + [True] * layers
    config = tiny_config("llama", compression_mode="variable")
    config._attn_implementation = "eager"
    model = MODEL_CLASS["llama"](config)  # no error: auto takes the 4D mask where SDPA is not used
    assert not folds_presence(model.config)
    model(ids, segment_lengths=[6, 6])
    assert len(key_biases) == 2 * layers


def test_folded_presence_attention_needs_sdpa():
    config = tiny_config("llama", compression_mode="variable", presence_attention="folded")
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="presence_attention='folded' needs attn_implementation 'sdpa'"):
        MODEL_CLASS["llama"](config)


@pytest.mark.parametrize("presence_attention", ["folded", "mask"])
def test_a_binding_sliding_window_holds_behind_a_presence_bias(presence_attention):
    """Mistral's window (6 here, over 4 vectors + 12 tokens) applies with a presence bias as without one: an
    all-zero bias gives the logits and the generated tokens of no bias (transformers' own windowed mask)."""
    model = tiny_model(
        "mistral", compression_mode="variable", compression_max_len=3, presence_attention=presence_attention
    )
    model.config.sliding_window = 6
    ids, sp, zero = random_ids(1, 12, seed=2), torch.randn(1, 4, 32), torch.zeros(1, 4)
    plain = model(ids, softprompt=sp).logits
    assert torch.allclose(model(ids, softprompt=sp, softprompt_bias=zero).logits, plain, atol=1e-5)
    kwargs = dict(softprompt=sp, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(model.generate(ids, softprompt_bias=zero, **kwargs), model.generate(ids, **kwargs))


def test_fixed_shape_decoding_is_refused_where_a_window_binds_behind_a_mask():
    """The static cache keeps the window in rolled order, which its key mask cannot follow: with padding or
    a presence bias it is refused; unpadded with no bias it stays exact."""
    model = tiny_model("mistral")
    model.config.sliding_window = 6
    ids, sp = random_ids(2, 8, seed=2), torch.randn(2, 3, 32)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match=r"decoding='static': the model's sliding window \(6 tokens\) binds"):
        model.generate(ids, attention_mask=mask, softprompt=sp, max_new_tokens=4, decoding="static")
    kwargs = dict(softprompt=sp, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(model.generate(ids, decoding="static", **kwargs), model.generate(ids, **kwargs))
