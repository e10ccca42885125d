"""Long prompts (issue 23): prefill and decode speed, peak RSS and first-call compile time against the
prompt length, jaxdec (float32 and block-quantized weights) vs Hugging Face transformers (fp32) in the
same run; llama.cpp (``llama-cpp-python``) is an optional row, skipped with a message when missing.

Prompts of 512, 1k, 2k, 4k and 8k tokens are standard-library Python source (text that ships with
Python), cut to exactly N tokens of the model's tokenizer. Each (system, weights, N) runs in a fresh
subprocess so that its peak RSS (``ru_maxrss``) is its own:

* prefill: one forward pass over the N prompt tokens returning the last position's logits (jaxdec: the
  decoders' own `jaxdec.core.steps.prefill`, chunked by 512; HF: ``model(ids, logits_to_keep=1)``);
  first call (compile + run) reported separately, then the median of ``--reps`` calls;
* decode: greedy ``--new`` tokens after the prompt (EOS ignored) through `jaxdec.generate` / HF
  ``generate``, median of ``--reps`` calls; decode tokens/s = new / (generate seconds - prefill seconds);
* the load average before/after (experiments/benchlib.py): a loaded machine is flagged in the results.

    python experiments/bench_long_context.py                        # full sweep
    python experiments/bench_long_context.py --sizes 512,1024,2048 --reps 3   # reduced sweep

Writes experiments/results/long_context.{json,md} (and .png with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import benchlib  # noqa: E402

MODULES = ("argparse", "json.decoder", "textwrap", "fractions", "shlex", "inspect", "typing")


def prompt_ids(encode, n: int) -> list:
    import importlib
    import inspect
    ids: list = []
    for name in MODULES:
        ids += encode(inspect.getsource(importlib.import_module(name)))
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError(f"the standard-library text holds fewer than {n} tokens")


def rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def one_jaxdec(weights: str, n: int, new: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import jaxdec
    from jaxdec.core.steps import prefill
    m = jaxdec.load(weights=weights)
    ids = prompt_ids(m.tokenizer.encode, n)
    model, params = m.model, m.params
    size = n + 64  # the driver's cache is sized by need as well
    size = -(-size // 512) * 512

    @jax.jit
    def pre(p, toks, lens):
        return prefill(model, p, toks, lens, model.init_cache(1, size))[0]

    toks, lens = jnp.asarray([ids], jnp.int32), jnp.asarray([n], jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(pre(params, toks, lens))
    pre_first = time.perf_counter() - t0
    gen = lambda: jaxdec.generate(model, params, [ids], max_new_tokens=new, stop_ids=())  # noqa: E731
    t0 = time.perf_counter()
    g = gen()
    gen_first = time.perf_counter() - t0
    assert len(g.tokens[0]) == new
    pt, gt = [], []
    for _ in range(reps):  # interleaved
        t0 = time.perf_counter()
        jax.block_until_ready(pre(params, toks, lens))
        pt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gen()
        gt.append(time.perf_counter() - t0)
    return _row("jaxdec", weights, n, new, pt, gt, pre_first, gen_first)


def one_hf(n: int, new: int, reps: int) -> dict:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from peer import peer_model, peer_tokenizer, versions
    tok, model = peer_tokenizer(), peer_model()
    ids = prompt_ids(lambda s: tok(s, add_special_tokens=False)["input_ids"], n)
    x = torch.tensor([ids])
    cfg = model.generation_config
    cfg.eos_token_id, cfg.pad_token_id = None, 2

    def pre():
        with torch.no_grad():
            return model(x, logits_to_keep=1).logits

    def gen():
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, generation_config=cfg)
        return out[0, n:].tolist()

    t0 = time.perf_counter()
    pre()
    pre_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert len(gen()) == new
    gen_first = time.perf_counter() - t0
    pt, gt = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        pre()
        pt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gen()
        gt.append(time.perf_counter() - t0)
    row = _row("hf", "f32", n, new, pt, gt, pre_first, gen_first)
    row["versions"] = versions()
    return row


def _row(system, weights, n, new, pt, gt, pre_first, gen_first) -> dict:
    p, g = statistics.median(pt), statistics.median(gt)
    return {"system": system, "weights": weights, "prompt_tokens": n, "new_tokens": new,
            "prefill_s": p, "prefill_s_spread": [min(pt), max(pt)], "prefill_tok_s": n / p,
            "generate_s": g, "generate_s_spread": [min(gt), max(gt)],
            "decode_tok_s": new / (g - p) if g > p else float("nan"),
            "first_prefill_s": pre_first, "compile_s": max(pre_first - p, 0.0) + max(gen_first - g, 0.0),
            "peak_rss_gb": rss_gb(), "reps": len(pt), "prefill_s_all": pt, "generate_s_all": gt}


def run_one(args) -> None:
    if args.one_system == "hf":
        row = one_hf(args.one_n, args.new, args.reps)
    else:
        row = one_jaxdec(args.one_system.split(":")[1], args.one_n, args.new, args.reps)
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,1024,2048,4096,8192")
    ap.add_argument("--systems", default="jaxdec:f32,jaxdec:q,hf")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (system, size) subprocess")
    ap.add_argument("--note", default="", help="a line written into the results file (e.g. why the sweep is reduced)")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite the .md (and .png) from results/long_context.json (e.g. of a stopped sweep)")
    ap.add_argument("--one-system")
    ap.add_argument("--one-n", type=int)
    args = ap.parse_args()
    if args.one_system:
        return run_one(args)
    if args.from_json:
        with open(os.path.join(HERE, "results", "long_context.json")) as f:
            meta = json.load(f)
        m = benchlib.LoadMonitor.__new__(benchlib.LoadMonitor)
        rec = meta["load"]
        m.cores, m.before, m.after, m.t0 = rec["cores"], rec["loadavg_before"], rec["loadavg_after"], 0.0
        args.note = args.note or meta.get("note", "")
        args.new = meta["rows"][0]["new_tokens"] if meta["rows"] else args.new
        args.reps = meta["rows"][0]["reps"] if meta["rows"] else args.reps
        return write_results(meta["rows"], meta["skipped"], m, args, command=meta["command"])
    load = benchlib.LoadMonitor()
    rows, skipped = [], []
    try:
        import llama_cpp  # noqa: F401
        skipped.append("llama.cpp: llama-cpp-python is installed but its row is not implemented in this script yet")
    except ImportError:
        skipped.append("llama.cpp: skipped (llama-cpp-python is not installed)")
    for n in (int(x) for x in args.sizes.split(",")):
        for system in args.systems.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--one-system", system, "--one-n", str(n),
                   "--new", str(args.new), "--reps", str(args.reps)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                   env={**os.environ, "PYTHONPATH": ROOT})
            except subprocess.TimeoutExpired:
                skipped.append(f"{system} at {n} tokens: over {args.timeout} s, stopped")
                print(skipped[-1], flush=True)
                continue
            line = [x for x in p.stdout.splitlines() if x.startswith("ROW ")]
            if p.returncode or not line:
                skipped.append(f"{system} at {n} tokens failed: {p.stderr.strip().splitlines()[-1:]}")
                print(skipped[-1], flush=True)
                continue
            row = json.loads(line[-1][4:])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{system:11s} N={n:5d}: prefill {row['prefill_tok_s']:8.1f} tok/s, decode {row['decode_tok_s']:6.1f} "
                  f"tok/s, compile {row['compile_s']:5.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
            write_results(rows, skipped, benchlib_copy(load), args)  # results so far (a stopped sweep keeps them)
    load.finish()
    write_results(rows, skipped, load, args)


def benchlib_copy(load):
    """A finished copy of the load monitor (the load now as 'after'), leaving ``load`` open."""
    m = benchlib.LoadMonitor.__new__(benchlib.LoadMonitor)
    m.cores, m.before, m.t0, m.after = load.cores, load.before, load.t0, None
    return m.finish()


def write_results(rows, skipped, load, args, command=None):
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    cmd = command or "python experiments/bench_long_context.py " + " ".join(a for a in sys.argv[1:])
    meta = {"command": cmd.strip(), "commit": benchlib.git_commit(), "load": load.record(), "note": args.note,
            "skipped": skipped, "rows": rows}
    with open(os.path.join(out, "long_context.json"), "w") as f:
        json.dump(meta, f, indent=1)
    lines = ["# Long prompts: prefill and decode against the prompt length", "",
             f"Command: `{meta['command']}` (commit {meta['commit']}); {args.new} new tokens, greedy, batch 1; "
             f"median of {args.reps} interleaved repetitions per (system, size), each in its own process.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| system | weights | prompt tokens | prefill tok/s | decode tok/s | first prefill s | compile s | "
              "peak RSS GB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['weights']} | {r['prompt_tokens']} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['first_prefill_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} |")
    hf = {r["prompt_tokens"]: r for r in rows if r["system"] == "hf"}
    ratios = [f"{r['weights']} {r['prompt_tokens']}: {r['prefill_tok_s'] / hf[r['prompt_tokens']]['prefill_tok_s']:.2f}x"
              for r in rows if r["system"] == "jaxdec" and r["prompt_tokens"] in hf]
    if ratios:
        lines += ["", "jaxdec prefill tok/s over HF's: " + ", ".join(ratios)]
    lines += [""] + [f"- {s}" for s in skipped]
    for r in rows:
        if r["system"] == "hf" and "generate_s_all" in r:
            lines.append(benchlib.peer_warning(r["generate_s_all"], f"HF at {r['prompt_tokens']} tokens"))
    lines.append(load.markdown())
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["system"], r["weights"]) for r in rows}):
            rs = sorted((r for r in rows if (r["system"], r["weights"]) == key), key=lambda r: r["prompt_tokens"])
            ax.plot([r["prompt_tokens"] for r in rs], [r["generate_s"] for r in rs], marker="o",
                    label=f"{key[0]} {key[1]}")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(f"seconds (prefill + {args.new} new tokens)")
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "long_context.png"), dpi=100)
        lines.append("\n![seconds against prompt length](long_context.png)\n")
    except ImportError:
        lines.append("\n(no plot: matplotlib is not installed)\n")
    with open(os.path.join(out, "long_context.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
