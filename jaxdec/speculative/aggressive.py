"""Input-guided aggressive decoding (Ge et al. 2022, "Lossless Acceleration for Seq2seq Generation with
Aggressive Decoding", IAD), generalized to decoder-only chat prompts that ask to correct or reformat a
given text: the output is mostly the input, so the draft is the input itself.

`InputGuidedDrafter` keeps a pointer into the input (the prompt) per row:

* aligned: the draft is the input copied from the pointer, ``hist[nxt : nxt + k]`` (no n-gram lookup
  at all, so a common token such as " the" never sends the copy to the wrong place). After the verify
  call the pointer moves past the accepted tokens; if the bonus token equals the next input token the
  row stays aligned, else alignment breaks at that input position (the ``anchor``).
* re-alignment (after a mismatch): the generated suffix (its last n tokens, n = max_ngram .. min_ngram,
  never reaching back into the prompt) is looked up in the input; the occurrence nearest *after* the
  anchor (at most ``back`` tokens before it) wins, so the copy moves forward through the input as
  the paper's does; without one, the last occurrence anywhere. When the suffix occurs nowhere the
  edit is taken for a substitution and the copy resumes one token after the anchor.
* before the first alignment (the answer's first tokens) the last occurrence in the prompt is used:
  in a chat prompt the text to edit comes after the instruction.

Greedy verification keeps it lossless (exactly the greedy tokens); it is a chain drafter of the shared
`SpeculativeDecoder`, one `lax.while_loop` like every other. `jaxdec.speculative.methods.input_guided`
builds it; the older ``aggressive_decoding`` constructor (prompt lookup restricted to the input) is kept
as it was.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jaxdec.speculative.tree import Draft, TreeSpec


def realign(hist, hist_len, prompt_len, lo, max_ngram: int, min_ngram: int):
    """Where to resume copying the input: for each row the index after an occurrence, inside the prompt
    (``hist[:, :prompt_len]``), of the generated suffix's last n tokens (longest n first; n at most the
    number of generated tokens). Among occurrences the first ending at or after ``lo [B]`` wins, else
    the last one. Only occurrences that leave at least one input token to copy count.
    Returns (next index [B] int32, found [B] bool)."""
    b, h = hist.shape
    big = max_ngram
    L = hist_len.astype(jnp.int32)
    P = prompt_len.astype(jnp.int32)
    gen = L - P
    j = jnp.arange(h, dtype=jnp.int32)[None, :]  # candidate match end
    left = jnp.concatenate([jnp.full((b, big), -1, hist.dtype), hist], axis=1)  # left[:, big + i] = hist[:, i]
    found = jnp.zeros((b,), bool)
    nxt = jnp.zeros((b,), jnp.int32)
    for n in range(max_ngram, min_ngram - 1, -1):
        suf = jnp.take_along_axis(hist, jnp.clip(L[:, None] - n + jnp.arange(n)[None], 0, h - 1), axis=1)
        m = (j - n + 1 >= 0) & (j + 1 < P[:, None]) & (gen >= n)[:, None]
        for t in range(n):  # hist[j - (n - 1 - t)] == suf[t]
            s = n - 1 - t
            m = m & (left[:, big - s:big - s + h] == suf[:, t:t + 1])
        fwd = m & (j >= lo[:, None])
        first_fwd = jnp.argmax(fwd, axis=1).astype(jnp.int32)
        last_any = (h - 1 - jnp.argmax(m[:, ::-1], axis=1)).astype(jnp.int32)
        cand = jnp.where(jnp.any(fwd, axis=1), first_fwd, last_any)
        any_m = jnp.any(m, axis=1)
        nxt = jnp.where(~found & any_m, cand + 1, nxt)
        found = found | any_m
    return nxt, found


@struct.dataclass
class InputGuidedState:
    """`InputGuidedDrafter`'s state ([B] each).

    nxt:     the input index (into ``state.method.hist``) of the token expected next while aligned.
    aligned: the output is in step with the input at ``nxt``.
    anchor:  the input index where alignment last broke (-1: never aligned yet).
    cur:     where the last draft started copying (-1: no draft was proposed).
    """

    nxt: jax.Array
    aligned: jax.Array
    anchor: jax.Array
    cur: jax.Array


@dataclasses.dataclass(frozen=True)
class InputGuidedDrafter:
    """A chain of ``num_tokens`` copied from the input at an aligned pointer, re-aligned after each
    mismatch (see the module docstring). ``back``: how far before the break re-alignment may land."""

    num_tokens: int = 16
    max_ngram: int = 3
    min_ngram: int = 1
    back: int = 2

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"draft length (num_tokens) must be >= 1, got {self.num_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                             f"max_ngram={self.max_ngram}")
        if self.back < 0:
            raise ValueError(f"back must be >= 0, got {self.back}")

    num_nodes = max_depth = property(lambda self: self.num_tokens)  # a chain of num_tokens, no model calls
    max_children, is_chain, draft_calls_per_step = 1, True, 0

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        b = prompts.shape[0]
        minus = jnp.full((b,), -1, jnp.int32)
        return InputGuidedState(nxt=jnp.zeros((b,), jnp.int32), aligned=jnp.zeros((b,), bool), anchor=minus,
                                cur=minus)

    def propose(self, model, params, state, keys):
        m = state.method
        ds = m.draft
        P = m.prompt_len
        lo = jnp.where(ds.anchor >= 0, ds.anchor - self.back, P)  # never aligned: no forward preference
        pos, found = realign(m.hist, m.hist_len, P, lo, self.max_ngram, self.min_ngram)
        guess = jnp.where(ds.anchor >= 0, ds.anchor + 1, -1)  # a substitution: skip the replaced token
        start = jnp.where(ds.aligned, ds.nxt, jnp.where(found, pos, guess))
        src = start[:, None] + jnp.arange(self.num_tokens, dtype=jnp.int32)[None]
        h = m.hist.shape[1]
        toks = jnp.take_along_axis(m.hist, jnp.clip(src, 0, h - 1), axis=1).astype(jnp.int32)
        valid = (start[:, None] >= 0) & (src < P[:, None])
        b = toks.shape[0]
        cur = jnp.where(jnp.any(valid, axis=1), start, -1)
        draft = Draft(toks, TreeSpec.chain(self.num_tokens).parents_array(b), valid)
        return draft, ds.replace(cur=cur), state.cache

    def update(self, model, params, state, dstate, info):
        m = state.method
        P = m.prompt_len
        a = info.n_acc
        bonus = jnp.take_along_axis(info.out, a[:, None], axis=1)[:, 0]
        at = dstate.cur + a  # the input token the bonus was compared with
        h = m.hist.shape[1]
        expect = jnp.take_along_axis(m.hist, jnp.clip(at, 0, h - 1)[:, None], axis=1)[:, 0]
        drafted = dstate.cur >= 0
        keep = drafted & (at < P) & (bonus == expect)
        use = info.live
        aligned = jnp.where(use & drafted, keep, dstate.aligned & ~use)
        nxt = jnp.where(use & drafted, at + 1, dstate.nxt)
        anchor = jnp.where(use & drafted & ~keep, at, dstate.anchor)
        return dstate.replace(aligned=aligned, nxt=nxt, anchor=anchor)
