"""Input-guided aggressive decoding (`jaxdec.speculative.aggressive`): lossless and really drafting.

Toy part (`TrigramModel` with a planted edit of its input): exact tokens in ragged batches, the
re-alignment search prefers the occurrence after the break, and on an input whose tokens repeat the
aligned pointer beats prompt lookup restricted to the input (the older ``aggressive_decoding``).

Real default model: the editing prompts of tests/data/editing_prompts.jsonl (chat turns asking to
correct or reformat a given text): exactly the greedy tokens (DESIGN near-tie rule) at batch 1 and in
ragged batches of 4 (>= 2 length buckets), τ > 1.3 there, while the same check fails for a drafter that
never proposes (τ = 1, the negative control; on the toy in CI, on the real model in the slow tier). CI:
8 prompts x 24 new tokens in batches of 4, 2 of them at batch 1 (measured τ 2.19 on all 13 x 32); the
``slow`` tier: all 13 at batch 1 and batch 4, 96 new tokens.
"""
from __future__ import annotations

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
import peer  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402
from test_speculative import SilentDrafter, assert_accepts_and_rejects  # noqa: E402

from jaxdec import generate  # noqa: E402
from jaxdec.cache.kv import bucket  # noqa: E402
from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder  # noqa: E402
from jaxdec.speculative import methods as M  # noqa: E402
from jaxdec.speculative.aggressive import InputGuidedDrafter  # noqa: E402
from jaxdec.speculative.aggressive import realign as realign_  # noqa: E402
from jaxdec.testing.toy_speculative import TrigramModel, random_table  # noqa: E402

EDITING = os.path.join(os.path.dirname(__file__), "data", "editing_prompts.jsonl")

# ------------------------------------------------------------------------------------------------
# Toy: a trigram table whose greedy output is the input with planted edits
# ------------------------------------------------------------------------------------------------
V = 48
EOS = 1
INSTR, START = 40, 41  # "instruction" and "answer starts" tokens
# the text to edit: token 7 occurs four times, so a lookup of the last token alone is ambiguous
SRC = [2, 3, 7, 4, 5, 7, 6, 8, 9, 7, 10, 11, 12, 7, 13, 14, 15, 16, 17, 18, 19, 20]
# the greedy output: 5 -> 42 (substitution before a 7), 10 dropped (deletion), 43 inserted after 14
OUT = [2, 3, 7, 4, 42, 7, 6, 8, 9, 7, 11, 12, 7, 13, 14, 43, 15, 16, 17, 18, 19, 20]


def toy_model():
    tab = random_table(5, V, 1.0)
    seq = [SRC[-1], START] + OUT + [EOS]
    for a, b, c in zip(seq, seq[1:], seq[2:]):
        assert tab[a, b].max() < 10
        tab[a, b, c] += 20.0  # every output pair is distinct, so the planted continuation is greedy
    return TrigramModel(V, eos_ids=(EOS,)), {"table": jnp.asarray(tab)}


def toy_prompts():
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(21, 40, size=n))) + [INSTR] + SRC + [START] for n in (1, 9, 40, 77, 3)]


def test_toy_exact_ragged_and_beats_prompt_lookup():
    model, params = toy_model()
    prompts = toy_prompts()
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=30)
    assert all(t == OUT + [EOS] for t in ref.tokens), "the planted output is not greedy"
    taus = {}
    for name, drafter, sizes in [("iad", InputGuidedDrafter(6), (2, 5)),
                                 ("pld_prompt", PromptLookupDrafter(6, 3, 1, "prompt"), (5,))]:
        for bs in sizes:  # batches of 2 with an inert filler row; one ragged batch
            out = generate(model, params, prompts, decoder=SpeculativeDecoder(drafter), max_new_tokens=30,
                           batch_size=bs)
            assert out.tokens == ref.tokens and out.finish_reason == ref.finish_reason, (name, bs)
        taus[name] = out.stats["tau"]
        assert_accepts_and_rejects(out.stats, name)
    print("toy τ", taus)
    # after the substitution the suffix [.., 42, 7] is ambiguous for a last-occurrence lookup (7 occurs four
    # times); the aligned pointer continues from the right place
    assert taus["iad"] > taus["pld_prompt"] + 0.3, taus
    # max_new inside a draft is clipped exactly
    short = generate(model, params, prompts, decoder=SpeculativeDecoder(InputGuidedDrafter(6)), max_new_tokens=7,
                     capacity=32, batch_size=5)  # the program compiled above (max_new_tokens is traced)
    assert short.tokens == [OUT[:7]] * len(prompts) and set(short.finish_reason) == {"length"}


