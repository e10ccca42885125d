"""`jaxdec` command line: `jaxdec generate ...` (JSONL in/out, progress bar, clear errors with exit code 2).

Bad input is one ``jaxdec: error: ...`` line on stderr and exit code 2, naming the flag and what it
expects; everything that needs no model (flags, prompts, files, stop strings, the ``--out`` path) is
checked before the model loads. Every flag's value is validated whatever the method, and a flag the
chosen method does not use is an error. ``--out OUT`` writes each finished batch to ``OUT.partial`` as
it completes and renames it to ``OUT`` at the end: an interrupted run leaves a previous ``OUT``
untouched. Ctrl-C prints one line and exits with code 130. ``--stream`` (one prompt, ``--n 1``; greedy,
sample, speculative) prints the text as it is decoded: the handler passes `stream_kwargs(args)` to
`generate`, which drives the same jitted init/step from Python with a `StreamPrinter` as callback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

from jaxdec.models.registry import ACTIVATIONS, WEIGHTS

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# method name -> (handler(args, loaded, prompt_ids, progress) -> (rows, stats), add_args). Other packages
# (speculative, search) register their methods here with `register_method`.
METHODS: dict = {}
# method name -> {"uses": flags (argparse dests) the method honours beyond ALWAYS, "check": check(args)
# run before the model loads when the method is chosen, "chunked": whether --batch-size batches may be
# decoded (and written to --out) one after the other, "rows_per_prompt": None, or the dest of the flag giving
# each prompt's state rows when --batch-size counts prompts (beam: num_beams)}
METHOD_INFO: dict = {}
# check(args) functions run before the model loads whatever the method: value checks of plugin flags
VALIDATORS: list = []
# method (or "speculative --drafter NAME") -> (paper, what it does): `jaxdec methods` lists them
PAPERS: dict = {}


def register_papers(entries: dict) -> None:
    """Each family names the papers its CLI methods implement (shown by ``jaxdec methods``)."""
    PAPERS.update(entries)

# flags every method of `generate` honours
ALWAYS = frozenset({"command", "model", "prompt", "prompts_file", "chat", "method", "max_new_tokens", "weights",
                    "activations", "attention", "out", "quiet", "prefill_chunk",
                    # multi-process runs: checked by _multihost_value (they need --mesh, which methods refuse by name)
                    "coordinator", "num_processes", "process_id",
                    # constraints: checked by jaxdec.constrained.cli (methods that cannot honour them refuse)
                    "json_schema", "regex", "grammar", "choices", "constraint_engine"})
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")
INT64 = 2 ** 63


def register_method(name: str, add_args=None, *, uses=(), check=None, chunked=False, validate=None,
                    rows_per_prompt=None):
    """Register a CLI method. ``uses``: the argparse dests (beyond `ALWAYS`) it honours; a flag it
    does not use given a non-default value is an error. ``check(args)``: method-specific checks run
    before the model loads (raise `BadInput`). ``validate(args)``: value checks of the flags that
    ``add_args`` adds, run whatever the method. ``chunked``: decoding prompts ``--batch-size`` at a time
    in separate calls gives the same rows (so finished batches can be written as they complete).
    ``rows_per_prompt``: for methods whose ``--batch-size`` counts prompts of several state rows each, the
    dest of the flag giving that count (``--mesh`` checks its data axis against the rows it implies)."""
    def deco(fn):
        METHODS[name] = (fn, add_args)
        METHOD_INFO[name] = {"uses": frozenset(uses), "check": check, "chunked": chunked,
                             "rows_per_prompt": rows_per_prompt}
        if validate is not None and validate not in VALIDATORS:
            VALIDATORS.append(validate)
        return fn
    return deco


class BadInput(Exception):
    pass


class _ArgError(Exception):
    """An argparse error (unknown flag, bad type, bad choice)."""

    def __init__(self, message, prog):
        super().__init__(message)
        self.prog = prog


class _Interrupted(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage block, a pointer to ``--help`` instead."""

    def error(self, message):
        raise _ArgError(message, self.prog)


# ------------------------------------------------------------------------------------------ checks
def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_int(args, dest, lo=None, hi=None, allow_none=False):
    v = getattr(args, dest)
    if v is None and allow_none:
        return
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise BadInput(f"{flag(dest)} must be an integer {rng}, got {v}")


def check_float(args, dest, ok, expected, allow_none=False):
    v = getattr(args, dest)
    if v is None and allow_none:
        return
    if not (math.isfinite(v) and ok(v)):
        raise BadInput(f"{flag(dest)} must be {expected}, got {v:g}")


