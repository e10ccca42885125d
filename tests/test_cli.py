"""The `jaxdec generate` command: JSONL contract, chat template, bad input as one line and exit code 2.

In-process (`jaxdec.cli.main`, which caches the loaded model per process); tests/test_bad_input.py runs
the subprocess cases (raw argv bytes, Ctrl-C)."""
from __future__ import annotations

import json
import types

import pytest

import peer


def _run(args, capsys):
    from jaxdec.cli import main
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=cap.out, stderr=cap.err)


@pytest.fixture
def cli_out(tmp_path, capsys):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "Name a colour."}\n')
    out = tmp_path / "out.jsonl"
    proc = _run(["generate", "--prompts-file", str(pf), "--chat", "--max-new-tokens", "12", "--out", str(out),
                 "--batch-size", "2", "--quiet"], capsys)
    return proc, out


def test_cli_generate_writes_jsonl(cli_out):
    proc, out = cli_out
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out.parent / "out.jsonl.partial").exists()
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2
    tok = peer.peer_tokenizer()
    for q, r in zip(["What is 2 + 2?", "Name a colour."], rows):
        want = tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"] == want
        assert 1 <= len(r["tokens"]) <= 12 and r["finish_reason"] in ("eos", "length")
        assert (r["finish_reason"] == "eos") == (r["tokens"][-1] == 2)
        assert r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
        assert r["stats"]["model_calls"] >= 1


@pytest.mark.parametrize("args, needle", [
    (["generate", "--prompt", "hi", "--model", "/no/such/model.gguf"], "--model"),
    (["generate", "--prompt", "hi", "--method", "sample", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "hi", "--method", "sample", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "hi", "--batch-size", "0"], "--batch-size"),
    (["generate", "--prompts-file", "/no/such/file.jsonl"], "--prompts-file"),
    (["generate"], "--prompt"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    proc = _run(args, capsys)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = [l for l in proc.stderr.strip().splitlines() if l.startswith("jaxdec: error:")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cli_non_gguf_model_file(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_text("hello")
    proc = _run(["generate", "--prompt", "hi", "--model", str(bad)], capsys)
    assert proc.returncode == 2 and "not a GGUF" in proc.stderr
