"""The mesh matrix of issue 20: one decode on one device and on data x model meshes of the visible devices.

Run as a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/test_mesh_matrix.py
does). Prints one line ``RESULT {json}``: per method the single-device tokens and, per mesh, its tokens,
the shardings ``generate`` placed, and (only where greedy or speculative tokens differ from one device)
the near-tie data of DESIGN's rule: the reference's top-2 logits at the first divergence and the mesh's
max |dlogit| over the reference sequences. ``--errors`` adds the messages of the bad-input cases.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxdec import sharding  # noqa: E402
from jaxdec.core.generate import generate  # noqa: E402
from jaxdec.search.beam import beam_search  # noqa: E402
from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder  # noqa: E402
from jaxdec.speculative.run import generate_speculative  # noqa: E402

METHODS = ("greedy", "sample", "beam", "speculative")


def load(args):
    if args.model == "tiny":
        from tiny_llama import tiny_llama, tiny_prompts
        model, params = tiny_llama()
        return model, params, tiny_prompts(8)
    from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
    from jaxdec.models.llama import LlamaModel
    r = open_gguf(args.gguf)
    cfg, arch = config_from_gguf(r)
    return LlamaModel(cfg), load_gguf_params(r, cfg, arch, args.weights), json.loads(args.prompts)


def decode(method, model, params, prompts, n, mesh):
    if method == "greedy":
        return generate(model, params, prompts, max_new_tokens=n, mesh=mesh)
    if method == "sample":
        return generate(model, params, prompts, method="sample", sampling={"temperature": 1.0}, seed=7,
                        max_new_tokens=n, mesh=mesh)
    if method == "beam":
        return beam_search(model, params, prompts, num_beams=2, max_new_tokens=n, mesh=mesh)
    return generate_speculative(model, params, prompts, SpeculativeDecoder(PromptLookupDrafter(4)),
                                max_new_tokens=n, mesh=mesh)


def forward_logits(model, params, seqs, mesh=None):
    """Teacher-forced logits ``[len, V]`` of each sequence, on one device or SPMD over ``mesh``."""
    d = 1 if mesh is None else mesh.shape[sharding.DATA]
    b, t = -(-len(seqs) // d) * d, max(len(s) for s in seqs)
    ids = np.zeros((b, t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    m = dataclasses.replace(model, matmul_impl="xla")
    if mesh is not None:
        params = sharding.shard_params(params, mesh, m)
        ids, pos = sharding.shard_rows((ids, pos), mesh)
    out = np.asarray(jax.jit(lambda p, i, q: m(p, i, q, m.init_cache(b, t)).logits)(params, ids, pos))
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def near_tie_data(model, params, prompts, single, ours, mesh):
    """For rows whose tokens differ: the reference's top-2 logits at the first divergence; and the
    mesh's max |dlogit| vs one device over every decoded position of every row."""
    seqs = [p + t for p, t in zip(prompts, single)]
    ref, got = forward_logits(model, params, seqs), forward_logits(model, params, seqs, mesh)
    dl = max(float(np.max(np.abs(a[len(p) - 1:] - b[len(p) - 1:]))) for a, b, p in zip(ref, got, prompts))
    rows = {}
    for r, (a, b) in enumerate(zip(ours, single)):
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        if i is None and len(a) != len(b):
            i = min(len(a), len(b))
        if i is not None and i < len(b):
            rows[r] = {"step": i, "top2": np.sort(ref[r][len(prompts[r]) - 1 + i])[-2:].tolist()}
    return {"max_dlogit": dl, "rows": rows}


def placed_specs(placed):
    def spec(w):
        s = (w.codes if hasattr(w, "codes") else w).sharding
        return {"spec": str(s.spec), "replicated": bool(s.is_fully_replicated)}
    lay = placed["layers"]
    out = {"wq": spec(lay["wq"]), "wo": spec(lay["wo"]), "w_gate": spec(lay["w_gate"]), "embed": spec(placed["embed"])}
    if "lm_head" in placed:
        out["lm_head"] = spec(placed["lm_head"])
    return out


def error_messages(model, params, prompts):
    out = {}
    for name, fn in (("too_many_devices", lambda: sharding.make_mesh(4, 4)),
                     ("bad_size", lambda: sharding.make_mesh(0, 2)),
                     ("batch_not_divisible", lambda: generate(model, params, prompts[:3], max_new_tokens=2,
                                                              mesh=sharding.make_mesh(2, 4))),
                     ("parse", lambda: sharding.parse_mesh("2by4"))):
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--gguf")
    ap.add_argument("--weights", default="f32")
    ap.add_argument("--prompts", help="JSON list of token-id prompts (default model)")
    ap.add_argument("--meshes", default="1x8,2x4,4x2,8x1")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma list; METHOD@AxB+CxD runs that method on those meshes only (default: --meshes)")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--errors", action="store_true")
    args = ap.parse_args()
    model, params, prompts = load(args)
    placed = []
    real_shard = sharding.shard_params

    def spy(p, mesh, model=None):  # what `generate` itself placed on the mesh
        out = real_shard(p, mesh, model)
        placed.append(out)
        return out

    sharding.shard_params = spy
    res = {"devices": len(jax.devices()), "meshes": args.meshes.split(","), "seconds": {}}
    for item in args.methods.split(","):
        method, _, only = item.partition("@")
        t0 = time.perf_counter()
        g1 = decode(method, model, params, prompts, args.new, None)
        entry = {"single": g1.tokens, "meshes": {}}
        if method == "beam":
            entry["single_beams"] = [[h["tokens"] for h in hyps] for hyps in g1.extras["beams"]]
        if method == "speculative":
            entry["single_tau"] = g1.stats["tau"]
        for name in (only.split("+") if only else res["meshes"]):
            mesh = sharding.make_mesh(*sharding.parse_mesh(name))
            placed.clear()
            g = decode(method, model, params, prompts, args.new, mesh)
            r = {"tokens": g.tokens, "placements": len(placed), "params": placed_specs(placed[-1])}
            if "token_sharding" in g.extras:
                ts, cs = g.extras["token_sharding"], g.extras["cache_sharding"]
                r.update(token_spec=str(ts.spec), token_replicated=bool(ts.is_fully_replicated),
                         cache_spec=str(cs.spec), cache_replicated=bool(cs.is_fully_replicated))
            if method == "beam":
                r["beams"] = [[h["tokens"] for h in hyps] for hyps in g.extras["beams"]]
            if method == "speculative":
                r["tau"] = g.stats["tau"]
            if method in ("greedy", "speculative") and g.tokens != g1.tokens:
                sharding.shard_params = real_shard
                r["near_tie"] = near_tie_data(model, params, prompts, g1.tokens, g.tokens, mesh)
                sharding.shard_params = spy
            entry["meshes"][name] = r
            print(f"mesh_matrix: {method} {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        res[method] = entry
        res["seconds"][method] = round(time.perf_counter() - t0, 1)
    if args.errors:
        res["errors"] = error_messages(model, params, prompts)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
