"""Issue 16 follow-up: the speculative verify call sized to what the drafter proposed
(`SpeculativeDecoder(verify_buckets=...)`).

Each step the target runs over the first ``Tb`` tokens of the block ``[last, node_1 .. node_N]``, ``Tb``
the smallest bucket >= ``need = 1 + (index of the last valid node over the running rows)``. Checked here:

* lossless: greedy tokens equal plain greedy decoding with buckets on, for a chain drafter and a tree
  drafter whose number of valid nodes varies per step and per row (`RaggedDrafter`), on the toy
  `TrigramModel` (the engine's in-call cache write) and on the tiny random Llama (the deferred
  write: keys/values padded to the block, then rolled back / gathered); the sampling verifier draws the
  same tokens as with the full block (same keys, same logits on the toy model);
* the bucket that ran is the smallest bucket >= need: ``need`` is recorded on the host by a callback in
  the drafter, the expected bucket histogram computed from it equals the engine's ``bucket_steps`` and
  ``block_tokens``; negative control: with buckets off every step runs T tokens, and the same check
  fails;
* bad ``verify_buckets`` (not ascending, a bucket > T, a bucket < 1, not integers, a bad string) is a
  ValueError naming ``verify_buckets``; the CLI's ``--verify-buckets`` names the flag.

The compiled loop's cache copies with buckets on are checked in tests/test_spec_cache_copies.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

import neartie  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402

from jaxdec import generate  # noqa: E402
from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder, TokenRecyclingDrafter, TreeSpec  # noqa: E402
from jaxdec.speculative.drafters import LayerSkipDrafter  # noqa: E402
from jaxdec.testing.toy_speculative import TrigramModel, random_table  # noqa: E402

V = 12
_SEEN: list = []  # (valid & live [B,N]) of every step, recorded by RaggedDrafter's host callback


def _record(valid_live):
    _SEEN.append(np.asarray(valid_live))


@dataclasses.dataclass(frozen=True)
class RaggedDrafter:
    """The inner drafter's draft with only its first ``k`` nodes kept valid, ``k`` random per step and per
    row (a step-wide cap first, so that short and long blocks both occur): nodes are in topological order,
    so a prefix of them is a valid chain or subtree. Records each step's valid nodes of running rows."""

    inner: Any
    seed: int = 0

    num_nodes = property(lambda self: self.inner.num_nodes)
    max_depth = property(lambda self: self.inner.max_depth)
    max_children = property(lambda self: getattr(self.inner, "max_children", 1))
    is_chain = property(lambda self: self.inner.is_chain)

    def __getattr__(self, name):  # optional hooks are the inner drafter's
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        return self.inner.init(model, params, prompts, prompt_lens, state, inputs)

    def propose(self, model, params, state, keys):
        d, dstate, cache = self.inner.propose(model, params, state, keys)
        b, n = d.tokens.shape
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
        k1, k2 = jax.random.split(key)
        cap = jax.random.randint(k1, (), 0, n + 1)
        k = jax.random.randint(k2, (b,), 0, n + 1) % (cap + 1)
        valid = d.valid & (jnp.arange(n)[None, :] < k[:, None])
        jax.debug.callback(_record, valid & ~state.done[:, None])
        return dataclasses.replace(d, valid=valid), dstate, cache

    def update(self, model, params, state, dstate, info):
        return self.inner.update(model, params, state, dstate, info)


def expected_buckets(seen, buckets):
    """From the recorded steps: the bucket histogram and block tokens the rule prescribes."""
    hist = np.zeros(len(buckets), np.int64)
    for vl in seen:
        idx = np.nonzero(vl.any(axis=0))[0]
        need = 1 + (int(idx.max()) + 1 if idx.size else 0)
        hist[int(np.searchsorted(buckets, need))] += 1
    return hist, int(np.dot(hist, buckets))


def run_recorded(model, params, prompts, drafter, max_new, **kw):
    _SEEN.clear()
    out = generate(model, params, prompts, decoder=SpeculativeDecoder(drafter, **kw), max_new_tokens=max_new)
    seen = list(_SEEN)
    assert len(seen) == out.stats["target_calls"] - 1  # one propose per verify step (the prefill is a call)
    return out, seen


