"""Issue 14: bad input is one `jaxdec: error:` line naming the CLI flag and exit code 2 (the API raises
ValueError/TypeError naming the argument); `--out` never loses or half-writes work; Ctrl-C is one line
and exit code 130.

CLI cases run in-process (`jaxdec.cli.main([...])`); cases that must fail before the model loads run
with the model loader replaced by one that fails the test. Only the raw-bytes argv case and the SIGINT
run use a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import jaxdec.cli as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(err: str) -> list:
    return [l for l in err.strip().splitlines() if l.strip()]


def check_bad(capsys, argv, needle, *more):
    """main(argv) returns 2 with exactly one stderr line, a `jaxdec: error:` line holding the needles."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert rc == 2, (argv, rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("jaxdec: error:"), err[-2000:]
    assert "Traceback" not in err
    for n in (needle, *more):
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI tries to load a model: these cases must be rejected before that."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(cli, "load_model", boom)


def G(*extra):
    return ["generate", "--prompt", "Hi", *extra]


# --------------------------------------------------------------------------- CLI, before the model loads
PRELOAD_CASES = [
    # sampling flags are validated whatever the method, and name the flag (not the API argument)
    (G("--temperature", "-1", "--top-p", "1.5", "--top-k", "-3"), ["--temperature", ">= 0"]),
    (G("--top-k", "-3"), ["--top-k", "got -3"]),
    (G("--method", "sample", "--top-p", "1.5"), ["--top-p", "(0, 1]"]),
    # flags the method cannot honour
    (G("--method", "beam", "--num-beams", "2", "--n", "2"), ["--n", "--method beam"]),
    (G("--temperature", "0.7"), ["--temperature", "--method greedy", "sample"]),
    (G("--method", "beam", "--stop", "x"), ["--stop", "--method beam"]),
    (G("--method", "astar", "--batch-size", "2"), ["--batch-size", "--method astar"]),
    (G("--method", "speculative", "--temperature", "0.5"), ["--temperature", "--spec-sampling"]),
    (G("--method", "speculative", "--drafter", "swift", "--max-ngram", "2"), ["--max-ngram", "--drafter swift"]),
    (G("--method", "speculative", "--stop", "x"), ["--stop"]),
    # SpecDec++'s learned stop on EAGLE and Clover: a head for another draft, none shipped (Clover: EAGLE's is
    # shipped since session 16), a drafter without a stop
    (G("--method", "speculative", "--drafter", "clover", "--stop-head"),
     ["--stop-head", "for the Clover heads", "--drafter clover"]),
    *[case for d, heads in (("eagle", "the EAGLE head"), ("clover", "the Clover heads")) for case in (
        (G("--method", "speculative", "--drafter", d, "--stop-head", "/no/such/head.safetensors"),
         ["--stop-head", "no such file"]),
        (G("--method", "speculative", "--drafter", d, "--stop-head",
           os.path.join(ROOT, "jaxdec", "speculative", "heads", "artefacts", "specdec_pp-smollm2-135m.safetensors")),
         ["--stop-head", "trained on draft_lm:", f"not on {heads}"]),
        (G("--method", "speculative", "--drafter", d, "--stop-threshold", "0.5"), ["--stop-threshold", "--stop-head"]))],
    (G("--method", "speculative", "--drafter", "medusa", "--stop-head"),
     ["--stop-head", "--drafter clover, draft-model, eagle"]),
    (G("--method", "diverse-beam", "--num-beams", "4", "--num-beam-groups", "3"), ["--num-beam-groups", "divide"]),
    # int8 activations run against block-quantized weights only
    (G("--activations", "q8"), ["--activations q8", "--weights q", "got --weights f32"]),
    # constraints
    (G("--regex", "[0-9]+", "--method", "adadec"), ["--regex", "--method adadec", "cannot honour"]),
    (G("--regex", "[0-9]+", "--method", "speculative", "--drafter", "pearl"), ["--regex", "--drafter pearl", "cannot honour"]),
    (G("--regex", "a", "--choices", "x,y"), ["at most one of", "--regex", "--choices"]),
    (G("--regex", "(a|b"), ["--regex", "invalid regex", "unclosed group"]),
    (G("--choices", "red,,blue"), ["--choices", "non-empty"]),
    (G("--constraint-engine", "outlines"), ["--constraint-engine", "no constraint"]),
    # seeds
    (G("--seed", "99999999999999999999"), ["--seed", "99999999999999999999"]),
    # prompts and stop strings, before the 6-9 s load
    (["generate", "--prompt", ""], ["--prompt", "empty"]),
    (["generate", "--chat", "--prompt", ""], ["--prompt", "empty"]),
    (G("--stop", ""), ["--stop", "empty"]),
    (G("--min-new-tokens", "9", "--max-new-tokens", "3"), ["--min-new-tokens", "--max-new-tokens"]),
    (["generate", "--prompt", "\udcff\udcfe"], ["--prompt", "UTF-8"]),  # what Python makes of non-UTF-8 argv bytes
    (G("--stop", "\ud800"), ["--stop", "UTF-8"]),
    # --out is checked before decoding
    (G("--out", "/no/such/folder/out.jsonl"), ["--out", "does not exist"]),
    (G("--out", "/"), ["--out", "folder"]),
    (G("--out", "/proc/version"), ["--out"]),
    # models
    (G("--model", "nope.gguf"), ["--model", "nope.gguf"]),
    (["demo", "--model", "nope.gguf"], ["--model", "nope.gguf"]),
    (["demo", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
]


@pytest.mark.parametrize("argv, needles", PRELOAD_CASES, ids=[" ".join(c[0][1:])[:60] for c in PRELOAD_CASES])
def test_cli_bad_input_before_model_load(argv, needles, capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_bad(capsys, argv, *needles)


def test_argparse_error_is_one_line_pointing_to_help(capsys, no_model_load):
    line = check_bad(capsys, G("--bogus"), "--bogus", "jaxdec generate --help")
    assert "usage" not in line
    check_bad(capsys, G("--top-k", "abc"), "--top-k", "--help")
    check_bad(capsys, G("--method", "nope"), "--method", "--help")
    check_bad(capsys, ["demo", "--max-new-tokens", "x"], "--max-new-tokens", "jaxdec demo --help")
    check_bad(capsys, [], "--help")


def _prompts_file(tmp_path, raw: bytes):
    p = tmp_path / "p.jsonl"
    p.write_bytes(raw)
    return str(p)


def test_prompts_file_encoding_and_content(capsys, no_model_load, tmp_path):
    f = _prompts_file(tmp_path, b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    check_bad(capsys, ["generate", "--prompts-file", f], "--prompts-file line 2", "UTF-8")
    f = _prompts_file(tmp_path, b'{"prompt": "ok"}\n{"prompt": "\\ud800 lone"}\n')
    check_bad(capsys, ["generate", "--prompts-file", f], "--prompts-file line 2", "surrogate")
    f = _prompts_file(tmp_path, b'{"prompt": ""}\n')
    check_bad(capsys, ["generate", "--prompts-file", f], "--prompts-file", "empty")
    check_bad(capsys, ["generate", "--prompts-file", str(tmp_path)], "--prompts-file", "folder")
    f = _prompts_file(tmp_path, b'{"prompt": "ok"}\n')
    check_bad(capsys, ["generate", "--prompts-file", f, "--out", f], "--out", "--prompts-file")
    assert open(f).read() == '{"prompt": "ok"}\n'


def test_non_utf8_prompt_bytes_subprocess(tmp_path):
    """Raw non-UTF-8 bytes in argv (the real path, not a str made in-process)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable.encode(), b"-m", b"jaxdec.cli", b"generate", b"--prompt", b"caf\xe9\xff"],
                          capture_output=True, cwd=tmp_path, env=env, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err[-2000:]
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("jaxdec: error: --prompt") and "UTF-8" in lines[0], err[-2000:]


def test_quiet_drops_native_log_lines_keeps_python_errors(capfd):
    """--quiet: XLA's C++ log lines (written straight to fd 2, e.g. "slow_operation_alarm ... Constant
    folding") are dropped; Python's own stderr lines still arrive."""
    with cli.native_stderr_silenced():
        os.write(2, b"E0000 00:00:00 slow_operation_alarm.cc:65] Constant folding an instruction\n")
        print("jaxdec: error: still shown", file=sys.stderr)
    os.write(2, b"native after\n")
    err = capfd.readouterr().err
    assert "Constant folding" not in err
    assert "jaxdec: error: still shown" in err and "native after" in err


# --------------------------------------------------------------------------- the sweep over every flag
# dest -> an out-of-range value (argv after "generate"); every `generate` flag must have one, so a new
# flag cannot skip validation unnoticed
def _file(tmp, name, text):
    p = os.path.join(tmp, name)
    with open(p, "w") as f:
        f.write(text)
    return p


SWEEP = {
    "model": lambda t: G("--model", os.path.join(t, "missing.gguf")),
    "prompt": lambda t: ["generate", "--prompt", ""],
    "prompts_file": lambda t: ["generate", "--prompts-file", os.path.join(t, "missing.jsonl")],
    "chat": lambda t: G("--chat=yes"),
    "method": lambda t: G("--method", "nope"),
    "max_new_tokens": lambda t: G("--max-new-tokens", "0"),
    "min_new_tokens": lambda t: G("--min-new-tokens", "-1"),
    "batch_size": lambda t: G("--batch-size", "0"),
    "n": lambda t: G("--n", "0"),
    "seed": lambda t: G("--seed", str(2 ** 64)),
    "weights": lambda t: G("--weights", "int3"),
    "activations": lambda t: G("--activations", "int4"),
    "attention": lambda t: G("--attention", "nope"),
    "temperature": lambda t: G("--method", "sample", "--temperature", "-0.5"),
    "top_k": lambda t: G("--method", "sample", "--top-k", "-1"),
    "top_p": lambda t: G("--method", "sample", "--top-p", "0"),
    "min_p": lambda t: G("--method", "sample", "--min-p", "1.5"),
    "typical_p": lambda t: G("--method", "sample", "--typical-p", "0"),
    "prefill_chunk": lambda t: G("--prefill-chunk", "-1"),
    "repetition_penalty": lambda t: G("--method", "sample", "--repetition-penalty", "0"),
    "stop": lambda t: G("--stop", ""),
    "out": lambda t: G("--out", os.path.join(t, "no", "such", "out.jsonl")),
    "quiet": lambda t: G("--quiet=1"),
    "stream": lambda t: G("--stream=1"),
    "mesh": lambda t: G("--mesh", "2by4"),
    "coordinator": lambda t: G("--coordinator", "nohost", "--mesh", "1x1"),
    "num_processes": lambda t: G("--coordinator", "localhost:1", "--num-processes", "0", "--process-id", "0"),
    "process_id": lambda t: G("--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"),
    # search
    "num_beams": lambda t: G("--method", "beam", "--num-beams", "0"),
    "num_return_sequences": lambda t: G("--method", "beam", "--num-beams", "2", "--num-return-sequences", "3"),
    "length_penalty": lambda t: G("--method", "beam", "--length-penalty", "nan"),
    "early_stopping": lambda t: G("--method", "beam", "--early-stopping", "maybe"),
    "num_beam_groups": lambda t: G("--method", "diverse-beam", "--num-beam-groups", "0"),
    "diversity_penalty": lambda t: G("--method", "diverse-beam", "--diversity-penalty", "-1"),
    "no_repeat_ngram_size": lambda t: G("--method", "beam", "--no-repeat-ngram-size", "-1"),
    "momentum_alpha": lambda t: G("--method", "momentum", "--momentum-alpha", "-1"),
    "momentum_ngram": lambda t: G("--method", "momentum", "--momentum-ngram", "0"),
    "momentum_top_k": lambda t: G("--method", "momentum", "--momentum-top-k", "0"),
    "adadec_threshold": lambda t: G("--method", "adadec", "--adadec-threshold", "nan"),
    "adadec_k": lambda t: G("--method", "adadec", "--adadec-k", "0"),
    "adadec_lookahead": lambda t: G("--method", "adadec", "--adadec-lookahead", "-1"),
    "ead_small_layers": lambda t: G("--method", "entropy-adaptive", "--ead-small-layers", "-1"),
    "ead_threshold": lambda t: G("--method", "entropy-adaptive", "--ead-threshold", "inf"),
    "astar_max_children": lambda t: G("--method", "astar", "--astar-max-children", "0"),
    "astar_max_expansions": lambda t: G("--method", "astar", "--astar-max-expansions", "0"),
    # superposed
    "num_drafts": lambda t: G("--method", "superposed", "--num-drafts", "0"),
    "sp_candidates": lambda t: G("--method", "superposed", "--num-drafts", "3", "--sp-candidates", "2"),
    "ngram_alpha": lambda t: G("--method", "superposed", "--ngram-alpha", "1.5"),
    "ngram_corpus": lambda t: G("--method", "superposed", "--ngram-corpus", os.path.join(t, "missing.txt")),
    "ngram_orders": lambda t: G("--method", "superposed", "--ngram-orders", "2,0"),
    "ngram_weights": lambda t: G("--method", "superposed", "--ngram-weights", "0.5,0.6,0.2"),
    "ngram_penalty": lambda t: G("--method", "superposed", "--ngram-penalty", "-1"),
    # speculative
    "drafter": lambda t: G("--method", "speculative", "--drafter", "oracle"),
    "spec_sampling": lambda t: G("--method", "speculative", "--spec-sampling=no"),
    "draft_tokens": lambda t: G("--method", "speculative", "--draft-tokens", "0"),
    "max_ngram": lambda t: G("--method", "speculative", "--max-ngram", "0"),
    "copy_from": lambda t: G("--method", "speculative", "--copy-from", "nowhere"),
    "tree_size": lambda t: G("--method", "speculative", "--drafter", "recycling", "--tree-size", "0"),
    "spec_config": lambda t: G("--method", "speculative", "--drafter", "recycling", "--spec-config",
                               os.path.join(t, "missing.json")),
    "skip_layers": lambda t: G("--method", "speculative", "--drafter", "swift", "--skip-layers", "3", "-1"),
    "exit_layer": lambda t: G("--method", "speculative", "--drafter", "del", "--exit-layer", "0"),
    "draft_model": lambda t: G("--method", "speculative", "--drafter", "draft-model", "--draft-model", "truncate:x"),
    "draft_layers": lambda t: G("--method", "speculative", "--drafter", "draft-model", "--draft-layers", "0"),
    "heads": lambda t: G("--method", "speculative", "--drafter", "medusa", "--heads", os.path.join(t, "missing.st")),
    "draft_depth": lambda t: G("--method", "speculative", "--drafter", "s2d", "--draft-depth", "0"),
    "stop_head": lambda t: G("--method", "speculative", "--drafter", "draft-model", "--stop-head",
                             os.path.join(t, "missing.st")),
    "stop_threshold": lambda t: G("--method", "speculative", "--drafter", "draft-model", "--stop-head",
                                  "--stop-threshold", "1.5"),
    "verify_buckets": lambda t: G("--method", "speculative", "--verify-buckets", "4,2"),
    "rapid_chunks": lambda t: G("--method", "speculative", "--drafter", "rapid", "--rapid-chunks", "0"),
    "rapid_chunk_chars": lambda t: G("--method", "speculative", "--drafter", "rapid", "--rapid-chunk-chars", "0"),
    "rapid_augment": lambda t: G("--method", "speculative", "--drafter", "rapid", "--rapid-augment", "-1"),
    "rapid_alpha": lambda t: G("--method", "speculative", "--drafter", "rapid", "--rapid-alpha", "2"),
    "lud_cut": lambda t: G("--method", "speculative", "--drafter", "lud", "--lud-cut", "1"),
    "lud_lossy": lambda t: G("--method", "speculative", "--drafter", "medusa", "--lud-lossy"),  # lud's flag only
    # constrained decoding
    "json_schema": lambda t: G("--json-schema", os.path.join(t, "missing.json")),
    "regex": lambda t: G("--regex", "a(b"),
    "grammar": lambda t: G("--grammar", os.path.join(t, "missing.lark")),
    "choices": lambda t: G("--choices", ","),
    "constraint_engine": lambda t: G("--regex", "a", "--constraint-engine", "xgrammar"),
    "forced_tokens": lambda t: G("--regex", "a", "--forced-tokens"),  # greedy: no chain drafter to wrap
    "asap_samples": lambda t: G("--method", "asap", "--regex", "a", "--asap-samples", "0"),
    "asap_warmup": lambda t: G("--method", "asap", "--regex", "a", "--asap-warmup", "-1"),
    # PG-TD
    "pgtd_rollouts": lambda t: G("--method", "pgtd", "--pgtd-rollouts", "0"),
    "pgtd_top_k": lambda t: G("--method", "pgtd", "--pgtd-top-k", "0"),
    "pgtd_timeout": lambda t: G("--method", "pgtd", "--pgtd-timeout", "0"),
    # diffusion
    "sampler": lambda t: G("--method", "diffusion", "--sampler", "nope"),
    "steps": lambda t: G("--method", "diffusion", "--steps", "0"),
    "block_length": lambda t: G("--method", "diffusion", "--block-length", "0"),
    "threshold": lambda t: G("--method", "diffusion", "--threshold", "1.5"),
    "factor": lambda t: G("--method", "diffusion", "--factor", "0"),
    "freedave_drafts": lambda t: G("--method", "diffusion", "--freedave-drafts", "0"),
    "dllm_cache": lambda t: G("--method", "diffusion", "--dllm-cache", "triple"),
    "learn2pd_filter": lambda t: G("--method", "diffusion", "--sampler", "learn2pd", "--learn2pd-filter",
                                   os.path.join(t, "missing.safetensors")),
    "diffusion_temperature": lambda t: G("--method", "diffusion", "--diffusion-temperature", "-1"),
    # FiRST
    "first_routers": lambda t: G("--method", "first", "--first-routers", os.path.join(t, "missing.npz")),
    "first_threshold": lambda t: G("--method", "first", "--first-routers", "x", "--first-threshold", "1.5"),
}


def test_every_generate_flag_out_of_range_exits_2(capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    actions = [a for a in cli.build_parser().generate_parser._actions if a.dest != "help"]
    missing = sorted(a.dest for a in actions if a.dest not in SWEEP)
    assert not missing, f"add an out-of-range value for these new flags to SWEEP: {missing}"
    for a in actions:
        argv = SWEEP[a.dest](str(tmp_path))
        check_bad(capsys, argv, a.option_strings[-1])


# `jaxdec serve`: every flag has an out-of-range value, reported before the model loads
def S(*extra):
    return ["serve", *extra]


SERVE_SWEEP = {
    "host": lambda t: S("--host", "0.0.0.0"),
    "port": lambda t: S("--port", "70000"),
    "model": lambda t: S("--model", os.path.join(t, "missing.gguf")),
    "weights": lambda t: S("--weights", "int3"),
    "served_model_name": lambda t: S("--served-model-name", " "),
    "slots": lambda t: S("--slots", "0"),
    "cache_size": lambda t: S("--cache-size", "1"),
    "max_tokens_limit": lambda t: S("--max-tokens-limit", "0"),
    "prefill_chunk_tokens": lambda t: S("--prefill-chunk-tokens", "0"),
    "drafter": lambda t: S("--drafter", "swift"),  # not a model-free drafter
}


SERVE_BENCH_SWEEP = {
    "trace": lambda t: ["serve-bench", "--trace", os.path.join(t, "missing.jsonl")],
    "requests": lambda t: ["serve-bench", "--requests", "0"],
    "rate": lambda t: ["serve-bench", "--rate", "0"],
    "prompt_lens": lambda t: ["serve-bench", "--prompt-lens", "8,x"],
    "output_lens": lambda t: ["serve-bench", "--output-lens", "0"],
    "seed": lambda t: ["serve-bench", "--seed", str(2 ** 64)],
    "model": lambda t: ["serve-bench", "--model", os.path.join(t, "missing.gguf")],
    "weights": lambda t: ["serve-bench", "--weights", "int3"],
    "slots": lambda t: ["serve-bench", "--slots", "0"],
    "cache_size": lambda t: ["serve-bench", "--cache-size", "64"],
    "prefill_chunk_tokens": lambda t: ["serve-bench", "--prefill-chunk-tokens", "0"],
    "drafter": lambda t: ["serve-bench", "--drafter", "oracle"],
    "out": lambda t: ["serve-bench", "--out", os.path.join(t, "no", "such", "out.json")],
}


def test_every_serve_bench_flag_out_of_range_exits_2(capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    actions = [a for a in cli.build_parser().serve_bench_parser._actions if a.dest != "help"]
    missing = sorted(a.dest for a in actions if a.dest not in SERVE_BENCH_SWEEP)
    assert not missing, f"add an out-of-range value for these new flags to SERVE_BENCH_SWEEP: {missing}"
    for a in actions:
        check_bad(capsys, SERVE_BENCH_SWEEP[a.dest](str(tmp_path)), a.option_strings[-1])


def test_every_serve_flag_out_of_range_exits_2(capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    actions = [a for a in cli.build_parser().serve_parser._actions if a.dest != "help"]
    missing = sorted(a.dest for a in actions if a.dest not in SERVE_SWEEP)
    assert not missing, f"add an out-of-range value for these new flags to SERVE_SWEEP: {missing}"
    for a in actions:
        check_bad(capsys, SERVE_SWEEP[a.dest](str(tmp_path)), a.option_strings[-1])
    check_bad(capsys, S("--max-tokens-limit", "512", "--cache-size", "256"), "--max-tokens-limit", "--cache-size")


# --------------------------------------------------------------------------- API
class _StubModel:
    vocab_size = 100
    eos_ids = (0,)
    num_layers = 2


def test_api_token_ids_must_be_integers():
    from jaxdec.core.generate import generate
    m = _StubModel()
    with pytest.raises(TypeError, match=r"prompts\[0\].*float64.*integers"):
        generate(m, None, [np.array([50.7, 35.2])])
    with pytest.raises(TypeError, match=r"prompts\[1\].*non-integer token id 3.5"):
        generate(m, None, [[1, 2], [3.5, 4]])
    with pytest.raises(TypeError, match=r"prompts\[0\].*str"):
        generate(m, None, ["hello"])
    with pytest.raises(TypeError, match=r"prompts\[0\].*bool"):
        generate(m, None, [[True, 2]])
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        generate(m, None, [[1, 200]])


def test_api_seed_is_checked_by_name():
    from jaxdec.core.generate import row_keys
    with pytest.raises(TypeError, match="seed"):
        row_keys("abc", 1, 1)
    with pytest.raises(TypeError, match="seed"):
        row_keys(1.5, 1, 1)
    with pytest.raises(ValueError, match="seed"):
        row_keys(99999999999999999999, 1, 1)
    assert row_keys(np.int64(3), 1, 1).shape == (1, 2)


def test_api_seed_abc_in_generate():
    from jaxdec.core.generate import generate
    loaded = cli.load_model("smollm2-135m", "f32")  # the CLI's cached model, shared with the CLI runs below
    with pytest.raises(TypeError, match="seed"):
        generate(loaded.model, loaded.params, [[1, 2, 3]], method="sample", seed="abc", max_new_tokens=2)


def test_api_beam_decoder_through_generate_names_the_argument():
    from jaxdec.core.generate import generate
    from jaxdec.search.beam import BeamSearch
    with pytest.raises(ValueError, match="decoder=BeamSearch.*beam_search"):
        generate(_StubModel(), None, [[1, 2]], decoder=BeamSearch(num_beams=4), n=2)


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_api_stop_strings_plain_str_is_one_stop_string():
    from jaxdec.core.stopping import StopStringChecker, truncate_at_stop
    c = StopStringChecker(_CharTokenizer(), "answer")
    assert c.stop_strings == ("answer",)
    tail = np.array([[ord(x) for x in "a cat"] + [-1], [ord(x) for x in "answer"]])
    assert c(tail, None).tolist() == [False, True]  # a plain "a" no longer stops the row
    assert truncate_at_stop("the answer is 4", "answer") == "the answer"
    with pytest.raises(TypeError, match=r"stop_strings\[1\]"):
        StopStringChecker(_CharTokenizer(), ["ok", 3])
    with pytest.raises(ValueError, match=r"stop_strings\[0\].*empty"):
        StopStringChecker(_CharTokenizer(), [""])
    with pytest.raises(TypeError, match="stop_strings"):
        StopStringChecker(_CharTokenizer(), b"answer")


# --------------------------------------------------------------------------- files that are not models
@pytest.fixture(scope="module")
def truncated_ggufs(tmp_path_factory, gguf_path):
    d = tmp_path_factory.mktemp("gguf")
    size = os.path.getsize(gguf_path)
    out = []
    with open(gguf_path, "rb") as f:
        for cut in (64, 5000, 10_000_000, size - 100):
            f.seek(0)
            p = d / f"cut{cut}.gguf"
            p.write_bytes(f.read(cut))
            out.append(str(p))
    return out


def test_truncated_gguf_api_and_cli(truncated_ggufs, capsys):
    """Cut in the header, in the metadata, in the tensor table and 100 bytes short of the end (the gguf
    reader parses the whole vocabulary first: ~5 s for the two long files)."""
    import jaxdec
    for p in truncated_ggufs[:3]:
        with pytest.raises(ValueError, match="truncated or corrupt"):
            jaxdec.load(p)
    check_bad(capsys, G("--model", truncated_ggufs[3]), "--model", "truncated or corrupt")
    check_bad(capsys, ["demo", "--model", truncated_ggufs[0]], "--model", "truncated or corrupt")


def _tiny_gguf(path, value):
    from gguf import GGUFWriter
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("test.value", value)
    w.add_tensor("t", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_reader_reused_only_for_an_unchanged_file(tmp_path):
    """open_gguf keeps the parsed reader of an unchanged file (one parse for f32 + q + tokenizer), but a
    file rewritten in place (new content, or cut short) is parsed again: never a stale reader."""
    from jaxdec.models.gguf_loader import field, open_gguf
    p = tmp_path / "tiny.gguf"
    _tiny_gguf(p, 1)
    r1 = open_gguf(str(p))
    assert open_gguf(str(p)) is r1 and field(r1, "test.value") == 1
    _tiny_gguf(p, 22)
    os.utime(p, ns=(0, os.stat(p).st_mtime_ns + 1_000_000))  # a new mtime even on coarse clocks
    r2 = open_gguf(str(p))
    assert r2 is not r1 and field(r2, "test.value") == 22
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        open_gguf(str(p))


# --------------------------------------------------------------------------- runs with the model
PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three."]


@pytest.fixture(scope="module")
def pfile(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in PROMPTS))
    return str(p)


def test_out_written_through_partial_and_batches_match_one_call(pfile, tmp_path, capsys):
    """--batch-size runs decode (and write) batch by batch; sampled rows equal one API call's rows."""
    import jaxdec
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    rc = cli.main(["generate", "--prompts-file", pfile, "--method", "sample", "--n", "2", "--batch-size", "2",
                   "--seed", "5", "--temperature", "0.8", "--max-new-tokens", "5", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert not os.path.exists(str(out) + ".partial")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 * len(PROMPTS)
    loaded = cli.load_model("smollm2-135m", "f32")  # the CLI's cached model
    ids = [loaded.tokenizer.encode(q) for q in PROMPTS]
    g = jaxdec.generate(loaded.model, loaded.params, ids, method="sample", n=2, seed=5, batch_size=2,
                        sampling={"temperature": 0.8}, max_new_tokens=5)
    assert [r["tokens"] for r in rows] == g.tokens


def test_bad_value_found_after_load_names_the_flag(capsys):
    check_bad(capsys, G("--method", "entropy-adaptive", "--ead-small-layers", "99"), "--ead-small-layers")
    check_bad(capsys, G("--method", "speculative", "--drafter", "del", "--exit-layer", "99"), "--exit-layer")


def _default_sigint():
    """In the child before exec: SIGINT back to its default. A test runner started in the background by a
    non-interactive shell inherits SIGINT ignored (POSIX), and Python then installs no KeyboardInterrupt
    handler: the CLI would never see the signal (it ran to the end, or past the timeout, that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_keeps_previous_out_and_finished_rows(tmp_path):
    """Ctrl-C mid-run: one stderr line, exit 130, OUT untouched, finished rows in OUT.partial.
    (--n 2 sampling with --quiet also checks that no XLA log line reaches stderr.)"""
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt": f"Write a long story about the number {i}."}) + "\n"
                          for i in range(40)))
    out = tmp_path / "out.jsonl"
    out.write_text("previous run\n")
    partial = tmp_path / "out.jsonl.partial"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "jaxdec.cli", "generate", "--prompts-file", str(pf), "--method",
                             "sample", "--n", "2", "--batch-size", "2", "--max-new-tokens", "12", "--quiet",
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and len(partial.read_text().splitlines()) >= 4:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("jaxdec: interrupted"), err[-3000:]
    assert "out.jsonl.partial" in lines[0]
    assert out.read_text() == "previous run\n"
    rows = [json.loads(l) for l in partial.read_text().splitlines()]
    assert 4 <= len(rows) < 80 and all(r["tokens"] for r in rows)


def test_constraint_files_and_prompt_fields(capsys, no_model_load, tmp_path):
    """Constraint files and per-row prompts-file fields are checked before the model loads."""
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "objekt"}')
    check_bad(capsys, G("--json-schema", str(schema)), "--json-schema", "invalid JSON schema", "objekt")
    schema.write_text("{not json")
    check_bad(capsys, G("--json-schema", str(schema)), "--json-schema", "not valid JSON")
    gram = tmp_path / "g.lark"
    gram.write_text("start: a\na: b\n")
    check_bad(capsys, G("--grammar", str(gram)), "--grammar", "invalid Lark grammar", "unknown name")
    check_bad(capsys, G("--grammar", str(gram), "--constraint-engine", "outlines"), "--grammar", "llguidance")
    p = _prompts_file(tmp_path, b'{"prompt": "a", "regex": "[0-9]"}\n{"prompt": "b", "regex": "(x"}\n')
    check_bad(capsys, ["generate", "--prompts-file", p], "--prompts-file line 2 (regex)", "invalid regex")
    p = _prompts_file(tmp_path, b'{"prompt": "a", "regex": "[0-9]", "choices": ["x"]}\n')
    check_bad(capsys, ["generate", "--prompts-file", p], "--prompts-file line 1", "at most one of")
    p = _prompts_file(tmp_path, b'{"prompt": "a", "json_schema": {"type": 3}}\n')
    check_bad(capsys, ["generate", "--prompts-file", p], "--prompts-file line 1 (json_schema)", "invalid JSON schema")
    p = _prompts_file(tmp_path, b'{"prompt": "a", "choices": []}\n')
    check_bad(capsys, ["generate", "--prompts-file", p], "--prompts-file line 1 (choices)", "non-empty")
