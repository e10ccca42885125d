"""RAPID (Chen et al. 2025, "Long-Context Inference with Retrieval-Augmented Speculative Decoding"):
the draft is the *same* model reading a short retrieved context instead of the long one; the target
verifies with the full long context.

* Retrieval (host, once per prompt): the long document is cut into chunks at line boundaries
  (`chunk_text`), ranked by BM25 against the question (`BM25Retriever`, the ``bm25s`` package: a
  lexical ranker with no model weights to download, which suits code and documentation questions whose
  words appear in the text), and the best ``k`` chunks, in document order, stand in for the document
  in the draft prompt (`rapid_prompts`).
* Decoding: `RapidDrafter` is a `DraftModelDrafter` whose draft model is the target itself with its own
  KV cache over the retrieved prompt (``inputs.method``: `RapidInputs`), kept in step with the target
  at a per-row offset (the two prompts differ in length). The shared `SpeculativeDecoder` verifies:
  greedy verification gives exactly the greedy tokens of the long-context target (the default);
  ``sampling=`` verifies by speculative sampling (lossless for the long-context target's distribution).
* ``augment=beta`` (greedy verification only; LOSSY, named so): RAPID's retrieval-augmented target.
  The verifier reads ``z_target + beta * mask * (q_draft - p_target)`` at every block position
  (``mask``: draft tokens with ``q_draft >= alpha * max q_draft``), the paper's one-step knowledge
  transfer from the retrieval-context draft. The draft then also feeds its last token, so every
  position of the block (the bonus one too) has its draft distribution; the output is greedy decoding
  of that augmented distribution, whatever the block boundaries (only the first token, chosen at
  prefill before any draft, is the plain target's).
* `rapid_generate` runs it (prompt ids and draft prompt ids from `rapid_prompts`); a prompt that does
  not fit the model's context with ``max_new_tokens`` is refused before anything runs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdec.cache.kv import bucket
from jaxdec.speculative.drafters import DraftModelDrafter, DraftModelState

DEFAULT_TEMPLATE = ("Read the following text.\n\n{context}\n\nQuestion: {question}\n"
                    "Answer in one or two sentences.")


# ----------------------------------------------------------------------------------------------------
# Retrieval (host)
# ----------------------------------------------------------------------------------------------------

def chunk_text(text: str, chunk_chars: int = 800) -> list:
    """Consecutive chunks of about ``chunk_chars`` characters, cut at line ends (a longer line is cut
    where it reaches the limit); joined back they give ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"chunk_chars must be an integer >= 1, got {chunk_chars!r}")
    chunks, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if cur:
                chunks.append(cur)
                cur = ""
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(cur) + len(line) > chunk_chars and cur:
            chunks.append(cur)
            cur = ""
        cur += line
    if cur:
        chunks.append(cur)
    return chunks