@pytest.fixture(scope="module")
def toy():
    model = TrigramModel(V, eos_ids=(1,))
    tab = random_table(1, V, 3.0)
    tab[:, :, 1] -= 2.0  # EOS ends some rows early: rows leave the batch at different steps
    dtab = tab + 2.0 * np.random.default_rng(1).standard_normal(tab.shape).astype(np.float32)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, V, size=int(rng.integers(1, 40))))) for _ in range(6)]
    params = {"table": jnp.asarray(tab), "table_skip": jnp.asarray(dtab)}
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=32)
    assert {"eos", "length"} <= set(ref.finish_reason)
    return model, params, prompts, ref


TOY = {
    "chain": lambda: RaggedDrafter(LayerSkipDrafter((0,), 8), seed=3),
    "tree": lambda: RaggedDrafter(TokenRecyclingDrafter(TreeSpec.from_widths((3, 2, 1)), k=4), seed=5),
}


@pytest.mark.parametrize("name", list(TOY))
def test_toy_lossless_and_bucket_choice(toy, name):
    model, params, prompts, ref = toy
    drafter = TOY[name]()
    t = drafter.num_nodes + 1
    auto = SpeculativeDecoder(drafter, verify_buckets="auto")._buckets()
    assert auto == tuple(b for b in (1, 2, 4, 8, 16) if b < t) + (t,)
    for vb in ("auto", (2, 5)) if name == "chain" else ("auto",):
        out, seen = run_recorded(model, params, prompts, drafter, 32, verify_buckets=vb)
        assert out.tokens == ref.tokens and out.finish_reason == ref.finish_reason, (name, vb)
        buckets = SpeculativeDecoder(drafter, verify_buckets=vb)._buckets()
        hist, tokens = expected_buckets(seen, buckets)
        raw = out.stats["raw"]
        assert raw["bucket_steps"] == hist.tolist(), (name, vb, raw["bucket_steps"], hist.tolist())
        assert raw["block_tokens"] == tokens
        assert out.stats["tau"] > 1.0 and raw["accepted"] > 0, (name, vb)  # drafts really were accepted
        if vb == "auto":
            assert sum(h > 0 for h in hist) >= 3, hist  # short, middle and full blocks all ran
            assert tokens < t * len(seen)
    # negative control: buckets off (no one-token shortcut either) -> every step runs the full block, and the
    # bucket rule's prediction does not hold
    off, seen = run_recorded(model, params, prompts, drafter, 32, skip_empty_drafts=False)
    assert off.tokens == ref.tokens
    raw = off.stats["raw"]
    assert raw["block_tokens"] == t * len(seen) and raw["bucket_steps"] == [len(seen)]
    assert raw["block_tokens"] != expected_buckets(seen, auto)[1]
    if name == "chain":  # default (skip_empty_drafts): the old cond, counted as buckets (1, T)
        dflt, seen = run_recorded(model, params, prompts, drafter, 32)
        assert dflt.tokens == ref.tokens
        assert dflt.stats["raw"]["bucket_steps"] == expected_buckets(seen, (1, t))[0].tolist()


@pytest.mark.slow
def test_toy_sampling_verifier_same_draws(toy):
    """Speculative sampling with buckets draws what it draws with the full block (same keys, and the toy
    model's logits do not depend on the block length)."""
    model, params, prompts, _ = toy
    drafter = RaggedDrafter(LayerSkipDrafter((0,), 6), seed=7)
    outs = [generate(model, params, prompts, decoder=SpeculativeDecoder(drafter, "sampling", verify_buckets=vb),
                     max_new_tokens=24, sampling={"temperature": 1.0}, seed=11) for vb in ((), "auto")]
    assert outs[0].tokens == outs[1].tokens
    assert outs[1].stats["raw"]["block_tokens"] < outs[0].stats["raw"]["block_tokens"]


