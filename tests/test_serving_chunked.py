"""Chunked prefill across decode steps in the decode-slot engine (issue #20's TPOT goal; Sarathi-Serve style):
``Engine(prefill_chunk_tokens=C)`` prefills at most C padded prompt tokens per engine iteration, long prompts in
pieces of C through one compiled piece program (`jaxdec.core.slots.prefill(..., cache=)`), each inserted into a
free slot after its last piece.

On the tiny random-weight Llama (tests/scripts/tiny_llama.py), each test with its own cache size so that trace
counts see only its own programs:
* every request's tokens equal `generate()` of it alone and the unchunked engine's (DESIGN's near-tie helper for
  greedy rows; sampled rows exactly, same keys), with long prompts arriving while other requests decode;
* structure (not timing): an instrumented `slots.prefill` shows that no engine iteration prefills more than C
  padded tokens or more than one piece, that the long prompts really went in pieces while decode steps ran, and
  (negative control) that the unchunked engine does prefill more than C tokens in one iteration;
* trace counts: a warmed engine compiles no piece, prefill, insert or step program for new requests of any
  length; an unwarmed one compiles the piece program once, not once per request;
* a cancel during a chunked prefill, bad values of ``prefill_chunk_tokens`` and of ``slots.prefill(cache=)``,
  and the ``--prefill-chunk-tokens`` flag of ``jaxdec serve`` / ``serve-bench``.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

import jaxdec
from jaxdec import cli
from jaxdec.cache import bucket
from jaxdec.core import loop
from jaxdec.core import slots as slots_lib
from jaxdec.core.token import TokenDecoder
from jaxdec.serving import Engine, RequestError

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from neartie import assert_sequences_match  # noqa: E402
from selfref import LazyStepLogits  # noqa: E402
from tiny_llama import tiny_llama, tiny_prompts  # noqa: E402

C, CAP, SLOTS = 64, 12, 3


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _count(prefix):
    return sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith(prefix))


def _counts():
    """Traces of (the piece program, batched prefills, inserts, the decode step)."""
    return tuple(_count(k) for k in ("init_continue:", "init:", "engine_insert:", "engine_step:"))


def _workload():
    """(early, late): 3 short requests that start decoding first, then long prompts (3 pieces of C each; one
    sampled) and short ones (one sampled) arriving while they decode."""
    short = tiny_prompts(7)  # 5..12 tokens: bucket 64 (batched admission within C)
    long_ = [(p * 30)[:150 + 9 * i] for i, p in enumerate(short[:3])]  # 150..168 tokens: bucket 192, 3 pieces
    assert {bucket(len(p)) for p in short} == {64} and all(bucket(len(p)) > C for p in long_)
    early = [(short[0], CAP, {}), (short[1], 9, {}), (short[2], CAP, dict(temperature=0.9, seed=4))]
    late = [(long_[0], 6, {}), (short[3], 4, {}), (long_[1], 8, dict(temperature=0.8, top_p=0.9, seed=7)),
            (short[4], 7, {}), (long_[2], 5, {}), (short[5], 3, dict(temperature=1.0, top_k=20, seed=2))]
    return early, late


class _Probe:
    """Counts what each engine iteration prefills through `slots.prefill` (padded tokens, calls, pieces), from the
    calls themselves rather than from the engine's own log."""

    def __init__(self, monkeypatch):
        self.per_step: list = []
        self.cur = None  # the iteration being counted (None outside `step`: the engine's own set-up)
        real = slots_lib.prefill

        def prefill(decoder, model, params, prompts, **kw):
            it = self.cur
            if it is None:
                return real(decoder, model, params, prompts, **kw)
            rows = len(prompts) + kw.get("fillers", 0)
            width = kw.get("prompt_bucket") or bucket(max(len(p) for p in prompts))
            it["tokens"] += rows * width
            it["calls"] += 1
            it["pieces"] += kw.get("cache") is not None
            return real(decoder, model, params, prompts, **kw)

        monkeypatch.setattr(slots_lib, "prefill", prefill)

    def step(self, eng):
        self.cur = {"tokens": 0, "calls": 0, "pieces": 0}
        self.per_step.append(self.cur)
        try:
            eng.step()
        finally:
            self.cur = None


