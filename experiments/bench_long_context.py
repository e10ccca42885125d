"""Long prompts (issue 23): prefill and decode speed, peak RSS and first-call compile time against the
prompt length, jaxdec (float32 and block-quantized weights) vs Hugging Face transformers (fp32) in the
same run; llama.cpp (``llama-cpp-python`` on the same GGUF) is an optional row, skipped with a message
when it is not installed.

Prompts of 512, 1k, 2k, 4k and 8k tokens are standard-library Python source (text that ships with
Python), cut to exactly N tokens of the model's tokenizer (the 8k prompt is 8192 minus the new tokens, so
that prompt and new tokens fill the model's context). Each (system, weights, N) is one cell of
experiments/runner.py and runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own
(the systems are not interleaved within a process for that reason; the load average of every cell is
recorded, and a loaded cell is flagged):

* prefill: one forward pass over the N prompt tokens returning the last position's logits (jaxdec: the
  decoders' own `jaxdec.core.steps.prefill`, chunked by 512; HF: ``model(ids, logits_to_keep=1)``;
  llama.cpp: ``Llama.eval``); first call (compile + run) reported separately, then the median of
  ``--reps`` calls;
* decode: greedy ``--new-tokens`` tokens after the prompt (EOS ignored) through `jaxdec.generate` / HF
  ``generate`` / llama.cpp's sampler loop, median of ``--reps`` calls; decode tokens/s = new /
  (generate seconds - prefill seconds).

Prompts of ``--big-from`` tokens and more (8k) have their own budget: ``--big-reps`` repetitions and
``--big-timeout`` seconds per subprocess. A rerun resumes the cells already measured (runner).

    python experiments/bench_long_context.py                                    # full sweep 512..8k
    python experiments/bench_long_context.py --sizes 512 1024 2048 --reps 3     # reduced sweep
    python experiments/bench_long_context.py --smoke                            # tiny check that it runs

Writes experiments/results/long_context.{json,md,png}.
"""
from __future__ import annotations

import dataclasses
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
import runner  # noqa: E402

MODULES = ("argparse", "json.decoder", "textwrap", "fractions", "shlex", "inspect", "typing")


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...] = runner.select((512, 1024, 2048, 4096, 8192), "prompt lengths (tokens)")
    systems: tuple[str, ...] = runner.select(("jaxdec:f32", "jaxdec:q", "hf", "llamacpp"),
                                             "jaxdec:f32, jaxdec:q, hf, llamacpp")
    new_tokens: int = dataclasses.field(default=16, metadata={"help": "greedy new tokens per decode call"})
    reps: int = dataclasses.field(default=5, metadata={"help": "timed repetitions below --big-from tokens"})
    big_from: int = dataclasses.field(default=8192, metadata={"help": "prompts this long get the big budget"})
    big_reps: int = dataclasses.field(default=3, metadata={"help": "timed repetitions at --big-from and above"})
    timeout: int = runner.select(1800, "seconds per (system, size) subprocess")
    big_timeout: int = runner.select(3600, "seconds per subprocess at --big-from and above")
    note: str = runner.select("", "a line written into the results (e.g. why the sweep is reduced)")


SMOKE = Config(sizes=(64,), systems=("jaxdec:q", "llamacpp"), new_tokens=2, reps=1, big_reps=1)


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
    def prefill_jit(p, toks, lens):
        return prefill(model, p, toks, lens, model.init_cache(1, size))[0]

    toks, lens = jnp.asarray([ids], jnp.int32), jnp.asarray([n], jnp.int32)
    pt, gt, pre_first, gen_first = _timed(
        lambda: jax.block_until_ready(prefill_jit(params, toks, lens)),
        lambda: jaxdec.generate(model, params, [ids], max_new_tokens=new, stop_ids=()).tokens[0], new, reps)
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

    pt, gt, pre_first, gen_first = _timed(pre, gen, new, reps)
    row = _row("hf", "f32", n, new, pt, gt, pre_first, gen_first)
    row["versions"] = versions()
    return row


