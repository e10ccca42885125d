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
    python experiments/dfloat11_report.py --smoke    # 1 prompt x 4 new tokens, 1 repetition, to a temp dir

Runs through experiments/runner.py (cells: ``compress``, one per matrix kind, ``generation``; an interrupted
run resumes) and writes ``experiments/results/dfloat11.{json,md}`` with the config, commit, machine and load.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import numpy as np

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

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


@dataclasses.dataclass(frozen=True)
class Config:
    prompts: int = dataclasses.field(default=2, metadata={"help": "chat prompts for the generation cell"})
    new_tokens: int = dataclasses.field(default=8, metadata={"help": "greedy new tokens per prompt"})
    reps: int = dataclasses.field(default=2, metadata={"help": "timed repetitions (decode timing: max(3, reps))"})


SMOKE = Config(prompts=1, new_tokens=4, reps=1)


class Setup:
    """The bf16 model and its DFloat11 compression, made once and only when a cell needs them."""

    def __init__(self):
        self._done = False

    def get(self):
        if not self._done:
            import jaxdec
            from jaxdec.compress.dfloat11 import compress_params, decode_layer
            t0 = time.perf_counter()
            self.loaded = jaxdec.load(weights="bf16")
            t1 = time.perf_counter()
            self.df11 = compress_params(self.loaded.params)
            self.encode_s = time.perf_counter() - t1
            self.decode = jax.jit(decode_layer)
            print(f"[df11] loaded in {t1 - t0:.1f}s, compressed in {self.encode_s:.1f}s", flush=True)
            self._done = True
        return self


def matrix_cell(setup, k, reps):
    st = setup.get()
    s = st.df11["layers"][k]
    plain = int(np.prod(s.shape)) * 2
    comp = s.nbytes()
    ms = _median_ms(lambda: st.decode(s, s.shape[0] // 2), max(3, reps))
    row = {"matrix": k, "shape": list(s.shape), "bf16_bytes": plain, "df11_bytes": comp,
           "ratio": comp / plain, "bits_per_weight": 8 * comp / (plain / 2),
           "max_code_len": s.max_len, "decode_ms_per_layer": ms}
    print(f"[df11] {row}", flush=True)
    return row


def generation_cell(setup, cfg):
    import jaxdec
    st = setup.get()
    model, tok, bf16, df11 = st.loaded.model, st.loaded.tokenizer, st.loaded.params, st.df11
    ids = [tok.chat_ids(p) for p in PROMPTS[:cfg.prompts]]
    kw = dict(max_new_tokens=cfg.new_tokens, stop_ids=())
    outs, times = {}, {"bf16": [], "df11": []}
    for name, params in (("bf16", bf16), ("df11", df11)):
        outs[name] = jaxdec.generate(model, params, ids, **kw).tokens  # compile
    for _ in range(cfg.reps):
        for name, params in (("bf16", bf16), ("df11", df11)):  # interleaved
            t = time.perf_counter()
            g = jaxdec.generate(model, params, ids, **kw)
            times[name].append(time.perf_counter() - t)
            assert g.tokens == outs[name]
    n_tok = sum(len(t) for t in outs["bf16"])
    gen = {name: {"seconds_median": statistics.median(ts), "tokens_per_s": n_tok / statistics.median(ts)}
           for name, ts in times.items()}
    return {"prompts": len(ids), "new_tokens": cfg.new_tokens, "reps": cfg.reps, **gen,
            "tokens_equal": outs["bf16"] == outs["df11"]}


def markdown(rec):
    from jaxdec.compress.dfloat11 import LAYER_MATRICES
    rows = [r for k in LAYER_MATRICES if (r := runner.result(rec, f"matrix/{k}"))]
    comp, gen = runner.result(rec, "compress"), runner.result(rec, "generation")
    lines = ["| matrix | shape | bf16 MB | DF11 MB | ratio | bits/weight | max code len | decode ms / layer |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape']} | {r['bf16_bytes'] / 1e6:.2f} | {r['df11_bytes'] / 1e6:.2f} | "
                     f"{r['ratio']:.3f} | {r['bits_per_weight']:.2f} | {r['max_code_len']} | "
                     f"{r['decode_ms_per_layer']:.2f} |")
    if rows:
        tp, tc = sum(r["bf16_bytes"] for r in rows), sum(r["df11_bytes"] for r in rows)
        decode_ms_token = sum(r["decode_ms_per_layer"] * r["shape"][0] for r in rows)
        lines += [f"| **all layer matrices** | | {tp / 1e6:.1f} | {tc / 1e6:.1f} | **{tc / tp:.3f}** | "
                  f"{16 * tc / tp:.2f} | | {decode_ms_token:.0f} per token |", ""]
    if comp:
        lines.append(f"Host-side compression took {comp['encode_seconds']:.1f}s.")
    if gen:
        lines.append(f"Greedy, {gen['prompts']} prompts x {gen['new_tokens']} new tokens, median of {gen['reps']} "
                     f"(interleaved): bf16 {gen['bf16']['tokens_per_s']:.1f} tok/s, DF11 "
                     f"{gen['df11']['tokens_per_s']:.2f} tok/s; tokens equal: {gen['tokens_equal']}.")
    lines += ["", "DFloat11 trades decode work for memory: on this CPU the jnp decoder (one code per block "
              "per step, all blocks in parallel) costs far more than streaming the bfloat16 bytes it saves; "
              "the paper's gain needs a GPU kernel whose decode hides under the matmul."]
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    from jaxdec.compress.dfloat11 import LAYER_MATRICES
    setup = Setup()
    cells = ["compress"] + [f"matrix/{k}" for k in LAYER_MATRICES] + ["generation"]

    def measure(cell):
        if cell == "compress":
            st = setup.get()
            return {"encode_seconds": st.encode_s}
        if cell.startswith("matrix/"):
            return matrix_cell(setup, cell.split("/", 1)[1], cfg.reps)
        return generation_cell(setup, cfg)

    depends = lambda c: {"compress": [], "generation": ["prompts", "new_tokens", "reps"]}.get(c, ["reps"])  # noqa: E731
    rec = runner.run_experiment("dfloat11", cfg, cells, measure, opts=opts, markdown=markdown, depends=depends,
                                title="DFloat11 on SmolLM2-135M-Instruct (layer matrices, bfloat16 -> DFloat11)")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    sys.exit(main())
