"""`jaxdec generate --method beam|stochastic-beam|...`: the spine's JSONL rows plus `beams`."""
from __future__ import annotations

import json

import pytest


def run_cli(tmp_path, *extra):
    from jaxdec.cli import main
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--prompt", "What is 2+2?", "--chat", "--max-new-tokens", "6", "--quiet",
               "--out", str(out), *extra])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else None
    return rc, rows


def test_cli_beam_and_stochastic_beam(tmp_path):
    rc, rows = run_cli(tmp_path, "--method", "beam", "--num-beams", "3")
    assert rc == 0 and len(rows) == 1
    r = rows[0]
    assert r["prompt_ids"][:3] == [1, 9690, 198]
    assert len(r["beams"]) == 3 and r["tokens"] == r["beams"][0]["tokens"]
    scores = [b["score"] for b in r["beams"]]
    assert scores == sorted(scores, reverse=True)
    assert isinstance(r["text"], str) and r["finish_reason"] in ("eos", "length")
    rc, rows = run_cli(tmp_path, "--method", "stochastic-beam", "--num-beams", "3", "--seed", "1")
    assert rc == 0 and len({tuple(b["tokens"]) for b in rows[0]["beams"]}) == 3


def test_cli_search_bad_input(tmp_path, capsys):
    rc, _ = run_cli(tmp_path, "--method", "diverse-beam", "--num-beams", "4", "--num-beam-groups", "3")
    assert rc == 2
    assert "must divide" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, "--method", "beam", "--num-beams", "0")
    assert rc == 2