def check_text(what: str, text: str) -> None:
    """``text`` must encode as UTF-8 (non-UTF-8 command-line bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise BadInput(f"{what}: not valid UTF-8 text (undecodable byte or lone surrogate {bad!r} at "
                       f"character {e.start})") from None


def read_jsonl_strings(path: str, flag_name: str, keys: tuple, expected: str) -> list:
    """The string under the first of ``keys`` present in each non-blank JSONL line of ``path``; any
    problem is one `BadInput` naming ``flag_name`` (and the line), ``expected`` describing a good line."""
    if os.path.isdir(path):
        raise BadInput(f"{flag_name}: {path!r} is a folder, expected a JSONL file")
    if not os.path.isfile(path):
        raise BadInput(f"{flag_name}: no such file {path!r}")
    out = []
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadInput(f"{flag_name}: cannot read {path!r} ({e.strerror})") from None
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"{flag_name} line {n}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                           f"{e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{flag_name} line {n}: not valid JSON ({e.msg})") from None
        value = next((obj[k] for k in keys if k in obj), None) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise BadInput(f"{flag_name} line {n}: expected {expected}")
        check_text(f"{flag_name} line {n}", value)
        out.append(value)
    return out


def _read_prompts(args) -> list:
    if (args.prompt is None) == (args.prompts_file is None):
        raise BadInput("give exactly one of --prompt TEXT or --prompts-file F.jsonl")
    if args.prompt is not None:
        check_text("--prompt", args.prompt)
        if not args.prompt:
            raise BadInput("--prompt is empty: expected a non-empty prompt text")
        return [args.prompt]
    prompts = read_jsonl_strings(args.prompts_file, "--prompts-file", ("prompt",),
                                 "an object {\"prompt\": \"...\"}")
    if not prompts:
        raise BadInput(f"--prompts-file {args.prompts_file!r} holds no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise BadInput(f"--prompts-file: prompt {i + 1} is empty: expected a non-empty prompt text")
    return prompts


def _sampling_from_args(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "typical_p": args.typical_p, "repetition_penalty": args.repetition_penalty}


def check_model_path(name: str, flag_name: str = "--model") -> None:
    """A model name or path that `jaxdec.load` could open: a known name, a GGUF file or a folder."""
    from jaxdec.models.gguf_loader import is_gguf
    from jaxdec.models.registry import resolve
    try:
        path = resolve(name)
    except FileNotFoundError as e:
        raise BadInput(f"{flag_name}: {e}") from None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise BadInput(f"{flag_name}: folder {path!r} has no config.json (expected a GGUF file or a Hugging "
                           f"Face model folder)")
    elif not is_gguf(path):
        raise BadInput(f"{flag_name}: not a GGUF file (no 'GGUF' magic bytes): {path!r}")


def _check_args(args, parser) -> None:
    """Every check that needs no model: flag values (whatever the method), flags the method ignores,
    stop strings, the model path."""
    check_int(args, "max_new_tokens", 1)
    check_int(args, "min_new_tokens", 0)
    if args.activations == "q8" and args.weights != "q":
        raise BadInput(f"--activations q8 needs --weights q (int8 activations run against block-quantized "
                       f"weights), got --weights {args.weights}")
    if args.min_new_tokens > args.max_new_tokens:
        raise BadInput(f"--min-new-tokens ({args.min_new_tokens}) must be <= --max-new-tokens ({args.max_new_tokens})")
    check_int(args, "batch_size", 1, allow_none=True)
    check_int(args, "prefill_chunk", 0)
    check_int(args, "n", 1)
    check_int(args, "seed", -INT64, INT64 - 1)
    check_float(args, "temperature", lambda v: v >= 0, "a finite number >= 0 (0 = greedy)")
    check_int(args, "top_k", 0, 2 ** 31 - 1)
    check_float(args, "top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
    check_float(args, "min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)")
    check_float(args, "typical_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
    check_float(args, "repetition_penalty", lambda v: v > 0, "a finite number > 0 (1 = off)")
    for s in args.stop or ():
        check_text("--stop", s)
        if s == "":
            raise BadInput("--stop: a stop string must not be empty")
    mesh_shape = _mesh_value(args)
    multihost = _multihost_value(args, mesh_shape)
    for validate in VALIDATORS:
        validate(args)
    info = METHOD_INFO.get(args.method, {"uses": frozenset(), "check": None})
    ignored = [a for a in parser.generate_parser._actions
               if a.dest not in ALWAYS and a.dest != "help" and a.dest not in info["uses"]
               and getattr(args, a.dest, a.default) != a.default]
    if ignored:
        a = ignored[0]
        users = sorted(m for m, i in METHOD_INFO.items() if a.dest in i["uses"])
        hint = f" (it applies to --method {', '.join(users)})" if users else ""
        raise BadInput(f"{a.option_strings[-1]} is not used by --method {args.method}{hint}")
    if info["check"] is not None:
        info["check"](args)
    if multihost is not None:  # before anything asks jax for its devices: the mesh spans every process's
        from jaxdec.sharding import initialize_distributed
        initialize_distributed(*multihost)
    args._mesh = None if mesh_shape is None else _build_mesh(args, *mesh_shape)
    from jaxdec.constrained.cli import read_constraints
    try:
        args._constraints = read_constraints(args, getattr(args, "_n_prompts", 1))
    except ValueError as e:  # jaxdec.constrained.ConstraintError: the message names the flag or the line
        raise BadInput(str(e)) from None
    check_model_path(args.model)


def _mesh_value(args):
    """``--mesh DATAxMODEL`` parsed (None without it); a malformed value is bad input whatever the method."""
    if getattr(args, "mesh", None) is None:
        return None
    from jaxdec.sharding import parse_mesh
    try:
        return parse_mesh(args.mesh)
    except ValueError as e:
        raise BadInput(str(e)) from None


_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:(\d{1,5})$")


def _multihost_value(args, mesh_shape):
    """``--coordinator HOST:PORT --num-processes N --process-id I`` (each falls back to JAXDEC_COORDINATOR,
    JAXDEC_NUM_PROCESSES, JAXDEC_PROCESS_ID): the checked ``(address, N, I)`` for
    `jaxdec.sharding.initialize_distributed`, or None for a single-process run. Multi-host runs need
    ``--mesh`` (one global mesh over every process's devices) and cannot ``--stream``."""
    env = os.environ
    coord = args.coordinator if args.coordinator is not None else env.get("JAXDEC_COORDINATOR") or None
    if coord is None:
        for dest in ("num_processes", "process_id"):
            if getattr(args, dest) is not None:
                raise BadInput(f"{flag(dest)} needs --coordinator HOST:PORT (or JAXDEC_COORDINATOR)")
        return None
    m = _HOST_PORT.match(coord)
    if m is None or not 0 < int(m.group(1)) < 65536:
        raise BadInput(f"--coordinator expects HOST:PORT (e.g. localhost:12355) with a port in 1..65535, got {coord!r}")
    vals = []
    for dest in ("num_processes", "process_id"):
        v = getattr(args, dest)
        if v is None:
            v = env.get(f"JAXDEC_{dest.upper()}")
            if v is None or not v.isdigit():
                raise BadInput(f"{flag(dest)} is needed with --coordinator (an integer; or JAXDEC_{dest.upper()}), got "
                               f"{v!r}")
            v = int(v)
        vals.append(v)
    n, i = vals
    if n < 1:
        raise BadInput(f"--num-processes must be an integer >= 1, got {n}")
    if not 0 <= i < n:
        raise BadInput(f"--process-id must be in [0, --num-processes) = [0, {n}), got {i}")
    if mesh_shape is None:
        raise BadInput("--coordinator (a multi-process run) needs --mesh DATAxMODEL: one global mesh over every "
                       "process's devices")
    if args.stream:
        raise BadInput("--stream is not supported in a multi-process run (--coordinator): process 0 writes the rows")
    return coord, n, i


def _build_mesh(args, data: int, model: int):
    """The ``--mesh`` mesh over the visible devices, after checking that there are enough of them and
    that its data axis divides the rows of every compiled batch (before the model loads)."""
    prompts, n, bs = getattr(args, "_n_prompts", 1), args.n, args.batch_size
    calls = [prompts] if bs is None else [min(bs, prompts - s) for s in range(0, prompts, bs)]
    if not METHOD_INFO[args.method]["chunked"]:  # one call over every row; each batch padded to --batch-size
        calls = [prompts]
    per = METHOD_INFO[args.method].get("rows_per_prompt")  # --batch-size counts prompts of `per` rows each
    for size in calls:
        if per is not None:
            rows = size * getattr(args, per)
            why = (f"{'the last batch: ' if len(calls) > 1 else ''}{size} prompt{'s' * (size != 1)} x "
                   f"{flag(per)} {getattr(args, per)}")
            hint = f"a {flag(per)} or --batch-size (prompts per batch) that makes them a multiple of {data}"
        else:
            rows = size * n if bs is None else min(bs, size * n)
            why = (f"--batch-size {bs}" if rows == bs else
                   f"{'the last batch: ' if bs is not None else ''}{size} prompt{'s' * (size != 1)} x --n {n}")
            hint = f"--batch-size as a multiple of {data} that divides the rows"
        if rows % data:
            raise BadInput(f"--mesh {args.mesh}: the data axis ({data}) must divide the rows of every compiled batch, "
                           f"got {rows} rows ({why}); choose {hint}, or a mesh whose data axis divides them")
    import jax
    from jaxdec.sharding import make_mesh
    have = jax.devices()
    if data * model > len(have):
        hint = " (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)" if have[0].platform == "cpu" else ""
        raise BadInput(f"--mesh {args.mesh} needs {data * model} devices (data x model), but only {len(have)} "
                       f"{have[0].platform} device{'s are' if len(have) != 1 else ' is'} visible{hint}")
    return make_mesh(data, model)


_API_NAMES = re.compile(r"\b(max_new_tokens|min_new_tokens|batch_size|top_k|top_p|min_p|typical_p|"
                        r"repetition_penalty|temperature|num_beams|num_return_sequences|length_penalty|"
                        r"diversity_penalty|num_beam_groups|no_repeat_ngram_size|num_drafts|ngram_alpha|"
                        r"ngram_weights|ngram_penalty|exit_layer|draft_layers|skip_layers|tree_size|"
                        r"stop_strings)\b")


def _flag_names(message: str) -> str:
    """An API error message with the API argument names replaced by their CLI flags."""
    return _API_NAMES.sub(lambda m: "--stop" if m.group(1) == "stop_strings" else flag(m.group(1)), message)


# ------------------------------------------------------------------------------------------ --stream
class StreamPrinter:
    """``--stream``: the ``callback(state)`` that `generate(debug=True)` calls after ``init`` and after
    every ``step`` of the very jitted init/step the compiled loop runs (`jaxdec.core.loop.run_debug`).
    Each call reads row 0's committed tokens (``tokens[0, :num_new[0]]``: one token per step for token
    decoders, several for speculative ones), detokenizes the new ones incrementally (no half UTF-8
    character, special tokens skipped as in the final text) and prints the new text at once, flushed.
    With stop strings the text stops after the first one, as the final text does. `finish` prints what
    the final text adds (the detokenizer's held-back tail), so stdout holds exactly the final text."""

    def __init__(self, tokenizer, stop_strings=(), out=None):
        self.detok = tokenizer.stream(skip_special_tokens=True)
        self.stops = tuple(stop_strings)
        self.out = out
        self.ids: list = []
        self.printed = ""
        self.t0 = time.perf_counter()
        self.first_seconds = None  # time from the decode call to the first printed text (compile included)

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def _write(self, text: str) -> None:
        if not text:
            return
        out = self.out or sys.stdout
        out.write(text)
        out.flush()
        self.printed += text
        if self.first_seconds is None:
            self.first_seconds = time.perf_counter() - self.t0

    def __call__(self, state) -> None:
        import numpy as np
        n = int(np.asarray(state.num_new[0]))  # a host read: waits for this step to finish
        if n < len(self.ids):
            raise RuntimeError(f"--stream: the decoder un-committed tokens ({len(self.ids)} -> {n})")
        if n == len(self.ids):
            return
        new = np.asarray(state.tokens[0, len(self.ids):n]).tolist()
        self.ids += new
        self.detok.push_many(new)
        text = self.detok.text  # everything decoded so far (the final text extends it)
        if self.stops:
            from jaxdec.core.stopping import truncate_at_stop
            text = truncate_at_stop(text, self.stops)
        if text.startswith(self.printed):
            self._write(text[len(self.printed):])

    def finish(self, final_text: str) -> bool:
        """Print the rest of ``final_text`` (the row's text as `generate` returns it) and a newline;
        False (and the whole text again, after a note on stderr) if the streamed text was not its prefix."""
        out = self.out or sys.stdout
        ok = final_text.startswith(self.printed)
        if ok:
            self._write(final_text[len(self.printed):])
        else:
            print("\njaxdec: warning: the streamed text differs from the final text; the final text follows",
                  file=sys.stderr)
            out.write(final_text)
        out.write("\n")
        out.flush()
        return ok


def stream_kwargs(args) -> dict:
    """The `generate` keywords a CLI handler passes for ``--stream`` (none without it): the same jitted
    init/step driven from Python with the `StreamPrinter` as callback."""
    printer = getattr(args, "_stream", None)
    return {} if printer is None else {"debug": True, "callback": printer}


def _check_stream(args, prompts) -> None:
    """--stream prints one row as it is decoded: one prompt, one sample, text on stdout."""
    if not args.stream:
        return
    if len(prompts) != 1:
        raise BadInput(f"--stream prints one prompt's text as it is decoded: give one prompt, got {len(prompts)} "
                       f"(from --prompts-file)")
    if args.n != 1:
        raise BadInput(f"--stream prints one row as it is decoded: --n must be 1 with --stream, got {args.n}")
    if args.batch_size is not None:
        raise BadInput("--stream decodes one prompt alone: --batch-size is not used with --stream")
    if args.quiet:
        raise BadInput("--stream prints text on stdout and --quiet prints none: give one of them")


# ------------------------------------------------------------------------------------------ --out
class PartialOut:
    """``--out OUT``: rows go to ``OUT.partial`` as batches finish; `commit` renames it to ``OUT``.
    Opened before the model loads, so a bad path costs nothing."""

    def __init__(self, path: str, write: bool = True):
        """``write=False``: only the path checks (the processes of a multi-process run other than 0)."""
        self.path = path
        self.partial = path + ".partial"
        self.rows = 0
        if os.path.isdir(path):
            raise BadInput(f"--out: {path!r} is a folder, expected a file path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise BadInput(f"--out: folder {parent!r} does not exist")
        if os.path.isdir(self.partial):
            raise BadInput(f"--out: {self.partial!r} (the file written while decoding) is a folder")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise BadInput(f"--out: {path!r} is not writable")
        if not write:
            return
        try:
            self.f = open(self.partial, "w", encoding="utf-8")
        except OSError as e:
            raise BadInput(f"--out: cannot write {self.partial!r} ({e.strerror})") from None

    def write(self, rows) -> None:
        for r in rows:
            self.f.write(json.dumps(r) + "\n")
        self.f.flush()
        self.rows += len(rows)

    def commit(self) -> None:
        self.f.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> str:
        """Close after a failure: keep ``OUT.partial`` if it holds rows (returns a note), else remove it."""
        self.f.close()
        if self.rows:
            return f"{self.rows} finished rows are in {self.partial}"
        try:
            os.remove(self.partial)
        except OSError:
            pass
        return ""


# ------------------------------------------------------------------------------------------ methods
def _token_method(args, loaded, prompt_ids, progress):
    from jaxdec.core.generate import generate
    sampling = _sampling_from_args(args) if args.method == "sample" else None
    inputs_fn = None
    offset, total = getattr(args, "_chunk", (0, len(prompt_ids)))
    if args.method == "sample" and (offset, total) != (0, len(prompt_ids)):
        inputs_fn = _global_keys(args, offset, total, len(prompt_ids))
    g = generate(loaded.model, loaded.params, prompt_ids, method=args.method, sampling=sampling,
                 max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, n=args.n,
                 seed=args.seed, stop_strings=tuple(args.stop or ()), tokenizer=loaded.tokenizer,
                 batch_size=args.batch_size, progress=progress, inputs_fn=inputs_fn,
                 constraint=chunk_constraints(args, len(prompt_ids)),
                 longest_prompt=getattr(args, "_longest", None), mesh=getattr(args, "_mesh", None),
                 **stream_kwargs(args))
    per_row = {k: g.stats[k] for k in ("model_calls", "new_tokens", "seconds", "tokens_per_second")}
    rows = [{"prompt_ids": p, "tokens": t, "text": x, "finish_reason": f, "stats": per_row}
            for p, t, x, f in zip(g.prompt_ids, g.tokens, g.text, g.finish_reason)]
    return with_constraint_ok(rows, g), g.stats


def chunk_constraints(args, count: int):
    """The per-prompt constraints (``--json-schema`` ... or prompts-file fields) of the prompts this call
    decodes (``args._chunk``), or None."""
    cons = getattr(args, "_constraints", None)
    if cons is None:
        return None
    offset = getattr(args, "_chunk", (0, count))[0]
    return cons[offset:offset + count]


def with_constraint_ok(rows: list, g) -> list:
    """Output rows with ``"constraint_ok"`` added when the run was constrained."""
    if g.constraint_ok is None:
        return rows
    return [{**r, "constraint_ok": ok} for r, ok in zip(rows, g.constraint_ok)]


def _global_keys(args, offset: int, total: int, count: int):
    """inputs_fn giving the rows of prompts ``offset .. offset+count`` (of ``total``) the keys they get
    in one call over all prompts (row (i, j) = fold_in(fold_in(PRNGKey(seed), i), j)): decoding
    ``--batch-size`` batches one call at a time samples the same tokens."""
    import jax.numpy as jnp
    import numpy as np
    from jaxdec.core.generate import row_keys
    keys = row_keys(args.seed, total, args.n)[offset * args.n:(offset + count) * args.n]
    rows = len(keys)
    calls = [0]

    def inputs_fn(inputs, chunk):
        bs = inputs.keys.shape[0]
        start = calls[0] * bs
        calls[0] += 1
        real = min(bs, rows - start)
        kb = np.concatenate([keys[start:start + real], np.repeat(keys[start:start + 1], bs - real, 0)])
        return inputs.replace(keys=jnp.asarray(kb))

    return inputs_fn


_TOKEN_USES = ("min_new_tokens", "batch_size", "n", "stop", "stream", "mesh")
register_method("greedy", uses=_TOKEN_USES, chunked=True)(_token_method)
register_method("sample", uses=_TOKEN_USES + ("seed",) + SAMPLING, chunked=True)(_token_method)
register_papers({"greedy": ("-", "argmax at every step"),
                 "sample": ("HF processors; Holtzman et al. 2020 (top-p), Nguyen et al. 2024 (min-p), Meister et al. "
                            "2023 (typical)", "temperature / top-k / top-p / min-p / typical sampling, repetition penalty")})


def cmd_methods(args) -> int:
    """Every registered method (and speculative drafter) with its paper and the flags it honours."""
    for name in sorted(METHODS):
        paper, what = PAPERS.get(name, ("?", "?"))
        flags = sorted(f"--{d.replace('_', '-')}" for d in METHOD_INFO[name]["uses"])
        print(f"{name}\n    {what}\n    paper: {paper}\n    flags: {' '.join(flags) or '-'}")
        for key in sorted(k for k in PAPERS if k.startswith(name + " --")):
            paper, what = PAPERS[key]
            print(f"  {key}\n      {what}\n      paper: {paper}")
    return 0


def _load_plugins():
    """Import the packages that register extra CLI methods (missing ones are simply absent)."""
    import importlib
    for mod in ("jaxdec.speculative.cli", "jaxdec.search.cli", "jaxdec.diffusion.cli", "jaxdec.layerskip.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    ap = ArgumentParser(prog="jaxdec", description="LLM decoding in JAX")
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
    g.add_argument("--activations", default="f32", choices=list(ACTIVATIONS),
                   help="q8: int8 activations in every weight product (LOSSY, needs --weights q; faster verify "
                        "blocks and batches; tokens can differ from the exact paths)")
    g.add_argument("--attention", default="xla", choices=["xla", "pallas"])
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per prefill chunk (0: the whole prompt in one call)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--out", help="write one JSON object per output row to this JSONL file (OUT.partial while "
                                 "decoding, renamed at the end)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, no text on stdout, no XLA log lines")
    g.add_argument("--mesh", help="DATAxMODEL, e.g. 2x4: decode SPMD over a data x model mesh of the visible devices "
                                  "(jaxdec.sharding; greedy, sample, beam (rows: prompts x --num-beams), speculative "
                                  "with drafters that keep the target's params; the data axis must divide each "
                                  "batch's rows)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0: run as one of --num-processes processes "
                                         "(jax.distributed; needs --mesh over every process's devices; process 0 "
                                         "prints and writes --out); default JAXDEC_COORDINATOR")
    g.add_argument("--num-processes", type=int, default=None, help="processes of a --coordinator run "
                                                                      "(default JAXDEC_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index in a --coordinator run, "
                                                                  "0..N-1 (default JAXDEC_PROCESS_ID)")
    from jaxdec.constrained.cli import add_arguments as add_constraint_arguments
    add_constraint_arguments(g)
    g.add_argument("--stream", action="store_true",
                   help="print the text as it is decoded (one prompt, --n 1; the same jitted init/step driven from "
                        "Python); the time to the first printed text goes to the stats line on stderr")
    sub.add_parser("methods", help="list every decoding method and drafter with its paper and main flags")
    d = sub.add_parser("demo", help="decode a few chat prompts with the default model and print the speed")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--weights", default="q", choices=list(WEIGHTS))
    d.add_argument("--max-new-tokens", type=int, default=64)
    seen = set()
    for name, (_, add_args) in METHODS.items():
        if add_args is not None and add_args not in seen:
            seen.add(add_args)
            add_args(g)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) "
                                     "over the decode-slot engine")
    s.add_argument("--host", default="127.0.0.1", help="loopback address to bind (127.0.0.1, ::1, localhost)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default="smollm2-135m", help="model name, GGUF file or HF folder")
    s.add_argument("--weights", default="q", choices=list(WEIGHTS))
    s.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: --model)")
    s.add_argument("--slots", type=int, default=8, help="decode slots (requests decoded together)")
    s.add_argument("--cache-size", type=int, default=1024, help="KV positions per slot (prompt + new tokens)")
    s.add_argument("--max-tokens-limit", type=int, default=256, help="the largest max_tokens a request may ask for")
    s.add_argument("--prefill-chunk-tokens", type=int, default=None,
                   help="chunked prefill across decode steps: at most this many prompt tokens prefilled "
                        "between two decode steps, longer prompts in pieces (bounds the stall of running "
                        "requests; default: a whole prompt at once)")
    _add_serve_drafter(s, "every request: greedy ones get exactly their greedy tokens, sampled ones are verified "
                          "by speculative sampling")
    b = sub.add_parser("serve-bench", help="replay a request trace on the decode-slot engine: throughput, TTFT and "
                                           "TPOT percentiles (a Poisson trace unless --trace is given)")
    b.add_argument("--trace", help='JSONL trace: one {"arrival": s, "prompt_len": n, "output_len": n} per line')
    b.add_argument("--requests", type=int, default=64, help="Poisson trace: number of requests")
    b.add_argument("--rate", type=float, default=4.0, help="Poisson trace: requests per second")
    b.add_argument("--prompt-lens", default="32,128", help="Poisson trace: prompt lengths to draw from (comma list)")
    b.add_argument("--output-lens", default="16,64", help="Poisson trace: output lengths to draw from (comma list)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--weights", default="q", choices=list(WEIGHTS))
    b.add_argument("--slots", type=int, default=8)
    b.add_argument("--cache-size", type=int, default=512)
    b.add_argument("--prefill-chunk-tokens", type=int, default=None,
                   help="chunked prefill across decode steps: at most this many prompt tokens prefilled "
                        "between two decode steps, longer prompts in pieces (bounds the stall of running "
                        "requests; default: a whole prompt at once)")
    b.add_argument("--out", help="write the report (with per-request records) to this JSON file")
    _add_serve_drafter(b, "greedy verification (the trace's requests are greedy); the report gains tau")
    ap.generate_parser = g
    ap.serve_parser = s
    ap.serve_bench_parser = b
    return ap


# ------------------------------------------------------------------------------------------ running
_LOADED: dict = {}


def load_model(name: str, weights: str, attention: str = "xla", flag_name: str = "--model", activations: str = "f32"):
    """`jaxdec.load`, cached per process (the last model only), with load errors as `BadInput`."""
    import jaxdec
    from jaxdec.models.registry import resolve
    try:
        path = resolve(name)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, weights, attention, activations)
        if key not in _LOADED:
            loaded = jaxdec.load(name, weights=weights, attention_impl=attention, activations=activations)
            _LOADED.clear()  # keep one model in memory
            _LOADED[key] = loaded
        return _LOADED[key]
    except (OSError, ValueError) as e:
        raise BadInput(f"{flag_name}: {e}") from None


