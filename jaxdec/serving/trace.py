"""Request traces for the engine: a Poisson generator, JSONL files, and a replay that reports throughput and
TTFT / TPOT / ITL percentiles.

A trace is a list of ``{"arrival": seconds from the start, "prompt_len": tokens, "output_len": tokens}``.
`replay` submits each request at its arrival time (the engine is stepped on the calling thread; arrivals
are admitted between steps), decodes exactly ``output_len`` tokens per request (an ``ignore_eos`` engine)
and measures, per request, TTFT (arrival to the first token on the host) and TPOT (the mean time between
its later tokens), and over all requests ITL (each gap between two consecutive tokens of a request).
"""
from __future__ import annotations

import json
import time
from typing import Optional, Sequence

import numpy as np


def poisson_trace(n: int, rate: float, prompt_lens: Sequence[int], output_lens: Sequence[int],
                  seed: int = 0) -> list:
    """``n`` requests with exponential inter-arrival times of mean ``1 / rate`` seconds (``rate`` requests per
    second; ``inf``: all at time 0); prompt and output lengths drawn uniformly from the given choices."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second, got {rate!r}")
    for name, lens in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not len(lens) or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1 for x in lens):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {list(lens)!r}")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n) if np.isinf(rate) else rng.exponential(1.0 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [{"arrival": float(a), "prompt_len": int(rng.choice(prompt_lens)), "output_len": int(rng.choice(output_lens))}
            for a in arrivals]


def load_trace(path: str) -> list:
    """A JSONL trace file (one request object per line); raises ValueError naming the line and field."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            for k, lo in (("arrival", 0), ("prompt_len", 1), ("output_len", 1)):
                v = r.get(k) if isinstance(r, dict) else None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (k != "arrival" and v != int(v)):
                    raise ValueError(f"{path}:{i}: '{k}' must be {'a number >= 0' if k == 'arrival' else 'an integer >= 1'}"
                                     f", got {v!r}")
            out.append({"arrival": float(r["arrival"]), "prompt_len": int(r["prompt_len"]),
                        "output_len": int(r["output_len"])})
    if not out:
        raise ValueError(f"{path}: the trace is empty")
    return out


def save_trace(trace: list, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in trace:
            f.write(json.dumps(r) + "\n")


def _pct(xs) -> dict:
    if not len(xs):
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(xs, np.float64)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def trace_prompts(trace: list, prompt_source: Optional[Sequence[int]] = None, prompts: Optional[list] = None,
                  vocab_lo: int = 3) -> list:
    """The prompt of each trace request: ``prompts[i][:prompt_len]`` (one token list per request), else the first
    ``prompt_len`` ids of ``prompt_source``, else ids ``vocab_lo, vocab_lo + 1, ...``."""
    if prompts is not None and len(prompts) != len(trace):
        raise ValueError(f"prompts has {len(prompts)} entries; the trace has {len(trace)} requests")
    out = []
    for i, r in enumerate(trace):
        n = r["prompt_len"]
        src = prompts[i] if prompts is not None else prompt_source
        ids = list(src[:n]) if src is not None else [vocab_lo + (j % 1000) for j in range(n)]
        if len(ids) < n:
            raise ValueError(f"request {i} asks for a {n}-token prompt; its prompt source has {len(src)} ids")
        out.append(ids)
    return out


def replay(engine, trace: list, prompt_source: Optional[Sequence[int]] = None, vocab_lo: int = 3,
           prompts: Optional[list] = None, keep_tokens: bool = False, warmup: bool = True) -> dict:
    """Replay ``trace`` on ``engine`` (build it with ``ignore_eos=True`` for exact output lengths). Prompts as
    `trace_prompts` makes them. Returns throughput (output tokens per second of wall time), TTFT, TPOT and ITL
    (every gap between two tokens of one request) percentiles, ``tau`` (tokens per decode step per live row over
    the replay: 1.0 plain, more with a speculative engine), and per-request records ``{id, arrival,
    prompt_len, output_len, tokens, ttft, tpot}`` in trace order (``keep_tokens``: with ``token_ids``, the
    request's new tokens). ``warmup``: first compile every admission shape of the trace's prompt buckets
    (`Engine.warmup`), outside the clock."""
    order = sorted(range(len(trace)), key=lambda i: trace[i]["arrival"])
    ids_of = trace_prompts(trace, prompt_source, prompts, vocab_lo)
    times: dict = {}  # id -> host times at which tokens arrived (one entry per token)
    toks_of: dict = {}
    meta: dict = {}

    def on_tokens(rid, toks, reason):
        now = time.perf_counter()
        times[rid].extend([now] * len(toks))
        toks_of[rid].extend(toks)

    if warmup and trace:
        engine.warmup([len(p) for p in ids_of])
    t0, steps0 = time.perf_counter(), engine.steps
    tau0 = (getattr(engine, "decode_tokens", 0), getattr(engine, "row_steps", 0))
    nxt = 0
    while nxt < len(order) or engine.busy:
        now = time.perf_counter() - t0
        while nxt < len(order) and trace[order[nxt]]["arrival"] <= now:
            r = trace[order[nxt]]
            rid = engine.submit(ids_of[order[nxt]], max_new_tokens=r["output_len"], on_tokens=on_tokens)
            times[rid], toks_of[rid] = [], []
            meta[rid] = (order[nxt], t0 + r["arrival"])
            nxt += 1
        if engine.busy:
            engine.step()
        elif nxt < len(order):
            time.sleep(max(0.0, min(0.05, trace[order[nxt]]["arrival"] - (time.perf_counter() - t0))))
    wall = time.perf_counter() - t0
    for rid in times:
        engine.pop_result(rid)
    recs, ttft, tpot, itl = [], [], [], []
    for rid, ts in times.items():
        i, arr = meta[rid]
        itl += np.diff(ts).tolist()
        a = ttft_i = ts[0] - arr if ts else None
        b = (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None
        if a is not None:
            ttft.append(ttft_i)
        if b is not None:
            tpot.append(b)
        recs.append({"id": rid, **trace[i], "tokens": len(ts), "ttft": a, "tpot": b,
                     **({"token_ids": toks_of[rid]} if keep_tokens else {})})
    recs.sort(key=lambda rec: meta[rec["id"]][0])
    total = sum(r["tokens"] for r in recs)
    return {"requests": len(recs), "output_tokens": total, "seconds": wall,
            "tokens_per_second": total / wall if wall > 0 else float("nan"), "ttft": _pct(ttft), "tpot": _pct(tpot),
            "itl": _pct(itl),
            "slots": engine.slots, "steps": engine.steps - steps0, **_tau(engine, tau0), "records": recs}


def _tau(engine, before) -> dict:
    """The replay's tau (tokens per decode step per live row: 1.0 plain, > 1 when speculative rows accept
    drafts), from the engine's counters."""
    if not hasattr(engine, "row_steps"):
        return {}
    rows = engine.row_steps - before[1]
    return {"tau": (engine.decode_tokens - before[0]) / rows if rows else None,
            "speculative": bool(getattr(engine, "speculative", False))}
