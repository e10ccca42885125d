"""The driver and the token decoders on the real default model: ragged batches, recompilation,
debug/streaming mode, stopping rules, sampling rows, bad input."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdec.cache import bucket
from jaxdec.core import loop
from jaxdec.core.generate import generate
from neartie import assert_sequences_match
from selfref import LazyStepLogits, step_logits


@pytest.fixture(scope="module")
def ragged_prompts(chat_prompt_ids):
    """8 prompts whose lengths fall in at least two length buckets."""
    ps = sorted(chat_prompt_ids, key=len)
    picked = ps[:4] + ps[-4:]
    long_one = picked[-1] + picked[-1][20:]  # make sure one prompt is past the first bucket
    picked[-1] = long_one
    assert len({bucket(len(p)) for p in picked}) >= 2, [len(p) for p in picked]
    return picked


def test_ragged_batch_rows_equal_rows_alone(model_f32, ragged_prompts):
    model, params = model_f32
    g = generate(model, params, ragged_prompts, max_new_tokens=24)
    pairs = []
    for i, p in enumerate(ragged_prompts):
        alone = generate(model, params, [p], max_new_tokens=24)
        ref = alone.tokens[0]
        pairs.append((f"row {i} (len {len(p)})", g.tokens[i], ref, LazyStepLogits(model, params, p, ref)))
    assert_sequences_match(pairs, max_dlogit=1e-4)


def test_same_shapes_do_not_recompile_and_max_new_is_traced(model_f32, chat_prompt_ids):
    model, params = model_f32
    prompts = chat_prompt_ids[:2]
    generate(model, params, prompts, max_new_tokens=8, capacity=16)
    before = sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:"))
    generate(model, params, prompts, max_new_tokens=8, capacity=16)
    generate(model, params, prompts, max_new_tokens=5, capacity=16)  # new max_new: traced, same program
    generate(model, params, chat_prompt_ids[2:4], max_new_tokens=12, capacity=16)  # new prompts, same bucket
    after = sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:"))
    assert after == before, f"recompiled {after - before} times for identical shapes"


def _run_traces():
    return sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:"))


def test_trace_counter_moves_when_a_shape_changes(monkeypatch):
    """Positive control of the no-recompile check above: the same counter moves when the output bucket
    changes (a new compiled program), and a frozen counter (count_trace doing nothing) is caught by
    this very check. A toy model behind the same driver keeps it cheap (its own config, so no other
    test shares its programs)."""
    import jax.numpy as jnp
    from jaxdec.testing.toy_speculative import TrigramModel, random_table
    model = TrigramModel(7, num_layers=5)
    params = {"table": jnp.asarray(random_table(0, 7))}
    prompts = [[2, 3], [4]]

    def moves(**kw):
        before = _run_traces()
        generate(model, params, prompts, max_new_tokens=8, **kw)
        return _run_traces() - before

    assert moves(capacity=16) >= 1  # first use of this shape
    assert moves(capacity=16) == 0  # same shape: cached
    assert moves(capacity=32) == 1  # new output bucket: exactly one new trace
    monkeypatch.setattr(loop, "count_trace", lambda name: None)  # the broken variant: a frozen counter
    assert moves(capacity=48) == 0  # a real retrace that the frozen counter hides: the check above fails


def test_phase_times_splits_prefill_and_decode_with_the_same_tokens(model_f32, chat_prompt_ids):
    """`loop.phase_times()`: init and loop compiled apart, one (prefill_s, decode_s) pair per batch, the fused
    program's tokens (greedy and a speculative decoder); the block closes after it."""
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder
    model, params = model_f32
    prompts = chat_prompt_ids[:3]
    spec = SpeculativeDecoder(PromptLookupDrafter(3, 2))
    for kw in ({}, {"decoder": spec}):
        ref = generate(model, params, prompts, max_new_tokens=6, batch_size=2, **kw)
        with loop.phase_times() as ph:
            assert loop.timing_phases()
            out = generate(model, params, prompts, max_new_tokens=6, batch_size=2, **kw)
        assert out.tokens == ref.tokens, kw
        assert len(ph) == 2 and all(p > 0 and d > 0 for p, d in ph), ph  # two batches of the 3 prompts
        assert not loop.timing_phases()


def test_max_new_tokens_and_finish_reasons(model_f32, chat_prompt_ids):
    model, params = model_f32
    g = generate(model, params, chat_prompt_ids[:3], max_new_tokens=5, stop_ids=())
    assert all(len(t) == 5 for t in g.tokens) and set(g.finish_reason) == {"length"}
    g2 = generate(model, params, chat_prompt_ids[:3], max_new_tokens=5)
    for t, t2 in zip(g.tokens, g2.tokens):
        assert t[:len(t2)] == t2


def test_debug_mode_runs_the_same_step_and_streams(model_f32, chat_prompt_ids):
    model, params = model_f32
    seen = []
    g_jit = generate(model, params, chat_prompt_ids[:2], max_new_tokens=10)
    g_dbg = generate(model, params, chat_prompt_ids[:2], max_new_tokens=10, debug=True,
                     callback=lambda s: seen.append(np.asarray(s.num_new).copy()))
    assert g_dbg.tokens == g_jit.tokens
    assert len(seen) >= 10 and seen[0].tolist() == [1, 1]
    # the streamed counts grow one token per step until each row is done
    assert all((b - a <= 1).all() for a, b in zip(seen, seen[1:]))


