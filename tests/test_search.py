"""Acceptance: beam search on the default model returns HF `generate(num_beams=N)`'s top sequence and score.

Near ties. Two implementations whose log-probabilities differ by ~1e-5 can legitimately choose different
beams where two cumulative scores (nearly) tie. `beam_near_tie` is the beam-search form of the shared
near-tie rule (tests/neartie.py): HF's own per-step log-probabilities (``output_scores``) are replayed
through a NumPy transcription of HF's beam step (`hf_beam_replay`, which must reproduce HF's output
exactly, so it is checked too); our run is replayed step by step through the debug driver; at the
first step where the running or finished beam sets differ, the difference is excused only if HF's
margin at one of that step's decision boundaries (the num_beams-th vs next running candidate, the
num_beams-th vs next candidate overall, the finished-set cut, the early-stop comparison) is below
max(1e-3, 10 x the measured max |delta cumulative score| on the common beams). At most 10 % of the
compared prompts may be excused, and every excused case is printed.
"""
from __future__ import annotations

import numpy as np
import pytest

import peer

NEG32 = np.float32(-1.0e9)


# ------------------------------------------------------------------ NumPy transcription of HF's beam step
def _desc(x):
    """Indices sorting x descending, ties by lower index first (what top-k returns here)."""
    return np.lexsort((np.arange(x.size), -x))


def hf_beam_replay(step_logprobs, nb, eos_ids, max_new, length_penalty=1.0, early_stopping=False):
    """Replay HF's `_beam_search` from its own per-step processed log-probs ``[nb, V]`` (running order).

    Returns dict(finished=[(tokens, score)] best first, trace=[per step: (running {prefix: score},
    finished {tokens: score}, margin)]).
    """
    eos = np.asarray(eos_ids)
    k = max(2, 1 + len(eos)) * nb
    run_seqs = [()] * nb
    run_scores = np.full(nb, NEG32, np.float32)
    run_scores[0] = 0.0
    fin_seqs = [()] * nb
    fin_scores = np.full(nb, NEG32, np.float32)
    fin_flag = np.zeros(nb, bool)
    unsat = True
    trace = []
    for s, lp in enumerate(step_logprobs):
        lp = np.asarray(lp, np.float32)
        v = lp.shape[1]
        n = s + 1
        acc = (lp + run_scores[:, None]).reshape(-1)
        order = _desc(acc)
        top = order[:k]
        vals, src, tok = acc[top], top // v, top % v
        hit_all = np.isin(order % v, eos) | (n >= max_new)
        hits = hit_all[:k]
        # margins at this step's decision boundaries
        margins = []
        nonhit = acc[order[~hit_all]]
        if nonhit.size > nb:
            margins.append(float(nonhit[nb - 1] - nonhit[nb]))
        margins.append(float(acc[order[nb - 1]] - acc[order[nb]]))
        # running beams
        rvals = vals + hits.astype(np.float32) * NEG32
        ri = _desc(rvals)[:nb]
        new_run = [run_seqs[src[i]] + (int(tok[i]),) for i in ri]
        new_run_scores = rvals[ri]
        # finished set
        cand = vals / np.float32(float(n) ** length_penalty)
        if early_stopping is True and fin_flag.all():
            cand = cand + NEG32
        if not unsat:
            cand = cand + NEG32
        just = hits & (np.arange(k) < nb)
        cand = cand + (~just).astype(np.float32) * NEG32
        m_scores = np.concatenate([fin_scores, cand.astype(np.float32)])
        m_seqs = fin_seqs + [run_seqs[src[i]] + (int(tok[i]),) for i in range(k)]
        m_flag = np.concatenate([fin_flag, just])
        fi = _desc(m_scores)
        real = m_scores[fi][m_scores[fi] > -1e8]
        if real.size > nb:
            margins.append(float(real[nb - 1] - real[nb]))
        fi = fi[:nb]
        fin_seqs = [m_seqs[i] for i in fi]
        fin_scores = m_scores[fi]
        fin_flag = m_flag[fi]
        run_seqs, run_scores = new_run, new_run_scores.astype(np.float32)
        # early-stop heuristic
        best_len = max_new if (early_stopping == "never" and length_penalty > 0) else n
        best = run_scores[0] / np.float32(float(best_len) ** length_penalty)
        worst = np.where(fin_flag, fin_scores.min(), NEG32)
        if fin_flag.all():
            margins.append(float(abs(best - fin_scores.min())))
        unsat = unsat and bool(np.any(best > worst))
        if fin_flag.sum() >= 2:
            margins.append(float(fin_scores[0] - fin_scores[1]))
        trace.append(({run_seqs[i]: float(run_scores[i]) for i in range(nb)},
                      {fin_seqs[i]: float(fin_scores[i]) for i in range(nb) if fin_flag[i]},
                      min(margins)))
        done = not (unsat and not (fin_flag.all() and early_stopping is True) and not hits.all())
        if done:
            break
    finished = [(list(fin_seqs[i]), float(fin_scores[i])) for i in range(nb)]
    return {"finished": finished, "trace": trace}


