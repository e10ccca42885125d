"""Beam search and diverse beam search on a tiny table model, against HF `generate` on the same model.

The peer here is transformers' own beam search driving a torch copy of the table model (defined in
this file; it imports nothing from jaxdec), so every branch of HF's scoring (length penalty of any
sign, early_stopping True/False/"never", several EOS ids, min_new_tokens) is checked exactly and fast.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 8
MAX_POS = 32
PROMPTS = [[1, 2], [3], [4, 5, 6], [7, 1]]


# ------------------------------------------------------------------ the torch peer of the table model
class ToyConfig(transformers.PretrainedConfig):
    model_type = "jaxdec_test_toy_table"

    def __init__(self, vocab_size=V, **kw):
        self.vocab_size = vocab_size
        super().__init__(**kw)


class ToyLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """logits at position p = A[x_p] + C[x_{p-1}] + D[p] (C[V] when p == 0); no cache."""

    config_class = ToyConfig
    main_input_name = "input_ids"

    def __init__(self, config, a=None, c=None, d=None):
        super().__init__(config)
        self.a = torch.nn.Parameter(torch.tensor(a), requires_grad=False)
        self.c = torch.nn.Parameter(torch.tensor(c), requires_grad=False)
        self.d = torch.nn.Parameter(torch.tensor(d), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kw):
        from transformers.modeling_outputs import CausalLMOutput
        b, t = input_ids.shape
        prev = torch.cat([torch.full((b, 1), self.config.vocab_size, dtype=input_ids.dtype), input_ids[:, :-1]], 1)
        pos = torch.arange(t).clamp(max=self.d.shape[0] - 1)
        return CausalLMOutput(logits=self.a[input_ids] + self.c[prev] + self.d[pos][None])


def make_params(seed, scale=1.5, eos_bias=0.0, eos_ids=(0,)):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, scale, (V, V)).astype(np.float32)
    c = rng.normal(0, 1.0, (V + 1, V)).astype(np.float32)
    d = rng.normal(0, 0.5, (MAX_POS, V)).astype(np.float32)
    for e in eos_ids:
        a[:, e] += eos_bias
    return {"A": a, "C": c, "D": d}


def hf_beams(params, prompt, eos_ids, **kw):
    cfg = ToyConfig(vocab_size=V, eos_token_id=list(eos_ids), pad_token_id=eos_ids[0])
    m = ToyLM(cfg, params["A"], params["C"], params["D"]).eval()
    nb = kw["num_beams"]
    out = m.generate(torch.tensor([prompt]), do_sample=False, use_cache=False, num_return_sequences=nb,
                     eos_token_id=list(eos_ids), pad_token_id=eos_ids[0], output_scores=True,
                     return_dict_in_generate=True, **kw)
    seqs = out.sequences[:, len(prompt):].tolist()
    res = []
    for s, sc in zip(seqs, out.sequences_scores.tolist()):
        # strip HF's padding after the first EOS
        cut = next((i + 1 for i, t in enumerate(s) if t in eos_ids), len(s))
        res.append((s[:cut], sc))
    return res


def jax_model():
    from jaxdec.testing.toy_search import TableModel
    return TableModel(vocab_size=V, max_position=MAX_POS, eos_ids=(0,))


def to_jax(params):
    import jax.numpy as jnp
    return {k: jnp.asarray(v) for k, v in params.items()}


def assert_same_beams(ours, ref, label):
    assert len(ours) == len(ref), label
    for j, (o, (rt, rs)) in enumerate(zip(ours, ref)):
        assert o["tokens"] == rt, f"{label}: beam {j}: ours {o['tokens']} vs HF {rt}\nours {ours}\nHF {ref}"
        assert abs(o["score"] - rs) <= 1e-5 * max(1.0, abs(rs)), f"{label}: beam {j} score {o['score']} vs {rs}"


SETTINGS = [(lp, es) for lp in (1.0, 0.0, 2.0, -0.7) for es in (False, True, "never")]


@pytest.mark.parametrize("num_beams", [2, 3, 5])
def test_beam_search_equals_hf_every_setting(num_beams):
    from jaxdec.search.beam import beam_search
    model = jax_model()
    for seed, (lp, es) in enumerate(SETTINGS):
        params = make_params(seed, eos_bias=1.0)
        g = beam_search(model, to_jax(params), PROMPTS, num_beams=num_beams, max_new_tokens=7,
                        length_penalty=lp, early_stopping=es)
        for i, p in enumerate(PROMPTS):
            ref = hf_beams(params, p, (0,), num_beams=num_beams, max_new_tokens=7, length_penalty=lp,
                           early_stopping=es)
            assert_same_beams(g.extras["beams"][i], ref, f"beams={num_beams} lp={lp} es={es} prompt={p}")
            assert g.tokens[i] == ref[0][0]


def test_beam_search_equals_hf_two_eos_and_min_new_tokens():
    from jaxdec.search.beam import beam_search
    model = jax_model()
    eos = (0, 5)
    for seed, (nb, min_new) in enumerate(itertools.product((2, 3), (0, 3))):
        params = make_params(100 + seed, eos_bias=1.5, eos_ids=eos)
        g = beam_search(model, to_jax(params), PROMPTS, num_beams=nb, max_new_tokens=6, min_new_tokens=min_new,
                        stop_ids=eos)
        for i, p in enumerate(PROMPTS):
            ref = hf_beams(params, p, eos, num_beams=nb, max_new_tokens=6, min_new_tokens=min_new)
            assert_same_beams(g.extras["beams"][i], ref, f"eos={eos} beams={nb} min_new={min_new} prompt={p}")


def test_beam_batching_and_debug_mode_agree():
    """A prompt's beams do not depend on its batch neighbours, and the debug (Python loop) driver
    gives the same result as the jitted while_loop."""
    from jaxdec.search.beam import beam_search
    model = jax_model()
    params = to_jax(make_params(7, eos_bias=0.5))
    full = beam_search(model, params, PROMPTS, num_beams=3, max_new_tokens=8)
    one_by_one = [beam_search(model, params, [p], num_beams=3, max_new_tokens=8).extras["beams"][0] for p in PROMPTS]
    assert full.extras["beams"] == one_by_one
    seen = []
    dbg = beam_search(model, params, PROMPTS, num_beams=3, max_new_tokens=8, batch_size=3, debug=True,
                      callback=lambda s: seen.append(int(s.step)))
    assert dbg.extras["beams"] == full.extras["beams"]
    assert len(seen) >= 2


# ------------------------------------------------------------------ diverse beam search
def test_diverse_beam_lambda_zero_is_plain_beam_per_group():
    from jaxdec.search.beam import beam_search
    model = jax_model()
    for seed, (groups, per_group, lp, es) in enumerate([(2, 2, 1.0, False), (3, 2, 0.5, "never"),
                                                         (2, 3, 1.0, True), (4, 1, 1.0, False)]):
        params = to_jax(make_params(200 + seed, eos_bias=0.5))
        dbs = beam_search(model, params, PROMPTS, num_beams=groups * per_group, num_beam_groups=groups,
                          diversity_penalty=0.0, max_new_tokens=7, length_penalty=lp, early_stopping=es)
        plain = beam_search(model, params, PROMPTS, num_beams=per_group, max_new_tokens=7, length_penalty=lp,
                            early_stopping=es)
        for i in range(len(PROMPTS)):
            want = [(b["tokens"], round(b["score"], 5)) for b in plain.extras["beams"][i]]
            for gi in range(groups):
                grp = [b for b in dbs.extras["beams"][i] if b["group"] == gi]
                got = [(b["tokens"], round(b["score"], 5)) for b in sorted(grp, key=lambda b: -b["score"])]
                assert got == want, f"groups={groups} prompt {i} group {gi}: {got} vs {want}"


def test_hamming_penalty_matches_hand_computation():
    """Two groups of one beam, one step (max_new_tokens=1): group 0 takes the argmax; group 1 takes the
    argmax of log p - lambda * [token == group 0's token]. Checked against a hand computation from the
    model's exact next-token log-probabilities, for a lambda that flips group 1's choice and one that
    does not, including the penalised score HF's group beam search reports."""
    from jaxdec.search.beam import beam_search, hamming_penalty
    import jax.numpy as jnp
    # the penalty itself: lambda x count of each token among earlier groups' choices
    pen = np.asarray(hamming_penalty(jnp.asarray([[3, 1, 3]]), 5, 0.5))
    np.testing.assert_allclose(pen, [[0.0, 0.5, 0.0, 1.0, 0.0]])

    model = jax_model()
    params = make_params(11, eos_bias=-3.0)
    prompt = [2, 4]
    lp = model.next_logprobs(to_jax(params), prompt)
    order = np.argsort(-lp)
    first, second = int(order[0]), int(order[1])
    gap = lp[first] - lp[second]
    for lam, expect in [(0.5 * gap, first), (gap + 0.3, second)]:
        g = beam_search(model, to_jax(params), [prompt], num_beams=2, num_beam_groups=2, diversity_penalty=lam,
                        max_new_tokens=1, stop_ids=(0,))
        beams = {b["group"]: b for b in g.extras["beams"][0]}
        assert beams[0]["tokens"] == [first]
        assert beams[1]["tokens"] == [expect]
        want = lp[expect] - (lam if expect == first else 0.0)
        assert abs(beams[1]["score"] - want) < 1e-5
        assert abs(beams[0]["score"] - lp[first]) < 1e-5


def test_hamming_penalty_counts_all_earlier_groups():
    """Three groups of two beams for two steps, checked against a NumPy re-implementation of the
    penalised group recursion (no EOS reachable, so every group runs for max_new_tokens)."""
    from jaxdec.search.beam import beam_search
    model = jax_model()
    params = make_params(12, eos_bias=-30.0)
    prompt = [3, 3]
    lam, groups, g, steps = 0.8, 3, 2, 2
    jp = to_jax(params)
    # NumPy reference of diverse beam search without finished hypotheses
    beams = [[([], 0.0)] + [([], -1e9)] * (g - 1) for _ in range(groups)]
    for _ in range(steps):
        chosen = []
        for gi in range(groups):
            cands = []
            for j, (seq, sc) in enumerate(beams[gi]):
                lp = model.next_logprobs(jp, prompt + seq) - lam * np.bincount(chosen, minlength=V)
                for tok in range(V):
                    cands.append((sc + lp[tok], j, tok))
            cands.sort(key=lambda x: -x[0])
            beams[gi] = [(beams[gi][j][0] + [tok], s) for s, j, tok in cands[:g]]
            chosen += [seq[-1] for seq, _ in beams[gi]]
    want = sorted([(tuple(seq), s / steps) for grp in beams for seq, s in grp], key=lambda x: -x[1])
    out = beam_search(model, jp, [prompt], num_beams=groups * g, num_beam_groups=groups, diversity_penalty=lam,
                      max_new_tokens=steps, stop_ids=(0,))
    got = [(tuple(b["tokens"]), b["score"]) for b in out.extras["beams"][0]]
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)