def one_llamacpp(n: int, new: int, reps: int) -> dict:
    """llama.cpp on the same GGUF (its own 4-bit kernels), default threads; tokens of the peer's tokenizer."""
    import llama_cpp
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from peer import default_gguf_path
    llm = llama_cpp.Llama(model_path=default_gguf_path(), n_ctx=n + new + 16, n_batch=512, verbose=False)
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False, special=False), n)

    def pre():
        llm.reset()
        llm.eval(ids)

    def gen():
        pre()
        out = []
        for _ in range(new):
            t = int(llm.sample(top_k=1, temp=0.0))
            out.append(t)
            llm.eval([t])
        return out

    pt, gt, pre_first, gen_first = _timed(pre, gen, new, reps)
    row = _row("llamacpp", "gguf", n, new, pt, gt, pre_first, gen_first)
    row["versions"] = {"llama_cpp": getattr(llama_cpp, "__version__", "?")}
    return row


def _timed(pre, gen, new: int, reps: int):
    """-> (prefill seconds, generate seconds, first prefill, first generate): one first call of each (compile
    included; generate must return ``new`` tokens), then ``reps`` interleaved repetitions."""
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
    return pt, gt, pre_first, gen_first


def _row(system, weights, n, new, pt, gt, pre_first, gen_first) -> dict:
    p, g = statistics.median(pt), statistics.median(gt)
    return {"system": system, "weights": weights, "prompt_tokens": n, "new_tokens": new,
            "prefill_s": p, "prefill_s_spread": [min(pt), max(pt)], "prefill_tok_s": n / p,
            "generate_s": g, "generate_s_spread": [min(gt), max(gt)],
            "decode_tok_s": new / (g - p) if g > p else float("nan"),
            "first_prefill_s": pre_first, "compile_s": max(pre_first - p, 0.0) + max(gen_first - g, 0.0),
            "peak_rss_gb": rss_gb(), "reps": len(pt), "prefill_s_all": pt, "generate_s_all": gt}


CONTEXT = 8192  # the default model's context: prompt + new tokens must fit


def run_one(system: str, n: int, new: int, reps: int) -> None:
    n = min(n, CONTEXT - new)  # the "8k" prompt fills the context with its new tokens (8176 + 16)
    if system == "hf":
        row = one_hf(n, new, reps)
    elif system == "llamacpp":
        row = one_llamacpp(n, new, reps)
    else:
        row = one_jaxdec(system.split(":")[1], n, new, reps)
    print("ROW " + json.dumps(row), flush=True)


def cell_key(system: str, n: int) -> str:
    return f"{system}@{n}"


