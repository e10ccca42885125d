"""Speculative decoding over the decode slots (issue #20: "works with plain and speculative decoding, rows accept
different numbers of tokens"): ``Engine(..., speculative=SpeculativeDecoder(...))``.

On the tiny random-weight Llama (tests/scripts/tiny_llama.py: greedy text partly repeats, so prompt lookup has
drafts to accept):
* a trace of 18 requests (short prompts admitted batched, long ones prefilled in pieces with
  ``prefill_chunk_tokens``; mixed output lengths; staggered arrivals; 3 sampled) through 4 slots with a prompt
  lookup drafter: every greedy row equals `generate()` of it alone (DESIGN's near-tie helper), every sampled row
  equals `generate()` with the same speculative decoder and seed alone; tau > 1, while the plain engine on the
  same requests has tau = 1 (negative control); a warmed engine compiles no admission program for them;
* a request's own stop id inside an accepted block ends it there (the same request without it runs past);
* bad input: what the engine cannot honour is refused naming the argument (engine and CLI).
The default model runs one trace in the slow tier.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

import jaxdec
from jaxdec import cli
from jaxdec.cache import bucket
from jaxdec.core import loop
from jaxdec.serving import Engine, RequestError
from jaxdec.speculative import methods as M
from jaxdec.speculative.drafters import LayerSkipDrafter, PromptLookupDrafter
from jaxdec.speculative.engine import SpeculativeDecoder

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from neartie import assert_sequences_match  # noqa: E402
from selfref import LazyStepLogits  # noqa: E402
from tiny_llama import tiny_llama, tiny_prompts  # noqa: E402

CACHE, CAP, SLOTS, C = 256, 24, 4, 64
DRAFTER = PromptLookupDrafter(6)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _count(prefix):
    return sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith(prefix))


def _workload():
    """18 requests: (prompt, max_new_tokens, sampling kwargs), in arrival order; long prompts (bucket 128 > C)
    repeat a pattern of the short ones (copy-heavy)."""
    short = tiny_prompts(12)
    long_ = [(p * 40)[:70 + 7 * i] for i, p in enumerate(short[:6])]
    assert {bucket(len(p)) for p in short} == {64} and {bucket(len(p)) for p in long_} == {128}
    news = [24, 5, 17, 24, 9, 3, 20, 12, 24, 7, 15, 11, 24, 6, 19, 24, 10, 14]
    prompts = [short[0], long_[0], short[1], short[2], long_[1], short[3], short[4], long_[2], short[5],
               short[6], long_[3], short[7], short[8], long_[4], short[9], short[10], long_[5], short[11]]
    sampled = {2: dict(temperature=0.9, seed=4), 9: dict(temperature=0.7, top_p=0.9, seed=11),
               14: dict(temperature=1.0, top_k=20, seed=2)}
    return [(p, n, sampled.get(i, {})) for i, (p, n) in enumerate(zip(prompts, news))]


def _replay(eng, work, check_hist=False):
    """Staggered arrivals: 4 requests, 2 steps, then 3 more every step. Returns each request's tokens."""
    ids, i = [], 0
    while i < len(work) or eng.busy:
        take = 4 if i == 0 else 3
        if i == 0 or eng.steps >= 2 or not eng.busy:
            for p, n, kw in work[i:i + take]:
                ids.append(eng.submit(p, max_new_tokens=n, **kw))
            i += len(work[i:i + take])
        eng.step()
        if check_hist:  # every running row's history holds its whole prompt (pieces included)
            plen = np.asarray(eng._state.method.prompt_len)
            for s, r in enumerate(eng._slot_req):
                assert r is None or plen[s] == len(r.prompt), (s, plen[s], len(r.prompt))
    got = eng.run_until_done()
    return [got[r] for r in ids]


def _alone(model, params, prompt, n, decoder=None, **kw):
    seed = kw.pop("seed", None)
    extra = dict(decoder=decoder, sampling=kw, seed=seed) if seed is not None else {}
    return jaxdec.generate(model, params, [prompt], max_new_tokens=n, cache_size=CACHE, capacity=CAP,
                           longest_prompt=128, **extra).tokens[0]


@pytest.fixture(scope="module")
def runs(tiny):
    model, params = tiny
    work = _workload()
    eng = Engine(model, params, slots=SLOTS, cache_size=CACHE, capacity=CAP, prefill_chunk_tokens=C,
                 speculative=SpeculativeDecoder(DRAFTER, verifier="sampling"))
    eng.warmup([len(p) for p, _, _ in work])
    before = tuple(_count(k) for k in ("init:", "init_continue:", "engine_insert:"))
    res = _replay(eng, work, check_hist=True)
    after = tuple(_count(k) for k in ("init:", "init_continue:", "engine_insert:"))
    plain = Engine(model, params, slots=SLOTS, cache_size=CACHE, capacity=CAP)  # one admission of 4 short prompts
    plain_ids = [plain.submit(p, max_new_tokens=n) for p, n, kw in work if not kw and len(p) < C][:SLOTS]
    plain_got = plain.run_until_done()
    plain_res = [plain_got[r] for r in plain_ids]
    return dict(work=work, eng=eng, res=res, compiles=(before, after), plain=plain, plain_res=plain_res)


