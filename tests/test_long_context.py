"""Long prompts (issue 23): blockwise attention that follows committed lengths, chunked prefill, cache
sized by need, the whole context.

Blockwise attention is checked against the reference `attend` (the oracle) with the kernel tolerance
of shared/DESIGN.md (rtol=1e-5, atol=1e-6*max|ref|); fully masked rows output exact zeros; NaN planted
past every row's length never reaches the output.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdec.attention.blockwise import blockwise_attend
from jaxdec.attention.reference import attend, causal_block_mask


def assert_close(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(ref).all(), "reference has NaN/inf"
    assert np.isfinite(out).all(), "blockwise output has NaN/inf"
    atol = 1e-6 * float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=atol)


def tree_mask(rng, b, t):
    """Random ancestor-or-self masks [B,T,T] (parent of node i is some j < i, or none) and depths."""
    masks, deps = [], []
    for _ in range(b):
        par = [-1] + [int(rng.integers(-1, i)) for i in range(1, t)]
        m = np.zeros((t, t), bool)
        dep = np.zeros(t, np.int32)
        for i in range(t):
            j = i
            while j >= 0:
                m[i, j] = True
                j = par[j]
            dep[i] = 0 if par[i] < 0 else dep[par[i]] + 1
        masks.append(m)
        deps.append(dep)
    return np.stack(masks), np.stack(deps)


def make_case(seed, *, b, t, h, kvh, d, s, lengths, tree=False, cache_mask=False):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    q, kc, vc, kn, vn = f(b, t, h, d), f(b, s, kvh, d), f(b, s, kvh, d), f(b, t, kvh, d), f(b, t, kvh, d)
    lengths = np.asarray(lengths, np.int32)
    if tree:
        mask, dep = tree_mask(rng, b, t)
    else:
        mask, dep = np.asarray(causal_block_mask(b, t)), np.tile(np.arange(t, dtype=np.int32), (b, 1))
    q_pos = lengths[:, None] + dep
    cm = rng.random((b, t, s)) < 0.7 if cache_mask else None
    return dict(q=q, k_cache=kc, v_cache=vc, lengths=lengths, k_new=kn, v_new=vn, block_mask=mask,
                q_pos=q_pos, cache_mask=cm)


def plant_nan(case):
    """NaN in every cache slot at or past each row's length (keys and values)."""
    kc, vc = case["k_cache"].copy(), case["v_cache"].copy()
    for r, n in enumerate(case["lengths"]):
        kc[r, n:] = np.nan
        vc[r, n:] = np.nan
    return {**case, "k_cache": kc, "v_cache": vc}


def run_both(case, sliding_window=None, key_chunk=16, layout=None):
    args = {k: (None if v is None else jnp.asarray(v)) for k, v in case.items()}
    ref = attend(**args, sliding_window=sliding_window)
    bw = jax.jit(lambda a: blockwise_attend(**a, sliding_window=sliding_window, key_chunk=key_chunk,
                                            layout=layout))(args)
    return bw, ref


LAYOUTS = ["token", "head"]  # the cache loop's two layouts (jaxdec.attention.blockwise.CACHE_LAYOUT)


