"""Constrained decoding (issue #18): JSON-schema / regex / Lark / choice masks inside the compiled loop.

CI tier: a subset of the committed constraints (tests/data/constrained/) on the real default model with
greedy, sampling (T = 0.7), beam search 4 and PLD speculative decoding; the two engines on shared
regexes; bad input; a negative control (mask off: invalid outputs appear, so the checks can fail).
The full sets run in the slow tier (`make acceptance`, tests/test_constrained_full.py).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import sys

import jsonschema
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
import peer  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402

import jaxdec  # noqa: E402
from jaxdec.constrained import ConstraintError, choices, get_engine, json_schema, lark, regex  # noqa: E402
from jaxdec.constrained.engines import mask_to_ids, words  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "constrained")
CI_SCHEMAS = ("person", "ref_defs_point", "anyof_id", "tags_array", "date_pattern", "status_const_anyof")
CI_REGEXES = ("phone", "yes_no", "time", "hex", "code", "word_lower")
CI_LARK = ("greeting", "arith", "sentence")
MAX_NEW = 96


def read(name):
    with open(os.path.join(DATA, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


SCHEMAS = read("schemas.jsonl")
REGEXES = read("regexes.jsonl")
LARKS = read("lark.jsonl")


def lark_text(row):
    with open(os.path.join(DATA, row["grammar"])) as f:
        return f.read()


@pytest.fixture(scope="module")
def tokenizer():
    from jaxdec.models.tokenizer import Tokenizer
    return Tokenizer.from_gguf(peer.default_gguf_path())


@pytest.fixture(scope="module")
def lm(model_q, tokenizer):
    model, params = model_q
    return model, params, tokenizer


def chat(tok, rows):
    return [tok.chat_ids(r["prompt"]) for r in rows]


def pick(rows, names):
    by = {r["name"]: r for r in rows}
    return [by[n] for n in names]


def check_json_rows(g, rows, label):
    """Every row that ended by EOS parses and validates; returns the number cut by max_new_tokens."""
    cut = 0
    for i, (text, fin, ok) in enumerate(zip(g.text, g.finish_reason, g.constraint_ok)):
        row = rows[i % len(rows)] if len(g.text) != len(rows) else rows[i]
        if fin != "eos":
            cut += 1
            continue
        try:
            value = json.loads(text)
        except ValueError as e:
            raise AssertionError(f"{label} {row['name']}: output is not JSON: {text!r} ({e})") from None
        jsonschema.validate(value, row["schema"])
        assert ok, f"{label} {row['name']}: the engine does not accept {text!r}"
    return cut


# ------------------------------------------------------------------------------------------------
# data and engines (no model)
# ------------------------------------------------------------------------------------------------

def test_data_sets_are_large_and_compile(tokenizer):
    assert len(SCHEMAS) >= 30 and len(REGEXES) >= 10 and len(LARKS) >= 10
    features = json.dumps([r["schema"] for r in SCHEMAS])
    for kw in ("$ref", "$defs", "anyOf", "enum", "const", "pattern", "minimum", "maxItems", "required",
               "additionalProperties", "maxLength"):
        assert kw in features, kw
    ll = get_engine("llguidance", tokenizer, 49152, 2)
    oc = get_engine("outlines", tokenizer, 49152, 2)
    for r in SCHEMAS:
        jsonschema.validators.validator_for(r["schema"]).check_schema(r["schema"])
        ll.compile(json_schema(r["schema"]))
    for r in REGEXES:
        ll.compile(regex(r["regex"]))
        oc.compile(regex(r["regex"], engine="outlines"))
    for r in LARKS:
        ll.compile(lark(lark_text(r)))


@pytest.mark.parametrize("rx", ["(00|11)*", "(ab)*c?", "x(0|1)*y", "[0-9]{3}-[0-9]{4}", "(yes|no|maybe)",
                                "(a|bc)*(de)?"])
def test_outlines_masks_agree_with_llguidance(tokenizer, rx):
    """Along random walks of tokens the outlines engine allows: every token llguidance's mask allows,
    outlines allows (EOS included), and every token outlines allows beyond it llguidance's own matcher
    consumes (llguidance's masks leave out some non-canonical splits of forced text, e.g. "m" "a" in
    "maybe"); acceptance agrees. Accepting states with continuations that end mid-pattern are where
    outlines-core's own Index drops tokens ("0" at the start of (00|11)*: a delayed match flag); the
    engine's sentinel index must keep them."""
    V = 49152
    ll, oc = get_engine("llguidance", tokenizer, V, 2), get_engine("outlines", tokenizer, V, 2)
    rng = np.random.default_rng(0)
    for walk in range(4):
        a, b = ll.matcher(ll.compile(regex(rx))), oc.matcher(oc.compile(regex(rx, engine="outlines")))
        for step in range(10):
            ma, mb = np.zeros((words(V),), np.int32), np.zeros((words(V),), np.int32)
            a.fill(ma)
            b.fill(mb)
            ia, ib = mask_to_ids(ma, V), mask_to_ids(mb, V)
            missing = np.setdiff1d(ia, ib)
            assert not len(missing), (rx, walk, step, [tokenizer.id_bytes(int(t)) for t in missing[:8]])
            for t in np.setdiff1d(ib, ia):
                assert a.copy().consume(int(t)), (rx, walk, step, tokenizer.id_bytes(int(t)))
            assert a.accepting() == b.accepting() and a.stopped() == b.stopped(), (rx, walk, step)
            real = ib[ib != 2]
            if not len(real):
                break
            t = int(rng.choice(real))
            assert a.consume(t) and b.consume(t)
        assert b.consume(2) == a.accepting()
    if rx == "(00|11)*":  # the tokens outlines-core's Index alone refuses at the start
        m = np.zeros((words(V),), np.int32)
        oc.matcher(oc.compile(regex(rx, engine="outlines"))).fill(m)
        assert {tokenizer.id_bytes(int(t)) for t in mask_to_ids(m, V) if t != 2} == {b"0", b"1"}


