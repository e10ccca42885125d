"""Constrained decoding with more decoders (issue #18, second slice), on the real default model:

* constrained speculative decoding from the CLI (`--method speculative --drafter pld --forced-tokens` with
  a schema file per prompts-file row) equals constrained greedy (DESIGN's near-tie rule);
* tree drafters (token recycling, through the CLI) with per-node masks equal constrained greedy; the node
  masks equal masks computed path by path (no model);
* stochastic beam search, best-of-N, CAD and momentum under a constraint: outputs satisfy it; CAD's
  tokens are the argmax of the masked contrast recomputed from teacher-forced logits, and momentum with
  no resistance (alpha = 0) equals constrained greedy (CI keeps momentum and the CLI's tree drafter; CAD,
  stochastic beam, best-of-N and the CLI's PLD + forced tokens run in the slow tier, each its own compile);
* flags that cannot honour a constraint give clear errors before the model loads.
"""
from __future__ import annotations

import json
import os
import re
import sys
import types

import jax
import jsonschema
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from selfref import lazy_block_vs_step_dlogit, step_logits  # noqa: E402
from test_constrained import (SCHEMAS, assert_constrained_greedy, chat, check_json_rows, lm, pick,  # noqa: E402,F401
                              tokenizer)

import jaxdec  # noqa: E402
from jaxdec.constrained import choices, get_engine, json_schema, regex  # noqa: E402
from jaxdec.constrained.engines import mask_to_ids, words  # noqa: E402

ROWS = ("person", "ref_defs_point", "date_pattern")
MAX_NEW = 48
V = 49152


@pytest.fixture(scope="module")
def json_ref(lm):
    """Constrained greedy on four schemas: the reference of the tree drafter and of momentum (alpha 0)."""
    model, params, tok = lm
    rows = pick(SCHEMAS, ROWS)
    cons = [json_schema(r["schema"]) for r in rows]
    g = jaxdec.generate(model, params, chat(tok, rows), max_new_tokens=MAX_NEW, tokenizer=tok, constraint=cons)
    return rows, cons, g


# ------------------------------------------------------------------------------------------------
# per-node masks of a draft tree (no model)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["llguidance", "outlines"])
def test_tree_node_masks_follow_each_path(tokenizer, engine):
    """Every node's mask equals a fresh matcher's after that node's path; nodes below a token the grammar
    refuses keep their row; the matcher ends where it started. The tree is breadth-first, so the depth-first
    walk must roll back between branches."""
    eng = get_engine(engine, tokenizer, V, 2)
    c = eng.compile(regex("(red|green|blue)-[0-9]{2}", engine=engine))

    def one(s):
        ids = tokenizer.encode(s)
        assert len(ids) == 1, (s, ids)
        return ids[0]
    red, green, yellow, dash, four = one("red"), one("green"), one("yellow"), one("-"), one("4")
    #            0     1    2      3       4     5     6     7     8
    block = [99, red, green, yellow, dash, dash, four, dash, four]
    parents = [-1, 0, 0, 0, 1, 2, 4, 3, 6]
    paths = {0: [], 1: [red], 2: [green], 4: [red, dash], 5: [green, dash], 6: [red, dash, four],
             8: [red, dash, four, four]}
    m = eng.matcher(c)
    out = np.full((len(block), words(V)), 7, np.int32)
    m.fill_tree(block, parents, out)
    for j in range(len(block)):
        if j not in paths:  # 3 (yellow) and 7 (below it) are refused: untouched
            assert (out[j] == 7).all(), j
            continue
        ref = eng.matcher(c)
        for t in paths[j]:
            assert ref.consume(t)
        want = np.zeros((words(V),), np.int32)
        ref.fill(want)
        np.testing.assert_array_equal(out[j], want, err_msg=f"node {j}")
    assert mask_to_ids(out[8], V).tolist() == [2]  # "red-44": only EOS
    now = np.zeros((words(V),), np.int32)
    m.fill(now)
    np.testing.assert_array_equal(now, out[0])
    assert not m.error() and m.consume(red)