def test_realign_prefers_the_occurrence_after_the_break():
    # prompt (P = 10): 5 6 9 5 6 8 5 6 7 0 ; generated: 5 6  -> the suffix "5 6" occurs at 0, 3 and 6
    realign = jax.jit(realign_, static_argnums=(4, 5))
    hist = jnp.asarray([[5, 6, 9, 5, 6, 8, 5, 6, 7, 0, 5, 6, 0, 0]], jnp.int32)
    L, P = jnp.asarray([12]), jnp.asarray([10])
    for lo, want in [(2, 5), (5, 8), (0, 2), (99, 8)]:  # lo past every match: the last occurrence
        nxt, found = realign(hist, L, P, jnp.asarray([lo]), 3, 1)
        assert bool(found[0]) and int(nxt[0]) == want, (lo, int(nxt[0]))
    # the suffix never reaches back into the prompt: one generated token -> only 1-grams are looked up
    nxt, found = realign(hist, jnp.asarray([11]), P, jnp.asarray([0]), 3, 1)
    assert bool(found[0]) and int(nxt[0]) == 1
    # nothing to copy after the only occurrence (it ends the prompt): not found
    h2 = jnp.asarray([[4, 3, 0, 9, 9]], jnp.int32)
    _, found = realign(h2, jnp.asarray([5]), jnp.asarray([4]), jnp.asarray([0]), 2, 1)
    assert not bool(found[0])


def test_bad_input():
    with pytest.raises(ValueError, match="num_tokens"):
        InputGuidedDrafter(0)
    with pytest.raises(ValueError, match="min_ngram"):
        InputGuidedDrafter(4, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="back"):
        InputGuidedDrafter(4, back=-1)


def test_constructor_and_cli_registration():
    from jaxdec.speculative.cli import DRAFTER_METHODS, DRAFTERS
    dec = M.input_guided(12, 2)
    assert dec == SpeculativeDecoder(InputGuidedDrafter(12, 2))
    assert "iad" in DRAFTERS and DRAFTER_METHODS["iad"] == "input_guided" and "input_guided" in M.PAPERS
    # the older constructor is unchanged (prompt lookup restricted to the input)
    assert M.aggressive_decoding() == SpeculativeDecoder(PromptLookupDrafter(8, 3, 1, source="prompt"))


# ------------------------------------------------------------------------------------------------
# Real default model on editing prompts
# ------------------------------------------------------------------------------------------------
# ci: the first 8 prompts (two ragged batches of 4), 24 new tokens, 2 at batch 1; the negative control on the
# real model runs in the slow tier (the toy test above shows the same check failing for a silent drafter)
TIERS = {"ci": dict(n=8, max_new=24, b1=2, silent=False), "full": dict(n=13, max_new=96, b1=13, silent=True)}


def editing_prompt_ids():
    with open(EDITING) as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [peer.peer_chat_ids(r) for r in rows]


@pytest.fixture(scope="module", params=["ci", pytest.param("full", marks=pytest.mark.slow)])
def editing(request, model_f32):
    model, params = model_f32
    size = TIERS[request.param]
    prompts = editing_prompt_ids()[:size["n"]]
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=size["max_new"], batch_size=len(prompts))
    return {**size, "model": model, "params": params, "prompts": prompts, "ref": ref,
            "logits": lazy_teacher_logits(model, params, prompts, ref.tokens),
            "max_dlogit": lazy_block_vs_step_dlogit(model, params, prompts[0], 16)}


def _exact(e, out, idx, label):
    pairs = [(f"{label} prompt {i}", out.tokens[j], e["ref"].tokens[i], e["logits"][i]) for j, i in enumerate(idx)]
    neartie.assert_sequences_match(pairs, e["max_dlogit"])


def ragged_batches_of_4(e, decoder):
    """Every group of 4 consecutive prompts as one compiled batch (generate would regroup a longer list by
    length); one program for all (longest_prompt); statistics merged. Returns (tokens, stats)."""
    from jaxdec.speculative import merge_raw, summarize_stats
    prompts, toks, raw = e["prompts"], [], None
    longest = max(len(p) for p in prompts)
    for i in range(0, len(prompts), 4):
        group = prompts[i:i + 4]
        assert len(group) < 4 or len({bucket(len(p)) for p in group}) >= 2, [len(p) for p in group]
        out = generate(e["model"], e["params"], group, decoder=decoder, max_new_tokens=e["max_new"], batch_size=4,
                       longest_prompt=longest)
        toks += out.tokens
        raw = merge_raw(raw, out.stats["raw"])
    return toks, summarize_stats(raw)


def test_real_editing_exact_ragged_batch4_and_tau(editing):
    e = editing
    assert len(e["prompts"]) >= 8
    taus = {}
    drafters = [("iad", InputGuidedDrafter())] + ([("silent", SilentDrafter(16))] if e["silent"] else [])
    for name, drafter in drafters:
        toks, stats = ragged_batches_of_4(e, SpeculativeDecoder(drafter))
        _exact(e, types.SimpleNamespace(tokens=toks), range(len(e["prompts"])), f"{name} b4")
        taus[name] = stats
    print("editing prompts τ: " + ", ".join(f"{k} {v['tau']:.3f}" for k, v in taus.items()))
    assert taus["iad"]["tau"] > 1.3, taus["iad"]
    assert_accepts_and_rejects(taus["iad"], "iad")
    if e["silent"]:  # negative control: a drafter that never proposes fails the same check
        assert taus["silent"]["tau"] == 1.0
        with pytest.raises(AssertionError, match="no draft token accepted"):
            assert_accepts_and_rejects(taus["silent"], "silent")


def test_real_editing_exact_batch1(editing):
    e = editing
    idx = list(range(e["b1"]))
    out = generate(e["model"], e["params"], [e["prompts"][i] for i in idx], decoder=M.input_guided(),
                   max_new_tokens=e["max_new"], batch_size=1)
    _exact(e, out, idx, "iad b1")
    assert out.stats["tau"] > 1.0