def _run(eng, probe, early, late):
    ids = [eng.submit(p, max_new_tokens=n, **kw) for p, n, kw in early]
    for _ in range(2):  # the first requests are decoding when the long prompts arrive
        probe.step(eng)
    ids += [eng.submit(p, max_new_tokens=n, **kw) for p, n, kw in late]
    while eng.busy:
        probe.step(eng)
    got = eng.run_until_done()
    return [got[i].tokens for i in ids]


@pytest.fixture(scope="module")
def runs(tiny):
    """The workload on a chunked and on an unchunked engine (same cache size), with the probe on."""
    model, params = tiny
    early, late = _workload()
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        probe = _Probe(mp)
        for name, kw in (("chunked", dict(prefill_chunk_tokens=C)), ("whole", {})):
            eng = Engine(model, params, slots=SLOTS, cache_size=240, capacity=CAP, **kw)
            probe.per_step = []
            warm = [_counts()]
            if name == "chunked":  # the warm-up covers every admission program, the piece program included
                warm.append(eng.warmup([len(p) for p, _, _ in early + late]))
                warm.append(_counts())
            toks = _run(eng, probe, early, late)
            out[name] = dict(tokens=toks, probe=probe.per_step, log=list(eng.iteration_log), engine=eng,
                             counts=warm + [_counts()])
    return early + late, out


def _alone(model, params, prompt, n, seed=None, **sampling):
    """`generate` of one request (greedy, or sampled with the request's seed and settings)."""
    kw = dict(method="sample", seed=seed, sampling=sampling) if seed is not None else {}
    return jaxdec.generate(model, params, [prompt], max_new_tokens=n, cache_size=240, capacity=CAP,
                           longest_prompt=192, **kw).tokens[0]


def test_chunked_rows_equal_generate_alone_and_the_unchunked_engine(tiny, runs):
    model, params = tiny
    reqs, out = runs
    refs = [_alone(model, params, p, n, **kw) for p, n, kw in reqs]
    sampled = [bool(kw) for _, _, kw in reqs]
    for name in ("chunked", "whole"):
        got = out[name]["tokens"]
        # sampled rows: the same keys and (near-identical) logits give exactly the same samples
        assert [g for g, s in zip(got, sampled) if s] == [r for r, s in zip(refs, sampled) if s], name
        pairs = [(f"{name} request {i} (prompt {len(p)}, new {n})", g, r, LazyStepLogits(model, params, p, r))
                 for i, ((p, n, kw), g, r) in enumerate(zip(reqs, got, refs)) if not kw]
        assert_sequences_match(pairs, max_dlogit=1e-4)
    assert [len(t) for t in out["chunked"]["tokens"]] == [n for _, n, _ in reqs]  # tiny model: EOS id 0 is rare
    # the sampled rows really sample (they differ from greedy decoding of the same prompt)
    assert _alone(model, params, reqs[5][0], reqs[5][1]) != out["chunked"]["tokens"][5]


def test_no_iteration_prefills_more_than_one_chunk(runs):
    reqs, out = runs
    probe, log = out["chunked"]["probe"], out["chunked"]["log"]
    assert len(probe) == len(log)
    # the engine's own iteration log agrees with what the instrumented prefill saw
    assert [(p["tokens"], p["calls"]) for p in probe] == [(it["prefill_tokens"], it["prefill_calls"]) for it in log]
    assert max(p["tokens"] for p in probe) <= C, probe
    assert all(p["pieces"] <= 1 and (p["pieces"] == 0 or p["calls"] == 1) for p in probe), probe
    # positive controls: every long prompt went in its pieces, and pieces ran in iterations that also decoded
    n_pieces = sum(math.ceil(len(p) / C) for p, _, _ in reqs if bucket(len(p)) > C)
    assert n_pieces == 9 and sum(p["pieces"] for p in probe) == n_pieces
    assert sum(p["pieces"] == 1 and it["decode"] for p, it in zip(probe, log)) >= n_pieces - 1
    # negative control: the unchunked engine prefilled a whole long prompt (or a batch) between two steps
    assert max(p["tokens"] for p in out["whole"]["probe"]) > C
    assert sum(p["pieces"] for p in out["whole"]["probe"]) == 0