# ------------------------------------------------------------------------------------------------
# speculative decoding: tree drafter (API) and the CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drafter", [
    ["--drafter", "recycling", "--tree-size", "12"],  # a draft tree: per-node masks
    pytest.param(["--drafter", "pld", "--draft-tokens", "6", "--forced-tokens"], marks=pytest.mark.slow),
], ids=["recycling_tree", "pld_forced"])
def test_cli_speculative_constrained_equals_constrained_greedy(lm, json_ref, drafter, tmp_path, capsys,
                                                               monkeypatch):
    """`jaxdec generate --method speculative --drafter ...` with a schema file per prompts-file row gives
    constrained greedy's rows (`generate`, same batch), with constraint_ok, in fewer model calls. With token
    recycling every node of its draft tree is masked along its path (the tree path is counted)."""
    from jaxdec import cli
    from jaxdec.constrained.engines import LLGuidanceEngine
    model, params, tok = lm
    rows, cons, g = json_ref
    trees = []
    fill_tree = LLGuidanceEngine.fill_batch_tree
    monkeypatch.setattr(LLGuidanceEngine, "fill_batch_tree",
                        lambda self, items, out: (trees.append(len(items)), fill_tree(self, items, out)))
    lines = []
    for r in rows:
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r["schema"]))
        lines.append({"prompt": r["prompt"], "json_schema": f"{r['name']}.json"})
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    path = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--prompts-file", str(pf), "--chat", "--weights", "q", "--max-new-tokens", str(MAX_NEW),
                   "--quiet", "--method", "speculative", *drafter, "--out", str(path)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    out = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["constraint_ok"] for r in out] == g.constraint_ok
    spec = types.SimpleNamespace(tokens=[r["tokens"] for r in out], text=[r["text"] for r in out],
                                 finish_reason=[r["finish_reason"] for r in out],
                                 constraint_ok=[r["constraint_ok"] for r in out])
    label = f"cli {' '.join(drafter)}"
    assert_constrained_greedy(lm, chat(tok, rows), cons, rows, spec, g, label)
    check_json_rows(spec, rows, label)
    st = out[0]["stats"]
    print(f"{label}: {st['model_calls']} model calls (tau {st['tau']:.2f}) vs greedy {g.stats['model_calls']}; "
          f"{sum(trees)} row-steps masked as trees")
    assert st["tau"] > 1.0 and st["model_calls"] < g.stats["model_calls"]
    assert (sum(trees) > 0) == (drafter[1] == "recycling")


def test_forced_tokens_flag_wraps_the_chain_drafter():
    import argparse
    from jaxdec.constrained.cli import speculative_decoder
    from jaxdec.constrained.forced import ForcedTokensDrafter
    from jaxdec.speculative.methods import prompt_lookup, token_recycling
    dec = prompt_lookup(6)
    wrapped = speculative_decoder(argparse.Namespace(forced_tokens=True), dec)
    assert isinstance(wrapped.drafter, ForcedTokensDrafter) and wrapped.drafter.inner == dec.drafter
    assert speculative_decoder(argparse.Namespace(forced_tokens=False), dec) is dec
    with pytest.raises(ValueError, match=r"ForcedTokensDrafter: inner must be a chain drafter, TokenRecyclingDrafter"):
        speculative_decoder(argparse.Namespace(forced_tokens=True), token_recycling())


@pytest.mark.parametrize("flags, needle", [
    (["--method", "speculative", "--drafter", "pearl", "--regex", "a"],
     "--regex: --drafter pearl cannot honour a constraint"),
    (["--method", "speculative", "--forced-tokens"], "--forced-tokens is set but no constraint is given"),
    (["--method", "speculative", "--drafter", "recycling", "--forced-tokens", "--regex", "a"],
     "--forced-tokens needs --method speculative with a chain drafter"),
    (["--forced-tokens", "--regex", "a"], "--forced-tokens is not used by --method greedy"),
])
def test_cli_constraint_flag_errors(flags, needle, capsys):
    from jaxdec import cli
    rc = cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "4"] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err


# ------------------------------------------------------------------------------------------------
# search decoders
# ------------------------------------------------------------------------------------------------

def test_momentum_constrained(lm, json_ref):
    """No resistance (alpha = 0): momentum's pick is the argmax of the masked distribution, so it equals
    constrained greedy token for token (DESIGN's near-tie rule: it takes the argmax of probabilities, greedy
    of logits); with resistance the outputs still validate."""
    from jaxdec.search import momentum_generate
    model, params, tok = lm
    rows, cons, g = json_ref
    prompts = chat(tok, rows)
    m0 = momentum_generate(model, params, prompts, alpha=0.0, max_new_tokens=MAX_NEW, tokenizer=tok, constraint=cons)
    assert_constrained_greedy(lm, prompts, cons, rows, m0, g, "momentum alpha=0")
    check_json_rows(m0, rows, "momentum 0")
    m1 = momentum_generate(model, params, prompts, alpha=0.5, max_new_tokens=MAX_NEW, tokenizer=tok, constraint=cons)
    check_json_rows(m1, rows, "momentum 0.5")
    assert all(ok for ok, f in zip(m1.constraint_ok, m1.finish_reason) if f == "eos")


