"""PEARL (pre-verify / post-verify with adaptive draft length) in one step of the loop: exact and lossless.

Toy `TrigramModel` (fast): greedy PEARL gives the plain greedy tokens on ragged batches for several
windows; its per-step phase record and tokens equal an independent plain-Python walk of PEARL's
schedule; an oracle draft stays in post-verify (τ = gamma) while an always-wrong draft never leaves
pre-verify (τ = 1 exactly: the negative control of the τ tests); an EOS accepted mid-draft and
max_new stop rows exactly; the parallel-time model adds up from the phase counts; with sampling the
joint of four tokens is the target's (chi-square, α = 1e-4) and a verifier without residual
resampling is rejected. Bad input raises errors naming the argument.

Real default model, in two tiers (the "ci" size, and the "full" size marked ``slow``, selected by
``-m slow`` / `make acceptance`: more prompts and tokens): tokens equal plain
greedy for a ragged batch (>= 2 length buckets) and at batch 1 (near-tie helper, excuses reported),
both phases run, and τ > 1.3 on a prompt where a deep (28 of 30 layers) draft model should help.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
import peer  # noqa: E402
from selfref import block_vs_step_dlogit, teacher_logits  # noqa: E402

from jaxdec import generate  # noqa: E402
from jaxdec.cache.kv import bucket  # noqa: E402
from jaxdec.core import loop  # noqa: E402
from jaxdec.core.processors import SamplingParams  # noqa: E402
from jaxdec.speculative import PearlDecoder, truncated_draft, with_draft_params  # noqa: E402
from jaxdec.testing.toy_speculative import BOS_PREV, TrigramModel, exact_joint, random_table  # noqa: E402
from jaxdec.core.state import DecodeInputs
from stat_checks import pooled_chisquare_p  # noqa: E402

TOY_V = 12
EOS = 1


@pytest.fixture(scope="module")
def toy():
    model = TrigramModel(TOY_V, eos_ids=(EOS,))
    tab = random_table(1, TOY_V, 3.0)
    tab[:, :, EOS] -= 2.0  # EOS ends some rows, others run to max_new
    dtab = tab + 0.8 * np.random.default_rng(1).standard_normal(tab.shape).astype(np.float32)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, TOY_V, size=int(rng.integers(1, 90))))) for _ in range(8)]
    params = {"table": jnp.asarray(tab)}
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=40)
    return model, tab, dtab, prompts, ref


CD, CURVE = 0.2, ((1, 1.0), (2, 1.1), (4, 1.5))


def _dec3(model):
    """The gamma = 3 decoder of the exactness, schedule and time-model tests (equal instances share
    one compiled program)."""
    return PearlDecoder(model, 3, draft_cost=CD, cost_curve=CURVE)


def _params(tab, dtab):
    return with_draft_params({"table": jnp.asarray(tab)}, {"table": jnp.asarray(dtab)})


def _argmax_next(tab, seq):
    prev = seq[-2] if len(seq) >= 2 else BOS_PREV
    return int(np.argmax(tab[prev, seq[-1]]))


def pearl_walk(tab, dtab, prompt, gamma, max_new, eos=EOS):
    """Plain-Python PEARL (greedy), written from the paper's description: returns (tokens, phases). The
    first token comes from the prompt's (prefill) call; PEARL's schedule starts after it in pre-verify."""
    ctx, out, pend, post, phases = list(prompt), [], [], False, []

    def draft_after(seq):
        seq, d = list(seq), []
        for _ in range(gamma):
            d.append(_argmax_next(dtab, seq))
            seq.append(d[-1])
        return d

    out.append(_argmax_next(tab, ctx))  # the prefill call's token
    if out[0] == eos or max_new <= 1:
        return out, phases
    while True:
        phases.append(int(post))
        d = draft_after(ctx + out + pend)  # the draft runs on everything, pending tokens included
        chain = (pend + d[:1]) if post else d[:1]
        seq, new, full = ctx + out, [], True
        for x in chain:  # the target judges each chain token in order
            t = _argmax_next(tab, seq)
            if x != t:
                new.append(t)
                full = False
                break
            new.append(x)
            seq = seq + [x]
        for t in new:
            out.append(t)
            if t == eos or len(out) >= max_new:
                return out, phases
        pend, post = (d[1:], True) if full else ([], False)


def test_toy_exact_ragged_batches(toy):
    model, tab, dtab, prompts, ref = toy
    assert sum(f == "eos" for f in ref.finish_reason) >= 2 and sum(f == "length" for f in ref.finish_reason) >= 2
    p = _params(tab, dtab)
    for gamma, sizes in ((3, (8, 3)), (1, (8,))):
        for bs in sizes:
            dec = _dec3(model) if gamma == 3 else PearlDecoder(model, gamma)
            out = generate(model, p, prompts, decoder=dec, max_new_tokens=40, batch_size=bs)
            assert out.tokens == ref.tokens, (gamma, bs)
            assert out.finish_reason == ref.finish_reason
            st = out.stats
            assert st["pre_verify_steps"] > 0 and st["post_verify_steps"] > 0, (gamma, bs, st["pearl"])
            assert st["pre_verify_steps"] + st["post_verify_steps"] == st["row_steps"]
            assert st["tau"] >= 1.0
            if gamma > 1:
                assert st["pearl"]["target_block_steps"] > 0 and st["pearl"]["target_single_steps"] > 0


def test_toy_schedule_equals_reference_walk(toy):
    """Tokens and the per-step phase record (a ragged batch of 8, and batches of 3) equal the plain-Python
    walk, so every row follows PEARL's schedule whatever its neighbours do."""
    model, tab, dtab, prompts, _ = toy
    gamma, max_new = 3, 40
    dec = _dec3(model)
    want = [pearl_walk(tab, dtab, pr, gamma, max_new) for pr in prompts]
    for bs in (8, 3):
        for start in range(0, len(prompts), bs):
            chunk = prompts[start:start + bs]
            out = generate(model, _params(tab, dtab), chunk + [chunk[0]] * (bs - len(chunk)), decoder=dec,
                           max_new_tokens=max_new, batch_size=bs)
            for j, (toks, phases) in enumerate(want[start:start + bs]):
                assert out.tokens[j] == toks, (bs, start + j)
                assert out.stats["phase_trace"][j] == phases, (bs, start + j)
    assert any(1 in ph for _, ph in want) and all(ph[0] == 0 for _, ph in want)