# ------------------------------------------------------------------ the peer
def hf_beam(ids, nb, max_new, eos=2, **kw):
    import torch
    m = peer.peer_model()
    with torch.no_grad():
        out = m.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         num_beams=nb, num_return_sequences=nb, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True, **kw)
    seqs = []
    for s in out.sequences[:, len(ids):].tolist():
        cut = s.index(eos) + 1 if eos in s else len(s)
        seqs.append(s[:cut])
    scores = out.sequences_scores.tolist()
    steps = [x.float().numpy() for x in out.scores]
    return seqs, scores, steps


# ------------------------------------------------------------------ our trajectory (debug driver)
def our_trace(model, params, ids, nb, max_new, **kw):
    from jaxdec.search.beam import beam_search
    trace = []

    def cb(state):
        m = state.method
        toks = np.asarray(state.tokens)
        t = int(np.asarray(state.num_new)[0])
        run = {tuple(toks[j, :t].tolist()): float(np.asarray(m["run_scores"])[0, j]) for j in range(nb)}
        fl = np.asarray(m["fin_flag"])[0]
        ft = np.asarray(m["fin_tokens"])[0]
        fln = np.asarray(m["fin_len"])[0]
        fs = np.asarray(m["fin_scores"])[0]
        fin = {tuple(ft[j, :fln[j]].tolist()): float(fs[j]) for j in range(nb) if fl[j]}
        trace.append((run, fin))

    beam_search(model, params, [ids], num_beams=nb, max_new_tokens=max_new, debug=True, callback=cb, **kw)
    return trace


def beam_near_tie(ours_trace, ref_trace):
    """(excused, message): first step where the beam sets differ and HF's margin there vs the bound."""
    delta = 0.0
    for s, ((o_run, o_fin), (r_run, r_fin, margin)) in enumerate(zip(ours_trace, ref_trace)):
        for pre in set(o_run) & set(r_run):
            if r_run[pre] > -1e8:
                delta = max(delta, abs(o_run[pre] - r_run[pre]))
        for seq in set(o_fin) & set(r_fin):
            delta = max(delta, abs(o_fin[seq] - r_fin[seq]))
        if set(o_run) != set(r_run) or set(o_fin) != set(r_fin):
            bound = max(1e-3, 10.0 * delta)
            msg = f"beam sets first differ at step {s}: HF margin {margin:.3g}, bound {bound:.3g}"
            return margin < bound, msg
    # same beam sets all along: only the final order of the finished set can differ
    margin = ref_trace[-1][2]
    bound = max(1e-3, 10.0 * delta)
    return margin < bound, f"same beam sets; final HF margin {margin:.3g}, bound {bound:.3g}"