CASES = [
    # (b, t, h, kvh, s, lengths, tree, window, cache_mask, key_chunk)
    (4, 1, 9, 3, 40, [0, 7, 40, 23], False, None, False, 16),  # decode: empty, ragged, full cache; 40 % 16 != 0
    (3, 5, 6, 2, 64, [64, 0, 33], True, None, False, 16),  # tree blocks
    (3, 4, 4, 4, 48, [48, 17, 5], False, 9, False, 16),  # sliding window, MHA
    (2, 6, 8, 2, 50, [31, 50], True, 12, True, 16),  # tree + window + explicit cache mask
    (2, 3, 6, 3, 24, [0, 0], False, None, False, 512),  # chunk wider than the cache; nothing committed
    (2, 8, 9, 3, 96, [96, 41], False, None, False, 32),  # prefill-like causal block after a full cache
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_i", range(len(CASES)))
def test_blockwise_equals_reference_with_nan_past_lengths(case_i, layout):
    b, t, h, kvh, s, lengths, tree, window, cm, kc = CASES[case_i]
    case = make_case(case_i, b=b, t=t, h=h, kvh=kvh, d=16, s=s, lengths=lengths, tree=tree, cache_mask=cm)
    bw, ref = run_both(case, window, kc, layout)
    assert_close(bw, ref)
    bw_nan, _ = run_both(plant_nan(case), window, kc, layout)
    assert np.isfinite(np.asarray(bw_nan)).all(), "NaN past a row's length reached the output"
    assert_close(bw_nan, ref)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_i", range(len(CASES)))
def test_blockwise_head_major_cache(case_i, layout):
    """A head-major cache (`cache_layout="bksd"`, how KVCache stores it), whole or stacked and read at a layer:
    equal to the reference; with the "head" loop it is the very program of the slot-major cache (bitwise). A
    slot-major cache passed as head-major is read wrong (negative control)."""
    b, t, h, kvh, s, lengths, tree, window, cm, kc = CASES[case_i]
    case = make_case(case_i, b=b, t=t, h=h, kvh=kvh, d=16, s=s, lengths=lengths, tree=tree, cache_mask=cm)
    args = {k: (None if v is None else jnp.asarray(v)) for k, v in case.items()}
    ref = attend(**args, sliding_window=window)
    run = jax.jit(lambda a, cl, layer=None: blockwise_attend(**a, sliding_window=window, key_chunk=kc, layout=layout,
                                                             cache_layout=cl, layer=layer), static_argnums=1)
    slot_major = run(args, "bskd")
    head = {**args, "k_cache": jnp.swapaxes(args["k_cache"], 1, 2), "v_cache": jnp.swapaxes(args["v_cache"], 1, 2)}
    out = run(head, "bksd")
    assert_close(out, ref)
    if layout == "head":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(slot_major))
    stacked = {**head, "k_cache": jnp.stack([head["k_cache"] * 0.5, head["k_cache"]]),
               "v_cache": jnp.stack([head["v_cache"] * 0.5, head["v_cache"]])}
    np.testing.assert_array_equal(np.asarray(run(stacked, "bksd", 1)), np.asarray(out))
    if kvh > 1 and max(lengths) > 0:
        wrong = run({**args, "k_cache": args["k_cache"].reshape(head["k_cache"].shape),
                     "v_cache": args["v_cache"].reshape(head["v_cache"].shape)}, "bksd")
        assert not np.allclose(np.asarray(wrong), np.asarray(ref), atol=1e-3)


