"""Serving (issue #20): per-request constraints in the decode-slot engine and the OpenAI-compatible server.

A constrained request decodes exactly as ``generate(..., constraint=...)`` of it alone, while unconstrained
requests share its steps unchanged; the server takes OpenAI's ``response_format`` (json_schema) and the
``regex`` / ``choices`` extension fields, and refuses bad ones with a 400 naming the field."""
from __future__ import annotations

import json
import os
import sys

import pytest

import jaxdec
from jaxdec.constrained import choices, json_schema, regex
from jaxdec.serving import Engine, RequestError

sys.path.insert(0, os.path.dirname(__file__))
from neartie import assert_sequences_match  # noqa: E402
from selfref import LazyStepLogits  # noqa: E402

from test_serving import CACHE, CAP, NAME, tokenizer  # noqa: E402,F401  (the same compiled step; the fixture)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(model_q, tokenizer):
    model, params = model_q
    return Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, tokenizer=tokenizer)


def _alone(model, params, tok, ids, new, constraint=None):
    return jaxdec.generate(model, params, [ids], max_new_tokens=new, cache_size=CACHE, capacity=CAP,
                           tokenizer=tok, constraint=constraint)


def _ids(tok, question):
    return tok.chat_ids(question)


CASES = [("Name a primary colour.", choices(["red", "green", "blue"]), 6),
         ("Give a product code.", regex(r"[A-Z]{2}-[0-9]{3}"), 10),
         ("Reply in JSON with a number n.", json_schema(SCHEMA), 12),
         ("Is the sky blue? Answer yes or no.", choices(["yes", "no"]), 4)]


def test_constrained_requests_equal_generate_alone(engine, model_q, tokenizer, chat_prompt_ids):
    model, params = model_q
    refs = [_alone(model, params, tokenizer, _ids(tokenizer, q), n, c) for q, c, n in CASES]
    free = chat_prompt_ids[6]
    free_ref = _alone(model, params, None, free, 9).tokens[0]
    # constrained and unconstrained requests side by side, more requests than slots (admission in two waves)
    ids = [engine.submit(_ids(tokenizer, q), max_new_tokens=n, constraint=c) for q, c, n in CASES[:2]]
    fid = engine.submit(free, max_new_tokens=9)
    ids += [engine.submit(_ids(tokenizer, q), max_new_tokens=n, constraint=c) for q, c, n in CASES[2:]]
    got = engine.run_until_done()
    for (q, c, n), rid, ref in zip(CASES, ids, refs):
        assert got[rid].tokens == ref.tokens[0], (q, tokenizer.decode(got[rid].tokens), ref.text)
        assert got[rid].constraint_ok == ref.constraint_ok[0]
    assert sum(got[r].constraint_ok for r in ids) >= 3  # most outputs complete their grammar (not vacuous)
    assert got[fid].constraint_ok is None
    assert_sequences_match([("unconstrained row", got[fid].tokens, free_ref,
                             LazyStepLogits(model, params, free, free_ref))], max_dlogit=1e-4)
    # negative control: the same colour question unconstrained does not answer with one bare colour word
    plain = _alone(model, params, tokenizer, _ids(tokenizer, CASES[0][0]), 6)
    assert plain.text[0].strip() not in ("red", "green", "blue")
    assert not engine.busy


def test_engine_refuses_bad_constraints(engine, model_q, tokenizer, chat_prompt_ids):
    p = chat_prompt_ids[0]
    with pytest.raises(RequestError, match="^constraint: "):
        engine.submit(p, max_new_tokens=2, constraint={"regex": "("})
    with pytest.raises(RequestError, match="exactly one of"):
        engine.submit(p, max_new_tokens=2, constraint={"regex": "a", "choices": ["b"]})
    model, params = model_q
    bare = Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP)
    with pytest.raises(RequestError, match="no tokenizer"):
        bare.submit(p, max_new_tokens=2, constraint=regex("a"))
    assert not engine.busy and not bare.busy


@pytest.fixture(scope="module")
def server(model_q, tokenizer):
    from jaxdec.serving import server as srv
    model, params = model_q
    eng = Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, keep_results=False)
    app = srv.create_app(eng, tokenizer, NAME)  # gives the engine the served tokenizer
    with srv.serve_in_thread(app) as url:
        yield url, eng
    assert not app.state.runner.thread.is_alive(), "engine thread still running"


def test_openai_client_constraints_equal_generate(server, model_q, tokenizer):
    import openai
    url, eng = server
    model, params = model_q
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    q_json, q_code, q_col = CASES[2][0], CASES[1][0], CASES[0][0]

    ref = _alone(model, params, tokenizer, _ids(tokenizer, q_json), 12, json_schema(SCHEMA)).text[0]
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": q_json}], max_tokens=12, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}})
    assert chat.choices[0].message.content == ref

    ref = _alone(model, params, tokenizer, _ids(tokenizer, q_code), 10, regex(r"[A-Z]{2}-[0-9]{3}")).text[0]
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": q_code}], max_tokens=10, temperature=0, stream=True,
        extra_body={"regex": r"[A-Z]{2}-[0-9]{3}"})]
    assert "".join(parts) == ref

    text = tokenizer.apply_chat_template([{"role": "user", "content": q_col}])
    ref = _alone(model, params, tokenizer, _ids(tokenizer, q_col), 6, choices(["red", "green", "blue"])).text[0]
    c = client.completions.create(model=NAME, prompt=text, max_tokens=6, temperature=0,
                                  extra_body={"choices": ["red", "green", "blue"]})
    assert c.choices[0].text == ref and ref in ("red", "green", "blue")

    for extra, param in [({"regex": "("}, "regex"), ({"choices": "red"}, "choices"),
                         ({"regex": "a", "choices": ["b"]}, "choices"),
                         ({"response_format": {"type": "xml"}}, "response_format"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
                          "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=text, max_tokens=4, temperature=0, extra_body=extra)
        err = json.loads(e.value.response.text)["error"]
        assert err["param"] == param, (extra, err)
    assert not eng.busy


def test_prefill_budget_bounds_admission_per_step(engine, model_q, chat_prompt_ids):
    """With ``prefill_budget`` = one prompt bucket, one waiting request is admitted per step (the first always
    is); the tokens equal those of the engine that admits every waiting request at once."""
    from jaxdec.cache import bucket
    model, params = model_q
    ps = chat_prompt_ids[13:16]
    assert len({bucket(len(p)) for p in ps}) == 1
    capped = Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, prefill_budget=bucket(len(ps[0])))
    ids = [capped.submit(p, max_new_tokens=5) for p in ps]
    capped.step()
    assert capped.free_slots == 3  # negative control below: the uncapped engine fills three slots at once
    got = capped.run_until_done()
    ref_ids = [engine.submit(p, max_new_tokens=5) for p in ps]
    engine.step()
    assert engine.free_slots == 1
    ref = engine.run_until_done()
    assert [got[i].tokens for i in ids] == [ref[i].tokens for i in ref_ids]
    with pytest.raises(ValueError, match="prefill_budget must be an integer >= 1"):
        Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, prefill_budget=0)