def test_toy_oracle_and_antagonist_drafts(toy):
    """A draft equal to the target is accepted forever: after the first pre-verify every step is
    post-verify and yields gamma tokens. A draft that is always wrong never leaves pre-verify: τ = 1
    exactly (the negative control: a τ bar above 1 cannot be passed by a draft that never helps)."""
    model, tab, _, prompts, _ = toy
    gamma = 4
    ref = generate(model, {"table": jnp.asarray(tab)}, prompts, method="greedy", max_new_tokens=40, stop_ids=())
    oracle = generate(model, _params(tab, tab), prompts, decoder=PearlDecoder(model, gamma), max_new_tokens=40,
                      stop_ids=())
    assert oracle.tokens == ref.tokens
    for tr in oracle.stats["phase_trace"]:
        assert tr[0] == 0 and all(x == 1 for x in tr[1:]) and len(tr) >= 2
    pa = oracle.stats["pearl"]
    assert pa["pre_verify_acceptance"] == 1.0 and pa["post_verify_full_accepts"] == oracle.stats["post_verify_steps"]
    # every row: 1 (prefill) + 1 (pre-verify) + gamma per post-verify step, the last one cut at max_new
    assert oracle.stats["tau"] > 0.8 * gamma
    # antagonist: the draft's favourite is always the target's least likely token
    anti = generate(model, _params(tab, -tab), prompts, decoder=PearlDecoder(model, gamma), max_new_tokens=40,
                    stop_ids=())
    assert anti.tokens == ref.tokens
    assert anti.stats["tau"] == 1.0 and anti.stats["post_verify_steps"] == 0
    assert anti.stats["pearl"]["target_block_steps"] == 0  # pre-verify only: one-token target calls


