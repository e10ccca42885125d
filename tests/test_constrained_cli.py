"""Constrained decoding from the CLI for the search methods (issue #18): `jaxdec generate --method
stochastic-beam | momentum | best-of-n | diverse-beam | conditional-beam | first-finish` with `--choices` /
`--regex` (all rows) or per-row prompts-file fields, on the real default model at small sizes. Every output
satisfies its constraint (choices membership, regex fullmatch), rows carry `constraint_ok`, and each CLI run
equals the library call with the same arguments (same model, same prompts, same seed); for diverse beam and
first-finish the same run without the constraint gives text the regex refuses (negative control). The search
methods that cannot honour a constraint refuse it, saying why. CI runs stochastic-beam, momentum,
diverse-beam and the errors; best-of-n, conditional-beam and first-finish (their own compiled programs) run
in the slow tier."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxdec.constrained import choices, regex  # noqa: E402

COLOURS = ["red", "yellow", "blue"]
PHONE = "[0-9]{3}-[0-9]{4}"


def _cli(tmp_path, capsys, *argv):
    """The CLI's output rows, and the (model, params, tokenizer) it loaded: the library reference runs on
    the same model object, so it reuses the CLI's compiled program instead of compiling its own."""
    from jaxdec import cli
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--chat", "--weights", "q", "--quiet", "--out", str(out), *argv])
    assert rc == 0, capsys.readouterr().err[-2000:]
    (loaded,) = cli._LOADED.values()
    return [json.loads(x) for x in out.read_text().splitlines()], (loaded.model, loaded.params, loaded.tokenizer)


def _text(tok, t):
    return tok.decode(t, skip_special_tokens=True)


def test_cli_stochastic_beam_choices(tmp_path, capsys):
    """k = 3 samples without replacement under `--choices`: three distinct token sequences, each spelling
    one of the choices (two may spell the same word in different tokens), each with its own constraint_ok;
    the row equals `stochastic_beam_search`'s."""
    from jaxdec.search import stochastic_beam_search
    q = "Pick a primary colour."
    rows, (model, params, tok) = _cli(tmp_path, capsys, "--prompt", q, "--method", "stochastic-beam", "--num-beams",
                                      "3", "--seed", "1", "--max-new-tokens", "6", "--choices", ",".join(COLOURS))
    assert len(rows) == 1
    row = rows[0]
    assert row["constraint_ok"] is True and row["finish_reason"] == "eos"
    texts = [_text(tok, b["tokens"]) for b in row["beams"]]
    assert len(texts) == 3 and set(texts) <= set(COLOURS), texts
    assert len({tuple(b["tokens"]) for b in row["beams"]}) == 3
    assert all(b["constraint_ok"] for b in row["beams"])
    g = stochastic_beam_search(model, params, [tok.chat_ids(q)], k=3, max_new_tokens=6, seed=1, tokenizer=tok,
                               constraint=choices(COLOURS))
    assert row["tokens"] == g.tokens[0] and g.constraint_ok == [True]
    assert [b["tokens"] for b in row["beams"]] == [h["tokens"] for h in g.extras["beams"][0]]
    assert [b["score"] for b in row["beams"]] == pytest.approx([h["score"] for h in g.extras["beams"][0]],
                                                                abs=1e-4)


