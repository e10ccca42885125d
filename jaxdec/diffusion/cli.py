"""``jaxdec generate --method diffusion``: masked-diffusion task models through the spine's CLI.

``jaxdec generate --model <task model folder or shipped name> --method diffusion --sampler <name> [--steps N]
[--block-length B] [--threshold T] [--learn2pd-filter PATH] [--diffusion-temperature T --seed S]
--max-new-tokens G --prompt "copy : Ada Lovelace , Alan Turing =>"``
decodes a generation window of G positions (``--max-new-tokens``) with one of
`jaxdec.diffusion.samplers.SAMPLERS`. JSONL rows are the spine's (``prompt_ids``, ``tokens`` up to and
including the first [EOS], ``text``, ``finish_reason`` "eos" or "length", ``stats``); ``stats`` adds
the row's ``model_calls``, ``committed_per_call`` and ``tokens_per_call`` and the ``sampler``.

Shipped models by name (`jaxdec.diffusion.shipped`): ``--model diffusion-tasks`` (``--sampler learn2pd`` then
uses its shipped filter unless ``--learn2pd-filter`` is given) and ``--model diffusion-tasks-ar`` (``--method
greedy``).

Refused before the model loads: a model that is not a masked-diffusion task model (an autoregressive
LM such as the default SmolLM2, or the autoregressive task model), ``--block-length`` not dividing the
window, ``--threshold`` outside (0, 1], ``--sampler learn2pd`` without a readable filter of the
right feature count (or ``--learn2pd-filter`` with another sampler), ``--diffusion-temperature`` < 0 or
> 0 with freedave (greedy-exact). ``--diffusion-temperature`` (default 0, greedy) is diffusion's own flag:
the shared ``--temperature`` defaults to 1.0 for ``--method sample``. And the reverse: a masked-diffusion
model given to any other method.
"""
from __future__ import annotations

import time

from jaxdec.cli import BadInput, check_float, check_int, register_method, register_papers
from jaxdec.diffusion.samplers import CACHES, SAMPLERS

_FLAGS = ("sampler", "steps", "block_length", "threshold", "factor", "freedave_drafts", "dllm_cache",
          "learn2pd_filter", "diffusion_temperature")


def add_diffusion_args(g):
    s = g.add_argument_group("diffusion (masked-diffusion task models: --method diffusion)")
    s.add_argument("--sampler", default="one-per-step", choices=list(SAMPLERS),
                   help="decoding schedule (learn2pd needs --learn2pd-filter)")
    s.add_argument("--steps", type=int, default=None, help="fixed-count schedules: steps per row (default: one "
                                                          "token per step)")
    s.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length (must divide --max-new-tokens; adablock: longest block)")
    s.add_argument("--threshold", type=float, default=0.9,
                   help="confidence threshold in (0, 1] (threshold, localleap anchors, credit, adablock, ccd); the "
                        "other settings of a sampler keep jaxdec.diffusion.samplers.SamplerConfig's defaults")
    s.add_argument("--factor", type=float, default=1.0, help="fast-dllm-factor: the factor f")
    s.add_argument("--freedave-drafts", type=int, default=4, help="freedave: drafts per call")
    s.add_argument("--dllm-cache", default="none", choices=CACHES,
                   help="Fast-dLLM's prefix or dual key/value cache (needs --block-length)")
    s.add_argument("--learn2pd-filter", default=None, metavar="PATH",
                   help="--sampler learn2pd: the filter (.safetensors) written by python -m train.learn2pd_filter "
                        "or a shipped filter name (default for --model diffusion-tasks: its shipped filter); "
                        "--threshold is the filter's ready probability")
    s.add_argument("--diffusion-temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: every position's prediction sampled from softmax(logits / T), "
                        "seeded by --seed (freedave refuses it: it is greedy-exact)")


def _model_objective(name: str):
    from jaxdec.diffusion.model import objective_of
    from jaxdec.models.registry import resolve
    try:
        path = resolve(name)
    except (FileNotFoundError, OSError, ValueError):
        return None, None  # check_model_path reports it
    return path, objective_of(path)


