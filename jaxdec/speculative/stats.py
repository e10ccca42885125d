"""Host-side statistics of speculative runs: the raw counters a decoder keeps in ``state.stats`` turned into
what researchers report (tau, acceptance per draft position, target calls ...), summed over batches with
`merge_raw`. PEARL's counters (``pearl_*``) add its phase counts and the two-device time model."""
from __future__ import annotations

import numpy as np


def summarize_stats(st) -> dict:
    """Host-side statistics from the (summed) raw counters of one or more runs."""
    st = {k: np.asarray(v) for k, v in st.items()}
    rows = max(int(st["row_steps"]), 1)
    offered = st["pos_offered"].astype(np.int64)
    acc = st["pos_accepted"].astype(np.int64)
    per_pos = [float(a / o) if o else float("nan") for a, o in zip(acc, offered)]
    out = {
        "tau": float((int(st["accepted"]) + int(st["row_steps"])) / rows),
        "tokens_per_row_step": float(int(st["emitted"]) / rows),
        "acceptance_per_position": per_pos,
        "accepted_at_least": [float(a / rows) for a in acc],
        "target_calls": int(st["model_calls"]),
        "block_calls": int(st["block_calls"]),
        "draft_calls": int(st["draft_calls"]),
        "row_steps": int(st["row_steps"]),
        "side_branch_accepts": int(st["side_branch_accepts"]),
        "rank_acceptance": [float(a / max(int(st["expanded"]), 1)) for a in st["rank_accepts"]],
        "raw": {k: v.tolist() for k, v in st.items()},
    }
    if "pearl_tokens" in st:  # PEARL (`jaxdec.speculative.pearl`): τ counts its tokens per target call
        out["pearl"] = summarize_pearl(st)
        out["tau"] = out["pearl"]["tokens_per_target_call"]
        out["pre_verify_steps"] = out["pearl"]["pre_verify_steps"]
        out["post_verify_steps"] = out["pearl"]["post_verify_steps"]
    return out


def merge_raw(a: dict | None, b: dict) -> dict:
    """Sum two `summarize(...)["raw"]` counter dicts (for runs split into several batches)."""
    if a is None:
        return {k: np.asarray(v) for k, v in b.items()}
    return {k: np.asarray(a[k]) + np.asarray(b[k]) for k in b}


def summarize_pearl(st: dict) -> dict:
    """PEARL's host-side statistics from the (summed) raw counters (called by `summarize_stats`)."""
    i = lambda k: int(np.asarray(st[k]))  # noqa: E731
    x = lambda k: float(np.asarray(st[k]))  # noqa: E731
    rows = max(i("row_steps"), 1)
    pre, post = i("pearl_pre_steps"), i("pearl_post_steps")
    po, pa = np.asarray(st["pearl_post_offered"], np.int64), np.asarray(st["pearl_post_accepted"], np.int64)
    par, seq, greedy = x("pearl_time_parallel"), x("pearl_time_sequential"), x("pearl_time_greedy")
    return {
        "pre_verify_steps": pre, "post_verify_steps": post,
        "pre_verify_acceptance": float(i("pearl_pre_accepted") / pre) if pre else float("nan"),
        "post_verify_full_accepts": i("pearl_post_full"),
        "post_verify_acceptance_per_position": [float(a / o) if o else float("nan") for a, o in zip(pa, po)],
        "target_block_steps": i("block_calls"), "target_single_steps": i("pearl_single_steps"),
        "loop_steps": i("pearl_loop_steps"), "tokens_per_target_call": float(i("pearl_tokens") / rows),
        "time_parallel": par, "time_sequential": seq, "time_greedy": greedy,
        "time_draft": x("pearl_time_draft"), "time_target": x("pearl_time_target"),
        "speedup_parallel_model": greedy / par if par > 0 else float("nan"),
        "speedup_sequential_model": greedy / seq if seq > 0 else float("nan"),
    }
