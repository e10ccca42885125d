"""The logits-processor seam (`jaxdec.core.logits`): one user processor through greedy, sampling, beam search
and speculative decoding (a chain and a tree drafter), host processors called once per step with every
live row, and post-commit hooks that see the committed tokens, counts and beam parents."""
from __future__ import annotations

import dataclasses
import threading

import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec.core.logits import (BanTokens, MinNewTokens, ProcessorContext, check_processors, run_processors,
                                step_context)
from jaxdec.search import beam_search
from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder, TokenRecyclingDrafter

import neartie
import selfref
from test_golden import GOLD

NEW = 16


@dataclasses.dataclass(frozen=True, eq=False)
class Recorder:
    """A host processor that records every call and every commit (identity-hashed: stateful); with
    ``ban`` it also bans those ids (on the host, so the ban and the records come from one callback)."""

    ban: tuple = ()
    stage = "mask"
    host = True
    calls: list = dataclasses.field(default_factory=list)
    commits: list = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __call__(self, logits, ctx):
        with self.lock:
            self.calls.append({"shape": logits.shape, "num_new": ctx.num_new.copy(), "done": ctx.done.copy(),
                               "depth": ctx.depth.copy()})
        if self.ban:
            logits = logits.copy()
            logits[..., list(self.ban)] = -np.inf
        return logits

    def post_commit(self, ctx, tokens, counts, parent_rows):
        with self.lock:
            self.commits.append({"num_new": ctx.num_new.copy(), "tokens": tokens.copy(), "counts": counts.copy(),
                                 "parents": parent_rows.copy()})


@pytest.fixture(scope="module")
def setup(model_q):
    """The golden-output prompts (one asks for code the drafters can copy) and the same calls as the golden
    cases (so their compiled programs are shared), and a ban list made of tokens greedy decoding does
    emit, so banning them must move the output."""
    model, params = model_q
    prompts = GOLD["inputs"]["prompts"]
    plain = jaxdec.generate(model, params, prompts, max_new_tokens=NEW)
    seen = []
    for t in plain.tokens:
        for tok in t[:6]:
            if tok not in seen and tok not in model.eos_ids:
                seen.append(tok)
    ban = BanTokens(tuple(seen[:4]))
    rec = Recorder()
    banned = jaxdec.generate(model, params, prompts, max_new_tokens=NEW, processors=[ban, rec])
    return model, params, prompts, plain, ban, banned, rec


def _no_banned(tokens, ban):
    banned = set(ban.ids)
    return all(not (set(t) & banned) for t in tokens)


def test_ban_changes_greedy_and_is_honoured(setup):
    model, params, prompts, plain, ban, banned, _ = setup
    assert not _no_banned(plain.tokens, ban)  # negative control: the ids were there without the processor
    assert _no_banned(banned.tokens, ban)
    assert banned.tokens != plain.tokens


def test_host_processor_called_once_per_step_with_every_row(setup):
    model, params, prompts, plain, ban, banned, rec = setup
    steps = max(len(t) for t in banned.tokens)
    assert len(rec.calls) == steps  # one batched callback per step (the prefill's included), not per row
    for i, c in enumerate(rec.calls):
        assert c["shape"] == (2, 1, model.vocab_size)
        live = ~c["done"]
        assert np.all(c["num_new"][live] == i)
    # post-commit: each step's committed token per row, counted for live rows only
    assert len(rec.commits) == steps
    emitted = [[int(c["tokens"][r, 0]) for c in rec.commits if c["counts"][r]] for r in range(2)]
    assert emitted == [list(t) for t in banned.tokens]
    assert all(np.array_equal(c["parents"], np.arange(2)) for c in rec.commits)


def test_ban_with_best_of_n_and_first_finish(setup):
    model, params, prompts, plain, ban, _, _ = setup
    from jaxdec.search import best_of_n, first_finish
    b = best_of_n(model, params, prompts[:1], n=3, sampling={"temperature": 1.0}, max_new_tokens=NEW,
                  processors=[ban])
    assert _no_banned(b.extras["samples"][0], ban)
    f = first_finish(model, params, prompts[:1], n=3, sampling={"temperature": 1.0}, max_new_tokens=NEW,
                     processors=[ban])
    assert _no_banned(f.tokens, ban)


def test_beam_search_ban_and_post_commit_parents(setup):
    model, params, prompts, plain, ban, _, _ = setup
    free = beam_search(model, params, prompts, num_beams=4, max_new_tokens=NEW)  # as the golden case
    rec = Recorder(ban=ban.ids)
    g = beam_search(model, params, prompts, num_beams=4, max_new_tokens=NEW, processors=[rec])
    assert not _no_banned([h["tokens"] for row in free.extras["beams"] for h in row], ban)
    assert _no_banned([h["tokens"] for row in g.extras["beams"] for h in row], ban)
    assert len(rec.commits) >= 2
    # parents are rows of the same prompt's 4 beams, and some step reordered the beams
    for c in rec.commits:
        assert set(c["parents"][:4].tolist()) <= set(range(4)) and set(c["parents"][4:].tolist()) <= set(range(4, 8))
    assert any(not np.array_equal(c["parents"], np.arange(8)) for c in rec.commits)