@pytest.mark.parametrize("engine", ["llguidance", "outlines"])
def test_matcher_mask_consume_rollback_fork(tokenizer, engine):
    eng = get_engine(engine, tokenizer, 49152, 2)
    m = eng.matcher(eng.compile(regex("(red|green|blue)-[0-9]{2}", engine=engine)))
    w = words(49152)
    out = np.zeros((w,), np.int32)
    m.fill(out)
    first = set(mask_to_ids(out, 49152).tolist())
    assert tokenizer.encode("red")[0] in first and 2 not in first
    assert all(tokenizer.decode([t])[:1] in "rgb" for t in first)
    ids = tokenizer.encode("green-42")
    fork = None
    for k, t in enumerate(ids):
        assert m.consume(t)
        if k == 0:
            fork = m.copy()
    m.fill(out)
    assert mask_to_ids(out, 49152).tolist() == [2] and m.accepting()
    assert m.consume(2) and m.accepting()
    m.rollback(2)
    assert not m.accepting()
    # the fork kept its own state
    assert not fork.accepting() and fork.consume(ids[1])
    bad = eng.matcher(eng.compile(regex("(red|green|blue)-[0-9]{2}", engine=engine)))
    assert not bad.consume(tokenizer.encode("yellow")[0]) and bad.error()
    bad.fill(out)
    assert mask_to_ids(out, 49152).tolist() == [2]  # an errored row may only end


def test_draft_masks_match_stepwise(tokenizer):
    """The batched draft masks (llguidance's par_with_draft_tokens) equal step-by-step masks."""
    eng = get_engine("llguidance", tokenizer, 49152, 2)
    c = eng.compile(json_schema(pick(SCHEMAS, ["person"])[0]["schema"]))
    draft = tokenizer.encode('{"age":3')
    w = words(49152)
    batch = np.full((len(draft) + 1, w), -1, np.int32)
    m = eng.matcher(c)
    eng.fill_batch_draft([(m, 0, draft)], batch)
    step = np.zeros_like(batch)
    ref = eng.matcher(c)
    for i in range(len(draft) + 1):
        ref.fill(step[i])
        if i < len(draft):
            assert ref.consume(draft[i])
    np.testing.assert_array_equal(batch, step)
    assert not m.accepting() and m.consume(draft[0])  # the matcher did not move


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_constraints_give_clear_errors(tokenizer):
    eng = get_engine("llguidance", tokenizer, 49152, 2)
    with pytest.raises(ConstraintError, match=r"json_schema: invalid JSON schema.*type"):
        json_schema({"type": "objekt"})
    with pytest.raises(ConstraintError, match=r"json_schema: a JSON schema must be an object"):
        json_schema([1, 2])
    with pytest.raises(ConstraintError, match=r"json_schema: not valid JSON text"):
        json_schema("{nope")
    with pytest.raises(ConstraintError, match=r"regex: invalid regex.*unclosed group"):
        eng.compile(regex("a(b"))
    with pytest.raises(ConstraintError, match=r"invalid regex for outlines"):
        get_engine("outlines", tokenizer, 49152, 2).compile(regex("a(b", engine="outlines"))
    with pytest.raises(ConstraintError, match=r"grammar: invalid Lark grammar.*unknown name"):
        eng.compile(lark("start: a\na: b\n"))
    with pytest.raises(ConstraintError, match=r"accepts no string"):
        eng.compile(regex("[^\\x00-\\U0010FFFF]"))
    with pytest.raises(ConstraintError, match=r"grammar: the grammar accepts no string"):  # an empty terminal
        eng.compile(lark("start: /[^\\x00-\\U0010FFFF]/\n"))
    with pytest.raises(ConstraintError, match=r"grammar: the grammar accepts no string \(rules a, start never finish"):
        eng.compile(lark('start: a\na: "x" a\n'))  # llguidance allows "x" first, but no derivation ends
    eng.compile(lark('start: a\na: "x" a | "y"\n'))  # the same recursion with a way out compiles
    with pytest.raises(ConstraintError, match=r"choices: give at least one"):
        choices([])
    with pytest.raises(ConstraintError, match=r"Lark grammars need engine='llguidance'"):
        lark("start: \"a\"", engine="outlines")
    with pytest.raises(ConstraintError, match=r"engine must be one of"):
        regex("a", engine="xgrammar")


