"""Throughput at large batches (issue 24): jaxdec vs HF transformers in the same run, with a GEMM microbenchmark.

Cells (each one a job; inside a cell every system is timed repetition by repetition, alternating the order,
so ratios compare runs made back to back under the same load):

* ``gemm``          XLA float32 dots at the decode step's weight shapes (rows = batch): GFLOP/s per shape and
                    for a whole step's weight products (30 layers of q/k/v/o/gate/up/down + the 49152-row LM
                    head, one jitted program): the achievable context for the greedy cells' GFLOP/s.
* ``greedy_bB``     greedy at batch B (B of --batches): jaxdec f32, jaxdec q and HF (fp32, same GGUF);
                    achieved GFLOP/s of weight products = tok/s x 2 x (weights per token).
* ``sample_bB``     top-p 0.95 at temperature 0.8 at batch B: jaxdec f32 vs HF ``do_sample``.
* ``n16_SETTING``   2 chat prompts x n=16 samples (batch 32) for temperature 0.8 alone, + top-k 50, + top-p 0.95,
                    + min-p 0.1: jaxdec with the shared prefix (Hydragen) on and off, jaxdec greedy on the same 32
                    rows (the issue's goal: sampling within 15 % of greedy), HF ``num_return_sequences=16``.
* ``beam4``         beam search, 4 beams, f32: jaxdec ``beam_search`` vs HF ``generate(num_beams=4)``, per prompt.
* ``long_b1``       1 prompt x --long-tokens new tokens at batch 1: jaxdec f32 vs HF greedy.

Conventions (DESIGN.md): time from token ids in to token ids on the host, prefill included, after warm-up (the
first call, which compiles, is reported separately); fixed N new tokens (EOS ignored); median of the
repetitions with min and max; HF in fp32 with torch's default threads and default attention. Greedy tokens of
jaxdec f32 vs HF are compared per row (they may part after near-ties). Load averages are recorded per cell
(experiments/benchlib.py) and a loaded run is flagged in the results.

    python experiments/bench_throughput.py                      # everything (about 40 min on the 2-core CPU)
    python experiments/bench_throughput.py --sections gemm greedy
    python experiments/bench_throughput.py --smoke              # tiny sizes, to a temp dir (checks it runs)
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

SAMPLING = {
    "temp0.8": {"temperature": 0.8},
    "top_k50": {"temperature": 0.8, "top_k": 50},
    "top_p0.95": {"temperature": 0.8, "top_p": 0.95},
    "min_p0.1": {"temperature": 0.8, "min_p": 0.1},
}
SECTIONS = ("gemm", "greedy", "sample", "n16", "beam", "long")


@dataclasses.dataclass(frozen=True)
class Config:
    batches: tuple[int, ...] = field(default=(1, 8, 16, 32, 64), metadata={"help": "batch sizes (greedy, sample)"})
    new_tokens: int = field(default=32, metadata={"help": "new tokens per row (min = max, EOS ignored)"})
    reps: int = field(default=3, metadata={"help": "timed repetitions per system and cell (after one warm-up)"})
    n: int = field(default=16, metadata={"help": "samples per prompt in the n16 cells"})
    n_prompts: int = field(default=2, metadata={"help": "chat prompts in the n16 cells"})
    beam_prompts: int = field(default=2, metadata={"help": "prompts in the beam4 cell"})
    long_tokens: int = field(default=1024, metadata={"help": "new tokens of the long_b1 cell"})
    long_reps: int = field(default=2, metadata={"help": "timed repetitions of the long_b1 cell"})
    gemm_rows: tuple[int, ...] = field(default=(1, 8, 16, 32, 64, 2048), metadata={"help": "rows of the GEMMs"})
    settings: tuple[str, ...] = runner.select(tuple(SAMPLING), help="n16 settings")
    sections: tuple[str, ...] = runner.select(SECTIONS, help=f"cells to run, of {SECTIONS}")


SMOKE = Config(batches=(1, 2), new_tokens=2, reps=1, n=2, n_prompts=2, beam_prompts=1, long_tokens=6, long_reps=1,
               gemm_rows=(1, 2), settings=("top_p0.95",))

# Weight products per token of SmolLM2-135M (30 layers: q, o 576x576; k, v 576x192; gate, up 576x1536; down
# 1536x576; LM head 576x49152), as (in, out) shapes; FLOPs = 2 x rows x in x out.
LAYERS, HIDDEN, FFN, KV, VOCAB = 30, 576, 1536, 192, 49152
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, FFN), (HIDDEN, FFN),
                (FFN, HIDDEN)]
FLOP_PER_TOKEN = 2 * (LAYERS * sum(i * o for i, o in LAYER_SHAPES) + HIDDEN * VOCAB)


def _depends(cell: str) -> list:
    common = ["reps"]
    if cell == "gemm":
        return ["gemm_rows", "reps"]
    if cell.startswith(("greedy_", "sample_")):
        return common + ["new_tokens"]
    if cell.startswith("n16_"):
        return common + ["new_tokens", "n", "n_prompts"]
    if cell == "beam4":
        return common + ["new_tokens", "beam_prompts"]
    if cell == "long_b1":
        return ["long_tokens", "long_reps"]
    return common


# ------------------------------------------------------------------------------------------------ systems
class Systems:
    """Models and prompts, made on first use and shared by the cells."""

    def __init__(self):
        self._m = {}
        self._prompts = None

    def jaxdec(self, weights: str):
        if weights not in self._m:
            import jaxdec
            self._m[weights] = jaxdec.load(weights=weights)
        return self._m[weights]

    def hf(self):
        if "hf" not in self._m:
            import peer
            self._m["hf"] = peer.peer_model()
        return self._m["hf"]

    def prompts(self, b: int) -> list:
        if self._prompts is None:
            from bench_greedy import chat_prompts, PROMPTS
            self._prompts = chat_prompts(len(PROMPTS))
        return [self._prompts[i % len(self._prompts)] for i in range(b)]


def jaxdec_fn(m, n_new: int, **kw):
    from jaxdec.core.generate import generate

    def run(prompts):
        g = generate(m.model, m.params, prompts, max_new_tokens=n_new, min_new_tokens=n_new, stop_ids=(), **kw)
        return g.tokens
    return run


def hf_fn(model, n_new: int, **kw):
    import torch
    pad = 2

    def run(prompts):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                 eos_token_id=None, pad_token_id=pad, **kw)
        return out[:, width:].tolist()
    return run


def hf_sampling(setting: dict) -> dict:
    """HF generate kwargs for a sampling setting, every warper named (the GGUF's generation config would
    otherwise add its defaults, e.g. top_k=50)."""
    return dict(do_sample=True, temperature=setting.get("temperature", 1.0), top_k=setting.get("top_k", 0),
                top_p=setting.get("top_p", 1.0), min_p=setting.get("min_p", None))


def interleaved(systems: dict, prompts: list, reps: int, n_new: int, rows: int) -> dict:
    """Time every system: one untimed warm-up call (compile), then `reps` calls interleaved across systems
    (order reversed every other repetition). Returns per system: seconds, tok/s stats, first-call time, tokens.
    n_new=None: rows may end early (at EOS); tok/s counts the tokens each system's warm-up call wrote."""
    out, count = {}, {}
    for name, fn in systems.items():
        t0 = time.perf_counter()
        toks = fn(prompts)
        out[name] = {"first_call_s": time.perf_counter() - t0, "seconds": [], "tokens": toks}
        lens = {len(t) for t in toks}
        if n_new is not None and lens != {n_new}:
            raise RuntimeError(f"{name}: expected exactly {n_new} new tokens per row, got lengths {sorted(lens)}")
        count[name] = rows * n_new if n_new is not None else sum(len(t) for t in toks)
        print(f"  warm-up {name}: {out[name]['first_call_s']:.2f} s", flush=True)
    names = list(systems)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            systems[name](prompts)
            out[name]["seconds"].append(time.perf_counter() - t0)
        print(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n} {count[n] / out[n]['seconds'][-1]:.1f} tok/s"
                                                    for n in names), flush=True)
    for name, r in out.items():
        tps = np.array([count[name] / s for s in r["seconds"]])
        r.update(tok_s=float(np.median(tps)), tok_s_min=float(tps.min()), tok_s_max=float(tps.max()))
    return out