def _words(texts):
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever:
    """BM25 over a list of chunks (``bm25s``). ``rank(query, k)`` -> the indices of the k best chunks,
    best first. Build the index with ``BM25Retriever(chunks)`` or ``index(chunks)``; ranking without an
    index is an error."""

    def __init__(self, chunks: Optional[Sequence[str]] = None, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self._bm25 = None
        self.num_chunks = 0
        if chunks is not None:
            self.index(chunks)

    def index(self, chunks: Sequence[str]) -> "BM25Retriever":
        import bm25s
        chunks = list(chunks)
        if not chunks or not all(isinstance(c, str) for c in chunks):
            raise ValueError("index(chunks): expected a non-empty list of strings")
        words = _words(chunks)
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        if any(words):
            self._bm25.index(words, show_progress=False)
        else:  # nothing searchable (no word of 2+ letters): ranking keeps the document order
            self._bm25.no_words = True
        self.num_chunks = len(chunks)
        return self

    def rank(self, query: str, k: int) -> list:
        if self._bm25 is None:
            raise RuntimeError("BM25Retriever has no index: build it with BM25Retriever(chunks) or "
                               ".index(chunks) before rank()")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = _words([query])
        if not q[0] or getattr(self._bm25, "no_words", False):  # nothing to match: the document's first chunks
            return list(range(min(k, self.num_chunks)))
        docs, _ = self._bm25.retrieve(q, k=min(k, self.num_chunks), show_progress=False)
        return [int(i) for i in docs[0]]


def retrieve_context(document: str, query: str, k: int = 4, chunk_chars: int = 800, sep: str = "\n...\n") -> str:
    """The ``k`` chunks of ``document`` that BM25 ranks best for ``query``, in document order."""
    chunks = chunk_text(document, chunk_chars)
    top = sorted(BM25Retriever(chunks).rank(query, k))
    return sep.join(chunks[i].rstrip("\n") for i in top)


def split_question(text: str):
    """(body, question) of a long prompt given as one text (the CLI's form): the question is the last
    paragraph (after the last blank line), the body everything before it. A text without a blank line,
    or with nothing before or after it, is a ValueError."""
    t = text.rstrip()
    i = t.rfind("\n\n")
    if i < 0 or not t[:i].strip() or not t[i:].strip():
        raise ValueError("RAPID needs a long prompt whose last paragraph (after its last blank line) is the "
                         "question: nothing to retrieve from, or no question, in this prompt")
    return t[:i], t[i:].lstrip("\n")


def draft_text(text: str, k: int = 4, chunk_chars: int = 800, sep: str = "\n...\n") -> str:
    """The draft's version of a long prompt text (`split_question`): the ``k`` chunks of the body that
    BM25 ranks best for the question, in document order, then the question paragraph unchanged."""
    body, question = split_question(text)
    return retrieve_context(body, question, k, chunk_chars, sep) + "\n\n" + question


HELDOUT = "rapid_heldout.jsonl"


def heldout_prompts(split: Optional[str] = "heldout") -> list:
    """The shipped long prompts (jaxdec/data/prompts/rapid_heldout.jsonl): rows with ``prompt`` (the whole
    user turn: a standard-library source, then a question paragraph), ``question``, ``module``,
    ``split`` ("heldout" 2k-6k tokens; "ci": two ~1k-token prompts for quick tests); ``split=None``: all."""
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "prompts", HELDOUT)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def rapid_prompts(documents: Sequence[str], questions: Sequence[str], encode: Callable[[str], list], *,
                  template: str = DEFAULT_TEMPLATE, k: int = 4, chunk_chars: int = 800):
    """-> (prompt ids, draft prompt ids), one pair per (document, question): the target reads
    ``template`` filled with the whole document, the draft with its retrieved chunks.
    encode(text) -> token ids (e.g. a chat template rendered and tokenized)."""
    if len(documents) != len(questions):
        raise ValueError(f"{len(documents)} documents but {len(questions)} questions")
    full, draft = [], []
    for doc, q in zip(documents, questions):
        full.append(list(encode(template.format(context=doc, question=q))))
        draft.append(list(encode(template.format(context=retrieve_context(doc, q, k, chunk_chars), question=q))))
    return full, draft


# ----------------------------------------------------------------------------------------------------
# The drafter (compiled)
# ----------------------------------------------------------------------------------------------------

@struct.dataclass
class RapidInputs:
    """Per-row draft prompts (``inputs.method``): ``draft_prompts [B, Pd]`` int32 right-padded,
    ``draft_lens [B]`` int32."""

    draft_prompts: jax.Array
    draft_lens: jax.Array


@struct.dataclass
class RapidState(DraftModelState):
    """`DraftModelState` plus ``offset [B]`` int32: draft cache length minus target cache length (the
    retrieved prompt's length minus the long prompt's); with ``augment``, ``dlogits [B, k+1, V]`` float32
    the draft's logits at each position of the last block (else None)."""

    offset: jax.Array = None
    dlogits: jax.Array = None