def test_warmed_engine_compiles_nothing_per_request(tiny, runs):
    """`Engine.warmup` covers the piece program: the workload's requests (long prompts of three lengths, short
    ones) then trace no piece, prefill or insert program. Negative control: an unwarmed engine (another cache
    size) traces the piece program on its first long prompt, once: a second long prompt of another length (other
    piece offsets) traces nothing more (no recompile per request)."""
    model, params = tiny
    c0, shapes, c1, c2 = runs[1]["chunked"]["counts"]
    assert shapes == 2 + 1  # bucket 64 in 1 and 2 rows; buckets above C: the piece program
    # positive control: the warm-up traced the piece program, the two batched prefills, the 1- and 2-row inserts
    assert (c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]) == (1, 2, 2), (c0, c1)
    assert c2[:3] == c1[:3], "a request compiled an admission program after the warm-up"
    assert c2[3] <= c1[3] + 1  # the decode step (not an admission program) compiles on the first step

    longs = [p for p, _, _ in runs[0] if bucket(len(p)) > C]
    cold = Engine(model, params, slots=SLOTS, cache_size=264, capacity=CAP, prefill_chunk_tokens=C)
    k0 = _count("init_continue:")
    cold.submit(longs[0], max_new_tokens=2)
    cold.run_until_done()
    assert _count("init_continue:") == k0 + 1
    cold.submit(longs[2][:-5], max_new_tokens=4)
    cold.run_until_done()
    assert _count("init_continue:") == k0 + 1


def test_cancel_during_a_chunked_prefill_and_bad_values(tiny):
    model, params = tiny
    eng = Engine(model, params, slots=SLOTS, cache_size=240, capacity=CAP, prefill_chunk_tokens=C)
    prompt = (tiny_prompts(2)[1] * 40)[:190]
    rid = eng.submit(prompt, max_new_tokens=4)
    eng.step()
    assert eng._pf is not None and eng.iteration_log[-1]["prefill_calls"] == 1  # one piece in, two to go
    eng.cancel(rid)
    eng.step()
    assert eng.result(rid).finish_reason == "cancelled" and eng._pf is None and not eng.busy
    # the engine goes on: the same prompt again decodes as generate alone
    rid = eng.submit(prompt, max_new_tokens=4)
    assert eng.run_until_done()[rid].tokens == _alone(model, params, prompt, 4)

    for bad in (0, -3, True, "64", 2.0, 241):
        with pytest.raises(RequestError, match="prefill_chunk_tokens"):
            Engine(model, params, slots=SLOTS, cache_size=240, capacity=CAP, prefill_chunk_tokens=bad)
    st = eng._state
    with pytest.raises(ValueError, match="cache: expected 1 rows of 240"):
        slots_lib.prefill(TokenDecoder(), model, params, [[5, 6]], like=st, max_new_tokens=2,
                          cache=slots_lib.empty_cache(model, 2, like=st))
    with pytest.raises(ValueError, match="cache: expected 1 rows of 240"):
        slots_lib.prefill(TokenDecoder(), model, params, [[5, 6]], like=st, max_new_tokens=2,
                          cache=slots_lib.empty_cache(model, 1, cache_size=128))
    with pytest.raises(ValueError, match="rows"):
        slots_lib.empty_cache(model, 0, like=st)


@pytest.mark.parametrize("cmd", ["serve", "serve-bench"])
def test_cli_prefill_chunk_tokens_flag(cmd, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", boom)
    parser = cli.build_parser()
    sub = parser.serve_parser if cmd == "serve" else parser.serve_bench_parser
    assert sub.parse_args(["--prefill-chunk-tokens", "32"]).prefill_chunk_tokens == 32
    assert sub.parse_args([]).prefill_chunk_tokens is None
    for bad in ("0", "4096"):  # below 1, above --cache-size
        assert cli.main([cmd, "--prefill-chunk-tokens", bad]) == 2
        err = capsys.readouterr().err
        assert "--prefill-chunk-tokens" in err and "Traceback" not in err, err
