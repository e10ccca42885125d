"""The `jaxdec generate` command: JSONL contract, chat template, bad input as one line and exit code 2.

In-process (`jaxdec.cli.main`, which caches the loaded model per process); tests/test_bad_input.py runs
the subprocess cases (raw argv bytes, Ctrl-C)."""
from __future__ import annotations

import json
import types

import numpy as np
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


# ------------------------------------------------------------------------------------------ --stream
STREAM_ARGS = ["generate", "--prompt", "Repeat exactly: one two three four five six seven eight", "--chat",
               "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def plain_greedy(tmp_path_factory):
    """The non-streamed greedy row of the --stream prompt (the compiled loop, no callback)."""
    from jaxdec.cli import main
    out = tmp_path_factory.mktemp("plain") / "plain.jsonl"
    assert main(STREAM_ARGS + ["--out", str(out), "--quiet"]) == 0
    (row,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["text"] and len(row["tokens"]) >= 6
    return row


def _streamed(args, capsys, monkeypatch):
    """Run `main(args)` recording each piece `--stream` printed and how many tokens were committed then."""
    import jaxdec.cli as cli
    pieces = []
    orig = cli.StreamPrinter._write

    def spy(self, text):
        if text:
            pieces.append((len(self.ids), text))
        orig(self, text)

    monkeypatch.setattr(cli.StreamPrinter, "_write", spy)
    return _run(args, capsys), pieces


@pytest.mark.parametrize("method", [["--method", "greedy"], ["--method", "speculative", "--drafter", "pld"]],
                         ids=["greedy", "speculative-pld"])
def test_cli_stream_prints_pieces_equal_to_the_final_text(method, plain_greedy, tmp_path, capsys, monkeypatch):
    """--stream prints the text piece by piece while decoding (the same jitted init/step driven from
    Python), one piece per step that committed new text; stdout is exactly the non-streamed greedy
    run's text (then the separator line; greedy-verified speculative decoding gives the greedy
    tokens); the stats line reports the time to the first printed text. The prompt asks for a copy,
    so prompt lookup's steps commit several tokens at once."""
    want = plain_greedy
    proc, pieces = _streamed(STREAM_ARGS + method + ["--stream", "--out", str(tmp_path / "s.jsonl")], capsys,
                             monkeypatch)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == want["text"] + "\n" + "-" * 60 + "\n"
    assert "".join(p for _, p in pieces) == want["text"]
    (rec,) = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rec["tokens"] == want["tokens"] and rec["text"] == want["text"]
    # printed while decoding: pieces after at least 3 different steps, not all at the end
    assert len({n for n, _ in pieces}) >= 3, pieces
    assert rec["stats"]["first_text_seconds"] > 0 and "first text after" in proc.stderr
    if "speculative" in method:
        commits = np.diff([0] + sorted({n for n, _ in pieces}))
        assert rec["stats"]["tau"] > 1 and commits.max() > 1, (pieces, rec["stats"]["tau"])


@pytest.mark.parametrize("extra, needle", [
    (["--n", "2", "--method", "sample"], "--n"),
    (["--batch-size", "1"], "--batch-size"),
    (["--quiet"], "--quiet"),
    (["--method", "beam"], "--stream"),
])
def test_cli_stream_refuses_more_than_one_row(extra, needle, capsys, monkeypatch, tmp_path):
    import jaxdec.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", boom)
    proc = _run(["generate", "--prompt", "hi", "--stream", *extra], capsys)
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    two = _run(["generate", "--prompts-file", str(pf), "--stream"], capsys)
    for p, n in ((proc, needle), (two, "--stream")):
        err = [l for l in p.stderr.strip().splitlines() if l.strip()]
        assert p.returncode == 2 and len(err) == 1 and err[0].startswith("jaxdec: error:") and n in err[0], p.stderr
    assert "2" in two.stderr and "one prompt" in two.stderr
