"""Behaviour of the AutoCompressor core on tiny models of every supported family (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, MODEL_CLASS, VOCAB, random_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import acomp.modeling.attention as attention
from acomp import AutoCompressorModel


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_length_zero_reproduces_base_model(family):
    model = tiny_model(family, summary_length=0)
    base = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    ids = random_ids(2, 17)
    ours = model(ids).logits
    theirs = base(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_segment_equals_manual_chaining(family):
    model = tiny_model(family)
    ids = random_ids(2, 18)
    full = model(ids, labels=ids, segment_lengths=[5, 7, 6], output_softprompt=True)

    sp, logits = None, []
    for chunk in ids.split([5, 7, 6], dim=1):
        out = model(chunk, softprompt=sp, output_softprompt=True)
        sp = out.softprompt
        logits.append(out.logits)
    logits = torch.cat(logits, dim=1)
    torch.testing.assert_close(full.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.softprompt, sp, rtol=1e-5, atol=1e-5)
    assert sp.shape == (2, 3 * model.summary_length, 32)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(full.loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_input_runs_the_causal_kernel_with_no_mask_and_equals_the_all_ones_mask(family, monkeypatch):
    """No attention mask from the caller: every decoder call goes through `causal_attention` without a mask
    (no host sync for transformers' all-ones check); logits, loss and every gradient equal those behind an
    explicit all-ones mask."""
    calls = []
    causal = attention.causal_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("key_bias"))
        return causal(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_attention", spy)
    model = tiny_model(family)
    ids = random_ids(2, 18)
    outs = []
    for mask in (None, torch.ones_like(ids)):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids, segment_lengths=[5, 7, 6])
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    layers = model.config.num_hidden_layers
    assert calls == [None] * (3 * layers)  # the unmasked call only, never with a bias
    assert model.config._attn_implementation == "sdpa"  # restored after each call
    (plain, plain_grads), (masked, masked_grads) = outs
    torch.testing.assert_close(plain.logits, masked.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.loss, masked.loss, rtol=0, atol=1e-6)
    assert plain_grads.keys() == masked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_binding_sliding_window_keeps_the_mask(monkeypatch):
    """A call longer than a sliding window (Mistral) needs the window's mask, so no-mask input takes the 2D mask."""
    calls = []
    causal = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(1) or causal(*a, **k))
    model = tiny_model("mistral", sliding_window=4)
    ids = random_ids(2, 18)
    plain = model(ids, labels=ids, segment_lengths=[9, 9])
    masked = model(ids, attention_mask=torch.ones_like(ids), labels=ids, segment_lengths=[9, 9])
    assert calls == []
    torch.testing.assert_close(plain.logits, masked.logits, rtol=0, atol=0)
    wide = tiny_model("mistral", sliding_window=64)(ids, labels=ids, segment_lengths=[9, 9])
    assert len(calls) == 2 * 2  # within the window: the unmasked call, per layer and segment
    assert not torch.allclose(wide.logits, plain.logits)  # the window of 4 did bind


def test_last_segment_gets_summary_tokens_only_when_asked():
    model = tiny_model("llama")
    ids = random_ids(1, 12)
    without = model(ids, segment_lengths=[6, 6])
    with_sp = model(ids, segment_lengths=[6, 6], output_softprompt=True)
    assert without.softprompt is None
    assert with_sp.softprompt.shape[1] == 2 * model.summary_length
    torch.testing.assert_close(without.logits, with_sp.logits)  # summary tokens come after the text