def test_tokenizer_the_engine_cannot_use(lm):
    """A tokenizer an engine cannot use: the error names `tokenizer` and the engine, from `get_engine` and
    from `generate(constraint=)` (before anything compiles)."""
    model, params, tok = lm

    class NoBackend:  # no Hugging Face `tokenizers` backend, not byte-level
        vocab_size, eos_id = 49152, 2

    class BadJSON(NoBackend):  # a backend whose tokenizer JSON llguidance cannot read
        class backend:
            @staticmethod
            def to_str():
                return '{"model": {"type": "nothing"}}'

    with pytest.raises(ConstraintError, match=r"^tokenizer: engine llguidance needs a tokenizer with a Hugging Face"):
        get_engine("llguidance", NoBackend(), 49152, 2)
    with pytest.raises(ConstraintError, match=r"^tokenizer: engine llguidance cannot use this tokenizer \(BadJSON\)"):
        get_engine("llguidance", BadJSON(), 49152, 2)
    with pytest.raises(ConstraintError, match=r"^tokenizer: engine outlines needs a byte-level BPE tokenizer"):
        get_engine("outlines", NoBackend(), 49152, 2)
    with pytest.raises(ConstraintError, match=r"^tokenizer: engine outlines needs"):
        jaxdec.generate(model, params, [tok.chat_ids("Hi")], max_new_tokens=4, tokenizer=NoBackend(),
                        constraint=regex("a", engine="outlines"))


def test_bad_constraint_arguments_in_generate(lm):
    from jaxdec.speculative.methods import pearl
    model, params, tok = lm
    ids = [tok.chat_ids("Hi")]
    with pytest.raises(ValueError, match=r"constraint= needs tokenizer="):
        jaxdec.generate(model, params, ids, max_new_tokens=4, constraint=regex("a"))
    with pytest.raises(ValueError, match=r"constraint: a list of constraints needs one entry per prompt \(1\), got 2"):
        jaxdec.generate(model, params, ids, max_new_tokens=4, tokenizer=tok, constraint=[regex("a"), None])
    with pytest.raises(TypeError, match=r"constraint\[0\]: expected a jaxdec.constrained.Constraint"):
        jaxdec.generate(model, params, ids, max_new_tokens=4, tokenizer=tok, constraint=[42])
    dec, dparams = pearl(model, params, 2)  # PEARL's own pre/post-verify loop has no constraint mask
    with pytest.raises(ValueError, match=r"generate: the decoder PearlDecoder cannot honour constraint="):
        jaxdec.generate(model, dparams, ids, max_new_tokens=4, tokenizer=tok, decoder=dec, constraint=regex("a"))

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class OwnDecoder:
        processors: tuple = ()
    with pytest.raises(ValueError, match=r"generate: the decoder OwnDecoder cannot honour constraint="):
        jaxdec.generate(model, params, ids, max_new_tokens=4, tokenizer=tok, decoder=OwnDecoder(),
                        constraint=regex("a"))
    with pytest.raises(ConstraintError, match=r"constraint\[0\] \(regex\): invalid regex"):
        jaxdec.generate(model, params, ids, max_new_tokens=4, tokenizer=tok, constraint=[regex("(")])