def test_head_major_cache_chunks_are_not_transposed():
    """The point of the head-major cache: a decode step's attention reads each chunk of keys/values in place.
    The compiled program of a stacked head-major read holds no transpose of a chunk; the slot-major read of
    the same values (negative control) transposes one for the dots."""
    b, kvh, s, d, h = 2, 3, 64, 16, 9
    rng = np.random.default_rng(0)
    kc = jnp.asarray(rng.normal(size=(2, b, s, kvh, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    kn = jnp.asarray(rng.normal(size=(b, 1, kvh, d)), jnp.float32)
    lens = jnp.asarray([40, 64], jnp.int32)

    def hlo(cache, cl):
        f = jax.jit(lambda c, i: blockwise_attend(q, c, c, lens, kn, kn, causal_block_mask(b, 1), lens[:, None],
                                                  layer=i, cache_layout=cl))
        return f.lower(cache, 1).compile().as_text()

    chunk = rf"f32\[{b},{kvh},{s},{d}\]"
    transposes = lambda text: re.findall(rf"= {chunk}\S* (?:transpose\(|fusion\([^\n]*calls=%fused_transpose|"  # noqa: E731
                                         rf"fusion\([^\n]*calls=%[\w.]*transpose)", text)
    named = lambda text: re.findall(rf"%\S*transpose\S* = {chunk}", text)  # noqa: E731
    old = hlo(kc, "bskd")
    new = hlo(jnp.swapaxes(kc, 2, 3), "bksd")
    assert named(old) or transposes(old), "negative control: the slot-major read should transpose a chunk"
    assert not named(new) and not transposes(new)


def test_blockwise_random_ragged():
    """Random ragged lengths in [0, S] (S not a multiple of the key chunk), GQA, trees, windows."""
    rng = np.random.default_rng(123)
    for i in range(4):
        b, t, s = int(rng.integers(1, 5)), int(rng.integers(1, 7)), int(rng.integers(1, 70))
        kvh = int(rng.choice([1, 2, 3]))
        h = kvh * int(rng.choice([1, 2, 3]))
        lengths = rng.integers(0, s + 1, size=b)
        lengths[0] = s if i % 2 else 0
        window = None if i % 3 else int(rng.integers(1, 20))
        case = make_case(1000 + i, b=b, t=t, h=h, kvh=kvh, d=8, s=s, lengths=lengths, tree=bool(i % 2))
        kc = int(rng.choice([8, 16, 64]))
        for layout in LAYOUTS:
            bw, ref = run_both(plant_nan(case), window, key_chunk=kc, layout=layout)
            assert_close(bw, ref)


def test_blockwise_fully_masked_rows_are_zero():
    case = make_case(7, b=2, t=3, h=4, kvh=2, d=8, s=20, lengths=[0, 5])
    case["block_mask"] = np.zeros_like(case["block_mask"])
    case["block_mask"][1] = np.asarray(causal_block_mask(1, 3))[0]
    bw, ref = run_both(plant_nan(case))
    assert np.all(np.asarray(bw)[0] == 0.0)
    assert_close(bw, ref)


def test_blockwise_trip_count_follows_lengths():
    """The cache loop is a while loop whose bound is traced (set by max(lengths) at run time), and no
    score tensor spans the whole cache."""
    case = make_case(3, b=1, t=1, h=9, kvh=3, d=64, s=4096, lengths=[256])
    args = {k: (None if v is None else jnp.asarray(v)) for k, v in case.items()}
    jaxpr = jax.make_jaxpr(lambda a: blockwise_attend(**a))(args)
    text = str(jaxpr)
    assert "while[" in text
    shapes = [tuple(v.aval.shape) for eq in _all_eqns(jaxpr.jaxpr) for v in eq.outvars]
    assert not any(4096 in sh and len(sh) >= 4 and sh[1] != 4096 for sh in shapes), \
        "a tensor spans the whole cache inside attention"
    # NaN everywhere past 256 slots: only the committed chunk is read
    bw, ref = run_both(plant_nan(case), key_chunk=512)
    assert_close(bw, ref)


def test_blockwise_window_skips_chunks_before_every_window():
    """With a sliding window the loop starts at the first chunk inside some query's window: NaN planted in
    committed slots that no query's window reaches (keys and values) never reaches the output, and the
    result still equals the reference."""
    case = make_case(11, b=2, t=2, h=6, kvh=2, d=16, s=128, lengths=[120, 100])
    case["q_pos"] = case["lengths"][:, None] + np.arange(2)[None, :]
    window = 20  # row 0 sees positions >= 101, row 1 >= 81: slots < 80 are in no window
    ref = attend(**{k: (None if v is None else jnp.asarray(v)) for k, v in case.items()}, sliding_window=window)
    kc, vc = case["k_cache"].copy(), case["v_cache"].copy()
    kc[:, :64], vc[:, :64] = np.nan, np.nan  # chunks 0-3 of 16 slots lie before every window
    for layout in LAYOUTS:
        bw, _ = run_both({**case, "k_cache": kc, "v_cache": vc}, window, key_chunk=16, layout=layout)
        assert_close(bw, ref)
    # control: without skipping, those NaN keys would be read (their scores are NaN before masking)
    from jaxdec.attention.blockwise import chunk_range
    first, end = chunk_range(jnp.asarray(case["lengths"]), 128, 16, jnp.asarray(case["q_pos"]), window)
    assert (int(first), int(end)) == (5, 8)
    assert tuple(int(x) for x in chunk_range(jnp.asarray(case["lengths"]), 128, 16)) == (0, 8)


# ---------------------------------------------------------------------------------------------------
# shared-prefix (Hydragen) caches follow the same lengths rule

def _hydra_case(seed, *, b, t, h, kvh, d, p_cap, plen, s, suf, groups=None, tree=False):
    """Hydragen inputs with NaN planted past the prefix length and past every suffix length, and the
    equivalent ordinary cache (prefix ++ suffix per row, finite) for the reference `attend`."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    g = 1 if groups is None else groups
    pk, pv = f(g, p_cap, kvh, d), f(g, p_cap, kvh, d)
    plen = np.asarray(plen if groups is not None else [plen], np.int32).reshape(g)
    sk, sv = f(b, s, kvh, d), f(b, s, kvh, d)
    suf = np.asarray(suf, np.int32)
    q, kn, vn = f(b, t, h, d), f(b, t, kvh, d), f(b, t, kvh, d)
    row_plen = np.repeat(plen, b // g)
    if tree:
        mask, dep = tree_mask(rng, b, t)
    else:
        mask, dep = np.asarray(causal_block_mask(b, t)), np.tile(np.arange(t, dtype=np.int32), (b, 1))
    q_pos = (row_plen + suf)[:, None] + dep
    full = p_cap + s
    kc, vc = np.zeros((b, full, kvh, d), np.float32), np.zeros((b, full, kvh, d), np.float32)
    for r in range(b):
        n0, n1 = row_plen[r], suf[r]
        kc[r, :n0], vc[r, :n0] = pk[r // (b // g), :n0], pv[r // (b // g), :n0]
        kc[r, n0:n0 + n1], vc[r, n0:n0 + n1] = sk[r, :n1], sv[r, :n1]
    for gi in range(g):
        pk[gi, plen[gi]:], pv[gi, plen[gi]:] = np.nan, np.nan
    for r in range(b):
        sk[r, suf[r]:], sv[r, suf[r]:] = np.nan, np.nan
    if groups is None:
        pk, pv, plen_arg = pk[0], pv[0], int(plen[0])
    else:
        plen_arg = plen
    hyd = dict(q=q, prefix_k=pk, prefix_v=pv, prefix_len=plen_arg, suffix_k=sk, suffix_v=sv, suffix_lengths=suf,
               k_new=kn, v_new=vn, block_mask=mask, q_pos=q_pos)
    ref = dict(q=q, k_cache=kc, v_cache=vc, lengths=row_plen + suf, k_new=kn, v_new=vn, block_mask=mask, q_pos=q_pos)
    return hyd, ref


HYDRA_CASES = [
    # (b, t, h, kvh, p_cap, plen, s, suf, groups, tree, window)
    (4, 1, 9, 3, 40, 23, 40, [0, 7, 40, 33], None, False, None),  # decode: empty / full suffix, GQA
    (3, 5, 6, 2, 64, 64, 24, [3, 0, 24], None, True, None),  # tree blocks, full prefix
    (4, 3, 6, 3, 48, [0, 37], 40, [5, 17, 0, 40], 2, False, 11),  # grouped (one empty prefix), window
    (2, 4, 4, 4, 80, 70, 32, [31, 2], None, True, 9),  # tree + window, MHA: prefix chunks skipped
    (2, 1, 9, 3, 16, 0, 16, [0, 0], None, False, None),  # nothing visible anywhere: zeros
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_i", range(len(HYDRA_CASES)))
def test_hydragen_equals_reference_with_nan_past_lengths(case_i, layout, monkeypatch):
    from jaxdec.attention import blockwise
    from jaxdec.attention.hydragen import hydragen_attend
    monkeypatch.setattr(blockwise, "CACHE_LAYOUT", layout)  # the suffix loop's layout
    b, t, h, kvh, p_cap, plen, s, suf, groups, tree, window = HYDRA_CASES[case_i]
    hyd, ref_args = _hydra_case(case_i, b=b, t=t, h=h, kvh=kvh, d=16, p_cap=p_cap, plen=plen, s=s, suf=suf,
                                groups=groups, tree=tree)
    empty = groups is None and plen == 0 and not any(suf)
    if empty:  # no key at all (no prefix, no suffix, block keys masked): zeros
        hyd["block_mask"] = ref_args["block_mask"] = np.zeros_like(hyd["block_mask"])
    ref = attend(**{k: jnp.asarray(v) for k, v in ref_args.items()}, sliding_window=window)
    out = jax.jit(lambda a: hydragen_attend(**a, sliding_window=window))({k: jnp.asarray(v) for k, v in hyd.items()})
    if empty:
        assert np.all(np.asarray(out) == 0.0)
    assert_close(out, ref)


def test_hydragen_reads_up_to_the_prefix_length_only():
    """The prefix loop's trip count follows prefix_len (traced), not the prefix buffer: a while loop in the
    traced program, and no score tensor spans the whole 4096-slot prefix."""
    from jaxdec.attention.hydragen import hydragen_attend
    hyd, _ = _hydra_case(5, b=2, t=1, h=9, kvh=3, d=64, p_cap=4096, plen=300, s=1024, suf=[3, 9])
    args = {k: jnp.asarray(v) for k, v in hyd.items()}
    jaxpr = jax.make_jaxpr(lambda a: hydragen_attend(**a))(args)
    assert str(jaxpr).count("while[") >= 2  # prefix and suffix loops
    shapes = [tuple(v.aval.shape) for eq in _all_eqns(jaxpr.jaxpr) for v in eq.outvars]
    assert not any(4096 in sh and sh[0] != 4096 for sh in shapes), "a tensor spans the whole prefix buffer"


def _all_eqns(jaxpr):
    for eq in jaxpr.eqns:
        yield eq
        for p in eq.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _all_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)


# ---------------------------------------------------------------------------------------------------
# chunked prefill on the default model

def stdlib_prompt_ids(tokenizer, n_tokens: int, module: str = "json.decoder") -> list:
    """``n_tokens`` token ids of a standard-library module's source (text that ships with Python)."""
    import importlib
    import inspect
    src = inspect.getsource(importlib.import_module(module))
    ids = tokenizer.encode(src)
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from jaxdec.models.gguf_loader import open_gguf
    from jaxdec.models.tokenizer import Tokenizer
    return Tokenizer.from_gguf(open_gguf(gguf_path))


def _greedy(model, params, prompts, chunk, new=8):
    import jaxdec
    g = jaxdec.generate(model, params, prompts, max_new_tokens=new, prefill_chunk=chunk, stop_ids=())
    return g.tokens


def _ragged(tokenizer, lens):
    mods = ["json.decoder", "textwrap", "fractions", "shlex"]
    return [stdlib_prompt_ids(tokenizer, n, mods[i % len(mods)]) for i, n in enumerate(lens)]


def test_chunked_prefill_same_tokens_batch1(model_f32, tokenizer):
    model, params = model_f32
    p = _ragged(tokenizer, [600])
    assert _greedy(model, params, p, 64) == _greedy(model, params, p, None)


def test_chunked_prefill_same_tokens_ragged4(model_f32, tokenizer):
    """Rows whose last prompt token falls in different chunks (and one shorter than a chunk). CI size:
    C=128 on prompts of up to 300 tokens; C=512 on 1-2k-token prompts is in the slow tier."""
    model, params = model_f32
    p = _ragged(tokenizer, [300, 100, 220, 260])
    assert _greedy(model, params, p, 128) == _greedy(model, params, p, None)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64, 512])
@pytest.mark.parametrize("lens", [[1500], [2048, 999, 1616, 1200]])
def test_chunked_prefill_same_tokens_full(model_f32, tokenizer, chunk, lens):
    model, params = model_f32
    p = _ragged(tokenizer, lens)
    assert _greedy(model, params, p, chunk, new=16) == _greedy(model, params, p, None, new=16)


def test_chunked_prefill_has_no_prompt_by_cache_scores(model_f32):
    """The traced prefill of a 2048-token block into a 4096-slot cache with C=512 holds no tensor that
    spans both the prompt block (T) and the cache (S): the largest score block is [C, key chunk]."""
    from jaxdec.core.steps import prefill
    model, params = model_f32
    t, s = 2048, 4096
    toks = jnp.zeros((1, t), jnp.int32)
    lens = jnp.full((1,), t, jnp.int32)
    m512 = model.with_prefill_chunk(512)
    jaxpr = jax.make_jaxpr(lambda p, x, n: prefill(m512, p, x, n, m512.init_cache(1, s)))(params, toks, lens)
    shapes = [tuple(v.aval.shape) for eq in _all_eqns(jaxpr.jaxpr) for v in eq.outvars if hasattr(v.aval, "shape")]
    assert any(512 in sh for sh in shapes)
    cache_shape = m512.init_cache(1, s).k.shape
    bad = [sh for sh in shapes if t in sh and s in sh]
    assert not bad, f"[T,S]-sized tensors in the chunked prefill: {bad[:3]}"
    big = [sh for sh in shapes if np.prod(sh) >= t * s and sh != cache_shape and model.vocab_size not in sh]
    assert not big, f"tensors of >= T*S elements besides the cache and the vocabulary: {big[:3]}"
    # control: the one-shot prefill with the reference attention does build [T,S]-sized scores
    one = model.with_attention("reference").with_prefill_chunk(None)
    jaxpr1 = jax.make_jaxpr(lambda p, x, n: prefill(one, p, x, n, one.init_cache(1, s)))(params, toks, lens)
    shapes1 = [tuple(v.aval.shape) for eq in _all_eqns(jaxpr1.jaxpr) for v in eq.outvars if hasattr(v.aval, "shape")]
    assert any(t in sh and s in sh for sh in shapes1)


# ---------------------------------------------------------------------------------------------------
# the whole context through the CLI

CONTEXT = 8192


def _text_of_n_tokens(tokenizer, n: int) -> str:
    """Standard-library source text that the tokenizer encodes to exactly ``n`` tokens."""
    ids = stdlib_prompt_ids(tokenizer, n + 64, "argparse")
    for k in range(n, n + 64):
        text = tokenizer.decode(ids[:k])
        if len(tokenizer.encode(text)) == n:
            return text
    raise AssertionError(f"no prefix of the source encodes to {n} tokens")


def test_cli_one_past_the_context_is_a_clear_error(tokenizer, tmp_path, capsys):
    from jaxdec.cli import main
    new = 8
    pf = tmp_path / "p.jsonl"
    import json
    pf.write_text(json.dumps({"prompt": _text_of_n_tokens(tokenizer, CONTEXT - new + 1)}) + "\n")
    capsys.readouterr()
    rc = main(["generate", "--prompts-file", str(pf), "--max-new-tokens", str(new), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"exceeds the model's context ({CONTEXT})" in err and str(CONTEXT + 1) in err


@pytest.mark.slow
def test_cli_full_context_prompt_within_rss_budget(tokenizer, tmp_path):
    """A prompt filling the model's whole context (8184 prompt + 8 new tokens = 8192 positions) decodes
    greedily with float32 weights in a fresh process whose peak RSS stays within 2.5 GB."""
    import json
    import os
    import subprocess
    import sys
    new = 8
    pf, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    pf.write_text(json.dumps({"prompt": _text_of_n_tokens(tokenizer, CONTEXT - new)}) + "\n")
    code = ("import resource, sys; from jaxdec.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, "generate", "--prompts-file", str(pf), "--weights", "f32",
                           "--max-new-tokens", str(new), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss_gb = int(proc.stderr.split("MAXRSS_KB")[-1].split()[0]) / 2 ** 20
    row = json.loads(out.read_text().splitlines()[0])
    assert len(row["prompt_ids"]) == CONTEXT - new and len(row["tokens"]) >= 1
    assert rss_gb <= 2.5, f"peak RSS {rss_gb:.2f} GB"


# ---------------------------------------------------------------------------------------------------
# one compiled program for every batch of a prompt list; batches sorted by length

def _toy():
    from jaxdec.testing.toy_speculative import TrigramModel, random_table
    model = TrigramModel(11, num_layers=3)  # its own config: no other test shares its programs
    return model, {"table": jnp.asarray(random_table(5, 11))}


def _toy_prompts():
    rng = np.random.default_rng(0)
    lens = [3, 100, 5, 90, 4, 110, 2]  # buckets of 64 and 128 slots
    return [[int(x) for x in rng.integers(0, 11, size=n)] for n in lens]


def _run_tokens(run):
    """Each unit's new tokens, in the order of run.units (through Run.positions)."""
    out = []
    for bi, row in run.positions():
        st = run.results[bi][0]
        out.append(np.asarray(st.tokens)[row, :int(np.asarray(st.num_new)[row])].tolist())
    return out


def _traces():
    from jaxdec.core import loop
    return sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:"))


def test_driver_sorts_batches_by_length_keeping_output_order():
    """batch_size 2 over prompts of 2-110 tokens: the driver runs them longest first (lower batch cost),
    maps every unit back to its input position, and the tokens equal the unsorted run's; all batches of
    a run share one compiled program (one trace for a fresh shape, not one per batch)."""
    from jaxdec.core import driver
    from jaxdec.core.token import TokenDecoder
    model, params = _toy()
    prompts = _toy_prompts()
    kw = dict(max_new_tokens=6, batch_size=2, stop_ids=(), capacity=48)
    before = _traces()
    plain = driver.run(TokenDecoder(), model, params, prompts, **kw)
    assert _traces() - before == 1  # positive control of the count: a fresh shape traces once...
    assert plain.order == list(range(len(prompts)))
    before = _traces()
    srt = driver.run(TokenDecoder(), model, params, prompts, sort_by_length=True, **kw)
    assert _traces() - before == 0  # ...and 4 batches of sorted rows reuse that program
    assert srt.order != plain.order and [len(srt.units[u]) for u in srt.order] == sorted(
        (len(p) for p in prompts), reverse=True)
    assert driver.batch_cost([len(srt.units[u]) for u in srt.order], 2) < driver.batch_cost(
        [len(p) for p in prompts], 2)
    assert _run_tokens(srt) == _run_tokens(plain)
    assert srt.units == plain.units  # units stay in input order
    # the identity when sorting cannot help (one batch), or when per-batch inputs follow the input order
    assert driver.length_order(prompts, len(prompts), 1) == list(range(len(prompts)))
    one = driver.run(TokenDecoder(), model, params, prompts, sort_by_length=True, inputs_fn=lambda i, c: i, **kw)
    assert one.order == list(range(len(prompts)))


def test_longest_prompt_gives_every_call_one_program():
    """A prompt list split over several calls (the CLI's --batch-size batches) sized by the whole list's
    longest prompt reuses one compiled program; the control without it compiles a second one."""
    from jaxdec.core import driver
    from jaxdec.core.token import TokenDecoder
    model, params = _toy()
    prompts = _toy_prompts()
    longest = max(len(p) for p in prompts)
    kw = dict(max_new_tokens=6, batch_size=2, stop_ids=(), capacity=64)
    first = driver.run(TokenDecoder(), model, params, prompts[1:3], longest_prompt=longest, **kw)
    before = _traces()
    second = driver.run(TokenDecoder(), model, params, prompts[4:5] + prompts[0:1], longest_prompt=longest, **kw)
    assert _traces() - before == 0
    assert (second.cache_size, second.prompt_bucket) == (first.cache_size, first.prompt_bucket)
    plain = driver.run(TokenDecoder(), model, params, prompts[4:5] + prompts[0:1], **kw)
    assert _traces() - before == 1 and plain.prompt_bucket < first.prompt_bucket  # control: a smaller bucket
    assert _run_tokens(plain) == _run_tokens(second)


def test_generate_batches_by_length_and_keeps_input_order():
    """`generate` with batch_size 2 over ragged prompts: the driver batched them by length (Run order is
    not the identity), and every output row equals the one-batch run of the same prompts (no sorting
    possible there), in the input order."""
    import jaxdec
    model, params = _toy()
    prompts = _toy_prompts()
    kw = dict(max_new_tokens=6, stop_ids=(), capacity=48)
    one = jaxdec.generate(model, params, prompts, **kw)
    two = jaxdec.generate(model, params, prompts, batch_size=2, **kw)
    assert two.prompt_ids == prompts and two.tokens == one.tokens and two.finish_reason == one.finish_reason
    from jaxdec.core import driver
    assert driver.length_order(prompts, 2, 1) != list(range(len(prompts)))  # the sorted path ran


def test_cli_batches_of_a_prompts_file_share_one_program(tokenizer, tmp_path, capsys):
    """`jaxdec generate --prompts-file F --batch-size 1` with prompts in different length buckets sizes one
    prompt bucket and cache for the whole file: at most one new trace for three batches (a first use of
    the shape), and the rows come out in the file's order."""
    import json
    from jaxdec.cli import main
    from jaxdec.core import loop
    texts = [_text_of_n_tokens(tokenizer, n) for n in (20, 150, 70)]  # buckets of 64, 192 and 128 slots
    pf, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    pf.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    before = sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:"))
    rc = main(["generate", "--prompts-file", str(pf), "--batch-size", "1", "--max-new-tokens", "2", "--quiet",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    traces = sum(v for k, v in loop.TRACE_COUNTS.items() if k.startswith("run:")) - before
    assert traces <= 1, f"{traces} traces for three batches of one prompts file"
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(r["prompt_ids"]) for r in rows] == [len(tokenizer.encode(t)) for t in texts]