def test_spec_engine_rows_equal_generate_alone(tiny, runs):
    model, params = tiny
    work, res = runs["work"], runs["res"]
    spec = SpeculativeDecoder(DRAFTER, verifier="sampling")
    pairs = []
    for i, ((p, n, kw), r) in enumerate(zip(work, res)):
        assert r.finish_reason in ("eos", "length") and len(r.tokens) <= n
        if kw:  # sampled: exactly the speculative decoder's draw for this seed, decoded alone
            assert r.tokens == _alone(model, params, p, n, decoder=spec, **kw), f"request {i}"
        else:
            ref = _alone(model, params, p, n)
            pairs.append((f"request {i} (prompt {len(p)}, new {n})", r.tokens, ref,
                          LazyStepLogits(model, params, p, ref)))
    assert len(pairs) == 15
    assert_sequences_match(pairs, max_dlogit=1e-4)
    # rows accepted several tokens per step: fewer steps than the longest request's tokens would take one by one
    assert max(len(r.tokens) for r in res) >= 20


def test_tau_above_one_and_the_plain_engine_at_one(runs):
    eng, plain = runs["eng"], runs["plain"]
    st = eng.stats()
    assert st["speculative"] and st["row_steps"] > 0
    assert eng.tau > 1.3, st
    # the tokens the steps gave = every request's tokens past its first (prefill) token, up to host truncation
    assert st["decode_tokens"] >= sum(len(r.tokens) - 1 for r in runs["res"])
    # negative control: one token per step and row
    assert plain.tau == 1.0 and not plain.stats()["speculative"]
    assert any(it["decode_tokens"] > it["decode"] for it in eng.iteration_log)
    assert all(it["decode_tokens"] == it["decode"] for it in plain.iteration_log)


def test_warmed_spec_engine_compiles_no_admission_program(runs):
    before, after = runs["compiles"]
    assert after == before
    assert min(before) >= 1  # positive control: the counters saw these programs (during the warm-up)
    # long prompts went in pieces, short ones batched
    log = list(runs["eng"].iteration_log)
    assert any(it["prefill_calls"] for it in log) and all(it["prefill_tokens"] <= C for it in log)


def test_own_stop_id_inside_an_accepted_block_truncates_there(tiny, runs):
    eng = runs["eng"]

    def inside(prompt):
        """(full tokens, position of a token strictly inside a block the host received in one step, its first
        occurrence in the output) or None."""
        chunks = []
        eng.submit(prompt, max_new_tokens=CAP, on_tokens=lambda rid, toks, why: chunks.append(list(toks)))
        full = next(iter(eng.run_until_done().values())).tokens
        seen = 0
        for ch in chunks:
            for j in range(1, len(ch) - 1):
                if ch[j] not in full[:seen + j] and ch[j] not in tiny[0].eos_ids:
                    return prompt, full, seen + j
            seen += len(ch)
        return None

    found = None
    for (p, _, kw), r in zip(runs["work"], runs["res"]):
        if not kw and len(p) < C:  # the prompt, its greedy output, the prompt again: the output is copied in blocks
            found = inside(p + r.tokens + p)
            if found:
                break
    assert found is not None, "no multi-token block to stop inside"
    prompt, full, pos = found
    stop = full[pos]
    got_chunks = []
    rid = eng.submit(prompt, max_new_tokens=CAP, stop_ids=[stop],
                     on_tokens=lambda rid, toks, why: got_chunks.append((list(toks), why)))
    r = eng.run_until_done()[rid]
    assert r.finish_reason == "stop" and r.tokens == full[:pos + 1]
    assert got_chunks[-1][1] == "stop" and got_chunks[-1][0][-1] == stop
    # negative control: without the stop id the same request runs past it (the device accepted more)
    assert len(full) > pos + 1