def validate_diffusion_args(args):
    """Value checks of the diffusion flags (whatever the method) and the reverse model check."""
    check_int(args, "steps", 1, allow_none=True)
    check_int(args, "block_length", 1, allow_none=True)
    check_int(args, "freedave_drafts", 1)
    check_float(args, "threshold", lambda v: 0 < v <= 1, "in (0, 1]")
    check_float(args, "factor", lambda v: v > 0, "a finite number > 0")
    check_float(args, "diffusion_temperature", lambda v: v >= 0, "a finite number >= 0 (0 = greedy)")
    if args.command == "generate":
        _resolve_shipped(args)
    if args.command == "generate" and args.method == "diffusion":
        if args.sampler == "freedave" and args.diffusion_temperature > 0:
            raise BadInput(f"--diffusion-temperature {args.diffusion_temperature} is refused by --sampler freedave "
                           f"(it reproduces greedy one-per-step decoding exactly): leave it at 0")
        if args.sampler == "learn2pd" and args.learn2pd_filter is None and args._shipped_filter is not None:
            args._learn2pd_params = _load_shipped_filter(args._shipped_filter)
        elif args.sampler == "learn2pd" and args.learn2pd_filter is None:
            raise BadInput("--sampler learn2pd needs --learn2pd-filter PATH (a filter written by python -m "
                           "train.learn2pd_filter)")
        if args.learn2pd_filter is not None and args.sampler != "learn2pd":
            raise BadInput(f"--learn2pd-filter is used only by --sampler learn2pd (got --sampler {args.sampler})")
        if args.learn2pd_filter is not None:
            args._learn2pd_params = _load_filter(args.learn2pd_filter)
    if args.command == "generate" and args.method != "diffusion":
        path, obj = _model_objective(args.model)
        if obj == "masked_diffusion":
            raise BadInput(f"--model {args.model!r} is a masked-diffusion model: decode it with --method diffusion "
                           f"(--method {args.method} needs an autoregressive model)")


def _resolve_shipped(args):
    """A shipped task model name in ``--model`` -> its folder in the package (`jaxdec.diffusion.shipped`);
    ``args._shipped_filter``: the shipped Learn2PD filter of that model (None for any other model)."""
    from jaxdec.diffusion import shipped
    args._shipped_filter = shipped.filter_for(args.model) if isinstance(args.model, str) else None
    if args.model in shipped.MODELS:
        try:
            args.model = shipped.resolve(args.model)
        except FileNotFoundError as e:
            raise BadInput(f"--model: {e}") from None


def _load_shipped_filter(name: str):
    from jaxdec.diffusion import shipped
    try:
        return shipped.load_filter(name)
    except (FileNotFoundError, ValueError) as e:  # missing, or HeadsMismatch (the model was retrained alone)
        raise BadInput(f"--sampler learn2pd: the shipped filter {name!r} of --model cannot be used: {e}") from None


def _load_filter(path: str):
    from jaxdec.diffusion import shipped
    from jaxdec.diffusion.learn2pd import load_filter
    if path in shipped.FILTERS:
        return _load_shipped_filter(path)
    try:
        return load_filter(path)
    except FileNotFoundError:
        raise BadInput(f"--learn2pd-filter {path!r}: no such file (expected a Learn2PD filter .safetensors "
                       f"written by python -m train.learn2pd_filter)") from None
    except Exception as e:  # ValueError (not a filter), OSError, safetensors' own error on a bad header
        raise BadInput(f"--learn2pd-filter {path!r} is not a readable Learn2PD filter: {e}") from None


def _check(args):
    path, obj = _model_objective(args.model)
    if path is not None and obj != "masked_diffusion":
        what = "the autoregressive task model" if obj == "autoregressive" else "an autoregressive language model"
        raise BadInput(f"--model {args.model!r} is {what}: --method diffusion needs a masked-diffusion task model "
                       f"(a folder written by python -m train.masked_diffusion --objective diffusion); decode "
                       f"this one with --method greedy")
    if args.block_length is not None and args.max_new_tokens % args.block_length:
        raise BadInput(f"--block-length {args.block_length} must divide the generation length --max-new-tokens "
                       f"{args.max_new_tokens}")
    if args.sampler == "adablock" and args.block_length is None:
        raise BadInput("--sampler adablock needs --block-length (the longest block)")
    if args.dllm_cache != "none" and (args.block_length is None or args.sampler in ("freedave", "adablock")):
        raise BadInput(f"--dllm-cache {args.dllm_cache} needs --block-length and a --sampler other than freedave "
                       f"and adablock")