def test_tiny_llama_deferred_write_lossless():
    """The deferred cache write (a real attention model): buckets' keys/values are padded to the block and
    the padding never survives the rollback / gather; greedy tokens equal plain greedy (near-tie rule)."""
    from tiny_llama import tiny_llama, tiny_prompts
    model, params = tiny_llama()
    assert model.supports_deferred_kv_write
    prompts = tiny_prompts(6)
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=20)
    logits = lazy_teacher_logits(model, params, prompts, ref.tokens)
    dlogit = lazy_block_vs_step_dlogit(model, params, prompts[0], 9)
    for name, drafter in (("chain", RaggedDrafter(PromptLookupDrafter(8), seed=1)),
                          ("tree", RaggedDrafter(TokenRecyclingDrafter(TreeSpec.from_widths((3, 2, 1)), k=4), 2))):
        out, seen = run_recorded(model, params, prompts, drafter, 20, verify_buckets="auto")
        neartie.assert_sequences_match([(f"{name} {i}", o, r, lg) for i, (o, r, lg) in
                                        enumerate(zip(out.tokens, ref.tokens, logits))], dlogit)
        buckets = SpeculativeDecoder(drafter, verify_buckets="auto")._buckets()
        hist, _ = expected_buckets(seen, buckets)
        assert out.stats["raw"]["bucket_steps"] == hist.tolist()
        assert sum(h > 0 for h in hist[1:-1]) >= 1, hist  # a truncated (neither 1 nor T) block ran
        assert out.stats["raw"]["accepted"] > 0, name


@pytest.mark.parametrize("bad, what", [((1, 4, 2), "ascending"), ((2, 2), "ascending"), ((1, 10), r"\[1, 9\]"),
                                       ((0, 4), r"\[1, 9\]"), ((-1,), r"\[1, 9\]"), ((1.5, 4), "integer"),
                                       ((True,), "integer"), ("fast", "'auto'"), (4, "tuple")])
def test_bad_verify_buckets(bad, what):
    with pytest.raises(ValueError, match=f"verify_buckets.*{what}"):
        SpeculativeDecoder(PromptLookupDrafter(8), verify_buckets=bad)


def test_good_verify_buckets():
    d = PromptLookupDrafter(8)
    assert SpeculativeDecoder(d, verify_buckets=[1, 4])._buckets() == (1, 4, 9)  # T added, a list accepted
    assert SpeculativeDecoder(d, verify_buckets=(3, 9))._buckets() == (3, 9)
    assert SpeculativeDecoder(d)._buckets() == (1, 9)
    assert SpeculativeDecoder(d, skip_empty_drafts=False)._buckets() == (9,)
    hash(SpeculativeDecoder(d, verify_buckets=[1, 4]))  # a jit static argument


def test_cli_verify_buckets_flag():
    import argparse
    from jaxdec.cli import BadInput
    from jaxdec.speculative import cli as spec_cli
    parser = argparse.ArgumentParser()
    spec_cli.add_arguments(parser)
    for good, want in (("auto", "auto"), ("1,2,4,8", (1, 2, 4, 8)), ("off", ())):
        assert spec_cli.parse_verify_buckets(good) == want
    for bad in ("1,4,2", "0,2", "a,b", "", "2,2"):
        with pytest.raises(BadInput, match="--verify-buckets"):
            spec_cli.parse_verify_buckets(bad)
    args = parser.parse_args(["--drafter", "pld", "--draft-tokens", "4", "--verify-buckets", "1,8"])
    with pytest.raises(ValueError, match="--verify-buckets"):  # a bucket > T = 5 needs the drafter to know
        spec_cli.apply_verify_buckets(args, SpeculativeDecoder(PromptLookupDrafter(4)))
    args = parser.parse_args(["--drafter", "pld", "--verify-buckets", "auto"])
    dec = spec_cli.apply_verify_buckets(args, SpeculativeDecoder(PromptLookupDrafter(8)))
    assert dec.verify_buckets == "auto"
    args = parser.parse_args(["--drafter", "pld"])
    assert spec_cli.apply_verify_buckets(args, SpeculativeDecoder(PromptLookupDrafter(8))).verify_buckets == ()