def test_bad_input_names_the_argument(tiny, runs):
    model, params = tiny
    with pytest.raises(ValueError, match="speculative: expected a SpeculativeDecoder .*got object"):
        Engine(model, params, slots=2, cache_size=CACHE, capacity=CAP, speculative=object())
    with pytest.raises(ValueError, match="got a drafter: wrap it as SpeculativeDecoder"):
        Engine(model, params, slots=2, cache_size=CACHE, capacity=CAP, speculative=DRAFTER)
    with pytest.raises(ValueError, match="prefill_chunk_tokens: drafter LayerSkipDrafter runs a model"):
        Engine(model, params, slots=2, cache_size=CACHE, capacity=CAP, prefill_chunk_tokens=C,
               speculative=SpeculativeDecoder(LayerSkipDrafter((1,), 3), verifier="sampling"))
    eng = runs["eng"]
    p = tiny_prompts(1)[0]
    with pytest.raises(RequestError, match="^constraint: not supported by a speculative engine"):
        eng.submit(p, max_new_tokens=4, constraint={"choices": ["a", "b"]})
    with pytest.raises(RequestError, match="too long for a slot.*needs 257"):  # the draft block's headroom counts
        eng.submit(list(range(3, 3 + CACHE - CAP - 6)), max_new_tokens=CAP)
    greedy = Engine(model, params, slots=1, cache_size=CACHE, capacity=CAP, speculative=M.prompt_lookup(6))
    with pytest.raises(RequestError, match="^temperature must be 0 on this engine: it verifies drafts greedily"):
        greedy.submit(p, max_new_tokens=4, temperature=0.5)
    greedy.submit(p, max_new_tokens=4)  # greedy requests are taken
    assert greedy.busy and not eng.busy


@pytest.mark.parametrize("cmd", ["serve", "serve-bench"])
def test_cli_drafter_flag(cmd, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", boom)
    parser = cli.build_parser()
    sub = parser.serve_parser if cmd == "serve" else parser.serve_bench_parser
    assert sub.parse_args(["--drafter", "pld"]).drafter == "pld" and sub.parse_args([]).drafter is None
    dec = cli._serve_decoder(sub.parse_args(["--drafter", "recycling"]), sampling=cmd == "serve")
    assert isinstance(dec, SpeculativeDecoder) and dec.verifier == ("sampling" if cmd == "serve" else "greedy")
    assert cli.main([cmd, "--drafter", "swift"]) == 2  # not a model-free drafter
    err = capsys.readouterr().err
    assert "--drafter" in err and "Traceback" not in err, err
    if cmd == "serve-bench":  # the draft block's headroom must fit the slot too
        assert cli.main([cmd, "--drafter", "pld", "--cache-size", "130", "--prompt-lens", "64",
                         "--output-lens", "60"]) == 2
        err = capsys.readouterr().err
        assert "--drafter pld" in err and "headroom" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_default_model_spec_engine_equals_generate(model_q, chat_prompt_ids):
    model, params = model_q
    cache, cap = 384, 32
    eng = Engine(model, params, slots=4, cache_size=cache, capacity=cap,
                 speculative=SpeculativeDecoder(PromptLookupDrafter(8), verifier="sampling"))
    ps = chat_prompt_ids
    prompts = [ps[i] + ps[i][1:] for i in range(6)] + [ps[6], ps[7]]  # mostly copy-heavy (repeated prompts)
    news = [32, 9, 24, 32, 17, 32, 5, 28]
    ids = [eng.submit(p, max_new_tokens=n) for p, n in zip(prompts[:4], news[:4])]
    eng.step()
    ids += [eng.submit(p, max_new_tokens=n) for p, n in zip(prompts[4:], news[4:])]
    got = eng.run_until_done()
    longest = max(len(p) for p in prompts)
    pairs = []
    for i, (r, p, n) in enumerate(zip(ids, prompts, news)):
        ref = jaxdec.generate(model, params, [p], max_new_tokens=n, cache_size=cache, capacity=cap,
                              longest_prompt=longest).tokens[0]
        pairs.append((f"request {i}", got[r].tokens, ref, LazyStepLogits(model, params, p, ref)))
    assert_sequences_match(pairs, max_dlogit=1e-4)
    assert eng.tau > 1.0, eng.stats()


@pytest.mark.slow
def test_shared_drafter_state_stays_and_rows_equal_generate(tiny):
    """Token Recycling's matrix has no batch axis: the engine keeps the running one (found by shape), and greedy
    rows are still exactly their greedy tokens."""
    from jaxdec.speculative.drafters import TokenRecyclingDrafter
    model, params = tiny
    eng = Engine(model, params, slots=2, cache_size=CACHE, capacity=CAP,
                 speculative=SpeculativeDecoder(TokenRecyclingDrafter(), verifier="sampling"))
    leaves = jax.tree_util.tree_flatten_with_path(eng._state.method)[0]
    axes = {jax.tree_util.keystr(p): ax for (p, _), ax in zip(leaves, eng._axes)}
    assert axes[".draft.adj"] is None and axes[".hist"] == 0 and axes[".hist_len"] == 0, axes
    work = [(p, n) for p, n, kw in _workload() if not kw and len(p) < C][:5]
    ids = [eng.submit(p, max_new_tokens=n) for p, n in work]
    got = eng.run_until_done()
    pairs = []
    for i, (r, (p, n)) in enumerate(zip(ids, work)):
        ref = _alone(model, params, p, n)
        pairs.append((f"request {i}", got[r].tokens, ref, LazyStepLogits(model, params, p, ref)))
    assert_sequences_match(pairs, max_dlogit=1e-4)
    assert eng.tau > 1.0, eng.stats()