def test_toy_eos_accepted_mid_draft_and_max_new():
    """An oracle draft runs into EOS and max_new inside a post-verify chain: rows stop exactly where
    greedy stops, and the tokens after the accepted EOS are dropped."""
    model = TrigramModel(TOY_V, eos_ids=(EOS,))
    tab = random_table(3, TOY_V, 3.0)
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(2, TOY_V, size=int(rng.integers(1, 20))))) for _ in range(16)]
    p = _params(tab, tab)
    max_new = 23
    ref = generate(model, {"table": jnp.asarray(tab)}, prompts, method="greedy", max_new_tokens=max_new)
    assert {"eos", "length"} <= set(ref.finish_reason)
    out = generate(model, p, prompts, decoder=PearlDecoder(model, 5), max_new_tokens=max_new)
    assert out.tokens == ref.tokens and out.finish_reason == ref.finish_reason
    raw = out.stats["raw"]
    assert raw["pearl_tokens"] > raw["emitted"]  # verified tokens past an EOS / max_new were cut
    assert out.stats["post_verify_steps"] > 0
    # rows that end on EOS well before max_new (repeated to the same batch, so the same program runs):
    # whatever was cut here was cut after an accepted EOS
    eos_rows = [prompts[i] for i, f in enumerate(ref.finish_reason) if f == "eos" and len(ref.tokens[i]) < max_new - 6]
    assert len(eos_rows) >= 3
    rows = (eos_rows * len(prompts))[:len(prompts)]
    want = [ref.tokens[prompts.index(r)] for r in rows]
    out = generate(model, p, rows, decoder=PearlDecoder(model, 5), max_new_tokens=max_new)
    assert out.tokens == want and set(out.finish_reason) == {"eos"}
    assert out.stats["raw"]["pearl_tokens"] > out.stats["raw"]["emitted"]


def test_toy_min_new_tokens(toy):
    model, tab, dtab, _, _ = toy
    prompts = [[2, 3], [5], [7, 8, 9]]
    ref = generate(model, {"table": jnp.asarray(tab)}, prompts, method="greedy", max_new_tokens=20, min_new_tokens=6)
    out = generate(model, _params(tab, tab), prompts, decoder=PearlDecoder(model, 4), max_new_tokens=20,
                   min_new_tokens=6)
    assert out.tokens == ref.tokens


def test_parallel_time_model_adds_up(toy):
    """Each loop step costs max(gamma * draft_cost, c(T)) in the two-device model and the sum in the
    sequential one; T = gamma on steps where a row is in post-verify, else 1; greedy = longest row - 1."""
    model, tab, dtab, prompts, ref = toy
    gamma, cd = 3, CD
    out = generate(model, _params(tab, dtab), prompts, decoder=_dec3(model), max_new_tokens=40)
    pa = out.stats["pearl"]
    c_block = np.interp(gamma, [1, 2, 4], [1.0, 1.1, 1.5])
    nb, ns = pa["target_block_steps"], pa["target_single_steps"]
    assert nb > 0 and ns > 0 and nb + ns == pa["loop_steps"]
    assert pa["time_parallel"] == pytest.approx(ns * max(gamma * cd, 1.0) + nb * max(gamma * cd, c_block), rel=1e-5)
    assert pa["time_sequential"] == pytest.approx(ns * (gamma * cd + 1.0) + nb * (gamma * cd + c_block), rel=1e-5)
    assert pa["time_greedy"] == max(len(t) for t in ref.tokens) - 1
    assert pa["speedup_parallel_model"] == pytest.approx(pa["time_greedy"] / pa["time_parallel"])
    assert out.stats["draft_calls"] == gamma * pa["loop_steps"]
    assert out.stats["target_calls"] == pa["loop_steps"] + 1  # + the prefill call
    # default draft cost: draft layers / target layers
    dm4, dm2 = TrigramModel(TOY_V, num_layers=4), TrigramModel(TOY_V, num_layers=2)
    assert PearlDecoder(dm2)._draft_cost(dm4) == 0.5


def test_bad_input(toy):
    model, tab, dtab, _, _ = toy
    with pytest.raises(ValueError, match="draft length"):
        PearlDecoder(model, 0)
    with pytest.raises(ValueError, match="verifier"):
        PearlDecoder(model, 2, verifier="typical")
    with pytest.raises(ValueError, match="cost_curve"):
        PearlDecoder(model, 2, cost_curve=((1, 0.0),))
    params = {"table": jnp.asarray(tab)}
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, with_draft_params(params, {"table": jnp.zeros((5, 5, 5))}), [[2, 3]],
                 decoder=PearlDecoder(TrigramModel(5), 2), max_new_tokens=4)
    with pytest.raises(ValueError, match="with_draft_params"):
        generate(model, params, [[2, 3]], decoder=PearlDecoder(model, 2), max_new_tokens=4)
    with pytest.raises(ValueError, match="SamplingParams"):
        generate(model, _params(tab, dtab), [[2, 3]], decoder=PearlDecoder(model, 2, verifier="sampling"),
                 max_new_tokens=4)


# ------------------------------------------------------------------------------------------------
# Sampling: the joint distribution of the first tokens is the target's
# ------------------------------------------------------------------------------------------------
TV = 5
ROWS = 200_000
ALPHA = 1e-4


