"""Serving benchmark (issue 20): the decode-slot engine on a request trace vs sequential HF generate and vs jaxdec
static batching, in the same run; TPOT with the slots full vs one decode step measured alone.

Cells (timings inside a cell are interleaved repetition by repetition, alternating the order of the systems, so
ratios compare runs made back to back under the same load):

* ``trace``  one Poisson trace (--requests, --rate, --prompt-lens, --output-lens; every request decodes exactly
             its output length, EOS ignored), replayed by three systems that each start a request no earlier than
             its arrival:
             - engine: `jaxdec.serving.Engine` with --slots slots (continuous batching: between two decode steps
               a finished request's slot takes the next arrived one) through `jaxdec.serving.trace.replay`;
             - static: jaxdec `generate`, batches of up to --slots requests taken from those arrived when the
               previous batch finished; a batch decodes as many tokens as its longest request (one compiled
               program for every batch: fixed batch size, cache and capacity; max_new_tokens is traced);
             - hf: transformers `generate` on the same GGUF (fp32, torch's default threads, its default
               attention), one request at a time in arrival order.
             Throughput = the trace's output tokens / wall time from the first arrival to the last token.
             Tokens: engine rows vs static rows (same weights), and vs HF (fp32) are compared per request.
* ``tpot``   --tpot-requests requests all arriving at 0 on --slots slots (the slots stay full until the queue
             drains; output lengths mixed, so prefills of new requests interleave with decoding): TPOT (per
             request mean) and ITL (every gap) percentiles, against one decode step over the full slots timed
             alone (`Engine.time_steps`, median of --step-reps) and the engine's host step (`Engine.step` with
             nothing to admit). Goal (issue 20): p99 TPOT <= 1.5x the step alone. The same trace is also replayed
             with chunked prefill across decode steps (`Engine(prefill_chunk_tokens=C)` for each C of
             --chunk-tokens: at most C prompt tokens prefilled per engine iteration, long prompts in pieces), each
             with its throughput, the mean number of busy slots per decode step (the goal holds "with all slots
             busy": a small C admits slower, so slots may idle) and its tokens compared with the unchunked engine.

Conventions (DESIGN.md): time from token ids in to token ids on the host, prefill included, after a warm-up
that compiles every program (first-call times reported separately); median [min, max] over --reps repetitions;
the load average is recorded per cell (experiments/benchlib.py) and a loaded run is flagged.

    python experiments/serve_bench.py                    # 64 requests, 3 repetitions (HF dominates the time)
    python experiments/serve_bench.py --quick            # 16 requests, shorter outputs, 2 repetitions
    python experiments/serve_bench.py --smoke            # tiny sizes, to a temp dir (checks it runs)
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SECTIONS = ("trace", "tpot")
SYSTEMS = ("engine", "static", "hf")


@dataclasses.dataclass(frozen=True)
class Config:
    requests: int = field(default=64, metadata={"help": "requests in the trace cell"})
    rate: float = field(default=16.0, metadata={"help": "Poisson arrivals per second (inf: all at 0)"})
    prompt_lens: tuple[int, ...] = field(default=(32, 128), metadata={"help": "prompt lengths to draw from"})
    output_lens: tuple[int, ...] = field(default=(16, 64), metadata={"help": "output lengths to draw from"})
    slots: int = field(default=8, metadata={"help": "engine slots = static batch size"})
    reps: int = field(default=3, metadata={"help": "timed repetitions per system (after one warm-up)"})
    weights: str = field(default="q", metadata={"help": "jaxdec weights (q: the server's default)"})
    seed: int = field(default=0, metadata={"help": "trace seed"})
    tpot_requests: int = field(default=32, metadata={"help": "requests of the tpot cell (all at time 0)"})
    step_reps: int = field(default=20, metadata={"help": "decode steps timed alone in the tpot cell"})
    prefill_budget: int = field(default=0, metadata={"help": "engine prefill_budget: padded prompt tokens "
                                                            "prefilled between two steps (0: fill every free slot)"})
    chunk_tokens: tuple[int, ...] = field(default=(64, 16), metadata={
        "help": "tpot cell: engine prefill_chunk_tokens values replayed besides the unchunked engine (chunked "
                "prefill across decode steps; empty: none)"})
    sections: tuple[str, ...] = runner.select(SECTIONS, help=f"cells to run, of {SECTIONS}")


SMOKE = Config(requests=6, rate=50.0, prompt_lens=(8, 70), output_lens=(2, 4), slots=2, reps=1, tpot_requests=4,
               step_reps=2, chunk_tokens=(32,))
QUICK = Config(requests=16, output_lens=(8, 32), reps=2, tpot_requests=24)


def _depends(cell: str) -> list:
    common = ["prompt_lens", "output_lens", "slots", "weights", "seed", "prefill_budget"]
    if cell == "trace":
        return common + ["requests", "rate", "reps"]
    return common + ["tpot_requests", "step_reps", "chunk_tokens"]


# ------------------------------------------------------------------------------------------------ systems
class Systems:
    """The jaxdec model, the HF peer and the prompt pool, made on first use and shared by the cells."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._m = {}

    def jaxdec(self):
        if "jaxdec" not in self._m:
            import jaxdec
            self._m["jaxdec"] = jaxdec.load(weights=self.cfg.weights)
        return self._m["jaxdec"]

    def hf(self):
        if "hf" not in self._m:
            import peer
            self._m["hf"] = peer.peer_model()
        return self._m["hf"]

    def pool(self, n: int) -> list:
        """``n`` distinct natural-text prompts of at least the longest prompt length: the chat prompts' texts,
        24 or more at a time in a rotating order, tokenized."""
        import json
        with open(os.path.join(ROOT, "jaxdec", "data", "prompts", "chat_prompts.jsonl")) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        tok = self.jaxdec().tokenizer
        return [tok.encode(" ".join(texts[(i + 7 * k) % len(texts)] for k in range(24 + i // len(texts))))
                for i in range(n)]

    def requests(self, trace: list) -> list:
        from jaxdec.serving.trace import trace_prompts
        return trace_prompts(trace, prompts=self.pool(len(trace)))


def sizes(cfg) -> tuple:
    """(cache_size, capacity, longest prompt) shared by the engine and the static batches."""
    from jaxdec.cache import bucket
    cap, longest = max(cfg.output_lens), max(cfg.prompt_lens)
    return bucket(longest + cap + 1), cap, longest


def make_engine(m, cfg, chunk: int = 0):
    from jaxdec.serving import Engine
    cache, cap, _ = sizes(cfg)
    return Engine(m.model, m.params, slots=cfg.slots, cache_size=cache, capacity=cap, ignore_eos=True,
                  prefill_budget=cfg.prefill_budget or None, prefill_chunk_tokens=chunk or None)


def _wait_for(arrival: float, t0: float) -> None:
    dt = arrival - (time.perf_counter() - t0)
    if dt > 0:
        time.sleep(dt)


def engine_run(eng, trace, prompts) -> dict:
    from jaxdec.serving.trace import replay
    out = replay(eng, trace, prompts=prompts, keep_tokens=True)
    return {"seconds": out["seconds"], "tokens": [r["token_ids"] for r in out["records"]],
            "ttft": out["ttft"], "tpot": out["tpot"], "itl": out["itl"], "steps": out["steps"]}


def static_run(m, cfg, trace, prompts) -> dict:
    """Batches of up to ``slots`` arrived requests, each decoded to its longest request's length."""
    from jaxdec.core.generate import generate
    cache, cap, longest = sizes(cfg)
    order = sorted(range(len(trace)), key=lambda i: trace[i]["arrival"])
    toks: list = [None] * len(trace)
    t0, i, batches = time.perf_counter(), 0, 0
    while i < len(order):
        _wait_for(trace[order[i]]["arrival"], t0)
        now = time.perf_counter() - t0
        batch = [k for k in order[i:i + cfg.slots] if trace[k]["arrival"] <= now]
        n_new = max(trace[k]["output_len"] for k in batch)
        g = generate(m.model, m.params, [prompts[k] for k in batch], max_new_tokens=n_new, min_new_tokens=n_new,
                     stop_ids=(), batch_size=cfg.slots, cache_size=cache, capacity=cap, longest_prompt=longest)
        for k, t in zip(batch, g.tokens):
            toks[k] = t[:trace[k]["output_len"]]
        i, batches = i + len(batch), batches + 1
    return {"seconds": time.perf_counter() - t0, "tokens": toks, "batches": batches}


def hf_run(model, trace, prompts) -> dict:
    """One request at a time, in arrival order, each started no earlier than its arrival."""
    from bench_throughput import hf_fn
    order = sorted(range(len(trace)), key=lambda i: trace[i]["arrival"])
    toks: list = [None] * len(trace)
    t0 = time.perf_counter()
    for k in order:
        _wait_for(trace[k]["arrival"], t0)
        toks[k] = hf_fn(model, trace[k]["output_len"])([prompts[k]])[0]
    return {"seconds": time.perf_counter() - t0, "tokens": toks}


def _stats(xs) -> dict:
    a = np.asarray(xs, np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def same_rows(a: list, b: list) -> int:
    return sum(x == y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ cells
def warm_trace(cfg) -> list:
    """Full slots of 2-token requests at every prompt length: the warm-up compiles each prompt bucket's prefill,
    the insert and the step."""
    return [{"arrival": 0.0, "prompt_len": p, "output_len": 2} for p in cfg.prompt_lens for _ in range(cfg.slots)]


def warm_engine(eng, cfg, sys_) -> float:
    warm = warm_trace(cfg)
    t = time.perf_counter()
    engine_run(eng, warm, sys_.requests(warm))
    return time.perf_counter() - t


def cell_trace(cfg, sys_: Systems) -> dict:
    from jaxdec.serving.trace import poisson_trace
    m = sys_.jaxdec()
    trace = poisson_trace(cfg.requests, cfg.rate, list(cfg.prompt_lens), list(cfg.output_lens), seed=cfg.seed)
    prompts = sys_.requests(trace)
    need = sum(r["output_len"] for r in trace)
    eng = make_engine(m, cfg)
    # warm-up (compiles): every prompt bucket through the engine, one static batch, one HF request
    warm = warm_trace(cfg)
    first = {"engine": warm_engine(eng, cfg, sys_)}
    t = time.perf_counter()
    static_run(m, cfg, warm[:cfg.slots], sys_.requests(warm[:cfg.slots]))
    first["static"] = time.perf_counter() - t
    hf = sys_.hf()
    t = time.perf_counter()
    hf_run(hf, warm[:1], sys_.requests(warm[:1]))
    first["hf"] = time.perf_counter() - t
    runs = {s: [] for s in SYSTEMS}
    fns = {"engine": lambda: engine_run(eng, trace, prompts), "static": lambda: static_run(m, cfg, trace, prompts),
           "hf": lambda: hf_run(hf, trace, prompts)}
    for rep in range(cfg.reps):
        for s in (SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]):
            r = fns[s]()
            got = sum(len(x) for x in r["tokens"])
            if got != need:
                raise RuntimeError(f"{s}: {got} output tokens, the trace asks for {need}")
            runs[s].append(r)
        print(f"  rep {rep + 1}/{cfg.reps}: " + ", ".join(f"{s} {need / runs[s][-1]['seconds']:.1f} tok/s"
                                                        for s in SYSTEMS), flush=True)
    secs = {s: np.array([r["seconds"] for r in runs[s]]) for s in SYSTEMS}
    out = {"trace": {"requests": len(trace), "output_tokens": need, "span_s": trace[-1]["arrival"] if trace else 0,
                     "prompt_tokens": sum(len(p) for p in prompts)},
           "first_call_s": first}
    for s in SYSTEMS:
        out[s] = {"seconds": secs[s].tolist(), "tok_s": _stats(need / secs[s])}
    for s in ("static", "hf"):
        out[f"engine_over_{s}"] = _stats(secs[s] / secs["engine"])  # per repetition: same load
    last = {s: runs[s][-1]["tokens"] for s in SYSTEMS}
    out["engine"].update(ttft=runs["engine"][-1]["ttft"], tpot=runs["engine"][-1]["tpot"],
                         itl=runs["engine"][-1]["itl"], steps=runs["engine"][-1]["steps"])
    out["static"]["batches"] = runs["static"][-1]["batches"]
    out["rows_equal"] = {"engine_vs_static": same_rows(last["engine"], last["static"]),
                         "engine_vs_hf": same_rows(last["engine"], last["hf"]), "of": len(trace)}
    out["hf_warning"] = benchlib.peer_warning(secs["hf"], "HF").strip()
    return out


def _replay_stats(eng, cfg, trace, prompts) -> dict:
    """One timed replay on ``eng`` (warmed up): latency percentiles, throughput and, from the engine's iteration
    log, how busy the slots were and the most prompt tokens prefilled in one iteration."""
    n0 = len(eng.iteration_log)
    full = engine_run(eng, trace, prompts)
    its = list(eng.iteration_log)[n0:] if len(eng.iteration_log) < eng.iteration_log.maxlen else []
    dec = [it["decode"] for it in its if it["decode"]]
    out = {"tpot": full["tpot"], "itl": full["itl"], "ttft": full["ttft"], "seconds": full["seconds"],
           "steps": full["steps"], "tokens": full["tokens"],
           "tok_s": sum(r["output_len"] for r in trace) / full["seconds"]}
    if dec:
        out.update(busy_mean=float(np.mean(dec)), busy_full_frac=float(np.mean([d == cfg.slots for d in dec])),
                   max_prefill_tokens=max(it["prefill_tokens"] for it in its),
                   chunk_iterations=sum(it["prefill_tokens"] > 0 and it["decode"] > 0 for it in its))
    return out


def cell_tpot(cfg, sys_: Systems) -> dict:
    from jaxdec.serving.trace import poisson_trace
    m = sys_.jaxdec()
    trace = poisson_trace(cfg.tpot_requests, float("inf"), list(cfg.prompt_lens), list(cfg.output_lens),
                          seed=cfg.seed + 1)
    prompts = sys_.requests(trace)
    engines = []
    for chunk in [0] + [c for c in cfg.chunk_tokens if c]:
        e = make_engine(m, cfg, chunk)
        first = warm_engine(e, cfg, sys_)
        r = _replay_stats(e, cfg, trace, prompts)
        r.update(chunk=chunk, first_call_s=first)
        engines.append(r)
        print(f"  chunk {chunk or 'none'}: p50/p99 TPOT {r['tpot']['p50'] * 1e3:.1f}/{r['tpot']['p99'] * 1e3:.1f} ms, "
              f"{r['tok_s']:.1f} tok/s, busy slots {r.get('busy_mean', 0):.2f}", flush=True)
        if chunk == 0:
            eng = e  # the unchunked engine also times the step alone
    # one decode step over full slots, alone: every slot holds a request with room for the timed steps
    _, cap, _ = sizes(cfg)
    ids = [eng.submit(p, max_new_tokens=cap) for p in prompts[:cfg.slots]]
    eng.step()  # admit all, first step
    alone = eng.time_steps(min(cfg.step_reps, cap - 2))
    host = []
    for _ in range(min(cfg.step_reps, cap - 2 - len(alone))):  # the engine's own step, nothing to admit
        t = time.perf_counter()
        eng.step()
        host.append(time.perf_counter() - t)
    for i in ids:
        eng.cancel(i)
    eng.run_until_done()
    step = float(np.median(alone))
    base = engines[0]
    for r in engines:
        r["p99_tpot_over_step"] = r["tpot"]["p99"] / step
        r["p50_tpot_over_step"] = r["tpot"]["p50"] / step
        r["p99_itl_over_step"] = r["itl"]["p99"] / step
        r["rows_equal_unchunked"] = same_rows(r["tokens"], base["tokens"])
    for r in engines:
        del r["tokens"]
    return {"first_call_s": base["first_call_s"], "requests": len(trace), "tpot": base["tpot"], "itl": base["itl"],
            "ttft": base["ttft"], "seconds": base["seconds"], "steps": base["steps"],
            "output_tokens": sum(r["output_len"] for r in trace),
            "step_alone_s": _stats(alone), "host_step_s": _stats(host) if host else None,
            "p99_tpot_over_step": base["p99_tpot_over_step"], "p99_itl_over_step": base["p99_itl_over_step"],
            "engines": engines}


# ------------------------------------------------------------------------------------------------ report
def _fmt(s: dict, scale: float = 1.0, nd: int = 1) -> str:
    return f"{s['median'] * scale:.{nd}f} [{s['min'] * scale:.{nd}f}, {s['max'] * scale:.{nd}f}]"


def markdown(rec) -> list:
    cfg = rec["config"]
    lines = []
    r = runner.result(rec, "trace")
    if r is not None:
        t = r["trace"]
        lines += ["## Trace throughput", "",
                  f"{t['requests']} requests (Poisson, {cfg['rate']}/s over {t['span_s']:.1f} s; prompt lengths "
                  f"{cfg['prompt_lens']}, output lengths {cfg['output_lens']}, EOS ignored): {t['output_tokens']} "
                  f"output tokens, {t['prompt_tokens']} prompt tokens. {cfg['slots']} engine slots = static batch "
                  f"size; jaxdec weights `{cfg['weights']}`; HF fp32, torch default threads. tok/s: median [min, max] "
                  f"over {cfg['reps']} repetitions; ratios: per-repetition time ratios.", "",
                  "| system | output tok/s | first call (s) | notes |", "| --- | --- | ---: | --- |",
                  f"| engine (continuous batching) | {_fmt(r['engine']['tok_s'])} | {r['first_call_s']['engine']:.1f} | "
                  f"{r['engine']['steps']} decode steps |",
                  f"| jaxdec static batching | {_fmt(r['static']['tok_s'])} | {r['first_call_s']['static']:.1f} | "
                  f"{r['static']['batches']} batches |",
                  f"| HF generate, sequential | {_fmt(r['hf']['tok_s'])} | {r['first_call_s']['hf']:.1f} | |", "",
                  f"Engine / HF sequential: **{_fmt(r['engine_over_hf'], nd=2)}** (goal >= 3x); engine / static "
                  f"batching: **{_fmt(r['engine_over_static'], nd=2)}** (goal >= 1.3x).", "",
                  f"Engine latency (last repetition): TTFT p50/p90/p99 {_pcts(r['engine']['ttft'])} s; TPOT "
                  f"{_pcts(r['engine']['tpot'])} s; ITL {_pcts(r['engine']['itl'])} s.", "",
                  f"Same tokens per request (last repetition): engine = static on {r['rows_equal']['engine_vs_static']}"
                  f"/{r['rows_equal']['of']}, engine = HF on {r['rows_equal']['engine_vs_hf']}/{r['rows_equal']['of']} "
                  f"(HF runs fp32 weights; a first difference after a near tie carries on).", ""]
        if r.get("hf_warning"):
            lines += [r["hf_warning"], ""]
    r = runner.result(rec, "tpot")
    if r is not None:
        host = r["host_step_s"]
        lines += ["## TPOT with the slots full", "",
                  f"{r['requests']} requests at time 0 on {cfg['slots']} slots ({r['output_tokens']} output tokens, "
                  f"{r['steps']} steps, {r['seconds']:.1f} s): new requests are prefilled between decode steps (batched "
                  f"admission; prefill budget per step: {cfg.get('prefill_budget') or 'none'} padded tokens).", "",
                  "| measure | p50 | p90 | p99 |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {label} | " + " | ".join(_ms(r[k], q) for q in ("p50", "p90", "p99")) + " |"
                  for label, k in (("TPOT per request (ms)", "tpot"), ("ITL, every gap (ms)", "itl"),
                                   ("TTFT (ms)", "ttft"))]
        lines += ["",
                  f"One batch-{cfg['slots']} decode step alone: {_fmt(r['step_alone_s'], 1e3)} ms"
                  + (f"; the engine's host step with nothing to admit: {_fmt(host, 1e3)} ms" if host else "") + ".", "",
                  f"p99 TPOT / step alone: **{r['p99_tpot_over_step']:.2f}x** (goal <= 1.5x); p99 ITL / step alone: "
                  f"{r['p99_itl_over_step']:.2f}x.", ""]
        if r.get("engines"):
            lines += _chunk_table(r, cfg)
    return lines


def _chunk_table(r: dict, cfg: dict) -> list:
    step = r["step_alone_s"]["median"]
    lines = ["### Chunked prefill across decode steps (same trace, same run)", "",
             f"`prefill_chunk_tokens` C: at most C prompt tokens prefilled per engine iteration (prompts whose bucket "
             f"exceeds C go in pieces of C, one per iteration, while the slots decode). Busy slots: mean live rows "
             f"per decode step (of {cfg['slots']}) and the share of steps with every slot busy. Step alone: "
             f"{step * 1e3:.1f} ms.", "",
             "| prefill per iteration | TPOT p50 / p99 (ms) | p50 / p99 TPOT over a step | ITL p99 / step | "
             "TTFT p50 / p99 (s) | output tok/s | busy slots (mean, all busy) | most prompt tokens in one "
             "iteration | rows = unchunked |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in r["engines"]:
        name = "whole prompts (unchunked)" if not e["chunk"] else f"C = {e['chunk']}"
        busy = (f"{e['busy_mean']:.2f}, {e['busy_full_frac']:.0%}" if "busy_mean" in e else "-")
        lines.append(f"| {name} | {_ms(e['tpot'], 'p50')} / {_ms(e['tpot'], 'p99')} | "
                     f"{e['p50_tpot_over_step']:.2f}x / **{e['p99_tpot_over_step']:.2f}x** | "
                     f"{e['p99_itl_over_step']:.2f}x | {e['ttft']['p50']:.2f} / {e['ttft']['p99']:.2f} | "
                     f"{e['tok_s']:.1f} | {busy} | {e.get('max_prefill_tokens', '-')} | "
                     f"{e['rows_equal_unchunked']}/{r['requests']} |")
    return lines + [""]


def _pcts(p: dict) -> str:
    return "/".join("-" if p[k] is None else f"{p[k]:.3f}" for k in ("p50", "p90", "p99"))


def _ms(p: dict, k: str) -> str:
    return "-" if p[k] is None else f"{p[k] * 1e3:.1f}"


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
    bad = [s for s in cfg.sections if s not in SECTIONS]
    if bad:
        opts.parser.error(f"--sections: unknown {bad}; choose from {SECTIONS}")
    if cfg.slots < 1 or cfg.reps < 1 or cfg.requests < 1 or cfg.tpot_requests < cfg.slots:
        opts.parser.error("--slots, --reps and --requests must be >= 1 and --tpot-requests >= --slots")
    if max(cfg.output_lens) < 4:
        opts.parser.error("--output-lens: the longest must be >= 4 (the tpot cell times steps within it)")
    sys_ = Systems(cfg)
    cells = [c for c in SECTIONS if c in cfg.sections]
    fns = {"trace": cell_trace, "tpot": cell_tpot}
    runner.run_experiment("serve_bench", cfg, cells, lambda c: fns[c](cfg, sys_), opts=opts, depends=_depends,
                          title="Serving engine: trace throughput and TPOT (issue 20)", markdown=markdown)


if __name__ == "__main__":
    main()