def sampler_config(args, model):
    import json
    import os
    from jaxdec.diffusion import tasks as T
    from jaxdec.diffusion.samplers import SamplerConfig
    with open(os.path.join(args._model_path, "config.json")) as f:
        mask_id = int(json.load(f).get("mask_token_id", T.MASK_ID))
    return SamplerConfig(args.sampler, steps=args.steps, block_length=args.block_length, threshold=args.threshold,
                         factor=args.factor, drafts=args.freedave_drafts, delimiters=T.DELIMITER_IDS, mask_id=mask_id,
                         pad_id=model.pad_id, cache=args.dllm_cache,
                         temperature=args.diffusion_temperature, eos_id=T.EOS_ID)


@register_method("diffusion", add_diffusion_args, uses=_FLAGS + ("seed", "batch_size"), check=_check, chunked=True,
                 validate=validate_diffusion_args)
def diffusion_method(args, loaded, ids, progress):
    from jaxdec.cli import _read_prompts
    from jaxdec.diffusion import tasks as T
    from jaxdec.diffusion.model import logits_fn
    from jaxdec.diffusion.samplers import sample
    offset = getattr(args, "_chunk", (0, len(ids)))[0]
    texts = _read_prompts(args)[offset:offset + len(ids)]
    unk = loaded.tokenizer.backend.token_to_id(T.UNK)
    for i, (p, text) in enumerate(zip(ids, texts)):
        if unk is not None and unk in p:
            try:
                T.encode(text)
            except ValueError as e:
                raise BadInput(f"prompt {offset + i + 1}: {e}") from None
    g = args.max_new_tokens
    longest = max(len(p) for p in ids) + g
    if longest > loaded.model.max_position:
        raise BadInput(f"--max-new-tokens {g}: the longest prompt ({longest - g} tokens) plus the window needs "
                       f"{longest} positions, the model has {loaded.model.max_position}")
    args._model_path = loaded.path
    cfg = sampler_config(args, loaded.model)
    t0 = time.perf_counter()
    filt = getattr(args, "_learn2pd_params", None) if cfg.name == "learn2pd" else None
    toks, st = sample(logits_fn(loaded.model), loaded.params, ids, g, cfg, seed=args.seed, filter_params=filt)
    secs = time.perf_counter() - t0
    eos = set(loaded.model.eos_ids)
    rows, new = [], 0
    for i, (p, w) in enumerate(zip(ids, toks.tolist())):
        cut = next((j for j, x in enumerate(w) if x in eos), None)
        out = w if cut is None else w[:cut + 1]
        new += len(out)
        stats = {"sampler": cfg.name, "cache": cfg.cache, "model_calls": st["model_calls"][i],
                 "committed_per_call": st["committed_per_call"][i], "tokens_per_call": st["tokens_per_call"][i],
                 "window": g, "seconds": secs}
        rows.append({"prompt_ids": p, "tokens": out, "text": loaded.tokenizer.decode(out, skip_special_tokens=True),
                     "finish_reason": "length" if cut is None else "eos", "stats": stats})
    batch = {"model_calls": st["batch_calls"], "new_tokens": new, "seconds": secs,
             "tokens_per_second": new / secs if secs > 0 else float("nan"), "sampler": cfg.name}
    if cfg.cache != "none":
        batch["full_calls"] = st["full_calls"]
    for r in rows:
        r["stats"]["new_tokens"], r["stats"]["tokens_per_second"] = new, batch["tokens_per_second"]
        if cfg.cache != "none":
            r["stats"]["full_calls"] = st["full_calls"]  # of the batch's calls
    return rows, batch


register_papers({"diffusion": ("LLaDA (Nie et al. 2025), Dream (Ye et al. 2025), Fast-dLLM (Wu et al. 2025), "
                               "FreeDave, LocalLeap, CreditDecoding, AdaBlock-dLLM, CCD, Discrete Diffusion VLA",
                               "masked-diffusion task models: parallel unmasking schedules (--sampler)")})