@pytest.mark.slow  # its own compiled program: the CI budget keeps momentum; `make acceptance` runs this
def test_cad_constrained_is_the_masked_contrast_argmax(lm):
    """Each CAD token (greedy, alpha 0.5) is the argmax, among the tokens the grammar allows after the
    output so far, of (1 + a) * with - a * without over teacher-forced logits (near ties excused)."""
    from jaxdec.search import context_aware_generate
    model, params, tok = lm
    a = 0.5
    q = "Question: what is the secret code? Answer with 4 digits."
    with_ctx = tok.chat_ids("Context: the secret code is 4721.\n" + q)
    without = tok.chat_ids(q)
    c = regex("[0-9]{4}")
    g = context_aware_generate(model, params, [with_ctx], [without], alpha=a, max_new_tokens=8, tokenizer=tok,
                               constraint=c)
    assert g.constraint_ok == [True] and re.fullmatch("[0-9]{4}", g.text[0]), g.text
    out = g.tokens[0]
    lw, lo = step_logits(model, params, with_ctx, out), step_logits(model, params, without, out)
    eng = get_engine("llguidance", tok, V, 2)
    m = eng.matcher(eng.compile(c))
    dlogit = lazy_block_vs_step_dlogit(model, params, with_ctx, 16)  # measured only at a divergence
    for i, t in enumerate(out):
        bits = np.zeros((words(V),), np.int32)
        m.fill(bits)
        allowed = mask_to_ids(bits, V)
        comb = (1 + a) * lw[i][allowed] - a * lo[i][allowed]
        best = int(allowed[np.argmax(comb)])
        if best != t:
            top = np.sort(comb)[-2:]  # a near tie of the contrast: each side's error scales by (1 + a), a
            assert top[1] - top[0] < max(1e-3, 10 * (1 + 2 * a) * dlogit()), (i, t, best, top)
        assert m.consume(t)
    assert m.accepting()


@pytest.mark.slow  # its own compiled program: the CI budget keeps momentum; `make acceptance` runs this
def test_stochastic_beam_constrained(lm):
    """k samples without replacement, all inside the grammar; each score is the model's log-probability of
    the sequence (the mask removes sequences, it does not renormalize)."""
    from jaxdec.search import stochastic_beam_search
    model, params, tok = lm
    opts = ["red", "yellow", "blue"]
    ids = [tok.chat_ids("Pick a primary colour.")]
    g = stochastic_beam_search(model, params, ids, k=3, max_new_tokens=6, seed=1, tokenizer=tok,
                               constraint=choices(opts))
    hyps = g.extras["beams"][0]
    assert len(hyps) == 3 and len({tuple(h["tokens"]) for h in hyps}) == 3
    assert g.constraint_ok == [True]
    for h in hyps:
        assert h["constraint_ok"] and h["finish_reason"] == "eos"
        assert tok.decode(h["tokens"], skip_special_tokens=True) in opts
    lp = [np.asarray(jax.nn.log_softmax(step_logits(model, params, ids[0], h["tokens"]), axis=-1)) for h in hyps]
    ref = [float(x[np.arange(len(h["tokens"])), h["tokens"]].sum()) for x, h in zip(lp, hyps)]
    np.testing.assert_allclose([h["score"] for h in hyps], ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # its own compiled program: the CI budget keeps momentum; `make acceptance` runs this
def test_best_of_n_constrained(lm):
    from jaxdec.search import best_of_n
    model, params, tok = lm
    rx = "[0-9]{3}-[0-9]{4}"
    g = best_of_n(model, params, [tok.chat_ids("Invent a phone number.")], n=3, seed=2,
                  sampling=dict(temperature=1.0), max_new_tokens=12, tokenizer=tok, constraint=regex(rx),
                  scorer=lambda p, cands: [float(sum(c)) for c in cands])  # any scorer: the samples are the point
    samples = g.extras["samples"][0]
    assert g.extras["samples_ok"][0] == [True] * 3 and g.constraint_ok == [True]
    for s in samples:
        assert re.fullmatch(rx, tok.decode(s, skip_special_tokens=True)), tok.decode(s)
    assert len({tuple(s) for s in samples}) > 1  # sampled, not three copies of one row


def test_methods_without_a_mask_refuse_by_name(lm):
    """Decoders with no logits-processor chain refuse constraint= by name, alone or inside FirstFinish (which
    honours one around a token decoder: the mask goes to its inner decoder)."""
    from jaxdec.search.entropy_adaptive import EntropyAdaptive
    from jaxdec.search.testtime import FirstFinish
    model, params, tok = lm
    with pytest.raises(ValueError, match=r"the decoder EntropyAdaptive cannot honour constraint="):
        jaxdec.generate(model, params, [tok.chat_ids("Hi")], decoder=EntropyAdaptive(small_layers=2),
                        max_new_tokens=4, tokenizer=tok, constraint=regex("a"))
    with pytest.raises(ValueError, match=r"the decoder FirstFinish wraps EntropyAdaptive, which cannot honour"):
        jaxdec.generate(model, params, [tok.chat_ids("Hi")], decoder=FirstFinish(n=1, inner=EntropyAdaptive()),
                        max_new_tokens=4, tokenizer=tok, constraint=regex("a"))
