"""Issue 21's speculative seed methods vs jaxdec greedy, in the same run: τ and speedup.

Cells (run all, or pick with --cells):

* ``iad``    input-guided aggressive decoding (`jaxdec.speculative.aggressive`) on the editing prompts of
             tests/data/editing_prompts.jsonl (chat turns asking to correct or reformat a given text);
* ``rapid``  RAPID (`jaxdec.speculative.rapid`): the same model drafting over BM25-retrieved chunks,
             the target verifying with the full long prompt, on the held-out long prompts of
             tests/data/rapid_long_prompts.jsonl (standard-library sources, 2k-6k tokens).

Every method decodes a fixed N new tokens per prompt at batch 1 (EOS ignored: ``stop_ids=()``), greedily,
with the same weights as the greedy baseline (float32). Timed from token ids in to ids on the host, prefill
included, after one untimed warm-up call per system (its time is reported as the first call), median of
--reps interleaved repetitions (order reversed every other repetition) with min/max; speedup = median of
per-repetition ratios. Every output is compared with greedy's tokens (mismatching prompts are counted; the
tests check exactness under the near-tie rule). Writes experiments/results/seed_methods_table.{json,md}.

    python experiments/seed_methods_table.py                 # 10 editing + 4 long prompts, 64 new, 5 reps
    python experiments/seed_methods_table.py --cells rapid --long-prompts 10
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
    long_prompts: int = field(default=4, metadata={"help": "held-out long prompts (rapid cell)"})
    iad_tokens: int = field(default=16, metadata={"help": "iad: draft length"})
    rapid_tokens: int = field(default=6, metadata={"help": "rapid: draft length"})
    rapid_chunks: int = field(default=4, metadata={"help": "rapid: retrieved chunks"})
    cells: tuple[str, ...] = runner.select(("iad", "rapid"), help="cells to run")


SMOKE = Config(new_tokens=8, reps=1, edit_prompts=1, long_prompts=1, cells=("iad",))


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
        import test_rapid
        full, drafts = test_rapid.long_prompt_ids("heldout", k=cfg.rapid_chunks)
        prompts, drafts = full[:cfg.long_prompts], drafts[:cfg.long_prompts]
        method = None
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


def markdown(rec):
    lines = ["| cell | prompts | τ | greedy tok/s | method tok/s | speedup (median [min, max]) | mismatching |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for cell in rec["cells_order"]:
        r = runner.result(rec, cell)
        sp = r["speedup"]
        row = [cell, r["prompts"], f"{r['tau']:.3f}", *(f"{r['timing'][k]['tok_s']:.1f}" for k in ("greedy", cell)),
               f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]", r["mismatching_prompts"]]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment("seed_methods_table", cfg, list(cfg.cells), lambda c: measure_cell(cfg, c), opts=opts,
                          title="Seed methods (issue 21): τ and speedup over jaxdec greedy (batch 1, f32)",
                          markdown=markdown)


if __name__ == "__main__":
    main()