def test_no_constraint_adds_nothing():
    """Without a constraint the decoder is untouched (golden outputs cannot change)."""
    from jaxdec.constrained.api import prepare
    from jaxdec.core.token import TokenDecoder
    assert prepare(TokenDecoder(), None, n_prompts=1, samples=1, expand=1, tokenizer=None, model=None) is None
    assert prepare(TokenDecoder(), [None], n_prompts=1, samples=1, expand=1, tokenizer=None, model=None) is None


# ------------------------------------------------------------------------------------------------
# real default model (CI subset)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def json_greedy(lm):
    model, params, tok = lm
    rows = pick(SCHEMAS, CI_SCHEMAS)
    g = jaxdec.generate(model, params, chat(tok, rows), max_new_tokens=MAX_NEW, tokenizer=tok,
                        constraint=[json_schema(r["schema"]) for r in rows])
    return rows, g


def test_json_greedy_validates(json_greedy):
    rows, g = json_greedy
    cut = check_json_rows(g, rows, "greedy")
    print(f"greedy: {len(rows) - cut}/{len(rows)} rows ended by EOS, {cut} cut at {MAX_NEW} tokens")
    assert cut <= 1
    assert g.stats["constraint_mask_calls"] > 0


def test_json_sampling_validates(lm):
    model, params, tok = lm
    rows = pick(SCHEMAS, CI_SCHEMAS)
    g = jaxdec.generate(model, params, chat(tok, rows), method="sample", n=2, seed=3, max_new_tokens=MAX_NEW,
                        sampling=dict(temperature=0.7), tokenizer=tok,
                        constraint=[json_schema(r["schema"]) for r in rows])
    rows2 = [r for r in rows for _ in range(2)]
    cut = check_json_rows(g, rows2, "sample T=0.7")
    print(f"sampling: {len(rows2) - cut}/{len(rows2)} rows ended by EOS")
    assert cut <= 2
    assert len({tuple(t) for t in g.tokens}) > len(rows)  # samples differ


def test_json_beam4_validates(lm):
    from jaxdec.search import beam_search
    model, params, tok = lm
    rows = pick(SCHEMAS, CI_SCHEMAS[:4])
    b = beam_search(model, params, chat(tok, rows), num_beams=4, max_new_tokens=MAX_NEW, tokenizer=tok,
                    constraint=[json_schema(r["schema"]) for r in rows])
    for i, r in enumerate(rows):
        assert b.finish_reason[i] == "eos", (r["name"], b.text[i])
        for h in b.extras["beams"][i]:
            if h["finished"]:
                text = tok.decode(h["tokens"], skip_special_tokens=True)
                jsonschema.validate(json.loads(text), r["schema"])
                assert h["constraint_ok"]
    assert all(b.constraint_ok)


class MaskedStepLogits:
    """The reference's step logits with its grammar mask applied (the near-tie margin of a constrained
    choice is the margin among the allowed tokens)."""

    def __init__(self, base, tokens, engine, compiled):
        self.base, self.tokens, self.engine, self.compiled = base, list(tokens), engine, compiled

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        row = np.array(self.base[i], np.float64)
        m = self.engine.matcher(self.compiled)
        for t in self.tokens[:i]:
            m.consume(t)
        out = np.zeros((words(len(row)),), np.int32)
        m.fill(out)
        keep = np.zeros(len(row), bool)
        keep[mask_to_ids(out, len(row))] = True
        return np.where(keep, row, -np.inf)


def assert_constrained_greedy(lm, prompts, cons, rows, s, g, label):
    """``s.tokens`` equal constrained greedy ``g.tokens`` under DESIGN's near-tie rule (margins among the
    tokens the grammar allows)."""
    model, params, tok = lm
    eng = get_engine("llguidance", tok, model.vocab_size, 2)
    base = lazy_teacher_logits(model, params, prompts, g.tokens)
    pairs = [(f"{label} {r['name']}", s.tokens[i], g.tokens[i], MaskedStepLogits(base[i], g.tokens[i], eng,
                                                                                 eng.compile(cons[i])))
             for i, r in enumerate(rows)]
    neartie.assert_sequences_match(pairs, lazy_block_vs_step_dlogit(model, params, prompts[0], 16))