@pytest.mark.parametrize("drafter", ["pld", "recycling"])
def test_speculative_with_processor_equals_greedy_with_it(setup, drafter):
    model, params, prompts, plain, ban, ref, _ = setup
    rec = Recorder()
    d = PromptLookupDrafter(4) if drafter == "pld" else TokenRecyclingDrafter()
    procs = [ban, rec] if drafter == "pld" else [ban]
    g = jaxdec.generate(model, params, prompts, max_new_tokens=NEW, decoder=SpeculativeDecoder(d), processors=procs)
    assert _no_banned(g.tokens, ban)
    assert g.stats["tau"] > 1.0  # the verify block really carried accepted drafts through the processor
    if g.tokens != ref.tokens:  # only a near tie between block and step logits may excuse a difference
        dl = selfref.block_vs_step_dlogit(model, params, prompts[0], 5)
        logits = selfref.teacher_logits(model, params, prompts, ref.tokens)
        masked = [np.where(np.isin(np.arange(lg.shape[-1]), ban.ids), -np.inf, lg) for lg in logits]
        neartie.assert_sequences_match(
            [(f"row {i}", a, b, m) for i, (a, b, m) in enumerate(zip(g.tokens, ref.tokens, masked))], dl,
            max_excused_frac=0.5)
    if drafter == "pld":  # post-commit saw several tokens per step, and the calls saw the block's depths
        emitted = [[int(t) for c in rec.commits for t in c["tokens"][r, :c["counts"][r]]] for r in range(2)]
        assert emitted == [list(t) for t in g.tokens]
        assert any(c["counts"].max() > 1 for c in rec.commits)
        assert any(c["depth"].shape[1] > 1 and c["depth"].max() > 0 for c in rec.calls)


def test_min_new_processor_counts_block_depth():
    ctx = ProcessorContext(tokens=jnp.zeros((2, 8), jnp.int32), num_new=jnp.array([0, 3]),
                           depth=jnp.array([[0, 1, 2], [0, 1, 2]]), parents=jnp.array([[-1, 0, 1]] * 2),
                           block=jnp.zeros((2, 3), jnp.int32), done=jnp.zeros((2,), bool),
                           min_new=jnp.array([2, 4]), stop_ids=jnp.array([5], jnp.int32))
    out = np.asarray(MinNewTokens()(jnp.zeros((2, 3, 8)), ctx))
    # row 0 chooses tokens 0,1,2: 0 and 1 are below min_new 2; row 1 chooses 3,4,5: only 3 is
    assert np.isneginf(out[:, :, 5]).tolist() == [[True, True, False], [True, False, False]]
    assert np.all(np.isfinite(np.delete(out, 5, axis=-1)))


def test_chain_orders_by_stage():
    order = []

    @dataclasses.dataclass(frozen=True)
    class Tag:
        name: str
        stage: str
        host = False

        def __call__(self, logits, ctx):
            order.append(self.name)
            return logits

    procs = check_processors([Tag("w", "warp"), Tag("p", "penalty"), Tag("m1", "mask"), Tag("m2", "mask")], "t")
    state_ctx = ProcessorContext(tokens=jnp.zeros((1, 2), jnp.int32), num_new=jnp.zeros((1,), jnp.int32),
                                 depth=jnp.zeros((1, 1), jnp.int32), parents=-jnp.ones((1, 1), jnp.int32),
                                 block=jnp.zeros((1, 1), jnp.int32), done=jnp.zeros((1,), bool),
                                 min_new=jnp.zeros((1,), jnp.int32), stop_ids=jnp.zeros((0,), jnp.int32))
    run_processors(procs, jnp.zeros((1, 4)), state_ctx)
    assert order == ["m1", "m2", "p", "w"]


def test_bad_processors_are_refused_by_name(setup):
    model, params, prompts, _, ban, _, _ = setup
    with pytest.raises(TypeError, match="processors\\[0\\].*stage"):
        jaxdec.generate(model, params, prompts, processors=[lambda x, c: x])
    with pytest.raises(ValueError, match="stage must be one of"):
        jaxdec.generate(model, params, prompts, processors=[dataclasses.replace(ban)] + [_BadStage()])
    from jaxdec.speculative import PearlDecoder, truncated_draft
    dm, _ = truncated_draft(model, params, 4)
    with pytest.raises(ValueError, match="PearlDecoder does not accept logits processors"):
        jaxdec.generate(model, params, prompts, decoder=PearlDecoder(dm, 2), processors=[ban])
    with pytest.raises(ValueError, match="BanTokens: ids"):
        BanTokens(())


@dataclasses.dataclass(frozen=True)
class _BadStage:
    stage = "sometimes"
    host = False

    def __call__(self, logits, ctx):
        return logits


def test_step_context_of_a_plain_step():
    from jaxdec.core.state import DecodeState
    st = DecodeState(tokens=jnp.zeros((2, 4), jnp.int32), num_new=jnp.array([1, 2]), done=jnp.array([False, True]),
                     finish=jnp.zeros((2,), jnp.int32), last=jnp.array([7, 9]), keys=jnp.zeros((2, 2), jnp.uint32),
                     cache=None, max_new=jnp.array([4, 4]), min_new=jnp.array([0, 0]),
                     stop_ids=jnp.array([2], jnp.int32), step=jnp.zeros((), jnp.int32))
    ctx = step_context(st)
    assert ctx.block.tolist() == [[7], [9]] and ctx.depth.tolist() == [[0], [0]] and ctx.parents.tolist() == [[-1], [-1]]
