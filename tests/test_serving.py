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
    # positive control: the counters saw this engine's step and insert being traced; batched admission compiles
    # one insert per power-of-two row count (1, 2, 4 for 4 slots) and the step once
    assert _count("engine_step:") - steps0 <= 1 and _count("engine_insert:") - ins0 <= 3
    assert _count("engine_step:") >= 1 and _count("engine_insert:") >= 1

    # a second wave (new prompts in the same buckets, into the idle engine) may add admission shapes; the same
    # wave again with new sampling settings and lengths traces nothing
    wave = [(chat_prompt_ids[9], 4, dict(temperature=0.8, top_p=0.9, seed=3)),
            (chat_prompt_ids[10], 11, {}),
            (chat_prompt_ids[24] + chat_prompt_ids[25][1:], 5, dict(temperature=1.3, top_k=20, seed=7))]
    engine.submit(chat_prompt_ids[11], max_new_tokens=3)
    engine.submit(chat_prompt_ids[12], max_new_tokens=2)
    engine.submit(chat_prompt_ids[22] + chat_prompt_ids[23][1:], max_new_tokens=6, temperature=0.5, seed=1)
    engine.run_until_done()
    before = (_count("engine_step:"), _count("engine_insert:"), _count("init:"))
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


def test_warmup_compiles_what_the_first_requests_need():
    """`Engine.warmup` (public seams only: `slots.prefill` with filler rows) compiles every admission shape of
    its prompt lengths' buckets: requests in those buckets then trace no prefill and no insert, and decode as on
    an engine without warm-up (the slots were left free). Negative control: a prompt in a bucket it did not warm
    traces its prefill once. On the tiny model, with a cache size no other test compiles."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from tiny_llama import tiny_llama, tiny_prompts
    model, params = tiny_llama()
    cache, cap = 224, 8
    short = tiny_prompts(7)  # 5..12 tokens: bucket 64
    longer = [(p * 20)[:70 + i] for i, p in enumerate(short[:2])]  # bucket 128
    fresh = (short[0] * 30)[:150]  # bucket 192: not warmed
    assert {bucket(len(p)) for p in short} == {64} and {bucket(len(p)) for p in longer} == {128}
    assert bucket(len(fresh)) == 192
    reqs = [(p, 3 + i % 6, dict(temperature=0.7, seed=i) if i % 3 == 1 else {})
            for i, p in enumerate(short + longer)]

    def run(eng):
        ids = [eng.submit(p, max_new_tokens=n, **kw) for p, n, kw in reqs]
        got = eng.run_until_done()
        return [got[i].tokens for i in ids]

    counts = lambda: (_count("init:"), _count("engine_insert:"))  # noqa: E731
    eng = Engine(model, params, slots=4, cache_size=cache, capacity=cap)
    c0 = counts()
    assert eng.warmup([5, 70]) == 2 * 3  # buckets 64 and 128, row counts 1, 2, 4
    c1 = counts()
    # positive control: the warm-up really traced: one prefill per shape but the 4 rows of bucket 64 (the engine's
    # empty state compiled that one), one insert per row count
    assert c1[0] - c0[0] == 5 and c1[1] - c0[1] == 3, (c0, c1)
    assert eng.free_slots == 4 and bool(np.all(np.asarray(eng._state.done)))
    warm = run(eng)
    assert counts() == c1, "a request in a warmed bucket compiled an admission shape"
    assert warm == run(Engine(model, params, slots=4, cache_size=cache, capacity=cap))  # same tokens without it
    # negative control: a bucket the warm-up did not cover traces its prefill (the counter sees admissions)
    eng.submit(fresh, max_new_tokens=2)
    eng.run_until_done()
    assert counts()[0] == c1[0] + 1


# --------------------------------------------------------------------------- the OpenAI-compatible server
NAME = "smollm2-test"


@pytest.fixture(scope="module")
def tokenizer():
    import peer
    from jaxdec.models.tokenizer import Tokenizer
    return Tokenizer.load(peer.default_gguf_path())


@pytest.fixture(scope="module")
def server(model_q, tokenizer):
    """The app on uvicorn in a thread, on a free loopback port; always stopped (with its engine thread)."""
    from jaxdec.serving import server as srv
    model, params = model_q
    eng = Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, keep_results=False)  # same programs
    app = srv.create_app(eng, tokenizer, NAME)
    with srv.serve_in_thread(app) as url:
        yield url, eng, app
    assert not app.state.runner.thread.is_alive(), "engine thread still running"


def _post(url, path, body):
    """(status, parsed JSON) of a POST with the standard library (bytes bodies are sent as they are)."""
    import http.client
    import json
    import urllib.parse
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def _client(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_client_completes_and_streams_greedy_as_generate(server, model_q, tokenizer, chat_prompt_ids):
    url, eng, _ = server
    model, params = model_q
    client = _client(url)
    import conftest
    question = conftest.read_prompts()[5]
    ids = tokenizer.chat_ids(question)
    ref = _alone(model, params, ids, 12, len(ids))
    ref_text = tokenizer.decode(ref, skip_special_tokens=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    assert tokenizer.encode(text) == ids

    c = client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0)
    assert c.choices[0].text == ref_text
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(ref)
    assert c.usage.total_tokens == len(ids) + len(ref)
    assert c.choices[0].finish_reason == ("stop" if ref[-1] in model.eos_ids else "length")

    chunks = list(client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref_text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) >= 2  # really streamed
    assert chunks[-1].usage.completion_tokens == len(ref)

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == ref_text and chat.usage.prompt_tokens == len(ids)
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0, stream=True)]
    assert "".join(parts) == ref_text

    # stop strings end the text before the stop string
    stop = ref_text[len(ref_text) // 2:len(ref_text) // 2 + 3]
    if stop.strip():
        s = client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, stop=[stop])
        assert s.choices[0].text == ref_text[:ref_text.index(stop)] and s.choices[0].finish_reason == "stop"

    # echo + logprobs (what loglikelihood clients send): the prompt's teacher-forced log-probabilities
    e = client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = e.choices[0].logprobs.token_logprobs
    assert e.choices[0].text == text and len(lp) == len(ids) and lp[0] is None
    want = jaxdec.score(model, params, [ids[:10]], [ids[10:]])[0]
    np.testing.assert_allclose(lp[10:], want, rtol=1e-4, atol=1e-4)


def test_32_concurrent_clients_and_disconnect_free_slots(server, chat_prompt_ids):
    import concurrent.futures
    import time

    url, eng, _ = server
    client = _client(url)
    prompts = [chat_prompt_ids[i] for i in range(12, 28)]

    def one(i):  # 32 concurrent clients: each of 16 prompts asked twice, once streamed and once not
        p, n = prompts[i // 2], 3 + (i // 2) % 4
        if i % 2:
            chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage, \
                [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        o = client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0)
        return o.choices[0].text, o.usage, o.choices[0].finish_reason
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        outs = list(ex.map(one, range(32)))
    for i in range(0, 32, 2):  # no request lost or crossed: both copies of a prompt give the same answer
        (a, ua, fa), (b, ub, fb) = outs[i], outs[i + 1]
        assert (a, fa) == (b, fb) and ua.completion_tokens == ub.completion_tokens, (i, outs[i], outs[i + 1])
        assert fa in ("stop", "length") and 1 <= ua.completion_tokens <= 3 + (i // 2) % 4
        assert ua.prompt_tokens == len(prompts[i // 2])
    assert len({o[0] for o in outs}) > 8  # the answers differ between prompts
    # a client that disconnects mid-stream: its request is cancelled and the slot freed
    import http.client
    import json
    import urllib.parse
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": chat_prompt_ids[3], "max_tokens": CAP,
                                                         "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    t0 = time.monotonic()
    while eng.busy or eng.free_slots != eng.slots:
        assert time.monotonic() - t0 < 30, "the disconnected request still holds its slot"
        time.sleep(0.1)


def test_malformed_requests_get_4xx_json(server, chat_prompt_ids):
    url, eng, _ = server
    p = chat_prompt_ids[0]
    good = {"model": NAME, "prompt": p, "max_tokens": 2, "temperature": 0}
    cases = [
        (b"{not json", 400, None),
        ({"prompt": p}, 400, "model"),
        ({**good, "model": "gpt-9"}, 404, "model"),
        ({**good, "max_tokens": -1}, 400, "max_tokens"),
        ({**good, "max_tokens": CAP + 1}, 400, "max_tokens"),
        ({**good, "prompt": p * 8}, 400, "prompt"),
        ({**good, "prompt": ""}, 400, "prompt"),
        ({**good, "prompt": [1, "a"]}, 400, "prompt"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "n": 2}, 400, "n"),
        ({**good, "stop": [1]}, 400, "stop"),
        ({**good, "stream": "yes"}, 400, "stream"),
    ]
    for body, status, param in cases:
        code, out = _post(url, "/v1/completions", body)
        assert code == status, (body if isinstance(body, bytes) else {k: body[k] for k in body if k != "prompt"}, out)
        err = out["error"]
        assert err["message"] and err["type"] and err["param"] == param, out
    code, out = _post(url, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot"}]})
    assert code == 400 and out["error"]["param"] == "messages"
    code, out = _post(url, "/v1/nope", good)
    assert code == 404 and "error" in out
    assert _post(url, "/v1/completions", good)[0] == 200  # still serving
    assert not eng.busy


# --------------------------------------------------------------------------- trace replay
def test_poisson_trace_and_replay(engine, chat_prompt_ids, tmp_path):
    from jaxdec.serving import trace as tr
    big = tr.poisson_trace(4000, rate=20.0, prompt_lens=[8, 40], output_lens=[2, 5], seed=1)
    gaps = np.diff([r["arrival"] for r in big])
    assert big[0]["arrival"] == 0 and abs(gaps.mean() - 0.05) < 0.005 and abs(gaps.std() - 0.05) < 0.005
    assert {r["prompt_len"] for r in big} == {8, 40} and {r["output_len"] for r in big} == {2, 5}
    t = tr.poisson_trace(8, rate=50.0, prompt_lens=[8, 40], output_lens=[2, 5, 9], seed=2)
    path = str(tmp_path / "t.jsonl")
    tr.save_trace(t, path)
    assert tr.load_trace(path) == t
    out = tr.replay(engine, t, prompt_source=chat_prompt_ids[30] + chat_prompt_ids[31])
    assert out["requests"] == 8 and not engine.busy and not engine._results
    for r in out["records"]:
        assert 1 <= r["tokens"] <= r["output_len"] and r["ttft"] >= 0
    assert out["tokens_per_second"] > 0 and out["ttft"]["p50"] <= out["ttft"]["p99"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival": 0, "prompt_len": 4, "output_len": 2}\n{"arrival": 1, "prompt_len": 0, "output_len": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'prompt_len' must be an integer >= 1"):
        tr.load_trace(str(bad))
    with pytest.raises(ValueError, match="rate must be > 0"):
        tr.poisson_trace(3, rate=0, prompt_lens=[4], output_lens=[4])


def test_trace_of_64_requests_each_equal_to_decoding_it_alone(engine, model_q, chat_prompt_ids):
    """A Poisson trace of 64 requests with mixed prompt lengths (two prompt buckets) and output lengths, replayed
    on the 4-slot engine with EOS on: each request's tokens equal greedy decoding of that request alone (DESIGN's
    near-tie rule, asserted per request). References: `generate` of 16 requests at a time through one compiled
    program (its rows decode independently) to the group's longest output, each row cut to its request's length
    (a greedy run that stops after n tokens is the first n tokens of a longer one)."""
    from jaxdec.serving import trace as tr
    model, params = model_q
    t = tr.poisson_trace(64, rate=400.0, prompt_lens=[6, 21, 45, 70, 110], output_lens=[1, 3, 6, 10], seed=3)
    n = len(chat_prompt_ids)  # 64 distinct prompts: user turns (past the shared system turn) of 8 chat prompts
    pool = [sum((chat_prompt_ids[(i + 5 * k) % n][23 + (i // n if k == 0 else 0):] for k in range(8)), [])
            for i in range(64)]
    prompts = tr.trace_prompts(t, prompts=pool)
    assert len({bucket(len(p)) for p in prompts}) == 2 and len({r["output_len"] for r in t}) == 4
    assert len({tuple(p) for p in prompts}) == 64 and t[-1]["arrival"] > 0
    steps0 = engine.steps
    out = tr.replay(engine, t, prompts=pool, keep_tokens=True)
    assert out["requests"] == 64 and not engine.busy and not engine._results
    longest = max(len(p) for p in prompts)
    refs = []
    for s in range(0, 64, 16):
        g = jaxdec.generate(model, params, prompts[s:s + 16], max_new_tokens=max(r["output_len"] for r in t[s:s + 16]),
                            cache_size=CACHE, capacity=CAP, longest_prompt=longest, batch_size=16)  # max_new: traced
        refs += [toks[:r["output_len"]] for toks, r in zip(g.tokens, t[s:s + 16])]
    pairs = [(f"request {i} (prompt {len(p)}, new {r['output_len']})", rec["token_ids"], ref,
              LazyStepLogits(model, params, p, ref))
             for i, (p, r, rec, ref) in enumerate(zip(prompts, t, out["records"], refs))]
    assert_sequences_match(pairs, max_dlogit=1e-4)
    assert all(rec["tokens"] == len(rec["token_ids"]) <= rec["output_len"] for rec in out["records"])
    # the slots really ran requests side by side: fewer steps than tokens
    assert engine.steps - steps0 < sum(len(r["token_ids"]) for r in out["records"]) * 0.5