def _merge_stats(all_stats: list) -> dict:
    if len(all_stats) == 1:
        return all_stats[0]
    out = dict(all_stats[-1])
    for k in ("model_calls", "new_tokens", "seconds"):
        out[k] = sum(s.get(k) or 0 for s in all_stats)
    out["tokens_per_second"] = out["new_tokens"] / out["seconds"] if out["seconds"] > 0 else float("nan")
    return out


def _process_index() -> int:
    import jax
    return jax.process_index()


def cmd_generate(args, parser) -> int:
    from tqdm import tqdm

    prompts = _read_prompts(args)
    args._n_prompts = len(prompts)
    _check_args(args, parser)
    _check_stream(args, prompts)
    if args.out and args.prompts_file and os.path.abspath(args.out) == os.path.abspath(args.prompts_file):
        raise BadInput("--out is the --prompts-file: writing it would replace the prompts; choose another path")
    # a multi-process run (--coordinator): every process decodes its rows of the global batch and receives
    # every row (jaxdec.sharding.to_host: process_allgather); process 0 alone prints and writes --out
    lead = args._mesh is None or _process_index() == 0
    if not lead:
        args.quiet = True
    out = PartialOut(args.out, write=lead) if args.out else None
    out = out if lead else None
    try:
        t0 = time.perf_counter()
        loaded = load_model(args.model, args.weights, args.attention, activations=args.activations)
        from jaxdec.core.steps import with_prefill_chunk
        loaded = loaded._replace(model=with_prefill_chunk(loaded.model, args.prefill_chunk or None))
        load_s = time.perf_counter() - t0
        tok = loaded.tokenizer
        ids = [tok.chat_ids(p) if args.chat else tok.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise BadInput(f"prompt {i + 1} is empty after tokenization")
        handler, _ = METHODS[args.method]
        step = len(ids)
        if args.batch_size is not None and METHOD_INFO[args.method]["chunked"]:
            step = args.batch_size
            # one prompt bucket and cache for the whole file: every batch reuses one compiled program
            args._longest = max(len(p) for p in ids)
        starts = range(0, len(ids), step)
        quiet = args.quiet or args.stream  # --stream: no progress bar between the streamed lines
        printer = args._stream = StreamPrinter(tok, args.stop or ()) if args.stream else None
        inner = None if quiet else (lambda it: tqdm(it, desc="batches", unit="batch", file=sys.stderr))
        if len(starts) > 1:
            starts, inner = (starts if quiet else tqdm(starts, desc="batches", unit="batch", file=sys.stderr)), None
        rows, all_stats = [], []
        for s in starts:
            args._chunk = (s, len(ids))
            if printer is not None:
                printer.start()
            try:
                r, st = handler(args, loaded, ids[s:s + step], inner)
            except ValueError as e:
                raise BadInput(_flag_names(str(e))) from None
            if printer is not None:
                printer.finish(r[0]["text"])
                first = {"first_text_seconds": printer.first_seconds}
                r = [{**row, "stats": {**row["stats"], **first}} for row in r]
                st = {**st, **first}
            if out is not None:
                out.write(r)
            rows += r
            all_stats.append(st)
        stats = _merge_stats(all_stats)
    except KeyboardInterrupt:
        note = out.abandon() if out is not None else ""
        if out is not None and os.path.exists(args.out):
            note += ("; " if note else "") + f"{args.out} was left untouched"
        raise _Interrupted(note) from None
    except BaseException:
        if out is not None:
            out.abandon()
        raise
    if out is not None:
        out.commit()
    if not args.quiet:
        for r in rows:
            if not args.stream:  # streamed rows are on stdout already
                print(r["text"])
            print("-" * 60)
        first = stats.get("first_text_seconds")
        first = "" if not args.stream else (f"; first text after {first:.2f}s (compile included)" if first is not None
                                            else "; no text was printed")
        print(f"[jaxdec] model load {load_s:.1f}s; {stats.get('new_tokens')} new tokens in {stats.get('seconds', 0):.2f}s "
              f"(compile included) = {stats.get('tokens_per_second', 0):.1f} tok/s; model calls {stats.get('model_calls')}"
              f"{first}", file=sys.stderr)
    return 0


DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
]