def _run_rows(decoder, params, max_new, seed, temperature):
    model = TrigramModel(TV)
    prompt = np.array([[3, 1]], np.int32)
    prompts = jnp.asarray(np.repeat(prompt, ROWS, 0))
    lens = jnp.full((ROWS,), 2, jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(seed), ROWS)).astype(jnp.uint32)
    inputs = DecodeInputs(max_new=jnp.full((ROWS,), max_new, jnp.int32), min_new=jnp.zeros((ROWS,), jnp.int32),
                          keys=keys, stop_ids=jnp.zeros((0,), jnp.int32),
                          out_buffer=jnp.zeros((ROWS, max_new), jnp.int32),
                          sampling=SamplingParams.create(ROWS, temperature=temperature))
    size = 2 + max_new + decoder.cache_headroom + 1
    state = loop.run_jit(decoder, model, params, prompts, lens, inputs, size)
    return np.asarray(state.tokens), decoder.summarize(state)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_joint_is_the_target(temperature):
    """gamma = 2, four new tokens: token 1 from the prefill, then pre-verify steps (one token) and
    post-verify steps (two tokens: a pending one and the next draft's first) in every mix."""
    model = TrigramModel(TV)
    tab = random_table(21, TV, 1.2)
    dtab = tab + random_table(22, TV, 1.2)
    params = _params(tab, dtab)
    joint = exact_joint(tab, (3, 1), 4, temperature)
    dec = PearlDecoder(model, 2, verifier="sampling")
    toks, st = _run_rows(dec, params, 4, seed=71, temperature=temperature)
    codes = ((toks[:, 0] * TV + toks[:, 1]) * TV + toks[:, 2]) * TV + toks[:, 3]
    assert pooled_chisquare_p(np.bincount(codes, minlength=TV ** 4), joint) > ALPHA
    assert st["pre_verify_steps"] > 0.2 * ROWS and st["post_verify_steps"] > 0.2 * ROWS, st["pearl"]
    assert st["pearl"]["post_verify_full_accepts"] > 0.05 * ROWS
    # negative control: the same schedule without residual resampling is rejected
    bad = PearlDecoder(model, 2, verifier="sampling", residual=False)
    btoks, _ = _run_rows(bad, params, 4, seed=72, temperature=temperature)
    bcodes = ((btoks[:, 0] * TV + btoks[:, 1]) * TV + btoks[:, 2]) * TV + btoks[:, 3]
    assert pooled_chisquare_p(np.bincount(bcodes, minlength=TV ** 4), joint) < ALPHA


# ------------------------------------------------------------------------------------------------
# Real default model
# ------------------------------------------------------------------------------------------------
# tier -> (new tokens, how many more chat prompts join the ragged batch); the full size is an explicitly
# `slow` parametrization of every real-model test, so CI and `make acceptance` select tiers by marker
TIERS = {"ci": (24, 0), "full": (64, 7)}
DRAFT_LAYERS = 28
COUNT = "Count from 1 to 30, separated by commas."  # the draft model should help here
DAYS = "List the days of the week, one per line."


@pytest.fixture(scope="module", params=["ci", pytest.param("full", marks=pytest.mark.slow)])
def real(request, model_f32, chat_prompt_ids):
    max_new, more = TIERS[request.param]
    model, params = model_f32
    tok = peer.peer_tokenizer()
    # a second request after an answered one (70 tokens: the batch spans two length buckets; it ends on EOS)
    msgs = [{"role": "user", "content": "Say exactly this and nothing else: I like green apples."},
            {"role": "assistant", "content": "I like green apples."},
            {"role": "user", "content": "Say exactly this and nothing else: I like green apples."}]
    again = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    prompts = [peer.peer_chat_ids(COUNT), peer.peer_chat_ids(DAYS), chat_prompt_ids[0], again]
    prompts += list(chat_prompt_ids[1:1 + more])
    ref = generate(model, params, prompts, method="greedy", max_new_tokens=max_new, batch_size=len(prompts))
    dm, dp = truncated_draft(model, params, DRAFT_LAYERS)
    return {"model": model, "params": params, "pparams": with_draft_params(params, dp), "dec": PearlDecoder(dm, 4),
            "prompts": prompts, "ref": ref, "max_new": max_new}


