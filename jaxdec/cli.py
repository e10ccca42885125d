"""`jaxdec` command line: `jaxdec generate ...` (JSONL in/out, progress bar, clear errors with exit code 2)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxdec.models.registry import WEIGHTS

EXIT_BAD_INPUT = 2

# method name -> handler(args, loaded, prompt_ids) -> list of per-prompt dicts. Other packages
# (speculative, search) register their methods here with `register_method`.
METHODS: dict = {}


def register_method(name: str, add_args=None):
    def deco(fn):
        METHODS[name] = (fn, add_args)
        return fn
    return deco


class BadInput(Exception):
    pass


def read_jsonl_strings(path: str, flag: str, keys: tuple, expected: str) -> list:
    """The string under the first of ``keys`` present in each non-blank JSONL line of ``path``; any
    problem is one `BadInput` naming ``flag`` (and the line), ``expected`` describing a good line."""
    if not os.path.isfile(path):
        raise BadInput(f"{flag}: no such file {path!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{flag} line {n}: not valid JSON ({e.msg})") from None
            value = next((obj[k] for k in keys if k in obj), None) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise BadInput(f"{flag} line {n}: expected {expected}")
            out.append(value)
    return out


def _read_prompts(args) -> list:
    if (args.prompt is None) == (args.prompts_file is None):
        raise BadInput("give exactly one of --prompt TEXT or --prompts-file F.jsonl")
    if args.prompt is not None:
        return [args.prompt]
    prompts = read_jsonl_strings(args.prompts_file, "--prompts-file", ("prompt",),
                                 "an object {\"prompt\": \"...\"}")
    if not prompts:
        raise BadInput(f"--prompts-file {args.prompts_file!r} holds no prompts")
    return prompts


def _sampling_from_args(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "typical_p": args.typical_p, "repetition_penalty": args.repetition_penalty}


def _token_method(args, loaded, prompt_ids, progress):
    from jaxdec.core.generate import generate
    sampling = _sampling_from_args(args) if args.method == "sample" else None
    g = generate(loaded.model, loaded.params, prompt_ids, method=args.method, sampling=sampling,
                 max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, n=args.n,
                 seed=args.seed, stop_strings=tuple(args.stop or ()), tokenizer=loaded.tokenizer,
                 batch_size=args.batch_size, progress=progress)
    per_row = {k: g.stats[k] for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second")}
    return [{"prompt_ids": p, "tokens": t, "text": x, "finish_reason": f, "stats": per_row}
            for p, t, x, f in zip(g.prompt_ids, g.tokens, g.text, g.finish_reason)], g.stats


METHODS["greedy"] = (_token_method, None)
METHODS["sample"] = (_token_method, None)


def _load_plugins():
    """Import the packages that register extra CLI methods (missing ones are simply absent)."""
    import importlib
    for mod in ("jaxdec.speculative.cli", "jaxdec.search.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    ap = argparse.ArgumentParser(prog="jaxdec", description="LLM decoding in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from prompts")
    g.add_argument("--model", default="smollm2-135m", help="model name, GGUF file or HF folder")
    g.add_argument("--prompt", help="one prompt text")
    g.add_argument("--prompts-file", help='JSONL file, one {"prompt": "..."} per line')
    g.add_argument("--chat", action="store_true", help="wrap each prompt as one user turn of the chat template")
    g.add_argument("--method", default="greedy", choices=sorted(METHODS))
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--weights", default="f32", choices=list(WEIGHTS))
    g.add_argument("--attention", default="xla", choices=["xla", "pallas"])
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--out", help="write one JSON object per output row to this JSONL file")
    g.add_argument("--quiet", action="store_true", help="no progress bar, no text on stdout")
    d = sub.add_parser("demo", help="decode a few chat prompts with the default model and print the speed")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--weights", default="q", choices=list(WEIGHTS))
    d.add_argument("--max-new-tokens", type=int, default=64)
    for name, (_, add_args) in METHODS.items():
        if add_args is not None:
            add_args(g)
    return ap


def _check_args(args):
    for name in ("max_new_tokens", "n"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.method == "sample":
        from jaxdec.core.processors import SamplingParams
        try:
            SamplingParams.create(1, **_sampling_from_args(args))
        except ValueError as e:
            raise BadInput(str(e)) from None


def cmd_generate(args) -> int:
    import jaxdec
    from tqdm import tqdm

    prompts = _read_prompts(args)
    _check_args(args)
    t0 = time.perf_counter()
    try:
        loaded = jaxdec.load(args.model, weights=args.weights, attention_impl=args.attention)
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(f"--model: {e}") from None
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    ids = [tok.chat_ids(p) if args.chat else tok.encode(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise BadInput(f"prompt {i} is empty after tokenization")
    progress = None if args.quiet else (lambda it: tqdm(it, desc="batches", unit="batch", file=sys.stderr))
    handler, _ = METHODS[args.method]
    try:
        rows, stats = handler(args, loaded, ids, progress)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if not args.quiet:
        for r in rows:
            print(r["text"])
            print("-" * 60)
        print(f"[jaxdec] model load {load_s:.1f}s; {stats.get('new_tokens')} new tokens in {stats.get('seconds', 0):.2f}s "
              f"(compile included) = {stats.get('tokens_per_second', 0):.1f} tok/s; model calls {stats.get('model_calls')}",
              file=sys.stderr)
    return 0


DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
]


def cmd_demo(args) -> int:
    """Load the default model, decode a few chat prompts greedily, print the text and the speed."""
    import jaxdec

    t0 = time.perf_counter()
    loaded = jaxdec.load(args.model, weights=args.weights)
    print(f"[demo] loaded {loaded.path} ({args.weights} weights) in {time.perf_counter() - t0:.1f}s")
    ids = [loaded.tokenizer.chat_ids(p) for p in DEMO_PROMPTS]
    kw = dict(max_new_tokens=args.max_new_tokens, tokenizer=loaded.tokenizer, batch_size=1)
    t0 = time.perf_counter()
    jaxdec.generate(loaded.model, loaded.params, ids[:1], **kw)  # compile once
    compile_s = time.perf_counter() - t0
    g = jaxdec.generate(loaded.model, loaded.params, ids, **kw)
    for p, text in zip(DEMO_PROMPTS, g.text):
        print(f"\n>>> {p}\n{text}")
    print(f"\n[demo] greedy, batch 1: {g.stats['new_tokens']} tokens in {g.stats['seconds']:.2f}s = "
          f"{g.stats['tokens_per_second']:.1f} tok/s (first call incl. compile: {compile_s:.1f}s)")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "demo":
            return cmd_demo(args)
    except BadInput as e:
        print(f"jaxdec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 1


if __name__ == "__main__":
    # run through the importable module so plugins registering into `jaxdec.cli.METHODS` are seen
    from jaxdec.cli import main as _main
    sys.exit(_main())