def cmd_demo(args) -> int:
    """Load the default model, decode a few chat prompts greedily, print the text and the speed."""
    import jaxdec

    check_int(args, "max_new_tokens", 1)
    check_model_path(args.model)
    t0 = time.perf_counter()
    loaded = load_model(args.model, args.weights)
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


# speculative decoding for `jaxdec serve` / `serve-bench --drafter NAME`: the speculative family registers the
# drafter names and a builder (`register_serve_drafters`, from jaxdec.speculative.cli), so this module does not
# import that family (the family imports this one to register its methods)
SERVE_DRAFTERS: dict = {"names": (), "build": None}


def register_serve_drafters(names, build) -> None:
    """``names``: model-free drafters the decode-slot engine can run; ``build(name, sampling, model_path)`` -> the
    engine's `SpeculativeDecoder` (sampling: the speculative-sampling verifier, else greedy verification)."""
    SERVE_DRAFTERS.update(names=tuple(names), build=build)


def _add_serve_drafter(p, how: str) -> None:
    p.add_argument("--drafter", default=None, choices=SERVE_DRAFTERS["names"] or None,
                   help=f"speculative decoding over the decode slots with this model-free drafter ({how}; "
                        "default: one token per step)")


def _serve_decoder(args, sampling: bool):
    """The engine's speculative decoder for ``--drafter`` (None without it), built by the registered builder
    before the model loads."""
    if args.drafter is None:
        return None
    if SERVE_DRAFTERS["build"] is None:
        raise BadInput("--drafter: the speculative family (jaxdec.speculative) is not installed")
    return SERVE_DRAFTERS["build"](args.drafter, sampling, args.model)