def test_min_new_tokens_suppresses_eos(model_f32, chat_prompt_ids):
    model, params = model_f32
    short = generate(model, params, chat_prompt_ids[:1], max_new_tokens=48)
    assert short.finish_reason[0] == "eos", "pick a prompt that ends early"
    n = len(short.tokens[0])
    g = generate(model, params, chat_prompt_ids[:1], max_new_tokens=n + 8, min_new_tokens=n + 4)
    assert len(g.tokens[0]) >= n + 4
    assert 2 not in g.tokens[0][:n + 4]
    assert g.tokens[0][:n - 1] == short.tokens[0][:n - 1]


def test_stop_strings_end_rows(model_f32, chat_prompt_ids):
    from jaxdec.models.tokenizer import Tokenizer
    import peer
    model, params = model_f32
    tok = Tokenizer.from_gguf(peer.default_gguf_path())
    base = generate(model, params, chat_prompt_ids[:2], max_new_tokens=32, tokenizer=tok)
    text0 = base.text[0]
    stop = text0.split()[2]  # a word that appears early in row 0's text
    g = generate(model, params, chat_prompt_ids[:2], max_new_tokens=32, tokenizer=tok, stop_strings=(stop,))
    assert g.finish_reason[0] == "stop_string"
    assert g.text[0].endswith(stop) and stop not in g.text[0][:-len(stop)]
    assert len(g.tokens[0]) < len(base.tokens[0])
    assert g.tokens[0] == base.tokens[0][:len(g.tokens[0])]


def test_sampling_rows_do_not_depend_on_batch_neighbours(model_f32, chat_prompt_ids):
    model, params = model_f32
    sp = dict(temperature=0.9, top_k=50)
    together = generate(model, params, chat_prompt_ids[:2], method="sample", sampling=sp, n=2, max_new_tokens=8, seed=3)
    assert len(together.tokens) == 4
    alone = generate(model, params, chat_prompt_ids[:1], method="sample", sampling=sp, n=2, max_new_tokens=8, seed=3)
    assert together.tokens[:2] == alone.tokens
    # the two samples of one prompt differ (n > 1 draws independent rows), and a new seed changes them
    other = generate(model, params, chat_prompt_ids[:1], method="sample", sampling=sp, n=2, max_new_tokens=8, seed=4)
    assert together.tokens[0] != together.tokens[1] or together.tokens[0] != other.tokens[0]
    assert other.tokens != alone.tokens


def _hf_penalized_choice_gaps(prompt, tokens, logits, penalty):
    """At each step, HF's RepetitionPenaltyLogitsProcessor applied to the teacher-forced logits with the
    history so far; returns how far below the processed maximum each emitted token sits (0 = argmax)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    gaps = []
    for i, tok in enumerate(tokens):
        ids = torch.tensor([list(prompt) + list(tokens[:i])])
        x = proc(ids, torch.tensor(logits[i][None], dtype=torch.float32))[0].numpy()
        gaps.append(float(x.max() - x[tok]))
    return np.asarray(gaps)


def test_repetition_penalty_through_generate_matches_hf_processor(model_f32, chat_prompt_ids):
    """Greedy rows (temperature 0) with a repetition penalty, through `generate`: every emitted token is
    the argmax of HF's own RepetitionPenaltyLogitsProcessor over the model's logits given the prompt and
    the tokens so far (a near tie of < 1e-3 excused). Negative control: plain greedy tokens fail the
    same check (the penalty changed the output)."""
    model, params = model_f32
    prompts, r = chat_prompt_ids[:2], 1.3  # plain greedy shares its program with test_stop_strings_end_rows
    g = generate(model, params, prompts, method="sample", sampling=dict(temperature=0.0, repetition_penalty=r),
                 max_new_tokens=32)
    plain = generate(model, params, prompts, max_new_tokens=32)
    assert g.tokens != plain.tokens
    for p, toks in zip(prompts, g.tokens):
        assert len(toks) >= 16
        gaps = _hf_penalized_choice_gaps(p, toks, step_logits(model, params, p, toks), r)
        assert gaps.max() < 1e-3, gaps
    bad = [_hf_penalized_choice_gaps(p, b, step_logits(model, params, p, b), r).max()
           for p, b in zip(prompts, plain.tokens)]
    assert max(bad) > 1e-2, bad


def test_temperature_zero_rows_are_greedy(model_f32, chat_prompt_ids):
    model, params = model_f32
    greedy = generate(model, params, chat_prompt_ids[:2], max_new_tokens=8)
    g = generate(model, params, chat_prompt_ids[:2], method="sample", sampling=dict(temperature=[0.0, 0.0]),
                 max_new_tokens=8)
    assert g.tokens == greedy.tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1, 2, 10**9]]), "outside"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1] * 9000]), "too long|exceeds"),
    (dict(cache_size=64, prompts=[[1] * 60], max_new_tokens=16), "too long"),
    (dict(method="sample", sampling=dict(temperature=-1.0)), "temperature"),
    (dict(method="sample", sampling=dict(top_p=0.0)), "top_p"),
    (dict(method="sample", sampling=dict(top_p=1.5)), "top_p"),
    (dict(method="beamish"), "method"),
])
def test_bad_input_is_a_clear_error(model_f32, kwargs, match):
    model, params = model_f32
    kw = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    kw.update(kwargs)
    prompts = kw.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(model, params, prompts, **kw)


def test_load_errors(tmp_path):
    import jaxdec
    with pytest.raises(FileNotFoundError, match="unknown model"):
        jaxdec.load(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        jaxdec.load(str(bad))
    with pytest.raises(ValueError, match="weights"):
        jaxdec.load("smollm2-135m", weights="int3")