def test_speculative_pld_equals_constrained_greedy(lm, json_greedy):
    from jaxdec.speculative.methods import prompt_lookup
    model, params, tok = lm
    rows, g = json_greedy
    prompts = chat(tok, rows)
    cons = [json_schema(r["schema"]) for r in rows]
    s = jaxdec.generate(model, params, prompts, max_new_tokens=MAX_NEW, tokenizer=tok, constraint=cons,
                        decoder=prompt_lookup(4))
    assert_constrained_greedy(lm, prompts, cons, rows, s, g, "pld")
    check_json_rows(s, rows, "pld")
    assert s.stats["accepted"] > 0 if "accepted" in s.stats else True


def test_pld_drafts_are_masked_and_rolled_back(lm):
    """A prompt that PLD can copy from: drafts are accepted (tau > 1) and rejected; the output still
    equals constrained greedy."""
    from jaxdec.speculative.methods import prompt_lookup
    model, params, tok = lm
    text = "Repeat exactly: alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta"
    ids = [tok.chat_ids(text)]
    c = regex("(alpha|beta|gamma|delta)( (alpha|beta|gamma|delta)){3,11}")
    g = jaxdec.generate(model, params, ids, max_new_tokens=40, tokenizer=tok, constraint=c)
    s = jaxdec.generate(model, params, ids, max_new_tokens=40, tokenizer=tok, constraint=c, decoder=prompt_lookup(4))
    assert s.tokens == g.tokens and s.constraint_ok == [True]
    assert s.stats["tau"] > 1.0
    assert s.stats["model_calls"] < g.stats["model_calls"]


def test_engines_agree_on_shared_regexes(lm):
    model, params, tok = lm
    rows = pick(REGEXES, CI_REGEXES)
    prompts = chat(tok, rows)
    out = {}
    for engine in ("llguidance", "outlines"):
        out[engine] = jaxdec.generate(model, params, prompts, max_new_tokens=24, tokenizer=tok,
                                      constraint=[regex(r["regex"], engine=engine) for r in rows])
    assert out["llguidance"].tokens == out["outlines"].tokens
    import re
    for r, text, fin, ok in zip(rows, out["outlines"].text, out["outlines"].finish_reason,
                                out["outlines"].constraint_ok):
        if fin == "eos":
            assert re.fullmatch(r["regex"], text), (r["name"], text)
            assert ok


def test_lark_choices_and_unconstrained_rows_mix(lm):
    """One batch: Lark grammars, a choice list and an unconstrained row (which equals plain greedy)."""
    model, params, tok = lm
    rows = pick(LARKS, CI_LARK)
    prompts = chat(tok, rows) + [tok.chat_ids("Pick a primary colour."), tok.chat_ids("Name a colour.")]
    cons = [lark(lark_text(r)) for r in rows] + [choices(["red", "yellow", "blue"]), None]
    g = jaxdec.generate(model, params, prompts, max_new_tokens=32, tokenizer=tok, constraint=cons)
    plain = jaxdec.generate(model, params, prompts[-1:], max_new_tokens=32)
    assert g.tokens[-1] == plain.tokens[0] and g.constraint_ok[-1] is None
    assert g.text[len(rows)] in ("red", "yellow", "blue") and g.constraint_ok[len(rows)]
    for i, r in enumerate(rows):
        if g.finish_reason[i] == "eos":
            assert g.constraint_ok[i], (r["name"], g.text[i])
    assert sum(f == "eos" for f in g.finish_reason[:len(rows)]) >= 2


def test_negative_control_mask_off_gives_invalid_outputs(lm, json_greedy, monkeypatch):
    """With the mask disabled (matchers still advance) the same checks fail: the model alone does not
    produce valid JSON for these prompts, so the validations above can fail."""
    from jaxdec.constrained import api
    model, params, tok = lm
    rows, _ = json_greedy
    from jaxdec.core import generate as core_generate
    monkeypatch.setattr(core_generate, "CONSTRAINTS", [functools.partial(api.prepare, mask=False)])
    g = jaxdec.generate(model, params, chat(tok, rows), max_new_tokens=MAX_NEW, tokenizer=tok,
                        constraint=[json_schema(r["schema"]) for r in rows])
    assert not all(g.constraint_ok)
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        check_json_rows(g, rows, "mask off")


