"""Where the time of one decode step goes: an op-level profile of the compiled model call (issue 24).

One jitted model call (a block of ``--tokens`` new tokens per row, the cache holding ``--committed`` tokens in
``--cache`` slots, the greedy argmax of the last position) is traced with `jax.profiler` over ``--reps`` calls;
each compiled op's time is summed per call and tied to the source line that made it (the compiled HLO's
metadata), then grouped: weight products (the native kernels' custom calls and XLA dots in jaxdec/quant), the
LM head, attention (jaxdec/attention), KV-cache writes (jaxdec/cache), the rest of the model, and the loop.
The wall time of the same calls is measured without the profiler, next to the load average.

    python experiments/profile_step.py --batch 32 --weights f32 [--cache 256 --committed 64 --tokens 1]
    python experiments/profile_step.py --smoke

Runs through experiments/runner.py (one cell); writes experiments/results/profile_step/b{B}_{weights}_t{T}.{json,md}
(the command, commit, machine and load average in the header; a loaded run is flagged).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdec  # noqa: E402
from jaxdec.core.reduce import argmax  # noqa: E402

# source file (relative to jaxdec/) -> group; the first matching prefix wins
GROUPS = (("quant/formats.py", "embedding lookup"), ("quant/", "weight products"), ("attention/", "attention"),
          ("cache/", "KV-cache writes"), ("models/", "model (norms, RoPE, LM head, embedding)"),
          ("core/", "argmax / sampling"))
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(.*?metadata=\{([^}]*)\}")
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
CONTROL = ("while", "conditional", "call")  # their time includes the ops they run: not summed


def _tables(hlo_text: str) -> dict:
    """The compiled HLO text's FileNames / FileLocations / StackFrames tables (id -> text of the row)."""
    tables, cur = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = tables.setdefault(line, {})
            continue
        m = _TABLE_ROW.match(line) if cur is not None else None
        if m:
            cur[int(m.group(1))] = m.group(2)
        elif line.strip() and cur is not None and not line[0].isdigit():
            cur = None
    return tables


def _source(frame: int, tables: dict) -> str:
    """file:line of the innermost frame inside jaxdec/ of a stack (else the innermost frame)."""
    frames, locs, files = (tables.get(k, {}) for k in ("StackFrames", "FileLocations", "FileNames"))
    first, seen = None, set()
    while frame and frame not in seen and frame in frames:
        seen.add(frame)
        loc_id = int(re.search(r"file_location_id=(\d+)", frames[frame]).group(1))
        loc = locs.get(loc_id, "")
        fm = re.search(r"file_name_id=(\d+)", loc)
        ln = re.search(r"\bline=(\d+)", loc)
        path = files.get(int(fm.group(1)), "").strip('"') if fm else ""
        here = f"{path}:{ln.group(1) if ln else '?'}"
        first = first or here
        if "/jaxdec/" in path and "/jaxdec/core/protocols" not in path:
            return here
        frame = int(re.search(r"parent_frame_id=(\d+)", frames[frame]).group(1))
    return first or ""