def measure(cfg: Config, cell: str) -> dict:
    """One (system, size) in a subprocess of its own; a skipped or failed cell is stored with its reason."""
    system, n = cell.rsplit("@", 1)
    n = int(n)
    big = n >= cfg.big_from
    reps, timeout = (cfg.big_reps, cfg.big_timeout) if big else (cfg.reps, cfg.timeout)
    if system == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(f"{cell}: skipped (llama-cpp-python is not installed)", flush=True)
            return {"skipped": "llama-cpp-python is not installed"}
    cmd = [sys.executable, os.path.abspath(__file__), "--one-system", system, "--one-n", str(n),
           "--one-new", str(cfg.new_tokens), "--one-reps", str(reps)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        print(f"{cell}: over {timeout} s, stopped", flush=True)
        return {"skipped": f"over {timeout} s, stopped"}
    line = [x for x in p.stdout.splitlines() if x.startswith("ROW ")]
    if p.returncode or not line:
        why = (p.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{cell}: failed: {why}", flush=True)
        return {"skipped": f"failed: {why}"}
    row = json.loads(line[-1][4:])
    row["wall_s"] = time.perf_counter() - t0
    print(f"{cell:18s}: prefill {row['prefill_tok_s']:8.1f} tok/s, decode {row['decode_tok_s']:6.1f} tok/s, "
          f"compile {row['compile_s']:5.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    return row


def depends(cfg: Config):
    def dep(cell):
        big = int(cell.rsplit("@", 1)[1]) >= cfg.big_from
        return ["new_tokens", "big_from", "big_reps" if big else "reps"]
    return dep


def markdown(rec: dict) -> list:
    cfg = rec["config"]
    rows = [r for r in (runner.result(rec, k) for k in rec["cells_order"]) if r and "skipped" not in r]
    skipped = [f"{k}: {runner.result(rec, k)['skipped']}" for k in rec["cells_order"]
               if runner.result(rec, k) and "skipped" in runner.result(rec, k)]
    lines = [f"{cfg['new_tokens']} new tokens, greedy, batch 1; median of the cell's repetitions ({cfg['reps']}, "
             f"{cfg['big_reps']} at {cfg['big_from']} tokens and more); each (system, size) in its own process.", ""]
    if cfg.get("note"):
        lines += [cfg["note"], ""]
    lines += ["| system | weights | prompt tokens | prefill tok/s | decode tok/s | first prefill s | compile s | "
              "peak RSS GB | reps | load 1-min before / after |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for k in rec["cells_order"]:
        r = runner.result(rec, k)
        if not r or "skipped" in r:
            continue
        ld = rec["cells"][k].get("load") or {}
        flag = " LOADED" if ld.get("overloaded") else ""
        lines.append(f"| {r['system']} | {r['weights']} | {r['prompt_tokens']} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['first_prefill_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['reps']} | {ld.get('loadavg_before', ['?'])[0]} / "
                     f"{ld.get('loadavg_after', ['?'])[0]}{flag} |")
    hf = {r["prompt_tokens"]: r for r in rows if r["system"] == "hf"}
    ratios = [f"{r['weights']} {r['prompt_tokens']}: {r['prefill_tok_s'] / hf[r['prompt_tokens']]['prefill_tok_s']:.2f}x"
              for r in rows if r["system"] == "jaxdec" and r["prompt_tokens"] in hf]
    if ratios:
        lines += ["", "jaxdec prefill tok/s over HF's (same run, separate processes): " + ", ".join(ratios)]
    lines += [""] + [f"- {s}" for s in skipped]
    for r in rows:
        if r["system"] == "hf" and "generate_s_all" in r:
            w = __import__("benchlib").peer_warning(r["generate_s_all"], f"HF at {r['prompt_tokens']} tokens")
            if w:
                lines.append(w)
    if rows:
        lines.append("\n![seconds against prompt length](long_context.png)\n")
    return lines


def plot(rec: dict, prefix: str) -> None:
    import matplotlib.pyplot as plt
    rows = [r for r in (runner.result(rec, k) for k in rec["cells_order"]) if r and "skipped" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["system"], r["weights"]) for r in rows}):
        rs = sorted((r for r in rows if (r["system"], r["weights"]) == key), key=lambda r: r["prompt_tokens"])
        ax.plot([r["prompt_tokens"] for r in rs], [r["generate_s"] for r in rs], marker="o",
                label=f"{key[0]} {key[1]}")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(f"seconds (prefill + {rec['config']['new_tokens']} new tokens)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    runner.stamp(fig, rec)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=100)
    plt.close(fig)


def _extra(ap) -> None:
    ap.add_argument("--one-system", help="internal: measure one system in this process")
    ap.add_argument("--one-n", type=int, help="internal")
    ap.add_argument("--one-new", type=int, help="internal")
    ap.add_argument("--one-reps", type=int, help="internal")


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, extra=_extra)
    if opts.one_system:
        return run_one(opts.one_system, opts.one_n, opts.one_new, opts.one_reps)
    cells = [cell_key(s, n) for n in cfg.sizes for s in cfg.systems]
    runner.run_experiment("long_context", cfg, cells, lambda cell: measure(cfg, cell), opts=opts,
                          title="Long prompts: prefill and decode against the prompt length", markdown=markdown,
                          plot=plot, depends=depends(cfg))


if __name__ == "__main__":
    main()
