"""CLI method of the layer-skip package, registered with `jaxdec.cli` (imported by its plugin loader).

`jaxdec generate --method first --first-routers ROUTERS.npz [--first-threshold 0.5] ...` (LOSSY): FiRST
routers choose at prefill which layers each batch of ``--batch-size`` prompts (default 1: per prompt)
skips for its whole generation; greedy decoding through the compiled loop. Each JSONL row's ``stats``
carry ``layers_skipped`` (its batch's skipped layers) and ``num_layers``.
"""
from __future__ import annotations

import os

from jaxdec.cli import BadInput, check_float, register_method, register_papers


def add_first_args(g):
    s = g.add_argument_group("first (FiRST router-selected layers, lossy)")
    s.add_argument("--first-routers", default=None,
                   help="router file written by python -m train.first_routers (<out>/routers.npz)")
    s.add_argument("--first-threshold", type=float, default=0.5,
                   help="a layer is skipped when its router's keep probability is below this")


def validate_first_args(args):
    check_float(args, "first_threshold", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _check_first(args):
    if not args.first_routers:
        raise BadInput("--method first needs --first-routers PATH (a router file from python -m train.first_routers)")
    if not os.path.isfile(args.first_routers):
        raise BadInput(f"--first-routers {args.first_routers!r} does not exist (expected a router file from "
                       f"python -m train.first_routers)")


@register_method("first", add_first_args, uses=("min_new_tokens", "batch_size", "first_routers", "first_threshold"),
                 check=_check_first, chunked=True, validate=validate_first_args)
def first_method(args, loaded, ids, progress):
    from jaxdec.layerskip.first import first_generate, load_routers
    try:
        routers, _ = load_routers(args.first_routers)
    except ValueError as e:
        raise BadInput(f"--first-routers: {e}") from None
    n_layers = loaded.model.num_layers
    if tuple(routers["b2"].shape) != (n_layers,) or routers["w1"].shape[1] != loaded.model.config.hidden_size:
        raise BadInput(f"--first-routers {args.first_routers!r} was trained for {routers['b2'].shape[0]} layers of width "
                       f"{routers['w1'].shape[1]}, this model has {n_layers} of width {loaded.model.config.hidden_size}")
    bs = args.batch_size or 1
    rows, totals = [], {"model_calls": 0, "new_tokens": 0, "seconds": 0.0}
    starts = range(0, len(ids), bs)
    for i in (progress(starts) if progress is not None else starts):
        chunk = ids[i:i + bs]
        g = first_generate(loaded.model, loaded.params, chunk, routers, threshold=args.first_threshold,
                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, batch_size=bs,
                           tokenizer=loaded.tokenizer)
        per = {k: g.stats.get(k) for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second")}
        per.update(layers_skipped=g.stats["layers_skipped"], num_layers=n_layers)
        for k in totals:
            totals[k] += g.stats[k]
        for p, t, x, f in zip(g.prompt_ids, g.tokens, g.text, g.finish_reason):
            rows.append({"prompt_ids": p, "tokens": t, "text": x, "finish_reason": f, "stats": per})
    totals["tokens_per_second"] = totals["new_tokens"] / totals["seconds"] if totals["seconds"] > 0 else float("nan")
    return rows, totals


register_papers({
    "first": ("Jain et al. 2024, FiRST: Finetuning Router-Selective Transformers for Input-Adaptive Latency "
              "Reduction", "per-layer routers skip layers chosen at prefill (lossy)"),
})