def op_sources(hlo_text: str) -> dict:
    """Compiled-HLO instruction name -> (result type, opcode, jax op name, source file:line)."""
    tables = _tables(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        meta = m.group(4)
        name = re.search(r'op_name="([^"]*)"', meta)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        out[m.group(1)] = (m.group(2), m.group(3), name.group(1) if name else "",
                           _source(int(frame.group(1)), tables) if frame else "")
    return out


def group_of(source: str) -> str:
    rel = source.split("jaxdec/", 1)[1] if "jaxdec/" in source else source
    for prefix, g in GROUPS:
        if rel.startswith(prefix):
            return g
    return "other"


def measure(cfg) -> dict:
    m = jaxdec.load(weights=cfg.weights)
    model, params = m.model, m.params
    b, t = cfg.batch, cfg.tokens
    cache = model.init_cache(b, cfg.cache)
    rng = np.random.default_rng(0)
    kv = jnp.asarray(rng.normal(size=cache.k.shape).astype(np.float32) * 0.1)
    cache = cache.replace(k=kv, v=kv, lengths=jnp.full((b,), cfg.committed, jnp.int32))
    tok = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(cfg.committed + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    f = jax.jit(lambda p, tk, ps, c: argmax(model(p, tk, ps, c, mask=mask).logits[:, -1]))
    call = (params, tok, pos, cache)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*call))
    first = time.perf_counter() - t0
    sources = op_sources(f.lower(*call).compile().as_text())
    wall = []
    for _ in range(cfg.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*call))
        wall.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(cfg.reps):
                jax.block_until_ready(f(*call))
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        with gzip.open(files[0]) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    calls = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in sources and sources[e["name"]][1] not in CONTROL:
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / cfg.reps  # ms per model call
            calls[e["name"]] += 1
    ops = []
    for name, ms in per_op.most_common():
        typ, _, op_name, src = sources[name]
        ops.append({"op": name, "ms": ms, "per_call": calls[name] // cfg.reps, "type": typ,
                    "jax_op": op_name.split("/")[-1], "source": src.split("jaxdec/", 1)[-1],
                    "group": group_of(src)})
    # the LM head: the weight product whose output rows are the vocabulary
    vocab = int(model.vocab_size)
    for o in ops:
        if o["group"] == "weight products" and re.search(rf"[\[,]{vocab}\]", o["type"]):
            o["group"] = "LM head"
    groups = collections.Counter()
    for o in ops:
        groups[o["group"]] += o["ms"]
    return {"wall_ms": [1e3 * w for w in wall], "first_call_s": first, "ops": ops, "groups": dict(groups),
            "profiled_ms": sum(groups.values())}


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 32
    weights: str = dataclasses.field(default="f32", metadata={"choices": ["f32", "q"]})
    cache: int = dataclasses.field(default=256, metadata={"help": "KV slots per row"})
    committed: int = dataclasses.field(default=64, metadata={"help": "tokens the cache holds"})
    tokens: int = dataclasses.field(default=1, metadata={"help": "new tokens per row (a verify block when > 1)"})
    reps: int = 5


SMOKE = Config(batch=2, cache=64, committed=8, reps=2)


def markdown(rec: dict) -> list:
    c, r = rec["config"], runner.result(rec, "profile")
    if r is None:
        return ["(not measured)"]
    med = statistics.median(r["wall_ms"])
    lines = [f"One model call: batch {c['batch']}, {c['tokens']} new token(s) per row, weights {c['weights']}, cache "
             f"{c['cache']} slots holding {c['committed']}. Wall time per call (no profiler, {c['reps']} calls): "
             f"median {med:.1f} ms [{min(r['wall_ms']):.1f}, {max(r['wall_ms']):.1f}]; first call (compile) "
             f"{r['first_call_s']:.1f} s; ops traced: {r['profiled_ms']:.1f} ms per call (ops of the two threads can "
             "overlap).", "", "| group | ms per call | share of traced |", "| --- | ---: | ---: |"]
    tot = r["profiled_ms"] or 1.0
    for g, ms in sorted(r["groups"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {g} | {ms:.1f} | {100 * ms / tot:.0f} % |")
    lines += ["", "Ops over 1 % of the traced time:", "",
              "| op | ms per call | runs per call | result | jax op | source |",
              "| --- | ---: | ---: | --- | --- | --- |"]
    for o in r["ops"]:
        if o["ms"] >= 0.01 * tot:
            lines.append(f"| {o['op']} | {o['ms']:.2f} | {o['per_call']} | `{o['type'][:40]}` | {o['jax_op'][:40]} | "
                         f"{o['source']} |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    for name in ("batch", "cache", "tokens", "reps"):
        if getattr(cfg, name) < 1:
            opts.parser.error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.committed <= cfg.cache - cfg.tokens:
        opts.parser.error(f"--committed must be in [0, --cache - --tokens] = [0, {cfg.cache - cfg.tokens}], got "
                          f"{cfg.committed}")
    rec = runner.run_experiment(f"b{cfg.batch}_{cfg.weights}_t{cfg.tokens}", cfg, ["profile"],
                                lambda cell: measure(cfg), opts=opts,
                                results_dir=os.path.join(runner.RESULTS, "profile_step"), markdown=markdown,
                                title="Where the time of one model call goes (op-level profile)")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
