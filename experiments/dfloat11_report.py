"""DFloat11 on the default model: compressed size per weight matrix and what decoding costs.

The model's weight matrices are rounded to bfloat16 (`weights="bf16"`), then every stacked layer matrix
is DFloat11-compressed (`weights="df11"`): sign+mantissa bytes kept raw, exponents Huffman-coded with
one code per stacked matrix, decoded per layer inside the jitted layer scan. Reported:

1. per matrix kind: bfloat16 bytes, compressed bytes (decode tables and block offsets included),
   ratio, bits per weight, code length cap;
2. decode cost: ms to decode one layer's matrix (jitted, median of repetitions);
3. greedy decoding, `weights="bf16"` vs `"df11"`, the same prompts, interleaved repetitions: tokens/s
   (prefill included, compile excluded) and whether the tokens are equal.

    python experiments/dfloat11_report.py            # 2 prompts x 8 new tokens, 2 repetitions
    python experiments/dfloat11_report.py --quick    # 1 prompt x 4 new tokens, 1 repetition

Writes ``experiments/results/dfloat11.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?",
           "Explain recursion to a child in two sentences."]


def _median_ms(fn, reps):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    load = benchlib.LoadMonitor()
    n_prompts = args.prompts or (1 if args.quick else 2)
    new_tokens = args.new_tokens or (4 if args.quick else 8)
    reps = args.reps or (1 if args.quick else 2)

    import jaxdec
    from jaxdec.compress.dfloat11 import LAYER_MATRICES, compress_params, decode_layer

    t0 = time.perf_counter()
    loaded = jaxdec.load(weights="bf16")
    bf16 = loaded.params
    t1 = time.perf_counter()
    df11 = compress_params(bf16)
    encode_s = time.perf_counter() - t1
    model, tok = loaded.model, loaded.tokenizer
    print(f"[df11] loaded in {t1 - t0:.1f}s, compressed in {encode_s:.1f}s", flush=True)

    rows, tot_plain, tot_comp = [], 0, 0
    dec = jax.jit(decode_layer)
    for k in LAYER_MATRICES:
        s = df11["layers"][k]
        plain = int(np.prod(s.shape)) * 2
        comp = s.nbytes()
        tot_plain, tot_comp = tot_plain + plain, tot_comp + comp
        ms = _median_ms(lambda: dec(s, s.shape[0] // 2), max(3, reps))
        rows.append({"matrix": k, "shape": list(s.shape), "bf16_bytes": plain, "df11_bytes": comp,
                     "ratio": comp / plain, "bits_per_weight": 8 * comp / (plain / 2),
                     "max_code_len": s.max_len, "decode_ms_per_layer": ms})
        print(f"[df11] {rows[-1]}", flush=True)
    decode_ms_token = sum(r["decode_ms_per_layer"] * r["shape"][0] for r in rows)

    ids = [tok.chat_ids(p) for p in PROMPTS[:n_prompts]]
    kw = dict(max_new_tokens=new_tokens, stop_ids=())
    outs, times = {}, {"bf16": [], "df11": []}
    for name, params in (("bf16", bf16), ("df11", df11)):
        outs[name] = jaxdec.generate(model, params, ids, **kw).tokens  # compile
    for _ in range(reps):
        for name, params in (("bf16", bf16), ("df11", df11)):
            t = time.perf_counter()
            g = jaxdec.generate(model, params, ids, **kw)
            times[name].append(time.perf_counter() - t)
            assert g.tokens == outs[name]
    n_tok = sum(len(t) for t in outs["bf16"])
    gen = {name: {"seconds_median": statistics.median(ts), "tokens_per_s": n_tok / statistics.median(ts)}
           for name, ts in times.items()}
    res = {"command": "python experiments/dfloat11_report.py" + (" --quick" if args.quick else ""),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                       "loadavg_at_end": os.getloadavg()}, "load": load.record(),
           "backend": jax.default_backend(), "encode_seconds": encode_s, "matrices": rows,
           "total": {"bf16_bytes": tot_plain, "df11_bytes": tot_comp, "ratio": tot_comp / tot_plain},
           "decode_ms_per_token_all_layers": decode_ms_token,
           "generation": {"prompts": len(ids), "new_tokens": new_tokens, "reps": reps, **gen,
                          "tokens_equal": outs["bf16"] == outs["df11"]}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "dfloat11.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# DFloat11 on SmolLM2-135M-Instruct (layer matrices, bfloat16 -> DFloat11)", "",
             f"Command: `{res['command']}`; commit `{res['commit']}`; backend {res['backend']}, "
             f"{res['machine']}", load.markdown(),
             "| matrix | shape | bf16 MB | DF11 MB | ratio | bits/weight | max code len | decode ms / layer |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape']} | {r['bf16_bytes'] / 1e6:.2f} | {r['df11_bytes'] / 1e6:.2f} | "
                     f"{r['ratio']:.3f} | {r['bits_per_weight']:.2f} | {r['max_code_len']} | "
                     f"{r['decode_ms_per_layer']:.2f} |")
    t = res["total"]
    lines += [f"| **all layer matrices** | | {t['bf16_bytes'] / 1e6:.1f} | {t['df11_bytes'] / 1e6:.1f} | "
              f"**{t['ratio']:.3f}** | {16 * t['ratio']:.2f} | | {decode_ms_token:.0f} per token |", "",
              f"Host-side compression took {encode_s:.1f}s. Greedy, {len(ids)} prompts x {new_tokens} new "
              f"tokens, median of {reps}: bf16 {gen['bf16']['tokens_per_s']:.1f} tok/s, DF11 "
              f"{gen['df11']['tokens_per_s']:.2f} tok/s; tokens equal: {res['generation']['tokens_equal']}.",
              "", "DFloat11 trades decode work for memory: on this CPU the jnp decoder (one code per block "
              "per step, all blocks in parallel) costs far more than streaming the bfloat16 bytes it saves; "
              "the paper's gain needs a GPU kernel whose decode hides under the matmul."]
    with open(os.path.join(RESULTS, "dfloat11.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
