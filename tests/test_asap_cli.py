"""Grammar-aligned sampling from the CLI (issue #18): `jaxdec generate --method asap` with `--regex` and with
per-row prompts-file fields, on the real default model (q weights) at small sizes. Every row is a string of
its grammar ending with EOS within --max-new-tokens, carries constraint_ok and ASAp's log-probabilities, and
equals `grammar_aligned_generate` with the same arguments (same seed); the model's own first choice is not in
the grammar (negative control: the constraint does the work). Bad input: one `jaxdec: error:` line naming
the flag, exit status 2."""
from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from jaxdec.constrained import choices, regex

PHONE = "[0-9]{3}-[0-9]{4}"
COLOURS = ["red", "yellow", "blue"]


def _cli(tmp_path, capsys, *argv):
    from jaxdec import cli
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--chat", "--weights", "q", "--quiet", "--out", str(out), "--method", "asap", *argv])
    assert rc == 0, capsys.readouterr().err[-2000:]
    (loaded,) = cli._LOADED.values()
    return [json.loads(x) for x in out.read_text().splitlines()], loaded


def _text(tok, t):
    return tok.decode(t, skip_special_tokens=True)


def test_cli_asap_regex_and_per_row_fields(tmp_path, capsys):
    from jaxdec.constrained import grammar_aligned_generate
    from jaxdec.constrained.asap import kv_score_fn
    q = "Invent a phone number."
    rows, loaded = _cli(tmp_path, capsys, "--prompt", q, "--regex", PHONE, "--asap-samples", "3", "--asap-warmup",
                        "2", "--max-new-tokens", "12", "--seed", "5")
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    eos = model.eos_ids[0]
    assert len(rows) == 3
    for r in rows:
        assert r["constraint_ok"] is True and r["finish_reason"] == "eos"
        assert r["tokens"][-1] == eos and len(r["tokens"]) <= 12
        assert re.fullmatch(PHONE, _text(tok, r["tokens"])) and r["text"] == _text(tok, r["tokens"]), r["text"]
        assert r["asap"]["log_q"] <= 1e-9 and r["asap"]["log_p"] < 0
        assert r["stats"]["model_tokens"] > 0
    assert len({tuple(r["tokens"]) for r in rows}) > 1  # sampled, not one string three times
    ids = tok.chat_ids(q)
    g = grammar_aligned_generate(model, params, [ids], regex(PHONE), n=3, max_new_tokens=11, tokenizer=tok, seed=5,
                                 warmup=2)
    assert [r["tokens"] for r in rows] == g.tokens
    np.testing.assert_allclose([r["asap"]["log_q"] for r in rows], g.extras["log_q"], atol=1e-6)
    # negative control: unconstrained, the model would not start with a digit
    first = int(np.argmax(kv_score_fn(model, params, ids, 1)(())))
    assert not re.fullmatch("[0-9]", _text(tok, [first])), _text(tok, [first])

    lines = [{"prompt": q, "regex": PHONE}, {"prompt": "Pick a primary colour.", "choices": COLOURS}]
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows, _ = _cli(tmp_path, capsys, "--prompts-file", str(pf), "--asap-samples", "2", "--max-new-tokens", "12")
    assert len(rows) == 4 and all(r["constraint_ok"] for r in rows)
    assert all(re.fullmatch(PHONE, _text(tok, r["tokens"])) for r in rows[:2]), [r["text"] for r in rows]
    assert all(_text(tok, r["tokens"]) in COLOURS for r in rows[2:]), [r["text"] for r in rows]
    g = grammar_aligned_generate(model, params, [tok.chat_ids(x["prompt"]) for x in lines],
                                 [regex(PHONE), choices(COLOURS)], n=2, max_new_tokens=11, tokenizer=tok, seed=0)
    assert [r["tokens"] for r in rows] == g.tokens


def _bad(capsys, argv, *needles):
    from jaxdec import cli
    rc = cli.main(["generate", "--weights", "q", "--max-new-tokens", "4", *argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("jaxdec: error:"), err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_asap_bad_input(tmp_path, capsys):
    _bad(capsys, ["--prompt", "hi", "--method", "asap"], "--method asap needs a constraint", "--regex")
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a", "regex": "[0-9]"}\n\n{"prompt": "b"}\n')
    _bad(capsys, ["--prompts-file", str(pf), "--method", "asap"], "--prompts-file line 3",
         "needs a constraint on every row")
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--regex", "a", "--asap-samples", "0"], "--asap-samples")
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--regex", "a", "--asap-warmup", "-2"], "--asap-warmup")
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--regex", "a", "--max-new-tokens", "1"], "--max-new-tokens",
         "with --method asap")
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--regex", "a", "--n", "2"], "--n is not used by --method asap")
    _bad(capsys, ["--prompt", "hi", "--method", "greedy", "--asap-samples", "2"], "--asap-samples is not used",
         "--method asap")
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--regex", "(a"], "--regex", "invalid regex")
    # after the model loads: no string of the grammar fits in the row (a one-entry choice of many tokens)
    _bad(capsys, ["--prompt", "hi", "--method", "asap", "--choices", "antidisestablishmentarianism"],
         "--choices: the grammar accepts no string of at most --max-new-tokens - 1 = 3 tokens", "raise --max-new-tokens")


def test_methods_lists_asap(capsys):
    from jaxdec import cli
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = lines.index("asap")
    block = "\n".join([lines[i]] + list(itertools.takewhile(lambda x: x.startswith(" "), lines[i + 1:])))
    assert "Grammar-Aligned Decoding" in block and "--asap-samples" in block and "--asap-warmup" in block, block