def cmd_serve(args) -> int:
    """Load the model, start the engine and serve the OpenAI-compatible API until Ctrl-C."""
    from jaxdec.serving import server
    if not server.is_loopback(args.host):
        raise BadInput(f"--host must be a loopback address (127.0.0.1, ::1, localhost), got {args.host!r}")
    check_int(args, "port", 1, 65535)
    check_int(args, "slots", 1, 1024)
    check_int(args, "cache_size", 2)
    check_int(args, "max_tokens_limit", 1)
    check_int(args, "prefill_chunk_tokens", 1, args.cache_size, allow_none=True)
    if args.max_tokens_limit >= args.cache_size:
        raise BadInput(f"--max-tokens-limit ({args.max_tokens_limit}) must be smaller than --cache-size "
                       f"({args.cache_size})")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise BadInput("--served-model-name is empty")
    spec = _serve_decoder(args, sampling=True)
    check_model_path(args.model)
    loaded = load_model(args.model, args.weights)
    max_pos = getattr(loaded.model, "max_position", None)
    if max_pos is not None and args.cache_size > max_pos:
        raise BadInput(f"--cache-size ({args.cache_size}) exceeds the model's context ({max_pos})")
    from jaxdec.serving.engine import Engine
    engine = Engine(loaded.model, loaded.params, slots=args.slots, cache_size=args.cache_size,
                    capacity=args.max_tokens_limit, keep_results=False, prefill_chunk_tokens=args.prefill_chunk_tokens,
                    speculative=spec)
    app = server.create_app(engine, loaded.tokenizer, args.served_model_name or args.model)
    print(f"[serve] {args.served_model_name or args.model} on http://{args.host}:{args.port}/v1 "
          f"({args.slots} slots, {args.cache_size} positions each)", file=sys.stderr, flush=True)
    server.serve(app, host=args.host, port=args.port)
    return 0