def _near_tie_data(real):
    """Teacher-forced reference logits and the measured block-vs-step |dlogit|, computed only when some
    sequence differs from the reference (they matter only there)."""
    if "logits" not in real:
        model, params = real["model"], real["params"]
        real["logits"] = teacher_logits(model, params, real["prompts"], real["ref"].tokens)
        real["max_dlogit"] = block_vs_step_dlogit(model, params, real["prompts"][0], 4)
    return real["logits"], real["max_dlogit"]


def _check(real, out, idx, label):
    ref = real["ref"]
    for j, i in enumerate(idx):
        if out.tokens[j] == ref.tokens[i]:
            assert out.finish_reason[j] == ref.finish_reason[i]
    if all(out.tokens[j] == ref.tokens[i] for j, i in enumerate(idx)):
        return []
    logits, dl = _near_tie_data(real)
    pairs = [(f"{label} prompt {i}", out.tokens[j], ref.tokens[i], logits[i]) for j, i in enumerate(idx)]
    return neartie.assert_sequences_match(pairs, dl)


def test_real_exact_ragged_batch(real):
    prompts = real["prompts"]
    assert len({bucket(len(p)) for p in prompts}) >= 2  # the batch is ragged across length buckets
    out = generate(real["model"], real["pparams"], prompts, decoder=real["dec"], max_new_tokens=real["max_new"],
                   batch_size=len(prompts))
    _check(real, out, range(len(prompts)), "pearl ragged")
    assert out.stats["pre_verify_steps"] > 0 and out.stats["post_verify_steps"] > 0
    assert out.stats["pearl"]["target_block_steps"] > 0 and out.stats["draft_calls"] > 0


def test_real_batch1_exact_and_tau_where_the_draft_helps(real):
    """Batch 1 (two prompts of one length bucket, one compiled program): exact; on the counting prompt
    the deep draft model keeps PEARL in post-verify and τ > 1.3 (the toy's always-wrong draft, τ = 1
    exactly, is the negative control)."""
    taus = []
    for i in (0, 1):
        out = generate(real["model"], real["pparams"], [real["prompts"][i]], decoder=real["dec"],
                       max_new_tokens=real["max_new"])
        _check(real, out, [i], "pearl b1")
        taus.append(out.stats["tau"])
        assert out.stats["pre_verify_steps"] > 0 and out.stats["post_verify_steps"] > 0, out.stats["pearl"]
        if i == 0:
            assert out.stats["tau"] > 1.3, out.stats["pearl"]
            assert out.stats["pearl"]["post_verify_full_accepts"] > 0
    print("PEARL τ at batch 1 (count, days):", taus)


def test_cli_pearl(real, tmp_path):
    """The CLI's PEARL run (same shapes as the batch-1 test above, so the compiled program is reused)
    gives the greedy reference's tokens; its stats carry τ, acceptance per position and the phases."""
    import json
    from jaxdec.cli import main
    out = str(tmp_path / "o.jsonl")
    args = ["generate", "--method", "speculative", "--drafter", "pearl", "--draft-layers", str(DRAFT_LAYERS),
            "--draft-tokens", "4", "--chat", "--quiet", "--prompt", COUNT, "--max-new-tokens", str(real["max_new"]),
            "--out", out]
    assert main(args) == 0
    rec = [json.loads(x) for x in open(out)]
    assert len(rec) == 1 and rec[0]["prompt_ids"] == real["prompts"][0]
    if rec[0]["tokens"] != real["ref"].tokens[0]:
        logits, dl = _near_tie_data(real)
        neartie.assert_sequences_match([("cli pearl", rec[0]["tokens"], real["ref"].tokens[0], logits[0])], dl)
    st = rec[0]["stats"]
    assert st["drafter"] == "pearl" and st["tau"] > 1.3 and st["target_calls"] >= 1
    assert len(st["acceptance_per_position"]) == 4
    assert st["pre_verify_steps"] > 0 and st["post_verify_steps"] > 0
    assert st["pearl"]["time_parallel"] > 0
    assert main(["generate", "--method", "speculative", "--drafter", "pearl", "--quiet", "--prompt", "hi",
                 "--draft-tokens", "0"]) == 2
    import argparse
    from jaxdec.speculative import cli as spec_cli
    ap = argparse.ArgumentParser()
    spec_cli.add_arguments(ap)
    for bad, msg in ((["--draft-layers", "99"], "--draft-layers"),
                     (["--draft-layers", "4", "--draft-model", "truncate:4"], "not both")):
        with pytest.raises(ValueError, match=msg):
            spec_cli.build(ap.parse_args(["--drafter", "pearl"] + bad), real["model"], real["params"])
