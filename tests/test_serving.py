"""Serving (issue #20): the decode-slot engine (`jaxdec.serving.engine`) on the real default model.

Each request's tokens equal `generate()` of that request alone (DESIGN's near-tie rule); new requests
join without retracing the step, the insert or the prefill of a known prompt bucket (trace counts, with
a positive control); bad requests are refused by field."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import jaxdec
from jaxdec.cache import bucket
from jaxdec.core import loop
from jaxdec.serving import Engine, RequestError

sys.path.insert(0, os.path.dirname(__file__))
from neartie import assert_sequences_match  # noqa: E402
from selfref import LazyStepLogits  # noqa: E402

CACHE, CAP = 256, 16


@pytest.fixture(scope="module")
def engine(model_q):
    model, params = model_q
    return Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP)


def _requests(chat_prompt_ids):
    """10 requests, mixed prompt lengths (two prompt buckets) and output lengths."""
    ps = chat_prompt_ids
    long_ = [ps[i] + ps[i + 1][1:] for i in (20, 22)]  # past the first bucket
    prompts = ps[:8] + long_
    news = [3, 16, 7, 12, 5, 16, 9, 2, 14, 6]
    assert len({bucket(len(p)) for p in prompts}) >= 2
    return list(zip(prompts, news))


def _alone(model, params, ids, new, longest, **kw):
    # one compiled program for every reference: fixed cache, capacity and prompt bucket (max_new is traced)
    return jaxdec.generate(model, params, [ids], max_new_tokens=new, cache_size=CACHE, capacity=CAP,
                           longest_prompt=longest, **kw).tokens[0]


def _count(prefix):
    return sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith(prefix))


def test_engine_rows_equal_generate_alone_and_do_not_retrace(engine, model_q, chat_prompt_ids):
    model, params = model_q
    reqs = _requests(chat_prompt_ids)
    longest = max(len(p) for p, _ in reqs)
    refs = [_alone(model, params, p, n, longest) for p, n in reqs]
    steps0, ins0 = _count("engine_step:"), _count("engine_insert:")
    # one request stops on its own stop id (its reference's 3rd token; the tokens up to it are kept)
    stop_at = refs[1][2]
    ids = [engine.submit(p, max_new_tokens=n, stop_ids=[stop_at] if i == 1 else ()) for i, (p, n) in enumerate(reqs)]
    got = engine.run_until_done()
    assert set(got) == set(ids)
    refs[1] = refs[1][:refs[1].index(stop_at) + 1]
    assert got[ids[1]].finish_reason == "stop"
    pairs = [(f"request {i} (prompt {len(p)}, new {n})", got[r].tokens, ref, LazyStepLogits(model, params, p, ref))
             for i, (r, (p, n), ref) in enumerate(zip(ids, reqs, refs))]
    assert_sequences_match(pairs, max_dlogit=1e-4)
    assert all(got[r].finish_reason in ("eos", "length", "stop") for r in ids)
    assert all(len(got[r].tokens) <= n for r, (_, n) in zip(ids, reqs))
    # 10 requests through 4 slots: slots were reused, and rows finished at different steps
    assert engine.steps < sum(n for _, n in reqs)
    # positive control: the counters saw this engine's step and insert being traced (once each at most)
    assert _count("engine_step:") - steps0 <= 1 and _count("engine_insert:") - ins0 <= 1
    assert _count("engine_step:") >= 1 and _count("engine_insert:") >= 1

    # a second wave: new prompts in the same buckets, new sampling settings and lengths -> no new trace
    before = (_count("engine_step:"), _count("engine_insert:"), _count("init:"))
    wave = [(chat_prompt_ids[9], 4, dict(temperature=0.8, top_p=0.9, seed=3)),
            (chat_prompt_ids[10], 11, {}),
            (chat_prompt_ids[24] + chat_prompt_ids[25][1:], 5, dict(temperature=1.3, top_k=20, seed=7))]
    ids2 = [engine.submit(p, max_new_tokens=n, **kw) for p, n, kw in wave]
    got2 = engine.run_until_done()
    assert (_count("engine_step:"), _count("engine_insert:"), _count("init:")) == before
    assert set(got2) == set(ids2)
    # positive control for the prefill counter: a prompt in a bucket not seen before is traced once
    fresh = chat_prompt_ids[26] + chat_prompt_ids[27][1:] + chat_prompt_ids[28][1:] + chat_prompt_ids[29][1:]
    assert all(bucket(len(fresh)) != bucket(len(p)) for p, _ in reqs)
    engine.submit(fresh, max_new_tokens=2)
    engine.run_until_done()
    assert _count("init:") == before[2] + 1
    # the sampled row draws with generate()'s keys for its seed
    ref = _alone(model, params, wave[0][0], 4, longest, method="sample", seed=3,
                 sampling=dict(temperature=0.8, top_p=0.9))
    assert got2[ids2[0]].tokens == ref


def test_engine_refuses_bad_requests_by_field(engine, chat_prompt_ids):
    p = chat_prompt_ids[0]
    with pytest.raises(RequestError, match="too long for a slot"):
        engine.submit(p * 8, max_new_tokens=4)
    with pytest.raises(RequestError, match="max_new_tokens .* capacity"):
        engine.submit(p, max_new_tokens=CAP + 1)
    for field, bad, what in [("temperature", -1.0, ">= 0"), ("top_p", 0.0, r"\(0, 1\]"), ("top_k", -2, ">= 0"),
                             ("max_new_tokens", 0, ">= 1"), ("seed", 1.5, "integer"), ("stop_ids", "x", "list")]:
        with pytest.raises(RequestError, match=f"{field}.*{what}"):
            engine.submit(p, **{field: bad})
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.submit([], max_new_tokens=2)
    with pytest.raises(RequestError, match="outside"):
        engine.submit([10 ** 7], max_new_tokens=2)
    assert not engine.busy


def test_engine_cancel_frees_the_slot(engine, chat_prompt_ids):
    a = engine.submit(chat_prompt_ids[3], max_new_tokens=CAP)
    b = engine.submit(chat_prompt_ids[4], max_new_tokens=CAP)
    engine.step()
    engine.cancel(a)
    engine.step()
    assert engine.result(a).finish_reason == "cancelled" and engine.free_slots == engine.slots - 1
    out = engine.run_until_done()
    assert out[b].finish_reason in ("eos", "length") and not engine.busy