def _int_list(args, dest):
    raw = getattr(args, dest)
    try:
        vals = [int(x) for x in raw.split(",")]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise BadInput(f"{flag(dest)} must be a comma-separated list of integers >= 1, got {raw!r}")
    return vals


def cmd_serve_bench(args) -> int:
    """Replay a trace on an `ignore_eos` engine (exact output lengths) and print the report as JSON."""
    import json as _json

    from jaxdec.serving import trace as tr
    check_int(args, "slots", 1, 1024)
    check_int(args, "cache_size", 2)
    check_int(args, "requests", 1)
    check_int(args, "prefill_chunk_tokens", 1, args.cache_size, allow_none=True)
    check_float(args, "rate", lambda v: v > 0, "> 0 requests per second")
    if isinstance(args.seed, int) and not -2 ** 63 <= args.seed < 2 ** 63:
        raise BadInput(f"--seed must be a 64-bit signed integer, got {args.seed}")
    if args.trace is not None:
        try:
            trace = tr.load_trace(args.trace)
        except (OSError, ValueError) as e:
            raise BadInput(f"--trace: {e}") from None
    else:
        trace = tr.poisson_trace(args.requests, args.rate, _int_list(args, "prompt_lens"),
                                 _int_list(args, "output_lens"), seed=args.seed)
    longest = max(r["prompt_len"] + r["output_len"] for r in trace)
    if longest >= args.cache_size:
        raise BadInput(f"--cache-size ({args.cache_size}) too small: the trace's longest request needs {longest} "
                       f"positions (prompt_len + output_len)")
    spec = _serve_decoder(args, sampling=False)
    if spec is not None and longest + spec.cache_headroom > args.cache_size:
        raise BadInput(f"--cache-size ({args.cache_size}) too small for --drafter {args.drafter}: the trace's longest "
                       f"request needs {longest} positions (prompt_len + output_len) + {spec.cache_headroom} of "
                       f"draft headroom")
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise BadInput(f"--out: cannot write to {d}")
    check_model_path(args.model)
    loaded = load_model(args.model, args.weights)
    from jaxdec.serving.engine import Engine
    cap = max(r["output_len"] for r in trace)
    engine = Engine(loaded.model, loaded.params, slots=args.slots, cache_size=args.cache_size, capacity=cap,
                    ignore_eos=True, prefill_chunk_tokens=args.prefill_chunk_tokens,
                    speculative=spec)
    src = [3 + (j % 1000) for j in range(longest)]
    warm = tr.poisson_trace(min(args.slots, len(trace)), float("inf"), sorted({r["prompt_len"] for r in trace}),
                            [2], seed=0)
    tr.replay(engine, warm, prompt_source=src)  # compile outside the clock
    report = tr.replay(engine, trace, prompt_source=src)
    summary = {k: v for k, v in report.items() if k != "records"}
    print(_json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            _json.dump(report, f, indent=1)
    return 0


def quiet_native_logs() -> None:
    """Ask XLA (C++) and absl for no log lines. XLA reads TF_CPP_MIN_LOG_LEVEL when it starts, which
    is too late once jax is imported, so `native_stderr_silenced` also drops what reaches fd 2."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def native_stderr_silenced():
    """--quiet: file descriptor 2 goes to /dev/null while the command runs, so native log lines (XLA's
    "slow_operation_alarm ... Constant folding" notice) are dropped; Python's ``sys.stderr`` keeps
    the real stderr, so errors and tracebacks still show."""
    try:
        sys.stderr.flush()
        stderr_is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        stderr_is_fd2 = False
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to silence
        yield
        return
    old = sys.stderr
    if stderr_is_fd2:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                               errors="backslashreplace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if stderr_is_fd2:
                sys.stderr.close()
                sys.stderr = old


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet = "--quiet" in argv
    if quiet:
        quiet_native_logs()
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        if args.command == "generate":
            with native_stderr_silenced() if quiet else contextlib.nullcontext():
                return cmd_generate(args, ap)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "methods":
            return cmd_methods(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "serve-bench":
            return cmd_serve_bench(args)
    except _ArgError as e:
        prog = e.prog
        if prog == "jaxdec" and argv and argv[0] in ("generate", "demo", "serve", "serve-bench"):
            prog = f"jaxdec {argv[0]}"  # unknown flags are reported by the top parser
        print(f"jaxdec: error: {e} (see '{prog} --help')", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInput as e:
        print(f"jaxdec: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _Interrupted as e:
        print(f"jaxdec: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("jaxdec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1


if __name__ == "__main__":
    # run through the importable module so plugins registering into `jaxdec.cli.METHODS` are seen
    from jaxdec.cli import main as _main
    sys.exit(_main())