def augmented_logits(target, draft, beta: float, alpha: float):
    """RAPID's retrieval-augmented target logits: ``target + beta * mask * (softmax(draft) -
    softmax(target))`` with ``mask = softmax(draft) >= alpha * max softmax(draft)`` (per position)."""
    p = jax.nn.softmax(target.astype(jnp.float32), axis=-1)
    q = jax.nn.softmax(draft.astype(jnp.float32), axis=-1)
    mask = q >= alpha * jnp.max(q, axis=-1, keepdims=True)
    return target + beta * jnp.where(mask, q - p, 0.0)


@dataclasses.dataclass(frozen=True)
class RapidDrafter(DraftModelDrafter):
    """The target model drafting over the retrieved prompt (its own cache, the target's weights).
    ``draft_model``: the target model (the same weights are used: no `with_draft_params`).
    augment: None (exact) or beta of the retrieval-augmented target (lossy), with ``alpha``."""

    augment: Optional[float] = None
    alpha: float = 0.1

    own_params = False

    def __post_init__(self):
        super().__post_init__()
        if self.augment is not None:
            if not np.isfinite(self.augment) or self.augment < 0:
                raise ValueError(f"augment (beta) must be a finite number >= 0, got {self.augment!r}")
            if self.sample or self.stop_threshold is not None:
                raise ValueError("augment: the retrieval-augmented target is implemented for greedy verification "
                                 "with full-length drafts (no sampling, no stop_threshold)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")

    def init(self, model, params, prompts, prompt_lens, state, inputs):
        from jaxdec.core.steps import prefill
        ri = inputs.method
        if not isinstance(ri, RapidInputs):
            raise ValueError("RapidDrafter needs the retrieved draft prompts as inputs.method (RapidInputs): run it "
                             "with jaxdec.speculative.rapid.rapid_generate")
        if self.draft_model.vocab_size != model.vocab_size:
            raise ValueError("RapidDrafter's draft_model must be the target model")
        b = prompts.shape[0]
        dp, dl = ri.draft_prompts, ri.draft_lens.astype(jnp.int32)
        size = bucket(dp.shape[1] + state.capacity + self.num_tokens + 2)
        dcache = model.init_cache(b, size)
        _, dcache, _ = prefill(model, params, dp, dl, dcache)
        pend = jnp.stack([state.last, jnp.zeros_like(state.last)], axis=1)
        dlogits = None
        if self.augment is not None:
            dlogits = jnp.zeros((b, self.num_tokens + 1, model.vocab_size), jnp.float32)
        return RapidState(cache=dcache, pend=pend, npend=jnp.ones((b,), jnp.int32), l0=dcache.lengths,
                          drafted=jnp.full((b,), self.num_tokens, jnp.int32),
                          offset=dl - prompt_lens.astype(jnp.int32), dlogits=dlogits)

    def propose(self, model, dparams, state, keys):
        if self.augment is None:
            return super().propose(model, dparams, state, keys)
        from jaxdec.cache.kv import rollback
        from jaxdec.speculative.tree import Draft, TreeSpec
        ds = state.method.draft
        dm = self.draft_model
        l0 = ds.cache.lengths
        pos = l0[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
        out = dm(dparams, ds.pend, pos, ds.cache, logits_at=(ds.npend - 1)[:, None])
        dc = rollback(out.cache, l0 + ds.npend)

        def body(carry, _):  # greedy draft token, then feed it (k calls: the last gives the bonus position's q)
            cache, logits = carry
            x = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            o = dm(dparams, x[:, None], cache.lengths[:, None], cache)
            return (o.cache, o.logits[:, 0].astype(jnp.float32)), (x, logits)

        first = out.logits[:, 0].astype(jnp.float32)
        (dc, last), (toks, lg) = jax.lax.scan(body, (dc, first), None, length=self.num_tokens)
        toks = toks.T  # [B,k]
        dlogits = jnp.concatenate([jnp.swapaxes(lg, 0, 1), last[:, None]], axis=1)  # [B,k+1,V]
        dc = rollback(dc, l0 + ds.npend + self.num_tokens - 1)  # the last draft token is fed again by update
        b = toks.shape[0]
        draft = Draft(toks, TreeSpec.chain(self.num_tokens).parents_array(b), jnp.ones_like(toks, bool),
                      calls=jnp.asarray(self.num_tokens + 1, jnp.int32))
        return draft, ds.replace(cache=dc, l0=l0, drafted=jnp.full((b,), self.num_tokens, jnp.int32),
                                 dlogits=dlogits), state.cache

    def target_logits(self, logits, draft, dstate):
        """The logits the verifier reads: the target's, or with ``augment`` the retrieval-augmented ones."""
        if self.augment is None:
            return logits
        return augmented_logits(logits, dstate.dlogits, self.augment, self.alpha).astype(logits.dtype)

    def update(self, model, dparams, state, dstate, info):
        # the parent keeps the draft cache at the target's length; here it runs `offset` ahead or behind
        shifted = dataclasses.replace(info, start=info.start + dstate.offset)
        return super().update(model, dparams, state, dstate, shifted)


def rapid_generate(model, params, prompts, draft_prompts, *, num_tokens: int = 6, max_new_tokens: int = 64,
                   batch_size: Optional[int] = None, sampling=None, seed: int = 0, stop_threshold=None,
                   augment: Optional[float] = None, alpha: float = 0.1, **kw):
    """RAPID over long prompts: ``prompts`` (the long-context token ids the target reads) and
    ``draft_prompts`` (their retrieved short versions, `rapid_prompts`). sampling: None (greedy
    verification: exactly the greedy tokens) or `generate`'s sampling argument (speculative sampling).
    augment: beta of the retrieval-augmented target (lossy; greedy only), alpha its mask threshold.
    Other keywords go to `jaxdec.generate`. Returns its `Generation` (``stats["tau"]`` ...)."""
    from jaxdec.core.generate import generate
    from jaxdec.core.protocols import hook
    from jaxdec.speculative.engine import SpeculativeDecoder
    prompts = [list(map(int, p)) for p in prompts]
    draft_prompts = [list(map(int, p)) for p in draft_prompts]
    if len(prompts) != len(draft_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(draft_prompts)} draft prompts")
    ctx = hook(model, "max_position")
    for i, (p, d) in enumerate(zip(prompts, draft_prompts)):
        if not d:
            raise ValueError(f"draft prompt {i} is empty")
        need = len(p) + max_new_tokens + num_tokens + 2
        if ctx is not None and need > ctx:
            raise ValueError(f"long prompt {i} has {len(p)} tokens: with max_new_tokens={max_new_tokens} it needs "
                             f"{need} positions, beyond the model's context ({ctx})")
    by_prompt = {}
    for p, d in zip(prompts, draft_prompts):
        if by_prompt.setdefault(tuple(p), d) != d:
            raise ValueError("two equal prompts with different draft prompts")
    width = bucket(max(len(d) for d in draft_prompts))

    def add_drafts(inputs, chunk):
        arr = np.zeros((len(chunk), width), np.int32)
        lens = np.zeros((len(chunk),), np.int32)
        for r, unit in enumerate(chunk):
            d = by_prompt[tuple(int(t) for t in unit)]
            arr[r, :len(d)] = d
            lens[r] = len(d)
        return inputs.replace(method=RapidInputs(jnp.asarray(arr), jnp.asarray(lens)))

    sample = sampling is not None
    drafter = RapidDrafter(model, num_tokens, sample=sample, stop_threshold=stop_threshold, augment=augment,
                           alpha=alpha)
    dec = SpeculativeDecoder(drafter, "sampling" if sample else "greedy")
    return generate(model, params, prompts, decoder=dec, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    sampling=sampling, seed=seed, inputs_fn=add_drafts, **kw)
