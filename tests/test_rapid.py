"""RAPID (`jaxdec.speculative.rapid`): retrieval, the retrieved-context drafter, exactness, bad input.

Toy part (`TrigramModel`): exact greedy tokens in ragged batches where the draft prompt is shorter or
longer than the long one (the draft cache runs at a per-row offset), accepts and rejects; a drafter
that never proposes gets τ = 1 and fails the same check (negative control). The retrieval-augmented
target option (lossy) equals an independent numpy decode of that distribution, in any batching.

Real default model: long prompts built at test time from standard-library sources that ship with
Python (``inspect.getsource``, cut at ``max_chars``) with the questions in
tests/data/rapid_long_prompts.jsonl; 2k-6k tokens each. Greedy verification gives exactly the greedy
tokens (DESIGN near-tie rule). Both real-model tiers are ``slow`` (`make acceptance`): 2k-token prefills
cost minutes on the 2-core CI machine (measured: the two "ci" prompts, 2077 and 2013 tokens x 24 new,
one ragged batch and one at batch 1: 7 min wall under load 9, τ 4.46), so CI runs the toy tests above;
the "full" tier: the ten held-out prompts (2.2k-4k tokens) x 64 new tokens at batch 1 and in ragged
batches of 4, τ reported.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
import peer  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402
from test_speculative import SilentDrafter, assert_accepts_and_rejects  # noqa: E402

from jaxdec import generate  # noqa: E402
from jaxdec.speculative import SpeculativeDecoder  # noqa: E402
from jaxdec.speculative.rapid import (BM25Retriever, RapidDrafter, chunk_text, rapid_generate,  # noqa: E402
                                      rapid_prompts, retrieve_context)
from jaxdec.testing.toy_speculative import TrigramModel, random_table  # noqa: E402

LONG = os.path.join(os.path.dirname(__file__), "data", "rapid_long_prompts.jsonl")
TEMPLATE = ("Here is the source code of the Python standard-library module {module}:\n\n{{context}}\n\n"
            "Question: {{question}}\nAnswer in one or two sentences.")


def test_chunks_and_bm25_ranking():
    text = "".join(f"line {i} about nothing in particular\n" for i in range(200))
    text = text.replace("line 120 about", "line 120 about the frobnicate function that reverses lists, about")
    chunks = chunk_text(text, 300)
    assert "".join(chunks) == text and max(len(c) for c in chunks) <= 300 and len(chunks) > 10
    assert chunk_text("x" * 25 + "\nyy\n", 10) == ["x" * 10, "x" * 10, "x" * 5 + "\nyy\n"]
    r = BM25Retriever(chunks)
    top = r.rank("what does frobnicate do?", 3)
    assert "frobnicate" in chunks[top[0]] and len(top) == 3
    ctx = retrieve_context(text, "frobnicate", k=2, chunk_chars=300)
    assert "frobnicate" in ctx and len(ctx) < 700


def test_bad_input():
    with pytest.raises(RuntimeError, match="no index"):
        BM25Retriever().rank("anything", 2)
    with pytest.raises(ValueError, match="non-empty list"):
        BM25Retriever([])
    with pytest.raises(ValueError, match="k must be"):
        BM25Retriever(["alpha beta", "gamma"]).rank("alpha", 0)
    assert BM25Retriever(["a b", "- -", "c"]).rank("alpha", 2) == [0, 1]  # nothing searchable: document order
    with pytest.raises(ValueError, match="chunk_chars"):
        chunk_text("abc", 0)
    with pytest.raises(ValueError, match="2 documents but 1 questions"):
        rapid_prompts(["a", "b"], ["q"], lambda s: [1])
    model = TrigramModel(12, eos_ids=(1,))
    params = {"table": jnp.asarray(random_table(0, 12))}
    with pytest.raises(ValueError, match="needs the retrieved draft prompts"):  # no RapidInputs
        generate(model, params, [[2, 3]], decoder=SpeculativeDecoder(RapidDrafter(model, 3)), max_new_tokens=4)
    with pytest.raises(ValueError, match="1 prompts but 2 draft prompts"):
        rapid_generate(model, params, [[2, 3]], [[2], [3]], max_new_tokens=4)


def test_prompt_beyond_model_context_is_refused(model_f32):
    model, params = model_f32
    with pytest.raises(ValueError, match=r"long prompt 1 has 8180 tokens: .* beyond the model's context \(8192\)"):
        rapid_generate(model, params, [[5] * 100, [5] * 8180], [[5] * 10, [5] * 10], max_new_tokens=16)


def test_toy_exact_ragged_with_offsets():
    v = 16
    model = TrigramModel(v, eos_ids=(1,))
    tab = random_table(2, v, 3.0)
    tab[:, :, 1] -= 3.0
    params = {"table": jnp.asarray(tab)}
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(2, v, size=n))) for n in (40, 7, 90, 25, 60)]
    # the toy reads the last two tokens: a draft prompt ending like the long one drafts its distribution; the
    # others differ in their last token (the first drafts are rejected, later ones follow the shared output)
    a, b, c, d, e = prompts
    drafts = [a[-5:], b[-30:], [int(rng.integers(2, v))] + c[-3:-1] + [(c[-1] + 1) % v or 2], d[-2:] * 40, e[:]]
    assert len(drafts[3]) > len(prompts[3])  # one draft prompt longer than its long prompt (negative offset)
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=30)
    for bs in (5, 2):
        out = rapid_generate(model, params, prompts, drafts, num_tokens=4, max_new_tokens=30, batch_size=bs)
        assert out.tokens == ref.tokens and out.finish_reason == ref.finish_reason, bs
        assert_accepts_and_rejects(out.stats, f"rapid b{bs}")
        assert out.stats["draft_calls"] > 0
    silent = generate(model, params, prompts, decoder=SpeculativeDecoder(SilentDrafter()), max_new_tokens=30)
    assert silent.tokens == ref.tokens and silent.stats["tau"] == 1.0
    with pytest.raises(AssertionError, match="no draft token accepted"):
        assert_accepts_and_rejects(silent.stats)



def _augmented_reference(tab, prompt, draft, beta, alpha, max_new, eos=1):
    """Greedy decoding of RAPID's retrieval-augmented distribution on the trigram toy, in numpy: the first
    token from the target alone (chosen at prefill), then argmax of z_t + beta * mask * (q_d - p_t), the
    target reading prompt + output and the draft reading draft prompt + output (each its last two tokens)."""
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()
    t, d, out = [0] + list(prompt), [0] + list(draft), []  # 0: the toy's `prev` before the first token
    while len(out) < max_new:
        zt = tab[t[-2], t[-1]].astype(np.float64)
        if out:
            q, p = softmax(tab[d[-2], d[-1]].astype(np.float64)), softmax(zt)
            zt = zt + beta * np.where(q >= alpha * q.max(), q - p, 0.0)
        y = int(np.argmax(zt))
        out.append(y)
        t.append(y)
        d.append(y)
        if y == eos:
            break
    return out


def test_toy_retrieval_augmented_target_option():
    v = 16
    model = TrigramModel(v, eos_ids=(1,))
    tab = random_table(4, v, 1.0)
    params = {"table": jnp.asarray(tab)}
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(2, v, size=n))) for n in (30, 5, 64)]
    drafts = [list(map(int, rng.integers(2, v, size=n))) for n in (6, 9, 3)]  # unrelated short contexts
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=24)
    same = rapid_generate(model, params, prompts, drafts, num_tokens=4, max_new_tokens=24, augment=0.0)
    assert same.tokens == ref.tokens  # beta = 0 is the plain target
    beta = 6.0  # large enough to move tokens on this table (beta <= 3 changes none of them)
    want = [_augmented_reference(tab, p, d, beta, 0.1, 24) for p, d in zip(prompts, drafts)]
    assert want != ref.tokens  # the option changes the output here (lossy, as named)
    for bs in (3, 2):  # the output does not depend on where blocks start (ragged rows, filler rows)
        out = rapid_generate(model, params, prompts, drafts, num_tokens=4, max_new_tokens=24, augment=beta,
                             batch_size=bs)
        assert out.tokens == want, bs
    with pytest.raises(ValueError, match="augment"):
        RapidDrafter(model, 3, augment=-1.0)
    with pytest.raises(ValueError, match="greedy verification"):
        RapidDrafter(model, 3, sample=True, augment=1.0)

# ------------------------------------------------------------------------------------------------
# Real default model on long standard-library prompts
# ------------------------------------------------------------------------------------------------

def long_documents(split):
    """(documents, questions, modules) of one split of tests/data/rapid_long_prompts.jsonl."""
    with open(LONG) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    docs = []
    for r in rows:
        src = inspect.getsource(importlib.import_module(r["module"]))
        cut = src[:r["max_chars"]]
        docs.append(cut[:cut.rfind("\n") + 1] if len(src) > r["max_chars"] else src)
    return docs, [r["question"] for r in rows], [r["module"] for r in rows]


def long_prompt_ids(split, k=4, chunk_chars=800):
    """(long prompt ids, draft prompt ids) of a split: the peer's chat template, BM25's best k chunks."""
    docs, questions, modules = long_documents(split)
    full, draft = [], []
    for d, q, m in zip(docs, questions, modules):
        f, dr = rapid_prompts([d], [q], peer.peer_chat_ids, template=TEMPLATE.format(module=m), k=k,
                               chunk_chars=chunk_chars)
        full += f
        draft += dr
    return full, draft


TIERS = {"ci": dict(split="ci", max_new=24, b1=1, bs=2), "full": dict(split="heldout", max_new=64, b1=10, bs=4)}


@pytest.fixture(scope="module", params=[pytest.param("ci", marks=pytest.mark.slow),
                                        pytest.param("full", marks=pytest.mark.slow)])
def long_prompts(request, model_f32):
    model, params = model_f32
    size = TIERS[request.param]
    full, draft = long_prompt_ids(size["split"])
    lens = [len(p) for p in full]
    assert all(2000 <= n <= 6000 for n in lens), lens
    assert all(len(d) < n // 2 for d, n in zip(draft, lens)), [len(d) for d in draft]
    ref = generate(model, params, full, method="greedy", max_new_tokens=size["max_new"], batch_size=size["bs"])
    return {**size, "model": model, "params": params, "full": full, "draft": draft, "ref": ref,
            "logits": lazy_teacher_logits(model, params, full, ref.tokens),
            "max_dlogit": lazy_block_vs_step_dlogit(model, params, full[0], 16)}


def _exact(lp, out, idx, label):
    pairs = [(f"{label} prompt {i}", out.tokens[j], lp["ref"].tokens[i], lp["logits"][i]) for j, i in enumerate(idx)]
    neartie.assert_sequences_match(pairs, lp["max_dlogit"])


def test_real_long_prompts_exact_ragged(long_prompts):
    lp = long_prompts
    assert len({len(p) for p in lp["full"]}) == len(lp["full"])  # ragged
    out = rapid_generate(lp["model"], lp["params"], lp["full"], lp["draft"], max_new_tokens=lp["max_new"],
                         batch_size=lp["bs"])
    _exact(lp, out, range(len(lp["full"])), f"rapid b{lp['bs']}")
    print(f"RAPID long prompts ({[len(p) for p in lp['full']]} tokens, drafts {[len(d) for d in lp['draft']]}): "
          f"τ {out.stats['tau']:.3f}, acceptance {out.stats['acceptance_per_position']}")
    assert out.stats["tau"] > 1.0 and out.stats["draft_calls"] > 0


def test_real_long_prompts_exact_batch1(long_prompts):
    lp = long_prompts
    idx = list(range(lp["b1"]))
    out = rapid_generate(lp["model"], lp["params"], [lp["full"][i] for i in idx], [lp["draft"][i] for i in idx],
                         max_new_tokens=lp["max_new"], batch_size=1)
    _exact(lp, out, idx, "rapid b1")