# ------------------------------------------------------------------ conditional beam search
def has_repeat(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("ngram", [2, 3])
def test_conditional_beam_no_repeat_ngram_equals_hf(ngram):
    """Beams conditioned on non-degenerate output (no repeated n-gram in prompt + output) equal HF's
    beam search with `no_repeat_ngram_size`; without the condition this table model does repeat."""
    from jaxdec.search.beam import beam_search
    model = jax_model()
    repeats_without = False
    for seed, nb in enumerate((2, 3)):
        params = make_params(300 + seed, scale=2.5, eos_bias=-2.0)
        g = beam_search(model, to_jax(params), PROMPTS, num_beams=nb, max_new_tokens=10,
                        no_repeat_ngram_size=ngram, min_new_tokens=1)
        free = beam_search(model, to_jax(params), PROMPTS, num_beams=nb, max_new_tokens=10)
        for i, p in enumerate(PROMPTS):
            ref = hf_beams(params, p, (0,), num_beams=nb, max_new_tokens=10, no_repeat_ngram_size=ngram,
                           min_new_tokens=1)
            assert_same_beams(g.extras["beams"][i], ref, f"ngram={ngram} beams={nb} prompt={p}")
            for b in g.extras["beams"][i]:
                assert not has_repeat(p + b["tokens"], ngram) and len(b["tokens"]) >= 1
            repeats_without |= any(has_repeat(p + b["tokens"], ngram) for b in free.extras["beams"][i])
    assert repeats_without
