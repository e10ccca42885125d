"""Issue 19 (diffusion-LM decoding), model-free part: the task generator and graders, and every sampler's
defining rule on hand-made logits (the expected commit order is written out in each test), FreeDave ==
one-token-per-step greedy on random canvas-dependent logit functions (with a broken-verifier control)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.diffusion import tasks as T
from jaxdec.diffusion.samplers import SamplerConfig, sample

# ------------------------------------------------------------------------------------------ tasks


def test_every_task_generates_gradable_examples_and_heldout_is_disjoint():
    for task in T.TASKS:
        tr = T.generate(task, 60, "train", seed=3)
        ho = T.heldout(task, 20)
        assert len({e.prompt for e in tr}) == 60 and len({e.prompt for e in ho}) == 20
        assert not {e.prompt for e in tr} & {e.prompt for e in ho}
        assert all(T.split_of(e.prompt) == "train" for e in tr)
        assert all(T.split_of(e.prompt) == "heldout" for e in ho)
        assert ho == T.heldout(task, 20)  # fixed
        assert tr == T.generate(task, 60, "train", seed=3) and tr != T.generate(task, 60, "train", seed=4)
        for e in tr + ho:
            assert e.task == task and T.parse_prompt(e.prompt)["task"] == task
            assert T.grade(e.prompt, e.answer), (e.prompt, e.answer)
            ids = T.encode(e.prompt)
            assert len(ids) <= T.PROMPT_LEN and len(T.encode(e.answer)) < T.GEN_LEN
            assert T.decode(ids) == e.prompt
    lists = [len(T.parse_prompt(e.prompt)["items"]) for e in T.generate("copy", 200)]
    assert set(lists) == {3, 4, 5, 6}


P3 = "Ada Lovelace , Alan Turing , Grace Hopper"


@pytest.mark.parametrize("prompt,good,bad", [
    (f"copy : {P3} =>", [P3], ["Ada Lovelace , Grace Hopper , Alan Turing", "Ada Lovelace , Alan Turing",
                               "Ada Lovelace Alan Turing , Grace Hopper", ""]),
    (f"reverse : {P3} =>", ["Grace Hopper , Alan Turing , Ada Lovelace"], [P3]),
    ("sort : Alan Turing , Ada Lovelace , Grace Hopper =>", ["Grace Hopper , Ada Lovelace , Alan Turing"],
     [P3, "Alan Turing , Ada Lovelace , Grace Hopper"]),  # by last name: Hopper, Lovelace, Turing
    (f"shuffle : {P3} =>", [P3, "Grace Hopper , Ada Lovelace , Alan Turing"],
     ["Grace Hopper , Ada Lovelace", "Grace Hopper , Ada Lovelace , Ken Thompson",
      "Grace Hopper , Ada Lovelace , Alan Turing , Alan Turing"]),
    (f"insert Ken Thompson at 1 : {P3} =>", ["Ada Lovelace , Ken Thompson , Alan Turing , Grace Hopper"],
     ["Ken Thompson , Ada Lovelace , Alan Turing , Grace Hopper"]),
    (f"insert Ken Thompson anywhere : {P3} =>", ["Ken Thompson , Ada Lovelace , Alan Turing , Grace Hopper",
                                                 "Ada Lovelace , Alan Turing , Grace Hopper , Ken Thompson"],
     [P3, "Ada Lovelace , Ken Thompson , Grace Hopper , Alan Turing"]),
    (f"remove at 0 : {P3} =>", ["Alan Turing , Grace Hopper"], ["Ada Lovelace , Grace Hopper"]),
    (f"remove any : {P3} =>", ["Alan Turing , Grace Hopper", "Ada Lovelace , Alan Turing"],
     [P3, "Grace Hopper , Alan Turing"]),
    (f"replace at 2 with Ken Thompson : {P3} =>", ["Ada Lovelace , Alan Turing , Ken Thompson"],
     ["Ken Thompson , Alan Turing , Grace Hopper"]),
    (f"replace any with Ken Thompson : {P3} =>", ["Ken Thompson , Alan Turing , Grace Hopper",
                                                  "Ada Lovelace , Ken Thompson , Grace Hopper"],
     [P3, "Ken Thompson , Ken Thompson , Grace Hopper"]),
    ("latin : 1 _ 3 4 / _ 4 1 _ / 4 _ _ 1 / 3 1 _ 2 =>",
     ["1 2 3 4 / 2 4 1 3 / 4 3 2 1 / 3 1 4 2"],
     ["1 2 3 4 / 2 4 1 3 / 4 3 2 1 / 3 1 2 4",  # breaks the clue 2 in the last row
      "1 2 3 4 / 2 4 1 3 / 4 3 2 1", "1 2 3 4 / 2 4 1 3 / 4 3 2 1 / 3 1 4 _"]),
    ("sudoku : 1 _ _ _ / _ _ _ _ / _ _ _ _ / _ _ _ _ =>",
     ["1 2 3 4 / 3 4 1 2 / 2 1 4 3 / 4 3 2 1"],
     ["1 2 3 4 / 2 3 4 1 / 3 4 1 2 / 4 1 2 3",  # a Latin square whose 2x2 boxes repeat
      "2 1 3 4 / 3 4 1 2 / 1 2 4 3 / 4 3 2 1"]),  # valid sudoku, but breaks the clue
])
def test_graders(prompt, good, bad):
    for g in good:
        assert T.grade(prompt, g), g
    for b in bad:
        assert not T.grade(prompt, b), b


def test_several_latin_completions_are_all_accepted():
    # two different completions of the same clues are both valid (validity, not one reference answer)
    prompt = "latin : 1 _ _ _ / _ _ _ _ / _ _ _ _ / _ _ _ _ =>"
    assert T.grade(prompt, "1 2 3 4 / 2 1 4 3 / 3 4 1 2 / 4 3 2 1")
    assert T.grade(prompt, "1 2 3 4 / 2 3 4 1 / 3 4 1 2 / 4 1 2 3")


def test_bad_prompts_and_words_are_clear_errors():
    with pytest.raises(ValueError, match="'Bob' is not in the task vocabulary"):
        T.encode("copy : Bob Smith =>")
    with pytest.raises(T.TaskFormatError, match="unknown task words 'duplicate'"):
        T.parse_prompt(f"duplicate : {P3} =>")
    with pytest.raises(T.TaskFormatError, match="'First Last'"):
        T.parse_prompt("copy : Ada , Alan Turing =>")
    with pytest.raises(T.TaskFormatError, match="4 cells per row"):
        T.parse_prompt("latin : 1 2 3 / _ _ _ _ / _ _ _ _ / _ _ _ _ =>")
    with pytest.raises(ValueError, match="task must be one of"):
        T.generate("juggle", 3)


def test_arrays_layout():
    ex = [T.Example("copy", f"copy : {P3} =>", P3)]
    a = T.to_arrays(ex)
    p, ans = T.encode(ex[0].prompt), T.encode(P3)
    row = a["tokens"][0]
    assert list(row[:len(p)]) == p and list(row[len(p):len(p) + len(ans)]) == ans
    assert set(row[len(p) + len(ans):len(p) + T.GEN_LEN]) == {T.EOS_ID}
    assert set(row[len(p) + T.GEN_LEN:]) == {T.PAD_ID}
    b = T.to_arrays(ex, eos_fill=False)["tokens"][0]
    assert b[len(p) + len(ans)] == T.EOS_ID and b[len(p) + len(ans) + 1] == T.PAD_ID


# ------------------------------------------------------------------------------------------ samplers
V = 6  # 0 [PAD], 1 [MASK], tokens 2..5
PROMPT = [2, 3]


def dist(tok, p):
    """Log-probabilities over the vocabulary: ``tok`` has ``p``, the other real tokens share the rest."""
    q = np.full(V, (1 - p) / 3)
    q[tok] = p
    q[:2] = 1e-12
    return np.log(q)


def rows_table(spec, t=16):
    """[1,T,V] logits: spec[i] = (token, p) or an explicit probability vector over tokens 2..5 for window
    position i (window starts after PROMPT)."""
    tab = np.zeros((1, t, V))
    for i, s in enumerate(spec):
        if isinstance(s, tuple):
            tab[0, len(PROMPT) + i] = dist(*s)
        else:
            q = np.full(V, 1e-12)
            q[2:] = s
            tab[0, len(PROMPT) + i] = np.log(q)
    return jnp.asarray(tab, jnp.float32)


def fixed_fn(aux, canvas):  # the same logits whatever the canvas
    return jnp.broadcast_to(aux, canvas.shape + (V,))


def staged_fn(aux, canvas):  # logits chosen by how many window tokens are committed so far
    tables, g = aux  # [S,1,T,V], []
    stage = jnp.clip(g - jnp.sum(canvas == 1, axis=1), 0, tables.shape[0] - 1)  # [B]
    return tables[stage, 0]


C8 = [0.70, 0.30, 0.40, 0.85, 0.97, 0.41, 0.92, 0.60]  # confidences of window positions 0..7
TOK8 = [2, 3, 4, 2, 3, 4, 2, 3]


def order_of(name, spec=None, fn=fixed_fn, aux=None, g=8, **kw):
    spec = spec if spec is not None else list(zip(TOK8, C8))
    cfg = SamplerConfig(name, mask_id=1, pad_id=0, **kw)
    toks, st = sample(fn, rows_table(spec) if aux is None else aux, [PROMPT], g, cfg, length=16)
    assert sum(st["committed_per_call"][0]) >= g and len(st["committed_per_call"][0]) == st["model_calls"][0]
    return list(st["commit_step"][0]), list(toks[0]), st


def test_one_per_step_and_llada_low_confidence_schedules():
    # one token per call, most probable first (0.97, 0.92, 0.85, 0.70, 0.60, 0.41, 0.40, 0.30)
    assert order_of("one-per-step")[0] == [3, 7, 6, 2, 0, 5, 1, 4]
    # blocks of 4: positions 0-3 first (0.85, 0.70, 0.40, 0.30), then 4-7
    assert order_of("one-per-step", block_length=4)[0] == [1, 3, 2, 0, 4, 7, 5, 6]
    # LLaDA: 4 steps over 2 blocks = 2 steps per block, 2 tokens per step
    steps, toks, st = order_of("llada-low-confidence", steps=4, block_length=4)
    assert steps == [0, 1, 1, 0, 2, 3, 2, 3] and st["committed_per_call"][0] == [2, 2, 2, 2]
    assert toks == TOK8
    # 3 steps, no blocks: 8 = 3 + 3 + 2 (remainder first)
    steps, _, st = order_of("llada-low-confidence", steps=3)
    assert steps == [1, 2, 2, 0, 0, 1, 0, 1] and st["committed_per_call"][0] == [3, 3, 2]


def test_llada_random_ignores_confidence():
    firsts = set()
    for seed in range(12):
        cfg = SamplerConfig("llada-random", mask_id=1, pad_id=0, steps=4)
        _, st = sample(fixed_fn, rows_table(list(zip(TOK8, C8))), [PROMPT], 8, cfg, seed=seed, length=16)
        assert st["committed_per_call"][0] == [2, 2, 2, 2]
        firsts.add(frozenset(np.flatnonzero(st["commit_step"][0] == 0)))
    assert len(firsts) >= 4  # not the two most confident every time (that is llada-low-confidence)


def test_dream_orders():
    spec = [[0.50, 0.40, 0.05, 0.05],  # top-1 0.50 (highest), margin 0.10, entropy 1.01
            [0.49, 0.49, 0.01, 0.01],  # top-1 0.49, margin 0.00, entropy 0.79 (lowest)
            [0.46, 0.18, 0.18, 0.18]]  # top-1 0.46, margin 0.28 (highest), entropy 1.28
    first = {name: order_of(name, spec, g=3)[0].index(0)
             for name in ("dream-maskgit-plus", "dream-topk-margin", "dream-entropy")}
    assert first == {"dream-maskgit-plus": 0, "dream-topk-margin": 2, "dream-entropy": 1}
    assert order_of("dream-maskgit-plus", spec, g=3)[0] == order_of("llada-low-confidence", spec, g=3)[0]


def test_fast_dllm_threshold_and_factor():
    # threshold 0.9: every position above it (0.97, 0.92) in the first call
    steps, _, st = order_of("fast-dllm-threshold", threshold=0.9)
    assert {i for i, s in enumerate(steps) if s == 0} == {4, 6}
    # within the first block of 4 nothing passes 0.9: the top one (0.85) is still committed
    steps, _, _ = order_of("fast-dllm-threshold", threshold=0.9, block_length=4)
    assert {i for i, s in enumerate(steps) if s == 0} == {3}
    # threshold 1.0: only the top one per call = one-per-step
    assert order_of("fast-dllm-threshold", threshold=1.0)[0] == order_of("one-per-step")[0]
    # factor 1: i-th most confident needs >= 1 - 1/(i+1): 0.97 | 0.92 >= .667 | 0.85 >= .75 | 0.70 < .8
    steps, _, _ = order_of("fast-dllm-factor", factor=1.0)
    assert {i for i, s in enumerate(steps) if s == 0} == {4, 6, 3}
    # factor 0.5: 0.92 >= .833 | 0.85 < .875
    steps, _, _ = order_of("fast-dllm-factor", factor=0.5)
    assert {i for i, s in enumerate(steps) if s == 0} == {4, 6}


def test_localleap_relaxes_only_near_anchors():
    # anchors (>= 0.9): 4, 6; within radius 1: 3 (0.85), 5 (0.41), 7 (0.60); relaxed 0.55 keeps 3 and 7;
    # position 0 (0.70) passes 0.55 but is far from every anchor
    steps, _, _ = order_of("localleap", threshold=0.9, relaxed_threshold=0.55, radius=1)
    assert {i for i, s in enumerate(steps) if s == 0} == {3, 4, 6, 7}
    steps, _, _ = order_of("localleap", threshold=0.9, relaxed_threshold=0.55, radius=0)
    assert {i for i, s in enumerate(steps) if s == 0} == {4, 6}
    steps, _, _ = order_of("localleap", threshold=0.9, relaxed_threshold=0.55, radius=4)
    assert {i for i, s in enumerate(steps) if s == 0} == {0, 3, 4, 6, 7}


def test_credit_commits_stable_tokens_earlier():
    spec = [(2, 0.80), (3, 0.82), (4, 0.85)]
    # plain threshold 0.9: nothing passes, one (the top) per call
    assert order_of("fast-dllm-threshold", spec, g=3, threshold=0.9)[0] == [2, 1, 0]
    # credit: after one call both leftovers carry credit p; 0.8 * 1.8^2 / (0.8 * 1.8^2 + 0.2) = 0.93 > 0.9
    steps, toks, st = order_of("credit", spec, g=3, threshold=0.9, credit_weight=2.0, credit_decay=0.5)
    assert steps == [1, 1, 0] and toks == [2, 3, 4] and st["model_calls"] == [2]
    # with a weight too small to lift 0.8 over 0.9 (0.8 * 1.8 / (0.8 * 1.8 + 0.2) = 0.88) it behaves like plain
    assert order_of("credit", spec, g=3, threshold=0.9, credit_weight=1.0)[0] == [2, 1, 0]


def test_adablock_ends_the_block_at_a_confident_delimiter():
    spec = list(zip(TOK8, C8))
    spec[2] = (5, 0.60)  # window position 2 predicts the delimiter 5 with 0.60
    steps, _, _ = order_of("adablock", spec, block_length=6, threshold=0.9, delimiters=(5,),
                           delimiter_threshold=0.5)
    # first block = positions 0..2: nothing > 0.9 there, so only its top (0.70 at 0); 0.97 at 4 waits
    assert {i for i, s in enumerate(steps) if s == 0} == {0}
    assert steps[:3] == [0, 2, 1]  # the block 0..2 is finished before anything else
    # an unconfident delimiter (threshold 0.7) does not end the block: block 0..5, 0.97 passes
    steps, _, _ = order_of("adablock", spec, block_length=6, threshold=0.9, delimiters=(5,),
                           delimiter_threshold=0.7)
    assert {i for i, s in enumerate(steps) if s == 0} == {4}


def _staged(stages, g, t=16):
    return (jnp.stack([rows_table(s, t) for s in stages]), jnp.int32(g))


def test_ccd_needs_agreement_across_steps():
    stages = [[(2, 0.95), (3, 0.96), (4, 0.93), (2, 0.50)],  # nothing committed yet
              [(2, 0.95), (3, 0.96), (5, 0.94), (2, 0.50)],  # position 2 changed its argmax
              [(2, 0.95), (3, 0.96), (5, 0.94), (2, 0.50)]]
    aux = _staged(stages, 4)
    steps, toks, _ = order_of("ccd", fn=staged_fn, aux=aux, g=4, threshold=0.9, ccd_window=2)
    # call 0: no history, the top one (0.96); call 1: position 0 agreed twice (0.95) -> committed, position
    # 2 flipped (0.94 but new) -> waits; call 2: position 2 agreed twice; call 3: the last one
    assert steps == [1, 0, 2, 3] and toks == [2, 3, 5, 2]
    # the threshold rule alone commits 0, 1, 2 at once, with position 2's first (later revised) guess
    steps, toks, _ = order_of("fast-dllm-threshold", fn=staged_fn, aux=aux, g=4, threshold=0.9)
    assert steps == [0, 0, 0, 1] and toks == [2, 3, 4, 2]


def test_secondary_remasking_revises_a_token_that_lost_its_support():
    stages = [[(2, 0.90), (3, 0.50), (4, 0.40)],
              [(3, 0.80), (3, 0.50), (4, 0.40)]]  # once one token is in, position 0 prefers token 3
    aux = _staged(stages, 3)
    steps, toks, st = order_of("remask", fn=staged_fn, aux=aux, g=3, remask_threshold=0.3)
    # call 0 commits 0 (token 2); call 1: p(token 2 at 0) = 0.2/3 < 0.3 -> back to [MASK], commits 1;
    # call 2 (last scheduled step): commits 0 (now token 3) and 2
    assert toks == [3, 3, 4] and steps == [2, 1, 2] and st["committed_per_call"][0] == [1, 1, 2]
    steps, toks, _ = order_of("llada-low-confidence", fn=staged_fn, aux=aux, g=3)
    assert toks == [2, 3, 4]  # without remasking the first guess stays


# ------------------------------------------------------------------------------------------ FreeDave
VR, TR = 7, 24


def random_fn(aux, canvas):
    """Logits that depend on the whole canvas: position bias + a random bilinear term over all tokens."""
    a, c = aux
    oh = jax.nn.one_hot(canvas, VR)
    return a[None] + jnp.einsum("btv,tsvw->bsw", oh, c)


def _random_aux(seed, scale):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.normal(size=(TR, VR)) * 2.0, jnp.float32),
            jnp.asarray(r.normal(size=(TR, TR, VR, VR)) * scale, jnp.float32))


def test_freedave_equals_one_per_step_exactly():
    prompts = [[2, 3, 4], [5, 6], [2, 3, 4, 5, 6]]
    gens = [12, 8, 16]
    saved = total = 0
    partial = False
    for seed in range(6):
        aux = _random_aux(seed, 0.35)
        for bl in (None, 4):
            base = SamplerConfig("one-per-step", mask_id=1, pad_id=0, block_length=bl)
            ref, rs = sample(random_fn, aux, prompts, gens, base, length=TR)
            fd, fs = sample(random_fn, aux, prompts, gens,
                            SamplerConfig("freedave", mask_id=1, pad_id=0, block_length=bl, drafts=4), length=TR)
            np.testing.assert_array_equal(fd, ref)
            assert rs["model_calls"] == gens
            saved += sum(gens) - sum(fs["model_calls"])
            total += sum(gens)
            for row, g in zip(fs["committed_per_call"], gens):
                left = g - np.cumsum([0] + row[1:-1])  # masked positions before each round
                partial |= any(c < min(4, n) for c, n in zip(row[1:], left))  # a draft was rejected
            assert all(sum(r) == g for r, g in zip(fs["committed_per_call"], gens))
    assert saved > 0.25 * total  # fewer calls: drafts are accepted
    assert partial  # and some are rejected (verification does something)


def test_freedave_broken_verifier_is_caught():
    prompts = [[2, 3, 4], [5, 6], [2, 3, 4, 5, 6]]
    gens = [12, 8, 16]
    differs = 0
    for seed in range(6):
        aux = _random_aux(seed, 0.35)
        ref, _ = sample(random_fn, aux, prompts, gens, SamplerConfig("one-per-step", mask_id=1, pad_id=0),
                        length=TR)
        bad, _ = sample(random_fn, aux, prompts, gens,
                        SamplerConfig("freedave", mask_id=1, pad_id=0, drafts=4, verify=False), length=TR)
        differs += int(not np.array_equal(bad, ref))
    assert differs >= 3


# ------------------------------------------------------------------------------------------ bad input / stats
def test_sampler_bad_input():
    tab = rows_table(list(zip(TOK8, C8)))
    with pytest.raises(ValueError, match="block_length 3 must divide the generation length, but row 0 has "
                                         "generation length 8"):
        sample(fixed_fn, tab, [PROMPT], 8, SamplerConfig("llada-low-confidence", block_length=3))
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            sample(fixed_fn, tab, [PROMPT], 8, SamplerConfig("fast-dllm-threshold", threshold=bad))
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(fixed_fn, tab, [PROMPT], 8, SamplerConfig("beam"))
    with pytest.raises(ValueError, match="steps must be None or an integer >= 1"):
        sample(fixed_fn, tab, [PROMPT], 8, SamplerConfig("llada-low-confidence", steps=0))
    with pytest.raises(ValueError, match="adablock needs block_length"):
        sample(fixed_fn, tab, [PROMPT], 8, SamplerConfig("adablock"))



# ------------------------------------------------------------------------------------------ Learn2PD
def handmade_filter(weights, bias, gain=50.0):
    """A Learn2PD filter whose logit is ~``gain * (w . features + bias)`` where that is > 0 and ~-0.1
    elsewhere (hidden unit 0 carries it through the two GELUs; the other units are zero)."""
    from jaxdec.diffusion import learn2pd as L
    p = jax.tree.map(jnp.zeros_like, L.init_filter(4))
    k0 = p["params"]["Dense_0"]["kernel"].at[:, 0].set(gain * jnp.asarray(weights, jnp.float32))
    p["params"]["Dense_0"]["kernel"] = k0
    p["params"]["Dense_0"]["bias"] = p["params"]["Dense_0"]["bias"].at[0].set(gain * bias)
    p["params"]["Dense_1"]["kernel"] = p["params"]["Dense_1"]["kernel"].at[0, 0].set(1.0)
    p["params"]["Dense_2"]["kernel"] = p["params"]["Dense_2"]["kernel"].at[0, 0].set(10.0)
    p["params"]["Dense_2"]["bias"] = p["params"]["Dense_2"]["bias"].at[0].set(-0.1)
    return p


P0_ABOVE_08 = ([1.0] + [0.0] * 8, -0.8)  # feature 0 is the top-1 probability


def test_learn2pd_commits_what_the_filter_accepts():
    filt = handmade_filter(*P0_ABOVE_08)
    kw = dict(threshold=0.5, eot=False)
    cfg = SamplerConfig("learn2pd", mask_id=1, pad_id=0, **kw)
    toks, st = sample(fixed_fn, rows_table(list(zip(TOK8, C8))), [PROMPT], 8, cfg, length=16, filter_params=filt)
    # call 0: the filter accepts p > 0.8 (0.85, 0.97, 0.92); then the top one per call: 0.70, 0.60, 0.41, 0.40, 0.30
    assert list(st["commit_step"][0]) == [1, 5, 4, 0, 0, 3, 0, 2] and list(toks[0]) == TOK8
    assert st["committed_per_call"][0] == [3, 1, 1, 1, 1, 1]
    # a filter that rejects everything is one-per-step (the top one is always committed)
    never = handmade_filter([0.0] * 9, -1.0)
    _, st2 = sample(fixed_fn, rows_table(list(zip(TOK8, C8))), [PROMPT], 8, cfg, length=16, filter_params=never)
    assert list(st2["commit_step"][0]) == order_of("one-per-step")[0]
    # the filter reads the features, not the raw threshold: "the left neighbour is decided" (feature 6)
    left = handmade_filter([0.0] * 6 + [1.0, 0.0, 0.0], -0.5)
    _, st3 = sample(fixed_fn, rows_table(list(zip(TOK8, C8))), [PROMPT], 8, cfg, length=16, filter_params=left)
    # call 0: position 0 (after the prompt) and the top one (4); call 1: 1 and 5 (their left neighbours are
    # decided) and the top one (6: 0.92); call 2: 2, 7 (left decided) and the top one (3)
    assert list(st3["commit_step"][0]) == [0, 1, 2, 2, 0, 1, 1, 2]


def test_learn2pd_end_of_text_prediction_stops_filling_after_eos():
    eos = 5
    spec = [(2, 0.70), (3, 0.30), (4, 0.40), (2, 0.85), (eos, 0.97), (4, 0.41), (2, 0.92), (3, 0.60)]
    filt = handmade_filter(*P0_ABOVE_08)
    cfg = SamplerConfig("learn2pd", mask_id=1, pad_id=0, threshold=0.5, eos_id=eos)
    toks, st = sample(fixed_fn, rows_table(spec), [PROMPT], 8, cfg, length=16, filter_params=filt)
    # call 0: 3, 4 ([EOS]), 6 pass the filter; EoTP fills the masked 5 and 7 with [EOS] in the same call;
    # then 0 (0.70), 2 (0.40), 1 (0.30)
    assert list(st["commit_step"][0]) == [1, 3, 2, 0, 0, 0, 0, 0]
    assert list(toks[0]) == [2, 3, 4, 2, eos, eos, 2, eos] and st["committed_per_call"][0] == [5, 1, 1, 1]
    off = SamplerConfig("learn2pd", mask_id=1, pad_id=0, threshold=0.5, eot=False)
    _, st_off = sample(fixed_fn, rows_table(spec), [PROMPT], 8, off, length=16, filter_params=filt)
    assert st_off["committed_per_call"][0] == [3, 1, 1, 1, 1, 1]  # without it, 5 and 7 cost a call each
    with pytest.raises(ValueError, match="needs eos_id"):
        sample(fixed_fn, rows_table(spec), [PROMPT], 8, SamplerConfig("learn2pd", threshold=0.5),
               filter_params=filt)
    with pytest.raises(ValueError, match="filter_params .* are needed by sampler learn2pd and only by it"):
        sample(fixed_fn, rows_table(spec), [PROMPT], 8, cfg)
    with pytest.raises(ValueError, match="filter_params .* are needed by sampler learn2pd and only by it"):
        sample(fixed_fn, rows_table(spec), [PROMPT], 8, SamplerConfig("one-per-step"), filter_params=filt)


def test_learn2pd_filter_file_round_trip(tmp_path):
    from jaxdec.diffusion import learn2pd as L
    filt = handmade_filter(*P0_ABOVE_08)
    path = L.save_filter(str(tmp_path / "f.safetensors"), filt, {"note": "test"})
    back = L.load_filter(path)
    assert jax.tree.structure(back) == jax.tree.structure(filt)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(filt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="no Learn2PD filter"):
        L.load_filter(str(tmp_path / "missing.safetensors"))


# ------------------------------------------------------------------------------------------ temperature
def test_temperature_sampling_matches_the_tempered_softmax():
    from tests.stat_checks import pooled_chisquare_p
    q = np.array([0.5, 0.3, 0.15, 0.05])  # over tokens 2..5, at each of the 8 window positions
    temp, rows = 0.7, 12500  # 8 positions x 12500 rows = 100k draws, one call (all committed at once)
    cfg = SamplerConfig("llada-low-confidence", mask_id=1, pad_id=0, steps=1, temperature=temp)
    toks, st = sample(fixed_fn, rows_table([q] * 8), [PROMPT] * rows, 8, cfg, seed=3, length=16)
    assert st["batch_calls"] == 1
    counts = np.bincount(toks.ravel() - 2, minlength=4)

    def tempered(t):
        w = q ** (1.0 / t)
        return w / w.sum()

    assert pooled_chisquare_p(counts, tempered(temp)) > 1e-4, counts
    # negative controls: temperature x 1.1, and the unscaled softmax
    assert pooled_chisquare_p(counts, tempered(temp * 1.1)) < 1e-4, counts
    assert pooled_chisquare_p(counts, q) < 1e-4, counts
    # rows are not copies of each other (a key per row), and another seed gives other tokens
    assert len({tuple(r) for r in toks[:50]}) > 40
    again = sample(fixed_fn, rows_table([q] * 8), [PROMPT] * 8, 8, cfg, seed=4, length=16)[0]
    assert not np.array_equal(again, toks[:8])


def test_temperature_zero_is_greedy_and_tiny_temperature_agrees():
    spec = list(zip(TOK8, C8))
    # temperature 0 is the default: the greedy program itself (the tests above and test_golden pin it)
    assert SamplerConfig("fast-dllm-threshold", temperature=0.0) == SamplerConfig("fast-dllm-threshold")
    base = order_of("fast-dllm-threshold", spec, threshold=0.8)
    assert order_of("fast-dllm-threshold", spec, threshold=0.8, temperature=1e-3)[:2] == base[:2]  # argmax wins
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            sample(fixed_fn, rows_table(spec), [PROMPT], 8, SamplerConfig("one-per-step", temperature=bad))
    with pytest.raises(ValueError, match="temperature must be 0 for sampler freedave"):
        sample(fixed_fn, rows_table(spec), [PROMPT], 8, SamplerConfig("freedave", temperature=0.5))
