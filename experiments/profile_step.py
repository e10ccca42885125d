"""Where the time of one decode step goes: an op-level profile of the compiled model call (issue 24).

One jitted model call (a block of ``--tokens`` new tokens per row, the cache holding ``--committed`` tokens in
``--cache`` slots, the greedy argmax of the last position) is traced with `jax.profiler` over ``--reps`` calls;
each compiled op's time is summed per call and tied to the source line that made it (the compiled HLO's
metadata), then grouped: weight products (the native kernels' custom calls and XLA dots in jaxdec/quant), the
LM head, attention (jaxdec/attention), KV-cache writes (jaxdec/cache), the rest of the model, and the loop.
The wall time of the same calls is measured without the profiler, next to the load average.

    python experiments/profile_step.py --batch 32 --weights f32 [--cache 256 --committed 64 --tokens 1]
    python experiments/profile_step.py --smoke

Writes experiments/results/profile_step/b{B}_{weights}_t{T}.{json,md} (the command, commit, machine and load
average in the header; a loaded run is flagged).
"""
from __future__ import annotations

import argparse
import collections
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
import benchlib  # noqa: E402
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


def measure(args) -> dict:
    m = jaxdec.load(weights=args.weights)
    model, params = m.model, m.params
    b, t = args.batch, args.tokens
    cache = model.init_cache(b, args.cache)
    rng = np.random.default_rng(0)
    kv = jnp.asarray(rng.normal(size=cache.k.shape).astype(np.float32) * 0.1)
    cache = cache.replace(k=kv, v=kv, lengths=jnp.full((b,), args.committed, jnp.int32))
    tok = jnp.ones((b, t), jnp.int32)
    pos = jnp.broadcast_to(args.committed + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    f = jax.jit(lambda p, tk, ps, c: argmax(model(p, tk, ps, c, mask=mask).logits[:, -1]))
    call = (params, tok, pos, cache)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*call))
    first = time.perf_counter() - t0
    sources = op_sources(f.lower(*call).compile().as_text())
    wall = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*call))
        wall.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.reps):
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
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.reps  # ms per model call
            calls[e["name"]] += 1
    ops = []
    for name, ms in per_op.most_common():
        typ, _, op_name, src = sources[name]
        ops.append({"op": name, "ms": ms, "per_call": calls[name] // args.reps, "type": typ,
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


def markdown(rec: dict, args) -> list:
    r = rec["result"]
    med = statistics.median(r["wall_ms"])
    lines = [f"# One model call: batch {args.batch}, {args.tokens} new token(s) per row, weights {args.weights}, "
             f"cache {args.cache} slots holding {args.committed}", ""]
    lines += rec["header"]
    lines += ["", f"Wall time per call (no profiler, {args.reps} calls): median {med:.1f} ms "
              f"[{min(r['wall_ms']):.1f}, {max(r['wall_ms']):.1f}]; first call (compile) {r['first_call_s']:.1f} s; "
              f"ops traced: {r['profiled_ms']:.1f} ms per call (ops of the two threads can overlap).", "",
              "| group | ms per call | share of traced |", "| --- | ---: | ---: |"]
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weights", default="f32", choices=["f32", "q"])
    ap.add_argument("--cache", type=int, default=256, help="KV slots per row")
    ap.add_argument("--committed", type=int, default=64, help="tokens the cache holds")
    ap.add_argument("--tokens", type=int, default=1, help="new tokens per row (a verify block when > 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="batch 2, 2 calls, to a temp dir")
    ap.add_argument("--out-dir", default=os.path.join(runner.RESULTS, "profile_step"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.reps, args.cache, args.committed = 2, 2, 64, 8
        args.out_dir = tempfile.mkdtemp(prefix="profile_step_")
    for name in ("batch", "cache", "tokens", "reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.committed <= args.cache - args.tokens:
        raise SystemExit(f"--committed must be in [0, --cache - --tokens] = [0, {args.cache - args.tokens}], "
                         f"got {args.committed}")
    mon = benchlib.LoadMonitor()
    result = measure(args)
    rec = {"command": "python experiments/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": benchlib.git_commit(), "machine": runner.machine_info(), "load": mon.record(),
           "config": vars(args), "result": result, "time": runner.now()}
    rec["header"] = [f"Command: `{rec['command']}`  ", f"Commit: `{rec['commit']}`  ",
                     f"Machine: {rec['machine'].get('cpu', '')}, {rec['machine'].get('cores', '')} cores  ",
                     f"Time: {rec['time']}", "", mon.summary_line()]
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"b{args.batch}_{args.weights}_t{args.tokens}")
    runner.atomic_write(stem + ".json", json.dumps(rec, indent=1, default=str))
    text = "\n".join(markdown(rec, args)) + "\n"
    runner.atomic_write(stem + ".md", text)
    print(text)
    print("wrote", stem + ".md")


if __name__ == "__main__":
    main()