def test_cli_constraints_per_row_and_for_all(tmp_path, capsys):
    """`jaxdec generate`: per-row fields in --prompts-file (a schema file, a regex, a .lark file, choices,
    none) and --regex for all rows; output rows add constraint_ok."""
    from jaxdec import cli
    schema = pick(SCHEMAS, ["person"])[0]["schema"]
    (tmp_path / "person.json").write_text(json.dumps(schema))
    (tmp_path / "greet.lark").write_text(lark_text(pick(LARKS, ["greeting"])[0]))
    lines = [{"prompt": "Describe a person as JSON with name and age.", "json_schema": "person.json"},
             {"prompt": "Give a phone number like 555-1234.", "regex": "[0-9]{3}-[0-9]{4}"},
             {"prompt": "Greet someone.", "grammar": "greet.lark"},
             {"prompt": "Pick a primary colour.", "choices": ["red", "yellow", "blue"]},
             {"prompt": "Name a colour."}]
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--prompts-file", str(pf), "--chat", "--weights", "q", "--max-new-tokens", "40",
                   "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["constraint_ok"] for r in rows][:4] == [True] * 4 and rows[4]["constraint_ok"] is None
    jsonschema.validate(json.loads(rows[0]["text"]), schema)
    assert rows[3]["text"] in ("red", "yellow", "blue")
    out2 = tmp_path / "out2.jsonl"
    rc = cli.main(["generate", "--prompts-file", str(pf), "--chat", "--weights", "q", "--max-new-tokens", "8",
                   "--quiet", "--regex", "[0-9]{2}", "--method", "beam", "--num-beams", "2", "--out", str(out2)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    rows2 = [json.loads(x) for x in out2.read_text().splitlines()]
    for r in rows2:  # beam rows' text keeps the special EOS token (beam_search decodes without skipping it)
        r["text"] = r["text"].replace("<|im_end|>", "")
    # the per-row fields win over --regex; the unconstrained row takes --regex
    assert rows2[4]["constraint_ok"] and len(rows2[4]["text"]) == 2 and rows2[4]["text"].isdigit()
    assert rows2[3]["text"] in ("red", "yellow", "blue")


def test_forced_tokens_drafter_saves_calls_and_keeps_greedy(lm, json_greedy):
    """Grammar-forced tokens (compute_ff_tokens) as the draft: fewer model calls, constrained greedy tokens."""
    from jaxdec.constrained.forced import ForcedTokensDrafter
    from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder
    model, params, tok = lm
    rows, g = json_greedy
    cons = [json_schema(r["schema"]) for r in rows]
    s = jaxdec.generate(model, params, chat(tok, rows), max_new_tokens=MAX_NEW, tokenizer=tok, constraint=cons,
                        decoder=SpeculativeDecoder(ForcedTokensDrafter(PromptLookupDrafter(8))))
    assert_constrained_greedy(lm, chat(tok, rows), cons, rows, s, g, "forced")
    assert s.extras["constraint_session"].forced_tokens > 0
    print(f"forced tokens: model calls {s.stats['model_calls']} vs greedy {g.stats['model_calls']}, "
          f"tau {s.stats['tau']:.2f}")
    assert s.stats["model_calls"] < g.stats["model_calls"]


@pytest.mark.parametrize("text, stuck", [
    ('start: a\na: "x" a\n', ["a", "start"]),
    ('start: a | b\na: "x" a\nb: "y" b "z"\n', ["a", "b", "start"]),
    ('start: a\na: b "x"\nb: a\n', ["a", "b", "start"]),  # mutual recursion
    ('start: a+\na: "x" a\n', ["a", "start"]),
    ('start: a{1,3}\na: "x" a\n', ["a", "start"]),
    ('?start.2: a\na: "x" a\n', ["a", "start"]),
    ('start: a\na: "x" a | "y"\n', []),
    ('start: "q" a*\na: "x" a\n', []),
    ('start: "q" [a]\na: "x" a\n', []),
    ('start: a?\na: "x" a\n', []),
    ('start: "q" a{0,3}\na: "x" a\n', []),
    ('start: "q" a ~ 0..2\na: "x" a\n', []),
    ('start: a -> foo\n    | "z"\na: "x" a\n', []),
    ('%import common.NUMBER\nstart: NUMBER\n', []),
    ('start: b\n', None),  # an undefined rule: the engine's error, not this check's
    ('start: %json {"type": "object"}\n', None),  # syntax the checker does not model: unknown, never "empty"
])
def test_lark_productive_rules(text, stuck):
    from jaxdec.constrained.lark_check import unproductive_start
    assert unproductive_start(text) == stuck


def test_lark_check_passes_every_shipped_grammar():
    from jaxdec.constrained.lark_check import unproductive_start
    files = sorted(glob.glob(os.path.join(DATA, "lark", "*.lark")))
    assert len(files) >= 10
    for f in files:
        with open(f) as fh:
            assert unproductive_start(fh.read()) == [], f