@pytest.mark.slow  # its own compiled program (n samples): CI keeps stochastic-beam and momentum; `make acceptance`
def test_cli_best_of_n_regex(tmp_path, capsys):
    """n = 3 samples at temperature 1 under `--regex`: the chosen row and every ranked sample fullmatch
    the regex; the ranking equals `best_of_n`'s (default scorer: mean log-probability)."""
    from jaxdec.search import best_of_n
    q = "Invent a phone number."
    rows, (model, params, tok) = _cli(tmp_path, capsys, "--prompt", q, "--method", "best-of-n", "--n", "3", "--seed",
                                      "2", "--temperature", "1.0", "--max-new-tokens", "12", "--regex", PHONE)
    row = rows[0]
    assert row["constraint_ok"] is True and re.fullmatch(PHONE, _text(tok, row["tokens"])), row["text"]
    assert len(row["beams"]) == 3
    for b in row["beams"]:
        assert b["constraint_ok"] and re.fullmatch(PHONE, _text(tok, b["tokens"])), _text(tok, b["tokens"])
    assert len({tuple(b["tokens"]) for b in row["beams"]}) > 1  # sampled, not three copies of one row
    g = best_of_n(model, params, [tok.chat_ids(q)], n=3, seed=2, sampling=dict(temperature=1.0),
                  max_new_tokens=12, tokenizer=tok, constraint=regex(PHONE))
    assert row["tokens"] == g.tokens[0] and g.constraint_ok == [True]
    assert [b["tokens"] for b in row["beams"]] == [r["tokens"] for r in g.extras["ranked"][0]]


def test_cli_momentum_per_row_fields(tmp_path, capsys):
    """Per-row `regex` / `choices` fields in --prompts-file (a free row between them) with momentum
    decoding: constrained rows satisfy their own constraint, the free row carries constraint_ok too, and the
    rows equal `momentum_generate` with the same constraint list."""
    from jaxdec.search import momentum_generate
    lines = [{"prompt": "Invent a phone number.", "regex": PHONE},
             {"prompt": "Say hello."},
             {"prompt": "Pick a primary colour.", "choices": COLOURS}]
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows, (model, params, tok) = _cli(tmp_path, capsys, "--prompts-file", str(pf), "--method", "momentum",
                                      "--momentum-alpha", "0.5", "--max-new-tokens", "10")
    assert len(rows) == 3 and all("constraint_ok" in r for r in rows)
    assert rows[0]["constraint_ok"] and re.fullmatch(PHONE, _text(tok, rows[0]["tokens"])), rows[0]["text"]
    assert rows[2]["constraint_ok"] and _text(tok, rows[2]["tokens"]) in COLOURS, rows[2]["text"]
    g = momentum_generate(model, params, [tok.chat_ids(x["prompt"]) for x in lines], alpha=0.5, max_new_tokens=10,
                          tokenizer=tok, constraint=[regex(PHONE), None, choices(COLOURS)])
    assert [r["tokens"] for r in rows] == g.tokens
    assert [r["constraint_ok"] for r in rows] == g.constraint_ok


