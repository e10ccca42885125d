"""Constrained decoding cost (issue 18): per-step host mask time (mean, p50, p99), grammar compile time,
end-to-end tokens/s of greedy decoding with and without a JSON-schema constraint at batch 1 and 8
(section "speed"), model calls and tokens/s saved by drafting grammar-forced tokens (section "forced"),
and the schema pass rate per decoder (section "decoders").

speed: each cell is one batch size; inside it the unconstrained and the constrained run alternate
repetition by repetition (each compiled first, untimed), so their ratio is taken under the same load.
Prompts and schemas are the committed ones (tests/data/constrained/schemas.jsonl). The unconstrained run
decodes a fixed number of tokens (EOS ignored): as many as the constrained batch runs steps (its longest
row; the constrained rows end when their grammar is complete), so both runs make the same number of model
calls and prefill weighs the same in both. Reported: new tokens per second and time per model call. Mask
times are the host callback's own time per step for the whole batch (`Session.mask_seconds`); grammar
compile time is llguidance's, per schema, on a fresh engine.

forced: batch 1 (one row at a time, one compiled program) over the first ``forced_schemas`` schemas:
constrained greedy, constrained PLD speculative, and PLD behind `ForcedTokensDrafter` (forced tokens
first), interleaved; plain greedy (no constraint, ``new_tokens`` per row, EOS ignored) for reference.
Model calls, tokens/s, forced tokens offered, and whether the speculative rows equal constrained greedy.

decoders: ``pass_schemas`` schemas at ``pass_tokens`` new tokens with greedy, sampling (T = 0.7), beam
search 4, PLD, token recycling (a draft tree, per-node masks) and forced + PLD: rows ended by EOS, those
that parse and validate (jsonschema), rows cut by the token limit, and speculative rows equal to greedy.

    python experiments/constrained_bench.py                # all sections
    python experiments/constrained_bench.py --sections forced decoders --pass-schemas 6
    python experiments/constrained_bench.py --smoke        # batch 1, 8 tokens, to a temp dir
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

SCHEMAS = os.path.join(runner.ROOT, "tests", "data", "constrained", "schemas.jsonl")


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = field(default=64, metadata={"help": "max new tokens per row"})
    reps: int = field(default=3, metadata={"help": "interleaved repetitions per variant"})
    weights: str = field(default="q", metadata={"help": "f32 or q"})
    forced_schemas: int = field(default=4, metadata={"help": "forced: schemas decoded at batch 1"})
    pass_schemas: int = field(default=8, metadata={"help": "decoders: schemas per decoder"})
    pass_tokens: int = field(default=128, metadata={"help": "decoders: max new tokens per row"})
    batches: tuple[int, ...] = runner.select((1, 8))
    sections: tuple[str, ...] = runner.select(("speed", "forced", "decoders"))


SMOKE = Config(new_tokens=8, reps=1, batches=(1,), forced_schemas=1, pass_schemas=1, pass_tokens=8)
SECTIONS = ("speed", "forced", "decoders")
DEPENDS = {"b": ("new_tokens", "reps", "weights"), "forced": ("new_tokens", "reps", "weights", "forced_schemas"),
           "decoders": ("weights", "pass_schemas", "pass_tokens")}


def _pct(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs, float), q)) if xs else float("nan")


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _valid(text, schema) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        opts.parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    import jaxdec
    from jaxdec.constrained import json_schema
    from jaxdec.constrained.engines import LLGuidanceEngine
    from jaxdec.constrained.forced import ForcedTokensDrafter
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder
    from jaxdec.speculative.methods import prompt_lookup, token_recycling

    rows = [json.loads(x) for x in open(SCHEMAS) if x.strip()]
    m = jaxdec.load(weights=cfg.weights)
    tok = m.tokenizer
    forced_pld = SpeculativeDecoder(ForcedTokensDrafter(PromptLookupDrafter(8)))

    def forced(sel):
        ids = [tok.chat_ids(r["prompt"]) for r in sel]
        cons = [json_schema(r["schema"]) for r in sel]
        kw = dict(max_new_tokens=cfg.new_tokens, tokenizer=tok, batch_size=1)
        gen = lambda **k: jaxdec.generate(m.model, m.params, ids, **kw, **k)  # noqa: E731
        runs = {"greedy": lambda: gen(constraint=cons), "pld": lambda: gen(constraint=cons, decoder=prompt_lookup(8)),
                "forced_pld": lambda: gen(constraint=cons, decoder=forced_pld),
                "plain": lambda: gen(min_new_tokens=cfg.new_tokens)}
        first = {k: f() for k, f in runs.items()}  # compile, untimed
        tps = {k: [] for k in runs}
        for rep in range(cfg.reps):
            for k in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                g = runs[k]()
                tps[k].append(sum(len(x) for x in g.tokens) / (time.perf_counter() - t))
        ref = first["greedy"].tokens
        out = {k: {"tok_s": _median(v), "spread": [min(v), max(v)], "model_calls": first[k].stats["model_calls"],
                   "new_tokens": sum(len(x) for x in first[k].tokens)} for k, v in tps.items()}
        for k in ("pld", "forced_pld"):
            out[k]["equal_to_greedy"] = sum(a == b for a, b in zip(first[k].tokens, ref))
            out[k]["tau"] = first[k].stats["tau"]
        out["forced_pld"]["forced_tokens_offered"] = first["forced_pld"].extras["constraint_session"].forced_tokens
        return {"rows": len(sel), "runs": out,
                "calls_saved_vs_greedy": out["greedy"]["model_calls"] - out["forced_pld"]["model_calls"],
                "speedup_vs_constrained_greedy": out["forced_pld"]["tok_s"] / out["greedy"]["tok_s"],
                "speedup_vs_plain_greedy": out["forced_pld"]["tok_s"] / out["plain"]["tok_s"]}

    def decoders(sel):
        from jaxdec.search import beam_search
        ids = [tok.chat_ids(r["prompt"]) for r in sel]
        cons = [json_schema(r["schema"]) for r in sel]
        kw = dict(max_new_tokens=cfg.pass_tokens, tokenizer=tok, constraint=cons)
        gen = lambda **k: jaxdec.generate(m.model, m.params, ids, **kw, **k)  # noqa: E731
        runs = {"greedy": lambda: gen(), "sample_t0.7": lambda: gen(method="sample", sampling=dict(temperature=0.7)),
                "beam4": lambda: beam_search(m.model, m.params, ids, num_beams=4, **kw),
                "pld": lambda: gen(decoder=prompt_lookup(8)), "recycling_tree": lambda: gen(decoder=token_recycling()),
                "forced_pld": lambda: gen(decoder=forced_pld)}
        out, ref = {}, None
        for k, f in runs.items():
            t = time.perf_counter()
            g = f()
            s = time.perf_counter() - t
            eos = [i for i, fr in enumerate(g.finish_reason) if fr == "eos"]
            texts = [tok.decode(t, skip_special_tokens=True) for t in g.tokens]
            valid = sum(_valid(texts[i], sel[i]["schema"]) for i in eos)
            r = {"rows": len(sel), "ended_by_eos": len(eos), "valid": valid, "cut": len(sel) - len(eos),
                 "constraint_ok": sum(bool(x) for x in g.constraint_ok), "seconds": s}
            if k == "greedy":
                ref = g.tokens
            elif k in ("pld", "recycling_tree", "forced_pld"):
                r["equal_to_greedy"] = sum(a == b for a, b in zip(g.tokens, ref))
                r["tau"] = g.stats["tau"]
            out[k] = r
        return {"decoders": out}

    def measure(cell):
        if cell == "forced":
            return forced(rows[:cfg.forced_schemas])
        if cell == "decoders":
            return decoders(rows[:cfg.pass_schemas])
        b = int(cell[1:])
        sel = rows[:b]
        ids = [tok.chat_ids(r["prompt"]) for r in sel]
        cons = [json_schema(r["schema"]) for r in sel]
        eng = LLGuidanceEngine(tok, m.model.vocab_size, 2)
        t = time.perf_counter()
        for c in cons:
            eng.compile(c)
        compile_ms = (time.perf_counter() - t) * 1e3 / len(cons)

        def constrained():
            return jaxdec.generate(m.model, m.params, ids, max_new_tokens=cfg.new_tokens, tokenizer=tok,
                                   constraint=cons)

        steps = max(len(x) for x in constrained().tokens)  # compile, untimed; the batch runs this many steps

        def plain():  # the same number of steps (EOS ignored), so prefill weighs the same in both
            return jaxdec.generate(m.model, m.params, ids, max_new_tokens=steps, min_new_tokens=steps)

        runs = {"plain": plain, "constrained": constrained}
        plain()  # compile, untimed
        tps = {k: [] for k in runs}
        step_ms = {k: [] for k in runs}
        masks, ok = [], []
        for rep in range(cfg.reps):
            for k in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                g = runs[k]()
                s = time.perf_counter() - t
                tps[k].append(sum(len(x) for x in g.tokens) / s)
                step_ms[k].append(1e3 * s / g.stats["model_calls"])
                if k == "constrained":
                    masks += g.extras["constraint_session"].mask_seconds
                    ok = g.constraint_ok
        med = {k: sorted(v)[len(v) // 2] for k, v in tps.items()}
        ms = {k: sorted(v)[len(v) // 2] for k, v in step_ms.items()}
        return {"batch": b, "steps": steps, "plain_ms_per_step": ms["plain"], "constrained_ms_per_step": ms["constrained"],
                "step_ratio": ms["plain"] / ms["constrained"], "plain_tok_s": med["plain"], "constrained_tok_s": med["constrained"],
                "ratio": med["constrained"] / med["plain"], "spread": {k: [min(v), max(v)] for k, v in tps.items()},
                "mask_ms_mean": 1e3 * sum(masks) / max(len(masks), 1), "mask_ms_p50": 1e3 * _pct(masks, 50),
                "mask_ms_p99": 1e3 * _pct(masks, 99), "compile_ms_per_schema": compile_ms,
                "constraint_ok": sum(bool(x) for x in ok), "rows": len(ok)}

    def body(rec):
        lines = ["| batch | plain tok/s | constrained tok/s | ratio | plain / constrained ms per step (ratio) | "
                 "mask ms mean / p50 / p99 (whole batch) | compile ms / schema | constraint_ok |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in rec["cells_order"]:
            r = runner.result(rec, c)
            if not c.startswith("b") or r is None:
                continue
            lines.append(f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | {r['ratio']:.2f} | "
                         f"{r['plain_ms_per_step']:.1f} / {r['constrained_ms_per_step']:.1f} ({r['step_ratio']:.2f}) | "
                         f"{r['mask_ms_mean']:.3f} / {r['mask_ms_p50']:.3f} / {r['mask_ms_p99']:.3f} | "
                         f"{r['compile_ms_per_schema']:.1f} | {r['constraint_ok']}/{r['rows']} |")
        f = runner.result(rec, "forced")
        if f is not None:
            lines += ["", f"### Forced tokens (batch 1, {f['rows']} schemas, up to {rec['config']['new_tokens']} new "
                      "tokens; plain: no constraint, EOS ignored)", "",
                      "| run | tok/s (min-max) | model calls | new tokens | tau | equal to constrained greedy | "
                      "forced tokens offered |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for k, r in f["runs"].items():
                lines.append(f"| {k} | {r['tok_s']:.1f} ({r['spread'][0]:.1f}-{r['spread'][1]:.1f}) | "
                             f"{r['model_calls']} | {r['new_tokens']} | {r.get('tau', float('nan')):.2f} | "
                             f"{r.get('equal_to_greedy', '-')} | {r.get('forced_tokens_offered', '-')} |")
            lines += ["", f"Forced + PLD: {f['calls_saved_vs_greedy']} model calls saved against constrained greedy, "
                      f"{f['speedup_vs_constrained_greedy']:.2f}x its tokens/s, {f['speedup_vs_plain_greedy']:.2f}x "
                      "plain greedy's."]
        d = runner.result(rec, "decoders")
        if d is not None:
            lines += ["", f"### Schema pass rate per decoder ({rec['config']['pass_schemas']} schemas, "
                      f"{rec['config']['pass_tokens']} new tokens)", "",
                      "| decoder | ended by EOS | of those valid | cut by the limit | constraint_ok | equal to greedy "
                      "| tau | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for k, r in d["decoders"].items():
                lines.append(f"| {k} | {r['ended_by_eos']}/{r['rows']} | {r['valid']}/{r['ended_by_eos']} | "
                             f"{r['cut']} | {r['constraint_ok']} | {r.get('equal_to_greedy', '-')} | "
                             f"{r.get('tau', float('nan')):.2f} | {r['seconds']:.1f} |")
        return lines

    cells = ([f"b{b}" for b in cfg.batches] if "speed" in cfg.sections else []) + [
        s for s in ("forced", "decoders") if s in cfg.sections]
    runner.run_experiment("constrained", cfg, cells, measure, opts=opts,
                          title="Constrained decoding: mask time and tokens/s with and without a JSON schema",
                          markdown=body, plot=plot, depends=lambda c: DEPENDS[c if c in DEPENDS else "b"])


def plot(rec: dict, prefix: str):
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    speed = [runner.result(rec, c) for c in rec["cells_order"] if c.startswith("b") and runner.result(rec, c)]
    x = range(len(speed))
    a.bar([i - 0.2 for i in x], [r["plain_tok_s"] for r in speed], 0.4, label="plain greedy")
    a.bar([i + 0.2 for i in x], [r["constrained_tok_s"] for r in speed], 0.4, label="JSON-schema constrained")
    a.set_xticks(list(x), [f"batch {r['batch']}" for r in speed])
    a.set_ylabel("new tokens / s")
    a.set_title("Greedy with and without a constraint")
    a.legend(fontsize=8)
    f = runner.result(rec, "forced")
    if f is not None:
        names = list(f["runs"])
        b.bar(names, [f["runs"][k]["tok_s"] for k in names], color="tab:green")
        for i, k in enumerate(names):
            b.text(i, f["runs"][k]["tok_s"], f"{f['runs'][k]['model_calls']} calls", ha="center", va="bottom",
                   fontsize=7)
        b.set_ylabel("new tokens / s (batch 1)")
        b.set_title("Forced tokens as a drafter")
    runner.stamp(fig, rec)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
