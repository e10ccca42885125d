"""The one convention every script in experiments/ follows: an experiment is a function over a config
dataclass, measured cell by cell; results/NAME.{json,md} (and plots) carry the config, the git commit, the
machine, the load average and the time; a rerun resumes where the last one stopped.

    import runner

    @dataclass(frozen=True)
    class Config:
        new_tokens: int = field(default=64, metadata={"help": "new tokens per row"})   # --new-tokens 64
        batches: tuple[int, ...] = (1, 8)                                              # --batches 1 8
        methods: tuple[str, ...] = runner.select(())  # only chooses which cells run: not part of their identity

    SMOKE = Config(new_tokens=4, batches=(1,))         # --smoke: tiny run, written to a temp dir, marked SMOKE
    QUICK = Config(new_tokens=16)                      # presets={"quick": QUICK} adds --quick

    def main(argv=None):
        cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
        def measure(cell):                              # one cell -> a JSON-able dict; + --out-dir, --fresh
            b = int(cell[1:])
            return {"tok_s": ...}
        def body(rec):                                  # the md's tables; header facts are added by the runner
            return [f"| {k} | {runner.result(rec, k)['tok_s']:.1f} |" for k in rec["cells_order"]]
        def plot(rec, prefix):                          # optional; runner.stamp(fig, rec) adds commit/machine
            ...
        runner.run_experiment("bench_x", cfg, [f"b{b}" for b in cfg.batches], measure, opts=opts,
                              title="...", markdown=body, plot=plot)

What `run_experiment` does:
* before each cell, it looks in NAME.partial.json (or a finished NAME.json) for that cell measured with the
  same config and, if present, reuses it instead of calling `fn` again (so an interrupted run resumes, and a
  script whose cells run in separate invocations, e.g. `--sections a` then `--sections b`, accumulates);
* after each cell it rewrites NAME.partial.json atomically (temporary file + os.replace): a crash inside a
  cell, or while writing, leaves the previous partial file intact;
* a stored cell measured under another config is refused with a message naming the changed fields (unless
  `--fresh`, which discards every stored cell); `depends(cell)` may narrow the fields one cell depends on;
  `--redo CELL ...` re-measures chosen cells and keeps the rest; a NAME.json written before this runner
  existed is not resumed, and is replaced only when the run completes;
* at the end it writes NAME.json and NAME.md atomically (header: command, commit with a dirty flag, machine,
  versions, start/end time, load average before/after with benchlib's LOADED-machine warning, per-cell
  facts) and the plots (`plot(record, prefix)`, skipped without matplotlib), then removes the partial file.
  Each cell also keeps its own commit, time and load average, since cells of one file may come from
  several runs.
* `fn` may return a dict; a cell whose timing is interleaved across systems is one cell (a batch size, a
  prompt group), never one system, so the per-repetition ratios keep their meaning.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import typing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # scripts run as `python experiments/x.py` import jaxdec from this checkout
    sys.path.insert(1, ROOT)
RESULTS = os.path.join(ROOT, "experiments", "results")
FORMAT = "jaxdec-experiment/1"


class ConfigChanged(SystemExit):
    """Stored cells were measured under another config (or by a script before the runner): refuse."""


def select(default, help: str = ""):  # noqa: A002 - mirrors argparse
    """A config field that only chooses which cells run (sections, methods): excluded from the identity
    that decides whether a stored cell may be reused."""
    return dataclasses.field(default=default, metadata={"select": True, "help": help})


# ------------------------------------------------------------------------------------------------ facts
def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_info(root: str = ROOT) -> dict:
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return {"commit": c, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _version(dist: str):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, cores, RAM, platform and the versions that decide speed (no heavy import)."""
    m = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
         "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    m["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        m["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        m["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    m["versions"] = {d: v for d in ("jax", "jaxlib", "numpy", "flax", "torch", "transformers")
                     if (v := _version(d)) is not None}
    if "jax" in sys.modules:  # the backend only when the script already imported jax
        try:
            m["jax_backend"] = sys.modules["jax"].default_backend()
        except Exception:  # noqa: BLE001 - no backend: leave it out
            pass
    return m


# ------------------------------------------------------------------------------------------------ files
def atomic_write(path: str, text: str) -> None:
    """Write `text` to `path` so that readers (and a crash) see either the old file or the new one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json(obj) -> str:
    return json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _plain(x):
    """JSON round trip: tuples become lists, numpy scalars numbers; what a stored config compares to."""
    return json.loads(_json(x))


def config_dict(config) -> dict:
    return _plain(dataclasses.asdict(config))


def identity_fields(config) -> list:
    return [f.name for f in dataclasses.fields(config) if not f.metadata.get("select")]


# ------------------------------------------------------------------------------------------------ run
def _stored(paths) -> tuple:
    """(record, path) of the first readable file among `paths`, else (None, None)."""
    for p in paths:
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f), p
    return None, None


def run_experiment(name: str, config, cells, fn, *, results_dir: str = RESULTS, fresh: bool = False,
                   opts=None, title: str | None = None, markdown=None, plot=None, depends=None, info=None,
                   command: str | None = None, identity: dict | None = None, pass_record: bool = False,
                   redo=(), quiet: bool = False) -> dict:
    """Run `fn(cell)` for every cell not already stored with the same config; write NAME.{json,md}.

    cells: cell keys (strings, in table order). fn(cell) -> JSON-able dict. markdown(record) -> lines for the
    body of NAME.md (default: a table of the cells' scalar results). plot(record, prefix): writes prefix*.png.
    depends(cell) -> config field names that cell's numbers depend on (default: every non-`select` field).
    info: a dict (or a function returning one, called at the end) stored as record["info"].
    opts: the namespace of `parse_args` (its out_dir, fresh and smoke win over the keyword arguments).
    identity: facts outside the config that the cells' numbers depend on (e.g. resolved commits); they are
    stored with the config and compared like its fields.
    pass_record: call fn(cell, record) so a cell can read cells stored before it (runner.result(record, key)).
    redo: cells to measure again even if stored (the others are kept); `--redo CELL ...` on the command line.
    """
    smoke = False
    if opts is not None:
        results_dir = opts.out_dir or results_dir
        fresh = fresh or opts.fresh
        smoke = bool(getattr(opts, "smoke", False))
        redo = tuple(redo) + tuple(getattr(opts, "redo", None) or ())
    cells = [str(c) for c in cells]
    unknown = [c for c in redo if c not in cells]
    if unknown:
        raise ValueError(f"{name}: --redo names cells this run does not have: {unknown}; cells: {cells}")
    if len(set(cells)) != len(cells):
        raise ValueError(f"{name}: duplicate cell keys {cells}")
    final = os.path.join(results_dir, name + ".json")
    partial = os.path.join(results_dir, name + ".partial.json")
    cfg = {**config_dict(config), **_plain(identity or {})}
    ident = identity_fields(config) + list(identity or {})
    deps = (lambda c: ident) if depends is None else depends
    command = command or " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
                                   if sys.argv and sys.argv[0] else "?"] + sys.argv[1:])

    old, old_path = (None, None) if fresh else _stored([partial, final])
    if old is not None and old.get("format") != FORMAT:
        # results of a script before the runner: nothing to resume; replaced only when this run completes
        if not quiet:
            print(f"[{name}] {old_path} predates experiments/runner.py: not resumed; it is replaced when this run "
                  "completes", flush=True)
        old, old_path = None, None
    stored = {}
    if old is not None:
        changed = []
        for key, c in old.get("cells", {}).items():
            if key in redo:
                continue
            want = {f: cfg.get(f) for f in deps(key)}
            have = {f: c.get("config", {}).get(f) for f in want}
            if have != want:
                diff = ", ".join(f"{f}: {have[f]!r} -> {want[f]!r}" for f in want if have[f] != want[f])
                changed.append(f"cell {key!r} ({diff})")
        if changed:
            raise ConfigChanged(
                f"{old_path} holds cells measured under another config: " + "; ".join(changed) +
                ". Pass --fresh to discard the stored cells, or --out-dir DIR to keep them.")
        stored = {k: c for k, c in old["cells"].items() if k not in redo}
    run = {"command": command, "git": git_info(), "started": now(), "cells_computed": []}
    runs = (old or {}).get("runs", []) + [run]
    load = benchlib.LoadMonitor()
    record = {"format": FORMAT, "experiment": name, "title": title or name, "smoke": smoke, "config": cfg,
              "identity_fields": ident, "command": command, "git": run["git"], "machine": machine_info(),
              "started": (old or {}).get("started", run["started"]), "cells": stored, "runs": runs,
              "complete": False}
    if old is not None and not quiet:
        done = [c for c in cells if c in stored]
        print(f"[{name}] resuming from {old_path}: {len(done)}/{len(cells)} cells already measured "
              f"({', '.join(done) or 'none'}); --fresh to re-measure", flush=True)

    for cell in cells:
        if cell in stored:
            continue
        cell_load = benchlib.LoadMonitor()
        t0, started = time.time(), now()
        if not quiet:
            print(f"[{name}] cell {cell} ...", flush=True)
        result = fn(cell, record) if pass_record else fn(cell)
        stored[cell] = {"result": _plain(result), "config": {f: cfg.get(f) for f in deps(cell)},
                        "git": run["git"], "command": command, "started": started,
                        "seconds": round(time.time() - t0, 2), "load": cell_load.record()}
        run["cells_computed"].append(cell)
        record["load"] = load.record()
        load.after = None  # measured again at the next cell and at the end
        atomic_write(partial, _json(record))

    run["finished"] = now()
    run["load"] = load.record()
    record.update(load=run["load"], finished=run["finished"], complete=all(c in stored for c in cells),
                  loaded=bool((run["cells_computed"] and run["load"]["overloaded"])
                              or any(c.get("load", {}).get("overloaded") for c in stored.values())))
    record["cells_order"] = cells + [c for c in stored if c not in cells]
    if info is not None:
        record["info"] = _plain(info() if callable(info) else info)
    atomic_write(final, _json(record))
    atomic_write(os.path.join(results_dir, name + ".md"), render_markdown(record, markdown))
    if os.path.exists(partial):
        os.unlink(partial)
    if plot is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
        except ImportError:
            print(f"[{name}] matplotlib not installed: no plot", flush=True)
        else:
            try:
                plot(record, os.path.join(results_dir, name))
            except Exception as e:  # noqa: BLE001 - the JSON and the table are the result; a plot is a convenience
                print(f"[{name}] plot failed: {type(e).__name__}: {e}", flush=True)
    if not quiet:
        print(f"[{name}] wrote {final} and {name}.md", flush=True)
    return record


def cell_commits(record: dict) -> list:
    """The commits (10 hex digits, +dirty) the stored cells were measured at."""
    return sorted({c["git"]["commit"][:10] + ("+dirty" if c["git"].get("dirty") else "")
                   for c in record["cells"].values()})


def stamp(fig, record: dict) -> None:
    """A footer on a matplotlib figure: experiment, commit, machine, load flag and time, so a plot copied out
    of results/ still says where its numbers came from."""
    m = record["machine"]
    text = (f"{record['experiment']}{' (SMOKE)' if record.get('smoke') else ''} | measured at "
            f"{', '.join(cell_commits(record)) or '?'} | {m.get('cpu')}, {m.get('cores')} cores | "
            f"{record.get('finished', record['started'])}{' | LOADED MACHINE' if record.get('loaded') else ''}")
    fig.text(0.005, 0.005, text, fontsize=5, color="grey", ha="left", va="bottom")


# ------------------------------------------------------------------------------------------------ markdown
def result(record: dict, cell: str):
    """The stored result of one cell (None if absent)."""
    c = record["cells"].get(cell)
    return None if c is None else c["result"]


def _load_line(rec: dict) -> str:
    return benchlib.LoadMonitor.markdown_of(rec).strip()


def header_lines(record: dict) -> list:
    m, g = record["machine"], record["git"]
    commits = cell_commits(record)
    lines = [f"# {record['title']}", ""]
    if record.get("smoke"):
        lines += ["**SMOKE RUN: a reduced config that only checks the script runs; not a result.**", ""]
    if record.get("loaded"):
        lines += ["**WARNING: LOADED MACHINE during this experiment (see the load lines below); its timings are "
                  "not trustworthy.**", ""]
    this = g["commit"][:10] + ("+dirty" if g.get("dirty") else "")
    measured = record["runs"][-1].get("cells_computed") if record.get("runs") else None
    lines += [f"Command: `{record['command']}`  ",
              f"Commit: `{g['commit']}`{' (uncommitted changes)' if g.get('dirty') else ''}"
              + (f"; cells measured at {', '.join(commits)}" if commits and commits != [this] else "") + "  ",
              f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib', '?')} GiB RAM, {m.get('platform')}"
              + (f", jax backend {m['jax_backend']}" if m.get("jax_backend") else "") + "  ",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + "  ",
              f"Time: {record['started']} to {record.get('finished', '?')} (UTC), {len(record['runs'])} run(s)  ",
              "Config: " + ", ".join(f"{k}={v}" for k, v in record["config"].items()), "",
              _load_line(record.get("load")) if measured or not record["cells"] else
              "(this run resumed every cell and measured nothing; the load average of each cell is listed under "
              "Cells)", ""]
    return lines


def cells_table(record: dict) -> list:
    """Per-cell facts: when, how long, which commit, the load average around it."""
    lines = ["| cell | started (UTC) | seconds | commit | load 1-min before / after | flag |",
             "| --- | --- | ---: | --- | --- | --- |"]
    for key in record.get("cells_order", record["cells"]):
        c = record["cells"].get(key)
        if c is None:
            lines.append(f"| {key} | (not measured) | | | | |")
            continue
        ld = c.get("load") or {}
        lines.append(f"| {key} | {c['started']} | {c['seconds']:.1f} | {c['git']['commit'][:10]}"
                     f"{'+dirty' if c['git'].get('dirty') else ''} | {ld.get('loadavg_before', ['?'])[0]} / "
                     f"{ld.get('loadavg_after', ['?'])[0]} | {'LOADED' if ld.get('overloaded') else ''} |")
    return lines


def results_table(record: dict) -> list:
    """Default body: one row per cell, one column per scalar result."""
    cols = []
    for c in record["cells"].values():
        for k, v in c["result"].items():
            if isinstance(v, (int, float, str, bool)) and k not in cols:
                cols.append(k)
    lines = ["| cell | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for key in record.get("cells_order", record["cells"]):
        r = result(record, key)
        if r is None:
            continue
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| {key} | " + " | ".join(fmt(r[k]) if k in r else "" for k in cols) + " |")
    return lines


def render_markdown(record: dict, body=None) -> str:
    lines = header_lines(record)
    lines += list(body(record)) if body is not None else results_table(record)
    lines += ["", "## Cells", "", *cells_table(record)]
    if not record.get("complete"):
        lines += ["", "**INCOMPLETE: some cells were not measured.**"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_arguments(ap: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the dataclass `cls`: --field-name (bool: --x / --no-x, but a field no_x gets --no-x
    alone; tuple/list: nargs='+')."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": None, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool and f.name.startswith("no_"):
            # argparse's BooleanOptionalAction reads any "--no-..." spelling as False, so a field named no_x
            # would be switched off by its own flag --no-x: such fields get a plain switch
            ap.add_argument(flag, action="store_const", const=True, **kw)
        elif tp is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (tuple, list):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            ap.add_argument(flag, nargs="*", type=_unwrap_optional(args[0]) if args else str, **kw)
        else:
            ap.add_argument(flag, type=tp, **kw)


def parse_args(cls, argv=None, *, description: str | None = None, smoke=None, presets=None, extra=None):
    """(config, opts): the config dataclass from flags over its defaults (or over `smoke` with --smoke, or over
    presets[NAME] with --NAME, e.g. presets={"quick": Config(...)}); opts.out_dir, opts.fresh, opts.smoke and
    whatever `extra(ap)` added. --smoke without --out-dir writes (afresh) to a temporary directory, so a smoke
    run never replaces results/."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, cls)
    ap.add_argument("--out-dir", default=None, help=f"results directory (default {os.path.relpath(RESULTS, ROOT)})")
    ap.add_argument("--fresh", action="store_true", help="discard stored cells (a partial run or another config)")
    ap.add_argument("--redo", nargs="+", default=None, metavar="CELL",
                    help="measure these cells again even if stored (the other stored cells are kept)")
    if smoke is not None:
        ap.add_argument("--smoke", action="store_true",
                        help="tiny config that only checks the script runs; writes to a temp dir unless --out-dir")
    presets = dict(presets or {})
    for name, preset in presets.items():
        ap.add_argument("--" + name, dest="preset_" + name, action="store_true",
                        help="preset: " + ", ".join(f"{f.name}={getattr(preset, f.name)}"
                                                    for f in dataclasses.fields(cls)
                                                    if getattr(preset, f.name) != getattr(cls(), f.name)))
    if extra is not None:
        extra(ap)
    opts = ap.parse_args(argv)
    chosen = [n for n in presets if getattr(opts, "preset_" + n)]
    if smoke is not None and opts.smoke:
        chosen.append("smoke")
    if len(chosen) > 1:
        ap.error(f"choose one preset of {', '.join('--' + n for n in chosen)}")
    base = smoke if chosen == ["smoke"] else presets[chosen[0]] if chosen else cls()
    opts.preset = chosen[0] if chosen else None
    given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(cls) if getattr(opts, f.name) is not None}
    hints = typing.get_type_hints(cls)
    for k, v in given.items():
        if typing.get_origin(_unwrap_optional(hints[k])) is tuple:
            given[k] = tuple(v)
    config = dataclasses.replace(base, **given)
    opts.smoke = bool(getattr(opts, "smoke", False))
    if opts.smoke and not opts.out_dir:  # a smoke run checks that the script runs: always measured afresh
        opts.out_dir, opts.fresh = os.path.join(tempfile.gettempdir(), "jaxdec-smoke"), True
    opts.parser = ap
    return config, opts
