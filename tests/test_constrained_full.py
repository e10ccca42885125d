"""Constrained decoding, full size (slow tier, `make acceptance`): every committed JSON schema with
greedy, sampling (T = 0.7), beam search 4 and speculative decoding (PLD, and token recycling's draft tree)
at 256 new tokens; every regex with both engines; every Lark grammar. Rows that end by EOS must parse and validate; rows cut by
max_new_tokens are counted and reported (goal <= 5 %)."""
from __future__ import annotations

import json
import os
import re
import sys

import jsonschema
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402
from test_constrained import (LARKS, REGEXES, SCHEMAS, MaskedStepLogits, chat, check_json_rows,  # noqa: E402,F401
                              lark_text, lm, tokenizer)

import jaxdec  # noqa: E402
from jaxdec.constrained import get_engine, json_schema, lark, regex  # noqa: E402

pytestmark = pytest.mark.slow
MAX_NEW = 256
BATCH = 8


def _report(label, g, rows):
    cut = check_json_rows(g, rows, label)
    frac = cut / len(rows)
    print(f"[constrained full] {label}: {len(rows)} rows, {len(rows) - cut} ended by EOS and validate, {cut} cut at "
          f"{MAX_NEW} tokens ({frac:.1%})")
    return frac


@pytest.fixture(scope="module")
def greedy_all(lm):
    model, params, tok = lm
    g = jaxdec.generate(model, params, chat(tok, SCHEMAS), max_new_tokens=MAX_NEW, tokenizer=tok, batch_size=BATCH,
                        constraint=[json_schema(r["schema"]) for r in SCHEMAS])
    return g


def test_full_json_greedy(greedy_all):
    assert _report("greedy", greedy_all, SCHEMAS) <= 0.05


def test_full_json_sampling(lm):
    model, params, tok = lm
    g = jaxdec.generate(model, params, chat(tok, SCHEMAS), method="sample", seed=7, sampling=dict(temperature=0.7),
                        max_new_tokens=MAX_NEW, tokenizer=tok, batch_size=BATCH,
                        constraint=[json_schema(r["schema"]) for r in SCHEMAS])
    assert _report("sample T=0.7", g, SCHEMAS) <= 0.05


def test_full_json_beam4(lm):
    from jaxdec.search import beam_search
    model, params, tok = lm
    b = beam_search(model, params, chat(tok, SCHEMAS), num_beams=4, max_new_tokens=MAX_NEW, tokenizer=tok,
                    batch_size=2, constraint=[json_schema(r["schema"]) for r in SCHEMAS])
    b.text = [tok.decode(t, skip_special_tokens=True) for t in b.tokens]
    assert _report("beam 4", b, SCHEMAS) <= 0.05


def _assert_equals_greedy(lm, greedy_all, s, label):
    model, params, tok = lm
    prompts = chat(tok, SCHEMAS)
    cons = [json_schema(r["schema"]) for r in SCHEMAS]
    eng = get_engine("llguidance", tok, model.vocab_size, 2)
    base = lazy_teacher_logits(model, params, prompts, greedy_all.tokens)
    pairs = [(f"{label} {r['name']}", s.tokens[i], greedy_all.tokens[i],
              MaskedStepLogits(base[i], greedy_all.tokens[i], eng, eng.compile(cons[i])))
             for i, r in enumerate(SCHEMAS)]
    neartie.assert_sequences_match(pairs, lazy_block_vs_step_dlogit(model, params, prompts[0], 16))
    assert _report(label, s, SCHEMAS) <= 0.05
    print(f"[constrained full] {label} tau {s.stats.get('tau')}, model calls {s.stats['model_calls']} vs greedy "
          f"{greedy_all.stats['model_calls']}")


@pytest.mark.parametrize("drafter", ["pld", "recycling"])
def test_full_json_speculative_equals_greedy(lm, greedy_all, drafter):
    """A chain drafter (prompt lookup) and a tree drafter (token recycling, per-node masks)."""
    from jaxdec.speculative.methods import prompt_lookup, token_recycling
    model, params, tok = lm
    dec = prompt_lookup(4) if drafter == "pld" else token_recycling()
    s = jaxdec.generate(model, params, chat(tok, SCHEMAS), max_new_tokens=MAX_NEW, tokenizer=tok, batch_size=BATCH,
                        constraint=[json_schema(r["schema"]) for r in SCHEMAS], decoder=dec)
    _assert_equals_greedy(lm, greedy_all, s, f"{drafter} speculative")


def test_full_regex_both_engines(lm):
    model, params, tok = lm
    prompts = chat(tok, REGEXES)
    out = {e: jaxdec.generate(model, params, prompts, max_new_tokens=64, tokenizer=tok, batch_size=BATCH,
                              constraint=[regex(r["regex"], engine=e) for r in REGEXES])
           for e in ("llguidance", "outlines")}
    assert out["llguidance"].tokens == out["outlines"].tokens
    cut = 0
    for r, text, fin, ok in zip(REGEXES, out["llguidance"].text, out["llguidance"].finish_reason,
                                out["llguidance"].constraint_ok):
        if fin != "eos":
            cut += 1
            continue
        assert re.fullmatch(r["regex"], text) and ok, (r["name"], text)
    print(f"[constrained full] regex: {len(REGEXES)} rows, engines equal, {cut} cut at 64 tokens")
    assert cut <= 1


def test_full_lark(lm):
    model, params, tok = lm
    g = jaxdec.generate(model, params, chat(tok, LARKS), max_new_tokens=64, tokenizer=tok, batch_size=BATCH,
                        constraint=[lark(lark_text(r)) for r in LARKS])
    cut = sum(f != "eos" for f in g.finish_reason)
    for r, fin, ok, text in zip(LARKS, g.finish_reason, g.constraint_ok, g.text):
        if fin == "eos":
            assert ok, (r["name"], text)
    print(f"[constrained full] lark: {len(LARKS)} rows, {cut} cut at 64 tokens")
    assert cut <= 1