@pytest.mark.parametrize("flag, value, needle", [
    ("--regex", "[^\\x00-\\U0010FFFF]", "(--regex): the grammar accepts no string"),
    ("--grammar", "start: /[^\\x00-\\U0010FFFF]/\n", "(--grammar): the grammar accepts no string"),
    ("--grammar", 'start: a\na: "x" a\n', "(--grammar): the grammar accepts no string (rules a, start never finish"),
])
def test_cli_grammar_that_accepts_nothing(flag, value, needle, tmp_path, capsys):
    """A regex or Lark grammar whose language is empty passes the syntax checks; compiling it against the
    tokenizer (after the model loads) gives one error line naming the flag, exit status 2."""
    from jaxdec import cli
    if flag == "--grammar":
        (tmp_path / "g.lark").write_text(value)
        value = str(tmp_path / "g.lark")
    rc = cli.main(["generate", "--prompt", "hi", "--weights", "q", "--max-new-tokens", "4", "--quiet",
                   "--method", "momentum", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("method, extra", [
    ("diverse-beam", ["--num-beams", "4", "--num-beam-groups", "2", "--diversity-penalty", "1.0"]),
    # its own compiled programs: CI keeps diverse-beam (the same grammar mask in beam_search); `make acceptance`
    pytest.param("conditional-beam", ["--num-beams", "3", "--no-repeat-ngram-size", "2"], marks=pytest.mark.slow),
])
def test_cli_diverse_and_conditional_beam_regex(method, extra, tmp_path, capsys):
    """Diverse and conditional beam search take `--regex` (beam_search's grammar mask, forked per beam on
    reorder): the chosen row and every returned beam fullmatch the regex with the real llguidance engine,
    and the rows equal `beam_search` with the same arguments. Negative control: the same run without the
    constraint gives text the regex refuses."""
    from jaxdec.search import beam_search
    q = "Invent a phone number."
    argv = ["--prompt", q, "--method", method, "--max-new-tokens", "10", *extra]
    rows, (model, params, tok) = _cli(tmp_path, capsys, *argv, "--regex", PHONE)
    row = rows[0]
    assert row["constraint_ok"] is True and re.fullmatch(PHONE, _text(tok, row["tokens"])), row["text"]
    for b in row["beams"]:
        assert b["constraint_ok"] and re.fullmatch(PHONE, _text(tok, b["tokens"])), _text(tok, b["tokens"])
    groups = int(extra[extra.index("--num-beam-groups") + 1]) if "--num-beam-groups" in extra else 1
    g = beam_search(model, params, [tok.chat_ids(q)], num_beams=int(extra[1]), max_new_tokens=10,
                    num_beam_groups=groups, diversity_penalty=1.0 if groups > 1 else 0.0,
                    no_repeat_ngram_size=2 if method == "conditional-beam" else 0, tokenizer=tok,
                    constraint=regex(PHONE))
    assert row["tokens"] == g.tokens[0] and [b["tokens"] for b in row["beams"]] == [h["tokens"] for h in
                                                                                    g.extras["beams"][0]]
    free, _ = _cli(tmp_path, capsys, *argv)
    assert "constraint_ok" not in free[0]
    assert not any(re.fullmatch(PHONE, _text(tok, b["tokens"])) for b in free[0]["beams"]), free[0]["text"]


@pytest.mark.slow  # three compiled programs (~40 s): issue 18's CI share is 4 minutes; `make acceptance` runs it
def test_cli_first_finish_regex(tmp_path, capsys):
    """First Finish Search takes `--regex` (the mask on its inner sampling decoder): the answer and every
    partial sample are prefixes of strings of the regex, the answer ended by EOS and fullmatches it, and it is
    the shortest EOS-ended sample of constrained sampling with the same seed and n (first-finish's samples are
    prefixes of best-of-N's). Negative control: without the constraint the answer is not a phone number."""
    import jaxdec
    from jaxdec.search.testtime import shortest_finished
    q = "Invent a phone number."
    argv = ["--prompt", q, "--method", "first-finish", "--n", "3", "--seed", "2", "--temperature", "1.0",
            "--max-new-tokens", "12"]
    rows, (model, params, tok) = _cli(tmp_path, capsys, *argv, "--regex", PHONE)
    row = rows[0]
    assert row["finish_reason"] == "eos" and row["constraint_ok"] is True
    assert re.fullmatch(PHONE, _text(tok, row["tokens"])), row["text"]
    g = jaxdec.generate(model, params, [tok.chat_ids(q)], method="sample", sampling=dict(temperature=1.0), n=3,
                        seed=2, max_new_tokens=12, tokenizer=tok, constraint=regex(PHONE))
    assert all(re.fullmatch(PHONE, _text(tok, t)) for t, f in zip(g.tokens, g.finish_reason) if f == "eos"), g.text
    assert row["tokens"] == g.tokens[shortest_finished(g.tokens, g.finish_reason)]
    free, _ = _cli(tmp_path, capsys, *argv)
    assert "constraint_ok" not in free[0] and not re.fullmatch(PHONE, _text(tok, free[0]["tokens"])), free[0]["text"]


@pytest.mark.parametrize("method, why", [
    ("adadec", "lookahead rollouts"), ("entropy-adaptive", "argmax of their own logits"), ("astar", "host-level"),
    ("superposed", "superposed model call"), ("pgtd", "doctests"),
])
def test_cli_methods_that_refuse_a_constraint_say_why(method, why, capsys):
    """The search methods that cannot honour a constraint refuse it before the model loads, naming the flag,
    the method and the reason."""
    from jaxdec import cli
    rc = cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "4", "--method", method, "--regex", "[0-9]+"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("jaxdec: error: --regex: --method " + method), err
    assert "cannot honour a constraint" in lines[0] and why in lines[0], lines[0]