def ratio(res: dict, a: str, b: str) -> dict:
    """Median [min, max] of per-repetition tok/s ratios a / b (same repetition = same load)."""
    x = np.array(res[b]["seconds"]) / np.array(res[a]["seconds"])
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def strip_tokens(res: dict) -> dict:
    return {n: {k: v for k, v in r.items() if k != "tokens"} for n, r in res.items()}


# ------------------------------------------------------------------------------------------------ cells
def cell_gemm(cfg) -> dict:
    """XLA f32 dot GFLOP/s at the step's shapes, per shape and for a whole step's weight products."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)

    def bench(f, *args, n=None):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(n or max(5, cfg.reps * 3)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)), float(min(ts))

    dot = jax.jit(lambda x, w: x @ w)
    ws = {s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05) for s in set(LAYER_SHAPES) | {(HIDDEN, VOCAB)}}
    stack = [jnp.asarray(rng.standard_normal((LAYERS,) + s, dtype=np.float32) * 0.05) for s in LAYER_SHAPES]
    head = ws[(HIDDEN, VOCAB)]

    @jax.jit
    def step(x, stack, head):
        def layer(h, w):
            wq, wk, wv, wo, wg, wu, wd = w
            a = h @ wq
            k, v = h @ wk, h @ wv
            h = h + (a @ wo) + 1e-3 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
            return h + jax.nn.silu(h @ wg) * (h @ wu) @ wd * 1e-3, None
        h, _ = jax.lax.scan(layer, x, tuple(stack))
        return h @ head

    out = {"per_shape": [], "step": []}
    for rows in cfg.gemm_rows:
        for (i, o) in sorted(ws):
            x = jnp.asarray(rng.standard_normal((rows, i), dtype=np.float32))
            med, best = bench(dot, x, ws[(i, o)])
            out["per_shape"].append({"rows": rows, "in": i, "out": o, "ms": med * 1e3,
                                     "gflops": 2 * rows * i * o / med / 1e9, "gflops_best": 2 * rows * i * o / best / 1e9})
        if rows <= 256:
            x = jnp.asarray(rng.standard_normal((rows, HIDDEN), dtype=np.float32))
            med, best = bench(step, x, stack, head)
            out["step"].append({"rows": rows, "ms": med * 1e3, "gflops": rows * FLOP_PER_TOKEN / med / 1e9,
                                "gflops_best": rows * FLOP_PER_TOKEN / best / 1e9})
        print(f"  gemm rows {rows}: " + ", ".join(f"{r['in']}x{r['out']} {r['gflops']:.0f}"
                                                  for r in out["per_shape"] if r["rows"] == rows)
              + (f"; step {out['step'][-1]['gflops']:.0f} GFLOP/s" if rows <= 256 else ""), flush=True)
    out["flop_per_token"] = FLOP_PER_TOKEN
    return out


def cell_greedy(st: Systems, cfg, b: int) -> dict:
    prompts = st.prompts(b)
    systems = {"hf": hf_fn(st.hf(), cfg.new_tokens, do_sample=False),
               "jaxdec_f32": jaxdec_fn(st.jaxdec("f32"), cfg.new_tokens, method="greedy", batch_size=b),
               "jaxdec_q": jaxdec_fn(st.jaxdec("q"), cfg.new_tokens, method="greedy", batch_size=b)}
    res = interleaved(systems, prompts, cfg.reps, cfg.new_tokens, b)
    f, hf = res["jaxdec_f32"]["tokens"], res["hf"]["tokens"]
    out = {"batch": b, "systems": strip_tokens(res),
           "ratio_f32_vs_hf": ratio(res, "jaxdec_f32", "hf"), "ratio_q_vs_hf": ratio(res, "jaxdec_q", "hf"),
           "f32_equals_hf_rows": sum(x == y for x, y in zip(f, hf)), "rows": b,
           "q_equals_f32_rows": sum(x == y for x, y in zip(res["jaxdec_q"]["tokens"], f))}
    for n in res:
        out["systems"][n]["gflops"] = res[n]["tok_s"] * FLOP_PER_TOKEN / 1e9
    return out


def cell_sample(st: Systems, cfg, b: int) -> dict:
    setting = SAMPLING["top_p0.95"]
    prompts = st.prompts(b)
    systems = {"hf": hf_fn(st.hf(), cfg.new_tokens, **hf_sampling(setting)),
               "jaxdec_f32": jaxdec_fn(st.jaxdec("f32"), cfg.new_tokens, method="sample", sampling=setting, seed=0,
                                       batch_size=b)}
    res = interleaved(systems, prompts, cfg.reps, cfg.new_tokens, b)
    return {"batch": b, "setting": setting, "systems": strip_tokens(res), "ratio_f32_vs_hf": ratio(res, "jaxdec_f32", "hf")}


def cell_n16(st: Systems, cfg, name: str) -> dict:
    setting = SAMPLING[name]
    prompts = st.prompts(cfg.n_prompts)
    rows = cfg.n * cfg.n_prompts
    m = st.jaxdec("f32")
    common = dict(n=cfg.n, batch_size=rows)
    systems = {
        "hf": None,
        "jaxdec_greedy": jaxdec_fn(m, cfg.new_tokens, method="greedy", shared_prefix=True, **common),
        "jaxdec_shared": jaxdec_fn(m, cfg.new_tokens, method="sample", sampling=setting, seed=0, shared_prefix=True,
                                   **common),
        "jaxdec_plain": jaxdec_fn(m, cfg.new_tokens, method="sample", sampling=setting, seed=0, shared_prefix=False,
                                  **common),
    }
    hf_one = hf_fn(st.hf(), cfg.new_tokens, num_return_sequences=cfg.n, **hf_sampling(setting))
    systems["hf"] = hf_one
    res = interleaved(systems, prompts, cfg.reps, cfg.new_tokens, rows)
    return {"batch": rows, "setting": setting, "systems": strip_tokens(res),
            "shared_vs_hf": ratio(res, "jaxdec_shared", "hf"), "plain_vs_hf": ratio(res, "jaxdec_plain", "hf"),
            "shared_vs_greedy": ratio(res, "jaxdec_shared", "jaxdec_greedy"),
            "plain_vs_greedy": ratio(res, "jaxdec_plain", "jaxdec_greedy")}


def cell_beam(st: Systems, cfg) -> dict:
    import torch
    from jaxdec.search.beam import beam_search
    m, hf, n_new = st.jaxdec("f32"), st.hf(), cfg.new_tokens
    prompts = st.prompts(cfg.beam_prompts)

    def ours(ids):
        g = beam_search(m.model, m.params, [ids], num_beams=4, max_new_tokens=n_new, min_new_tokens=n_new,
                        stop_ids=())
        return g.tokens

    def theirs(ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              num_beams=4, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              eos_token_id=None, pad_token_id=2)
        return out[:, len(ids):].tolist()

    per = []
    for ids in prompts:
        res = interleaved({"hf": lambda p: theirs(p[0]), "jaxdec_f32": lambda p: ours(p[0])}, [ids], cfg.reps, n_new, 1)
        per.append({"prompt_len": len(ids), "systems": strip_tokens(res), "ratio_f32_vs_hf": ratio(res, "jaxdec_f32", "hf"),
                    "same_best_beam": res["jaxdec_f32"]["tokens"][0] == res["hf"]["tokens"][0]})
    ratios = [p["ratio_f32_vs_hf"]["median"] for p in per]
    return {"num_beams": 4, "prompts": per, "ratio_median": float(np.median(ratios)),
            "jaxdec_tok_s": float(np.median([p["systems"]["jaxdec_f32"]["tok_s"] for p in per])),
            "hf_tok_s": float(np.median([p["systems"]["hf"]["tok_s"] for p in per]))}


def cell_long(st: Systems, cfg) -> dict:
    prompts = st.prompts(1)
    n_new = cfg.long_tokens
    systems = {"hf": hf_fn(st.hf(), n_new, do_sample=False),
               "jaxdec_f32": jaxdec_fn(st.jaxdec("f32"), n_new, method="greedy")}
    res = interleaved(systems, prompts, cfg.long_reps, n_new, 1)
    f, h = res["jaxdec_f32"]["tokens"][0], res["hf"]["tokens"][0]
    agree = next((i for i, (a, c) in enumerate(zip(f, h)) if a != c), len(f))
    return {"new_tokens": n_new, "systems": strip_tokens(res), "ratio_f32_vs_hf": ratio(res, "jaxdec_f32", "hf"),
            "tokens_equal_prefix": agree}


# ------------------------------------------------------------------------------------------------ report
def _sys(r, name):
    s = r["systems"][name]
    return f"{s['tok_s']:.1f} [{s['tok_s_min']:.1f}, {s['tok_s_max']:.1f}]"


def _ratio(x):
    return f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]"


def markdown(rec: dict) -> list:
    c = rec["config"]
    R = lambda k: runner.result(rec, k)  # noqa: E731
    lines = [f"{c['new_tokens']} new tokens per row (EOS ignored) unless stated; {c['reps']} timed repetitions per "
             "system after one warm-up call, interleaved within each cell. tok/s: median [min, max]; ratios: median "
             "[min, max] of per-repetition ratios. HF: transformers fp32, torch default threads, same GGUF. Weight "
             f"products per token: {FLOP_PER_TOKEN / 1e6:.1f} MFLOP (GFLOP/s = tok/s x that).", ""]
    for k in rec["cells_order"]:
        r = R(k)
        if r and "systems" in r:
            for name, s in r["systems"].items():
                if name == "hf":
                    lines.append(benchlib.peer_warning(s["seconds"], f"HF ({k})").strip())
    lines = [x for x in lines if x != ""] + [""]
    if rec.get("loaded"):
        lines += ["**Loaded run: the ratios to HF are not the idle ratios.** With the load average above the core count, "
                  "torch's default OpenMP threads (the peer's default, DESIGN.md) stall at every op waiting for a "
                  "descheduled partner, so HF slows far more than jaxdec (its idle speeds here, from the issue: ~165 "
                  "tok/s greedy at batch 32, 91-99 tok/s n=16 sampling). Ratios between jaxdec rows of one cell "
                  "(sampling vs greedy, shared prefix on vs off) were measured back to back and keep their meaning.", ""]
    g = R("gemm")
    step = {s["rows"]: s for s in (g or {}).get("step", [])}
    greedy = sorted((R(k) for k in rec["cells_order"] if k.startswith("greedy_") and R(k)), key=lambda r: r["batch"])
    if greedy:
        lines += ["## Greedy", "", "| batch | jaxdec f32 tok/s | jaxdec q tok/s | HF tok/s | f32 / HF | q / HF | f32 GFLOP/s "
                  "| q GFLOP/s | step-GEMM GFLOP/s (same rows) | f32 rows = HF | first call f32 / q (s) |",
                  "| ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"]
        for r in greedy:
            b = r["batch"]
            sg = f"{step[b]['gflops']:.0f}" if b in step else "-"
            s = r["systems"]
            lines.append(f"| {b} | {_sys(r, 'jaxdec_f32')} | {_sys(r, 'jaxdec_q')} | {_sys(r, 'hf')} | "
                         f"{_ratio(r['ratio_f32_vs_hf'])} | {_ratio(r['ratio_q_vs_hf'])} | {s['jaxdec_f32']['gflops']:.1f} | "
                         f"{s['jaxdec_q']['gflops']:.1f} | {sg} | {r['f32_equals_hf_rows']}/{r['rows']} | "
                         f"{s['jaxdec_f32']['first_call_s']:.1f} / {s['jaxdec_q']['first_call_s']:.1f} |")
        lines.append("")
    samp = sorted((R(k) for k in rec["cells_order"] if k.startswith("sample_") and R(k)), key=lambda r: r["batch"])
    if samp:
        lines += ["## Sampling (temperature 0.8, top-p 0.95), distinct prompts", "",
                  "| batch | jaxdec f32 tok/s | HF tok/s | jaxdec / HF |", "| ---: | --- | --- | --- |"]
        for r in samp:
            lines.append(f"| {r['batch']} | {_sys(r, 'jaxdec_f32')} | {_sys(r, 'hf')} | {_ratio(r['ratio_f32_vs_hf'])} |")
        lines.append("")
    n16 = [(k, R(k)) for k in rec["cells_order"] if k.startswith("n16_") and R(k)]
    if n16:
        lines += [f"## {c['n_prompts']} chat prompts x n={c['n']} (batch {c['n'] * c['n_prompts']}), f32", "",
                  "| setting | jaxdec greedy | jaxdec sample, shared prefix | same, no shared prefix | HF "
                  "`num_return_sequences` | shared / greedy | plain / greedy | shared / HF | plain / HF |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, r in n16:
            lines.append(f"| {k[4:]} | {_sys(r, 'jaxdec_greedy')} | {_sys(r, 'jaxdec_shared')} | {_sys(r, 'jaxdec_plain')} "
                         f"| {_sys(r, 'hf')} | {_ratio(r['shared_vs_greedy'])} | {_ratio(r['plain_vs_greedy'])} | "
                         f"{_ratio(r['shared_vs_hf'])} | {_ratio(r['plain_vs_hf'])} |")
        lines.append("")
    b4 = R("beam4")
    if b4:
        lines += ["## Beam search, 4 beams, f32 (tok/s of the returned best sequence, batch 1 prompt = 4 rows)", "",
                  "| prompt tokens | jaxdec tok/s | HF tok/s | jaxdec / HF | same best beam |", "| ---: | --- | --- | --- | --- |"]
        for p in b4["prompts"]:
            lines.append(f"| {p['prompt_len']} | {_sys(p, 'jaxdec_f32')} | {_sys(p, 'hf')} | {_ratio(p['ratio_f32_vs_hf'])} "
                         f"| {p['same_best_beam']} |")
        lines.append("")
    lg = R("long_b1")
    if lg:
        lines += [f"## Batch 1, {lg['new_tokens']} new tokens (greedy, f32; {c['long_reps']} repetitions)", "",
                  "| jaxdec tok/s | HF tok/s | jaxdec / HF | tokens equal up to |", "| --- | --- | --- | ---: |",
                  f"| {_sys(lg, 'jaxdec_f32')} | {_sys(lg, 'hf')} | {_ratio(lg['ratio_f32_vs_hf'])} | "
                  f"{lg['tokens_equal_prefix']} |", ""]
    if g:
        rows = sorted({r["rows"] for r in g["per_shape"]})
        shapes = sorted({(r["in"], r["out"]) for r in g["per_shape"]})
        lines += ["## GEMM microbenchmark (XLA float32 dot, GFLOP/s, median)", "",
                  "| rows | " + " | ".join(f"{i}x{o}" for i, o in shapes) + " | whole step's weight products |",
                  "| ---: |" + " ---: |" * (len(shapes) + 1)]
        for n in rows:
            per = {(r["in"], r["out"]): r["gflops"] for r in g["per_shape"] if r["rows"] == n}
            lines.append(f"| {n} | " + " | ".join(f"{per[s]:.0f}" for s in shapes) + " | "
                         + (f"{step[n]['gflops']:.0f} ({step[n]['ms']:.1f} ms)" if n in step else "-") + " |")
        lines.append("")
    return lines


def plot(rec: dict, prefix: str):
    import matplotlib.pyplot as plt
    R = lambda k: runner.result(rec, k)  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    greedy = sorted((R(k) for k in rec["cells_order"] if k.startswith("greedy_") and R(k)), key=lambda r: r["batch"])
    samp = sorted((R(k) for k in rec["cells_order"] if k.startswith("sample_") and R(k)), key=lambda r: r["batch"])
    for rs, sysname, label, style in [(greedy, "jaxdec_f32", "jaxdec greedy f32", "o-"),
                                      (greedy, "jaxdec_q", "jaxdec greedy q", "s-"),
                                      (greedy, "hf", "HF greedy fp32", "o--"),
                                      (samp, "jaxdec_f32", "jaxdec top-p f32", "^-"),
                                      (samp, "hf", "HF top-p fp32", "^--")]:
        if rs:
            ax.plot([r["batch"] for r in rs], [r["systems"][sysname]["tok_s"] for r in rs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput vs batch size (SmolLM2-135M, same run)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    runner.stamp(fig, rec)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    unknown = [s for s in cfg.sections if s not in SECTIONS] + [s for s in cfg.settings if s not in SAMPLING]
    if unknown:
        opts.parser.error(f"unknown sections/settings {unknown}; sections {SECTIONS}, settings {tuple(SAMPLING)}")
    st = Systems()
    cells = []
    if "gemm" in cfg.sections:
        cells.append("gemm")
    cells += [f"greedy_b{b}" for b in cfg.batches if "greedy" in cfg.sections]
    cells += [f"sample_b{b}" for b in cfg.batches if "sample" in cfg.sections]
    cells += [f"n16_{s}" for s in cfg.settings if "n16" in cfg.sections]
    cells += ["beam4"] if "beam" in cfg.sections else []
    cells += ["long_b1"] if "long" in cfg.sections else []

    def measure(cell):
        if cell == "gemm":
            return cell_gemm(cfg)
        if cell.startswith("greedy_b"):
            return cell_greedy(st, cfg, int(cell[8:]))
        if cell.startswith("sample_b"):
            return cell_sample(st, cfg, int(cell[8:]))
        if cell.startswith("n16_"):
            return cell_n16(st, cfg, cell[4:])
        if cell == "beam4":
            return cell_beam(st, cfg)
        return cell_long(st, cfg)

    def info():
        import peer
        return {"peer_versions": peer.versions(), "flop_per_token": FLOP_PER_TOKEN}

    runner.run_experiment("throughput", cfg, cells, measure, opts=opts, depends=_depends, info=info,
                          title="Throughput at large batches: jaxdec vs HF transformers (issue 24)",
                          markdown=markdown, plot=plot)


if __name__ == "__main__":
    main()
