"""experiments/runner.py: the experiment convention (config dataclass -> results/NAME.{json,md}, resumable).

No model here: the cells are plain functions that count their calls. One smoke run of a converted script
(bench_attention.py at tiny sizes) runs in a subprocess."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import benchlib  # noqa: E402
import runner  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int = 3
    scale: float = 1.0
    names: tuple[str, ...] = ("a", "b")
    verbose: bool = False
    only: tuple[str, ...] = runner.select(())


class Counter:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cell):
        self.calls.append(cell)
        if cell == self.fail_at:
            raise RuntimeError(f"crash in cell {cell}")
        return {"value": len(cell) * 1.5, "cell": cell}


def run(tmp_path, fn, cfg=Cfg(), cells=("x", "yy", "zzz"), **kw):
    return runner.run_experiment("exp", cfg, list(cells), fn, results_dir=str(tmp_path), quiet=True, **kw)


def test_writes_json_and_md_with_commit_machine_load_and_config(tmp_path):
    rec = run(tmp_path, Counter())
    data = json.loads((tmp_path / "exp.json").read_text())
    assert data == json.loads(json.dumps(rec))
    assert not (tmp_path / "exp.partial.json").exists()
    assert data["complete"] and data["config"] == {"n": 3, "scale": 1.0, "names": ["a", "b"], "verbose": False,
                                                   "only": []}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert data["git"]["commit"] == head and isinstance(data["git"]["dirty"], bool)
    m = data["machine"]
    assert m["cores"] == os.cpu_count() and m["cpu"] and m["ram_gib"] > 0 and "jax" in m["versions"]
    assert "jaxlib" in m["versions"] and m["platform"]
    for load in [data["load"]] + [c["load"] for c in data["cells"].values()]:
        assert len(load["loadavg_before"]) == 3 and len(load["loadavg_after"]) == 3
        assert isinstance(load["overloaded"], bool)
    assert data["started"] <= data["finished"]
    assert data["cells"]["yy"]["result"] == {"value": 3.0, "cell": "yy"}
    md = (tmp_path / "exp.md").read_text()
    assert head in md and m["cpu"] in md and "load average (1/5/15 min) before" in md
    assert "| yy | 3 | yy |" in md


def test_loaded_machine_is_flagged_in_json_and_md(tmp_path, monkeypatch):
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (99.0, 50.0, 20.0))
    run(tmp_path, Counter())
    data = json.loads((tmp_path / "exp.json").read_text())
    assert data["loaded"] and data["load"]["overloaded"]
    assert all(c["load"]["overloaded"] for c in data["cells"].values())
    md = (tmp_path / "exp.md").read_text()
    assert "WARNING: LOADED MACHINE" in md and md.count("LOADED") >= 4  # header, load line, one per cell


def test_resume_skips_finished_cells(tmp_path):
    crash = Counter(fail_at="zzz")
    with pytest.raises(RuntimeError, match="crash in cell zzz"):
        run(tmp_path, crash)
    assert crash.calls == ["x", "yy", "zzz"]
    assert not (tmp_path / "exp.json").exists()
    part = json.loads((tmp_path / "exp.partial.json").read_text())
    assert sorted(part["cells"]) == ["x", "yy"] and not part["complete"]
    again = Counter()
    rec = run(tmp_path, again)
    assert again.calls == ["zzz"]  # x and yy were not recomputed
    assert rec["complete"] and sorted(rec["cells"]) == ["x", "yy", "zzz"] and len(rec["runs"]) == 2
    assert rec["runs"][0]["cells_computed"] == ["x", "yy"] and rec["runs"][1]["cells_computed"] == ["zzz"]
    assert not (tmp_path / "exp.partial.json").exists()
    third = Counter()  # a finished file is resumed too: nothing left to do
    run(tmp_path, third)
    assert third.calls == [] and "measured nothing" in (tmp_path / "exp.md").read_text()
    fresh = Counter()
    run(tmp_path, fresh, fresh=True)
    assert fresh.calls == ["x", "yy", "zzz"]


def test_new_cells_accumulate_and_select_fields_do_not_invalidate(tmp_path):
    run(tmp_path, Counter(), cells=["x"], cfg=Cfg(only=("x",)))
    c = Counter()
    rec = run(tmp_path, c, cells=["yy"], cfg=Cfg(only=("yy",)))
    assert c.calls == ["yy"] and sorted(rec["cells"]) == ["x", "yy"]
    assert rec["config"]["only"] == ["yy"]


def test_config_change_is_refused_with_the_changed_field(tmp_path):
    with pytest.raises(RuntimeError):
        run(tmp_path, Counter(fail_at="yy"))
    c = Counter()
    with pytest.raises(runner.ConfigChanged, match=r"cell 'x' \(n: 3 -> 4\).*--fresh"):
        run(tmp_path, c, cfg=Cfg(n=4))
    assert c.calls == []
    with pytest.raises(runner.ConfigChanged, match=r"names: \['a', 'b'\] -> \['a'\]"):
        run(tmp_path, c, cfg=Cfg(names=("a",)))
    rec = run(tmp_path, c, cfg=Cfg(n=4), fresh=True)
    assert c.calls == ["x", "yy", "zzz"] and rec["config"]["n"] == 4 and len(rec["runs"]) == 1


def test_depends_narrows_what_invalidates_a_cell(tmp_path):
    deps = lambda cell: ["n"] if cell == "x" else ["n", "scale"]  # noqa: E731
    run(tmp_path, Counter(), depends=deps)
    with pytest.raises(runner.ConfigChanged, match=r"cell 'yy' \(scale") as e:
        run(tmp_path, Counter(), cfg=Cfg(scale=2.0), depends=deps)
    assert "'x'" not in str(e.value)
    c = Counter()
    rec = run(tmp_path, c, cfg=Cfg(verbose=True), depends=deps)  # a field no cell depends on
    assert c.calls == [] and rec["cells"]["x"]["config"] == {"n": 3}


def test_results_of_an_older_script_are_replaced_only_by_a_complete_run(tmp_path):
    (tmp_path / "exp.json").write_text(json.dumps({"command": "old script", "results": []}))
    c = Counter(fail_at="yy")
    with pytest.raises(RuntimeError):
        run(tmp_path, c)
    assert c.calls == ["x", "yy"] and json.loads((tmp_path / "exp.json").read_text())["command"] == "old script"
    c = Counter()
    run(tmp_path, c)  # resumes from the partial file, not from the old script's results
    assert c.calls == ["yy", "zzz"]
    assert json.loads((tmp_path / "exp.json").read_text())["format"] == runner.FORMAT


def test_crash_while_writing_leaves_the_previous_partial_intact(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        run(tmp_path, Counter(fail_at="yy"))
    before = (tmp_path / "exp.partial.json").read_text()

    def disk_full(fd):  # the write of the next finished cell fails before it reaches the disk
        raise OSError("disk full")

    monkeypatch.setattr(runner.os, "fsync", disk_full)
    c = Counter()
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, c)
    assert c.calls == ["yy"] and (tmp_path / "exp.partial.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.partial.json"]  # no temporary file left behind
    monkeypatch.undo()
    c = Counter()
    run(tmp_path, c)
    assert c.calls == ["yy", "zzz"]


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    runner.atomic_write(str(p), "old")

    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(runner.os, "fsync", boom)
    with pytest.raises(OSError):
        runner.atomic_write(str(p), "new")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_cli_from_the_dataclass(tmp_path):
    cfg, opts = runner.parse_args(Cfg, ["--n", "5", "--names", "p", "q", "--verbose", "--out-dir", str(tmp_path)])
    assert cfg == Cfg(n=5, names=("p", "q"), verbose=True) and opts.out_dir == str(tmp_path) and not opts.fresh
    cfg, opts = runner.parse_args(Cfg, ["--smoke", "--scale", "0.5"], smoke=Cfg(n=1))
    assert cfg == Cfg(n=1, scale=0.5) and opts.fresh and opts.smoke
    assert opts.out_dir and os.path.abspath(opts.out_dir) != os.path.abspath(runner.RESULTS)
    with pytest.raises(SystemExit):
        runner.parse_args(Cfg, ["--n", "x"])


@dataclasses.dataclass(frozen=True)
class NoCfg:
    no_peer: bool = False
    verbose: bool = True


def test_a_bool_field_named_no_x_is_switched_on_by_its_flag():
    """argparse's BooleanOptionalAction reads every "--no-..." spelling as False, so a field named no_peer
    got False from its own flag --no-peer (spec_bench's --no-hf ran the HF rows); ordinary bools keep --x /
    --no-x."""
    assert runner.parse_args(NoCfg, ["--no-peer"])[0].no_peer is True
    assert runner.parse_args(NoCfg, [])[0].no_peer is False
    assert runner.parse_args(NoCfg, ["--no-verbose"])[0].verbose is False


def test_custom_markdown_body_and_plot_hook(tmp_path):
    seen = []
    run(tmp_path, Counter(), markdown=lambda rec: ["custom body", f"{runner.result(rec, 'x')['value']}"],
        plot=lambda rec, prefix: seen.append(prefix), title="My title")
    md = (tmp_path / "exp.md").read_text()
    assert md.startswith("# My title") and "custom body\n1.5" in md and "## Cells" in md
    assert seen == [str(tmp_path / "exp")]


def test_smoke_run_of_a_converted_script(tmp_path):
    """bench_attention.py --smoke in a fresh interpreter: resumable JSON + md in --out-dir, marked SMOKE."""
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_attention.py"), "--smoke",
           "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "bench_attention.json").read_text())
    assert data["complete"] and data["smoke"] and set(data["cells"]) == {"hydragen", "quantized"}
    assert data["cells"]["hydragen"]["result"]["max_abs_diff"] < 1e-4
    md = (tmp_path / "bench_attention.md").read_text()
    assert "SMOKE RUN" in md and data["git"]["commit"] in md
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # resumed: nothing to measure
    assert r.returncode == 0 and "2/2 cells already measured" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_identity_facts_outside_the_config_invalidate_like_fields(tmp_path):
    run(tmp_path, Counter(), identity={"base": "abc"})
    with pytest.raises(runner.ConfigChanged, match=r"base: 'abc' -> 'def'"):
        run(tmp_path, Counter(), identity={"base": "def"})
    c = Counter()
    run(tmp_path, c, identity={"base": "abc"})
    assert c.calls == []


def test_presets_and_pass_record(tmp_path):
    cfg, opts = runner.parse_args(Cfg, ["--quick", "--n", "9"], presets={"quick": Cfg(n=2, scale=0.1)})
    assert cfg == Cfg(n=9, scale=0.1) and opts.preset == "quick" and opts.out_dir is None
    with pytest.raises(SystemExit):
        runner.parse_args(Cfg, ["--quick", "--smoke"], smoke=Cfg(n=1), presets={"quick": Cfg(n=2)})
    seen = []

    def fn(cell, rec):
        seen.append(sorted(rec["cells"]))
        return {"v": 1}

    run(tmp_path, fn, pass_record=True)
    assert seen == [[], ["x"], ["x", "yy"]]


def test_a_failing_plot_keeps_the_results(tmp_path, capsys):
    def bad_plot(rec, prefix):
        raise ValueError("all values are <= 0")

    run(tmp_path, Counter(), plot=bad_plot)
    assert json.loads((tmp_path / "exp.json").read_text())["complete"] and (tmp_path / "exp.md").exists()
    assert "plot failed: ValueError" in capsys.readouterr().out


def test_plots_carry_the_commit(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    texts = []

    def plot(rec, prefix):
        fig, ax = plt.subplots()
        ax.plot([1, 2])
        runner.stamp(fig, rec)
        texts.extend(t.get_text() for t in fig.texts)
        fig.savefig(prefix + ".png")
        plt.close(fig)

    rec = run(tmp_path, Counter(), plot=plot)
    assert (tmp_path / "exp.png").stat().st_size > 0
    assert len(texts) == 1 and rec["git"]["commit"][:10] in texts[0] and rec["machine"]["cpu"] in texts[0]


def test_redo_remeasures_chosen_cells_and_keeps_the_others(tmp_path):
    run(tmp_path, Counter())
    first = json.loads((tmp_path / "exp.json").read_text())["cells"]
    calls = []

    def again(cell):
        calls.append(cell)
        return {"value": -1.0}

    rec = run(tmp_path, again, redo=["yy"])
    assert calls == ["yy"] and rec["cells"]["x"] == first["x"] and rec["cells"]["yy"]["result"] == {"value": -1.0}
    c = Counter()  # a stale cell that is being redone does not block the run
    with pytest.raises(runner.ConfigChanged):
        run(tmp_path, c, cfg=Cfg(n=5), depends=lambda cell: ["n"] if cell == "yy" else [])
    rec = run(tmp_path, c, cfg=Cfg(n=5), depends=lambda cell: ["n"] if cell == "yy" else [], redo=["yy"])
    assert c.calls == ["yy"] and rec["cells"]["yy"]["config"] == {"n": 5}
    with pytest.raises(ValueError, match="does not have"):
        run(tmp_path, c, redo=["nope"])
    _, opts = runner.parse_args(Cfg, ["--redo", "x", "zzz"])
    assert opts.redo == ["x", "zzz"]


NOT_EXPERIMENTS = {"benchlib.py": "helper", "runner.py": "the helper itself", "mutation_plugin.py": "pytest plugin"}


def _scripts():
    d = os.path.join(ROOT, "experiments")
    return sorted(f for f in os.listdir(d) if f.endswith(".py") and f not in NOT_EXPERIMENTS)


def test_every_experiment_script_follows_the_convention():
    """Each script in experiments/ runs through runner.run_experiment with flags from its config dataclass."""
    assert len(_scripts()) >= 9
    for f in _scripts():
        src = open(os.path.join(ROOT, "experiments", f)).read()
        assert "import runner" in src and "runner.run_experiment(" in src and "runner.parse_args(" in src, f
        assert "@dataclasses.dataclass" in src and "--smoke" in src, f


@pytest.mark.parametrize("script", ["bench_attention", "bench_greedy", "bench_versions", "dfloat11_report",
                                    "kv_compression", "mutation_checks", "search_table", "spec_bench",
                                    "decode_step_cost", "bench_long_context", "bench_throughput",
                                    "serve_bench", "diffusion_table", "seed_methods_table", "first_table",
                                    "heads_table", "verify_cost", "compile_times", "profile_step"])
def test_cli_help_of_each_converted_script(script, capsys):
    import importlib
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--out-dir" in out and "--fresh" in out and "--smoke" in out and "--redo" in out