def check_beams_against_hf(model, params, prompt_ids, nb, max_new, report=print, **kw):
    from jaxdec.search.beam import beam_search
    ours = beam_search(model, params, prompt_ids, num_beams=nb, max_new_tokens=max_new, **kw)
    failures, excused, compared = [], [], 0
    worst_score = 0.0
    for i, ids in enumerate(prompt_ids):
        seqs, scores, steps = hf_beam(ids, nb, max_new, **kw)
        replay = hf_beam_replay(steps, nb, (2,), max_new, kw.get("length_penalty", 1.0),
                                kw.get("early_stopping", False))
        # the replay is a faithful transcription of HF's algorithm: it reproduces HF's output from HF's scores
        assert replay["finished"][0][0] == seqs[0], (replay["finished"][0], seqs[0])
        assert abs(replay["finished"][0][1] - scores[0]) < 1e-5
        compared += 1
        mine = ours.extras["beams"][i][0]
        if mine["tokens"] == seqs[0]:
            worst_score = max(worst_score, abs(mine["score"] - scores[0]))
            assert abs(mine["score"] - scores[0]) <= 1e-4, (i, mine["score"], scores[0])
            continue
        ok, msg = beam_near_tie(our_trace(model, params, ids, nb, max_new, **kw), replay["trace"])
        label = f"beams={nb} prompt {i}: ours {mine['tokens']} ({mine['score']:.5f}) vs HF {seqs[0]} ({scores[0]:.5f}); {msg}"
        (excused if ok else failures).append(label)
    for m in excused:
        report("near-tie excused: " + m)
    assert not failures, "beam search differs from HF without a near tie:\n" + "\n".join(failures)
    assert len(excused) <= 0.10 * compared, f"{len(excused)} of {compared} prompts needed a near-tie excuse"
    return {"compared": compared, "excused": excused, "max_score_delta": worst_score}


@pytest.mark.parametrize("nb", [2, 4])
def test_beam_search_matches_hf_ci_size(nb, model_f32, chat_prompt_ids):
    model, params = model_f32
    res = check_beams_against_hf(model, params, chat_prompt_ids[:4], nb, 16)
    print(f"beams={nb}: {res}")


@pytest.mark.slow
@pytest.mark.parametrize("nb", [2, 4, 8])
def test_beam_search_matches_hf_full(nb, model_f32, chat_prompt_ids):
    model, params = model_f32
    res = check_beams_against_hf(model, params, chat_prompt_ids[:10], nb, 24, report=print)
    print(f"beams={nb}: {res}")


# ------------------------------------------------------------------ diverse and stochastic beams, real model
def distinct_n(seqs, n=2):
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def test_diverse_beam_search_real_model(model_f32, chat_prompt_ids):
    """lambda = 0: every group returns plain beam search's beams (num_beams / groups); lambda > 0: the
    returned beams are more diverse (distinct-2 across a prompt's beams rises)."""
    from jaxdec.search.beam import beam_search
    model, params = model_f32
    prompts = chat_prompt_ids[:4]
    plain = beam_search(model, params, prompts, num_beams=2, max_new_tokens=16)
    d0 = beam_search(model, params, prompts, num_beams=4, num_beam_groups=2, diversity_penalty=0.0,
                     max_new_tokens=16)
    d1 = beam_search(model, params, prompts, num_beams=4, num_beam_groups=2, diversity_penalty=1.0,
                     max_new_tokens=16)
    for i in range(len(prompts)):
        want = [b["tokens"] for b in plain.extras["beams"][i]]
        for gi in range(2):
            got = [b["tokens"] for b in d0.extras["beams"][i] if b["group"] == gi]
            assert got == want, (i, gi)
    before = [distinct_n([b["tokens"] for b in bs]) for bs in d0.extras["beams"]]
    after = [distinct_n([b["tokens"] for b in bs]) for bs in d1.extras["beams"]]
    print(f"distinct-2 across beams: lambda=0 {np.mean(before):.3f} -> lambda=1 {np.mean(after):.3f}")
    assert np.mean(after) > np.mean(before) + 0.1
    assert sum(a > b for a, b in zip(after, before)) >= 3


def test_stochastic_beam_real_model(model_f32, chat_prompt_ids):
    """k distinct samples per prompt, each with its teacher-forced log-probability (jaxdec.score)."""
    from jaxdec import score
    from jaxdec.search.stochastic import stochastic_beam_search
    model, params = model_f32
    prompts = chat_prompt_ids[:2]
    g = stochastic_beam_search(model, params, prompts, k=4, max_new_tokens=12, seed=3)
    for ids, beams in zip(prompts, g.extras["beams"]):
        assert len(beams) == 4 and len({tuple(b["tokens"]) for b in beams}) == 4
        lps = score(model, params, [ids] * 4, [b["tokens"] for b in beams])
        for b, lp in zip(beams, lps):
            assert abs(b["score"] - float(np.sum(lp))) < 2e-4, (b["score"], float(np.sum(lp)))