def test_no_accumulation_replaces_softprompt():
    model = tiny_model("llama", accumulate_summary=False)
    ids = random_ids(1, 12)
    out = model(ids, segment_lengths=[4, 4, 4], output_softprompt=True)
    assert out.softprompt.shape[1] == model.summary_length
    last = model(
        ids[:, 8:], softprompt=model.compress(ids[:, :8], segment_lengths=[4, 4]), output_softprompt=True
    )
    torch.testing.assert_close(out.softprompt, last.softprompt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_segment2_loss_reaches_segment1_and_summary_embeddings(family):
    model = tiny_model(family)
    ids = random_ids(2, 12)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    labels = ids.clone()
    labels[:, :7] = -100  # only segment 2's own tokens are targets (token 6 is predicted by segment 1)
    out = model(inputs_embeds=embeds, labels=labels, segment_lengths=[6, 6])
    out.loss.backward()
    seg1_grad = embeds.grad[:, :6].abs().sum()
    assert seg1_grad > 0, "no gradient from segment-2 loss into segment-1 tokens through the summaries"
    assert model.embed_summary.weight.grad.abs().sum() > 0

    # Cut the summary path and the gradient into segment 1 disappears: it only flows through summaries.
    embeds.grad = None
    out = model(inputs_embeds=embeds[:, 6:], labels=labels[:, 6:], softprompt=None)
    out.loss.backward()
    assert embeds.grad[:, :6].abs().sum() == 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_segment_checkpointing_gives_identical_gradients(family):
    ids = random_ids(2, 15)
    grads = []
    for ckpt in (False, True):
        model = tiny_model(family, segment_gradient_checkpointing=ckpt).train()
        model(ids, labels=ids, segment_lengths=[5, 5, 5]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gives_same_per_sample_results(family, side):
    model = tiny_model(family)
    lengths = [12, 9]
    segs = [6, 6]
    ids = random_ids(2, 12)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch_ids = ids.clone()
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 12 - n :] = 1
            batch_ids[i, 12 - n :] = ids[i, :n]
        batch_ids[i][mask[i] == 0] = 0
    batched = model(
        batch_ids, attention_mask=mask, labels=batch_ids, segment_lengths=segs, output_softprompt=True
    )
    for i in range(len(lengths)):
        real = batch_ids[i][mask[i] == 1][None]
        # The same tokens alone, with the same per-segment split of real tokens.
        per_seg = [int(m.sum()) for m in mask[i].split(segs)]
        per_seg = [x for x in per_seg if x]
        single = model(real, labels=real, segment_lengths=per_seg, output_softprompt=True)
        torch.testing.assert_close(batched.logits[i][mask[i] == 1], single.logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.softprompt[i], single.softprompt[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            batched.segment_nll[i].sum() / batched.segment_tokens[i].sum(), single.loss, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_generate_with_cache_equals_argmax_loop(family, decoding):
    model = tiny_model(family)
    context = random_ids(2, 16, seed=3)
    prompt = random_ids(2, 5, seed=4)
    sp = model.compress(context, segment_lengths=[8, 8])
    cached = model.generate(prompt, softprompt=sp, max_new_tokens=8, eos_token_id=None, decoding=decoding)

    ids = prompt
    for _ in range(8):
        nxt = model(ids, softprompt=sp).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_generate_left_padded_batch_matches_single():
    model = tiny_model("llama")
    sp = model.compress(random_ids(2, 8, seed=5))
    prompt = random_ids(2, 6, seed=6)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    batched = model.generate(prompt, attention_mask=mask, softprompt=sp, max_new_tokens=5, eos_token_id=None)
    single = model.generate(prompt[1:, 2:], softprompt=sp[1:], max_new_tokens=5, eos_token_id=None)
    assert torch.equal(batched[1, 6:], single[0, 4:])


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generate_batch_with_an_empty_prompt_matches_single(family, decoding):
    """A sample whose prompt is all padding continues from its last summary vector, as it does alone."""
    model = tiny_model(family)
    sp = model.compress(random_ids(2, 12, seed=5), segment_lengths=[6, 6])
    prompt = random_ids(2, 4, seed=6)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    kwargs = dict(max_new_tokens=5, eos_token_id=[], decoding=decoding)
    batched = model.generate(prompt, attention_mask=mask, softprompt=sp, **kwargs)
    assert torch.equal(batched[0], model.generate(prompt[:1], softprompt=sp[:1], **kwargs)[0])
    assert torch.equal(batched[1, 4:], model.generate(prompt[1:, :0], softprompt=sp[1:], **kwargs)[0])
    with pytest.raises(ValueError, match="sample 1 has no prompt tokens and there are no summary vectors"):
        model.generate(prompt, attention_mask=mask, max_new_tokens=2)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _left_padded_generation(family, device, max_new_tokens):
    """A tiny model on `device`, a 2-sample prompt (the second left-padded by 3) and generate kwargs with
    the summary vectors of a 12-token context."""
    model = tiny_model(family).to(device)
    sp = model.compress(random_ids(2, 12, seed=5).to(device), segment_lengths=[6, 6])
    prompt = random_ids(2, 6, seed=6).to(device)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, softprompt=sp, max_new_tokens=max_new_tokens, eos_token_id=None)
    return model, prompt, kwargs


@pytest.mark.parametrize(
    "decoding, device",
    [("static", d) for d in DEVICES] + [("cuda_graph", "cuda")] * torch.cuda.is_available(),
)
@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_shape_decoding_equals_dynamic(family, decoding, device):
    """Static cache (and its CUDA-graph replay) against the growing cache: left padding, a softprompt,
    greedy and sampled tokens, EOS stopping (samples stopping at different steps, or both at the first token:
    pad tokens after a sample's EOS, and no step after the last one)."""
    model, prompt, kwargs = _left_padded_generation(family, device, max_new_tokens=10)
    runs = {}
    for mode in ("dynamic", decoding):
        greedy = model.generate(prompt, decoding=mode, **kwargs)
        gen = torch.Generator(device=device).manual_seed(1)
        sampled = model.generate(prompt, decoding=mode, do_sample=True, top_k=20, generator=gen, **kwargs)
        runs[mode] = greedy, sampled
    assert torch.equal(runs["dynamic"][0], runs[decoding][0])
    assert torch.equal(runs["dynamic"][1], runs[decoding][1])
    free = runs["dynamic"][0][:, prompt.shape[1] :]
    for eos in ([int(free[0, 2]), int(free[1, 6])], [int(free[0, 0]), int(free[1, 0])]):
        stop = {**kwargs, "eos_token_id": eos}
        stopped = [model.generate(prompt, decoding=m, **stop) for m in ("dynamic", decoding)]
        assert stopped[0].shape[1] <= prompt.shape[1] + 7
        assert torch.equal(stopped[0], stopped[1])


@pytest.mark.parametrize(
    "decoding, device", [("static", "cpu")] + [("cuda_graph", "cuda")] * torch.cuda.is_available()
)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compiled_decode_step_equals_dynamic(family, decoding, device):
    """compile_step=True: the torch.compile'd step gives the eager tokens, and a second call with the same
    shapes and another prompt reuses its graph (no recompilation) with that call's own cache."""
    from torch._dynamo.utils import counters

    model, prompt, kwargs = _left_padded_generation(family, device, max_new_tokens=8)
    other = random_ids(2, 6, seed=9).to(device)
    counters.clear()
    got = model.generate(prompt, decoding=decoding, compile_step=True, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]
    again = model.generate(other, decoding=decoding, compile_step=True, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(got, model.generate(prompt, decoding="dynamic", **kwargs))
    assert torch.equal(again, model.generate(other, decoding="dynamic", **kwargs))


@pytest.mark.parametrize(
    "decoding, device", [("static", "cpu")] + [("cuda_graph", "cuda")] * torch.cuda.is_available()
)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_frozen_decode_step_fuses_projections_and_follows_weight_changes(family, decoding, device):
    """freeze_weights=True: the step compiled with its weights as constants gives the eager tokens, runs the
    projections that read the same input as one GEMM (query/key/value; Llama's gate/up), reuses its graph on
    a second call with another prompt (which must read that call's own cache, not the first call's), and
    compiles again once the weights change in place (its constants would be stale)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch.torch_version import TorchVersion

    gemms = []

    def count_gemms(graph):  # inductor's graph after its post-grad passes
        names = (str(n.target) for n in graph.nodes if n.op == "call_function")
        gemms.extend(n for n in names if "linear" in n or n in ("aten.mm.default", "aten.addmm.default"))

    model, prompt, kwargs = _left_padded_generation(family, device, max_new_tokens=8)
    frozen = dict(decoding=decoding, compile_step=True, freeze_weights=True, **kwargs)
    # On CPU inductor concatenates linears only when asked to.
    with inductor_config.patch({"post_grad_custom_post_pass": count_gemms, "cpp.enable_concat_linear": True}):
        counters.clear()
        assert torch.equal(
            model.generate(prompt, **frozen), model.generate(prompt, decoding="static", **kwargs)
        )
        graphs = counters["stats"]["unique_graphs"]
        other = random_ids(2, 6, seed=9).to(device)
        want = model.generate(other, decoding="static", **kwargs)
        assert torch.equal(model.generate(other, **frozen), want)
        assert counters["stats"]["unique_graphs"] == graphs
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(1.5)
        want = model.generate(prompt, decoding="static", **kwargs)
        assert torch.equal(model.generate(prompt, **frozen), want)
        assert counters["stats"]["unique_graphs"] == graphs + 1
    if device == "cpu":
        # Per layer: q/k/v as one, output, gate/up as one (OPT: fc1), down (fc2); then the LM head. Torch
        # concatenates projections of unequal widths (Llama's grouped-query k/v) from 2.12 on (the pinned 2.14).
        qkv = 1 if family == "opt" or TorchVersion(torch.__version__) >= "2.12" else 3
        per_graph = model.config.num_hidden_layers * (qkv + 3) + 1
        assert len(gemms) == 2 * per_graph  # compiled before and after the change


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_empty_prompt_continues_from_the_last_summary_vector(family, decoding):
    """With no prompt tokens the first token is predicted at the last summary vector; the rest follow as after
    a prompt made of the tokens generated so far."""
    model, prompt, kwargs = _left_padded_generation(family, "cpu", max_new_tokens=6)
    sp = kwargs["softprompt"]
    out = model.generate(prompt[:, :0], decoding=decoding, **{**kwargs, "attention_mask": None})
    assert out.shape == (2, 6)
    no_text = torch.ones(2, 0, dtype=torch.long)
    hidden = model.get_decoder()(
        inputs_embeds=sp, position_ids=model.position_rule.segment(sp.shape[1], no_text, 0)
    ).last_hidden_state
    assert torch.equal(out[:, 0], model.lm_head(hidden[:, -1]).argmax(-1))
    for k in range(1, 6):
        assert torch.equal(out[:, k], model(out[:, :k], softprompt=sp).logits[:, -1].argmax(-1))


def test_generate_rejects_bad_options_with_the_reason():
    model = tiny_model("llama")
    prompt = random_ids(1, 4)
    with pytest.raises(ValueError, match="'graph'"):
        model.generate(prompt, decoding="graph")
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        model.generate(prompt, decoding="cuda_graph")
    with pytest.raises(ValueError, match="compile_step=True needs decoding='static' or 'cuda_graph'"):
        model.generate(prompt, compile_step=True)
    with pytest.raises(ValueError, match="freeze_weights=True needs compile_step=True"):
        model.generate(prompt, decoding="static", freeze_weights=True)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling, got 0"):
        model.generate(prompt, do_sample=True, temperature=0)
    with pytest.raises(TypeError, match=r"no longer takes graphs= \(acomp.DecodeGraphs was removed\)"):
        model.generate(prompt, decoding="static", graphs=object())
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['beams'\]"):
        model.generate(prompt, beams=2)


def test_generate_past_the_position_table_is_an_error_for_opt_and_a_warning_for_rope():
    """OPT's learned positions end at max_position_embeddings (128 here): one token more is refused before any
    work (pads take no positions; the last new token is never fed back, so it takes none); a RoPE model (256
    positions, summary vectors counted) generates, warned."""
    opt = tiny_model("opt")
    prompt = torch.cat([torch.zeros(1, 5, dtype=torch.long), random_ids(1, 100)], dim=1)
    mask = (torch.arange(105) >= 5).long()[None]
    fits = opt.generate(prompt, attention_mask=mask, max_new_tokens=29, eos_token_id=[])
    ids = prompt[:, 5:]
    for _ in range(29):  # the argmax loop over the whole table: positions 0-127
        ids = torch.cat([ids, opt(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(fits[:, 5:], ids)
    with pytest.raises(
        ValueError, match=r"longest prompt \(100 tokens\) plus max_new_tokens=30 needs 129 positions; "
    ):
        opt.generate(prompt, attention_mask=mask, max_new_tokens=30)
    llama = tiny_model("llama")
    summary = llama.compress_context(random_ids(1, 20), segment_lengths=[10, 10]).summary
    with pytest.warns(
        UserWarning, match=r"\(240 tokens\) behind 6 summary positions plus max_new_tokens=12 needs 257"
    ):
        out = llama.generate(random_ids(1, 240), softprompt=summary, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, 252)


def test_generate_stops_at_eos_and_pads():
    model = tiny_model("llama")
    prompt = random_ids(1, 4)
    free = model.generate(prompt, max_new_tokens=6, eos_token_id=None)
    first = int(free[0, 4])
    stopped = model.generate(prompt, max_new_tokens=6, eos_token_id=first, pad_token_id=0)
    assert stopped.shape == (1, 5) and int(stopped[0, 4]) == first


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_save_load_round_trip(family, tmp_path):
    model = tiny_model(family)
    ids = random_ids(2, 12)
    before = model(ids, segment_lengths=[6, 6], output_softprompt=True)
    model.save_pretrained(tmp_path)

    loaded = MODEL_CLASS[family].from_pretrained(tmp_path).eval()
    after = loaded(ids, segment_lengths=[6, 6], output_softprompt=True)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.softprompt, after.softprompt)
    assert loaded.config.summary_length == 3 and loaded.config.accumulate_summary is True

    auto = AutoCompressorModel.from_pretrained(tmp_path).eval()
    assert type(auto) is MODEL_CLASS[family]
    assert torch.equal(auto(ids).logits, loaded(ids).logits)

    # The plain base class loads the same checkpoint (embed_summary.weight is simply unused there).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    no_summary = loaded(ids).logits  # one segment, no summary tokens: the base model's computation
    torch.testing.assert_close(plain(ids).logits, no_summary, rtol=0, atol=1e-6)


def test_base_checkpoint_gets_summary_rows_from_eos_after_loading(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    base.save_pretrained(tmp_path)
    model = AutoCompressorModel.from_pretrained(tmp_path, summary_length=4)
    eos_row = base.get_input_embeddings().weight[2]
    assert model.embed_summary.weight.shape == (4, 32)
    for row in model.embed_summary.weight:
        assert torch.equal(row, eos_row)


def test_normal_summary_init_draws_distinct_rows_at_the_base_init_std(tmp_path):
    """summary_init='normal': a new table gets N(0, initializer_range) rows (OPT: init_std), not EOS copies;
    a checkpoint that has its table loads it unchanged, whatever summary_init says."""
    for family, std_key in (("llama", "initializer_range"), ("opt", "init_std")):
        config = tiny_config(family)
        setattr(config, std_key, 0.5)
        base = AutoModelForCausalLM.from_config(config)
        base.save_pretrained(tmp_path / family)
        torch.manual_seed(0)
        model = AutoCompressorModel.from_pretrained(
            tmp_path / family, summary_length=50, summary_init="normal"
        )
        rows = model.embed_summary.weight.detach()
        assert model.config.summary_init == "normal"
        assert rows.std().item() == pytest.approx(0.5, rel=0.1), family
        assert rows.mean().abs().item() < 0.05
        assert torch.cdist(rows, rows).add(torch.eye(50) * 1e9).min() > 0.1  # distinct rows
        model.save_pretrained(tmp_path / f"{family}-ac")
        again = AutoCompressorModel.from_pretrained(tmp_path / f"{family}-ac", summary_init="eos")
        assert torch.equal(again.embed_summary.weight, model.embed_summary.weight)


def test_clear_errors_on_bad_input():
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    with pytest.raises(ValueError, match=r"\[4, 4\] sum to 8, but the input has 10"):
        model(ids, segment_lengths=[4, 4])
    with pytest.raises(ValueError, match="softprompt must have shape .*32.*got \\(1, 3, 16\\)"):
        model(ids, softprompt=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="summary_length must be an integer >= 0, got -1"):
        MODEL_CLASS["llama"](tiny_config("llama", summary_length=-1))
    with pytest.raises(ValueError, match="compression_lambda must be >= 0, got -0.5"):
        MODEL_CLASS["llama"](tiny_config("llama", compression_lambda=-0.5))
    with pytest.raises(ValueError, match="compression_alpha must be > 0, got 0"):
        MODEL_CLASS["llama"](tiny_config("llama", compression_alpha=0))
    with pytest.raises(ValueError, match="summary_init must be one of \\('eos', 'normal'\\), got 'zeros'"):
        MODEL_CLASS["llama"](tiny_config("llama", summary_init="zeros"))
    with pytest.raises(ValueError, match="no AutoCompressor for model_type 'gpt2'"):
        from acomp.modeling import autocompressor_class

        autocompressor_class("gpt2")
    with pytest.raises(ValueError, match="flash-attn"):
        from acomp.modeling.attention import resolve_attn_implementation

        resolve_attn_implementation("flash_attention_2")


def test_int_segment_length_splits_with_shorter_tail():
    from acomp.modeling import split_lengths

    assert split_lengths(10, 4) == [4, 4, 2]
    assert split_lengths(10, None) == [10]
    model = tiny_model("opt")
    ids = random_ids(1, 10)
    a = model(ids, segment_lengths=4, output_softprompt=True).softprompt
    b = model(ids, segment_lengths=[4, 4, 2], output_softprompt=True).softprompt
    assert torch.equal(a, b)


def test_plain_lm_checkpoint_loads_with_any_summary_length(tmp_path):
    """A model trained with summary_length 0 (a plain LM) is a base model: no empty summary table saved."""
    plain = tiny_model("llama", summary_length=0)
    plain.save_pretrained(tmp_path)
    model, info = MODEL_CLASS["llama"].from_pretrained(tmp_path, summary_length=3, output_loading_info=True)
    assert "embed_summary.weight" in info["missing_keys"]
    eos = model.get_input_embeddings().weight[model.config.eos_token_id]
    assert torch.equal(model.embed_summary.weight, eos.expand(3, -1))
    ids = random_ids(1, 8)
    torch.testing.assert_close(model(ids, segment_lengths=[8]).logits, plain(ids).logits)


@pytest.mark.parametrize("compiling", [False, True], ids=["sdpa", "matmul_under_compile"])
def test_grouped_decode_attention_equals_repeated_kv_sdpa(compiling, monkeypatch):
    """Both kernels of the grouped decode attention (SDPA eager, matmuls under torch.compile) against
    transformers' SDPA attention with K/V repeated per head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from acomp.modeling.attention import grouped_decode_attention

    class Module(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, 1, 16, generator=g)
    key, value = torch.randn(2, 3, 2, 40, 16, generator=g)
    bias = torch.where(torch.rand(3, 1, 1, 40, generator=g) < 0.3, torch.finfo(torch.float32).min, 0.0)
    want, _ = sdpa_attention_forward(Module(), query, key, value, bias, scaling=0.25)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    got, _ = grouped_decode_attention(Module(), query, key, value, bias, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_static_decoding_uses_grouped_attention_and_restores_sdpa(monkeypatch):
    import acomp.modeling.attention as attention

    calls = []
    real = attention.grouped_decode_attention
    monkeypatch.setattr(
        attention, "grouped_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    model = tiny_model("llama")  # 4 query heads over 2 KV heads
    model.generate(random_ids(1, 4), max_new_tokens=3, eos_token_id=None, decoding="static")
    assert len(calls) == 2 * model.config.num_hidden_layers  # two decode steps after the prefill
    assert model.config._attn_implementation == "sdpa"
