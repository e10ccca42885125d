"""`jaxdec generate --method speculative --drafter rapid` (RAPID through the CLI) and its shipped long prompts.

* Tiny random Llama as an HF folder (tests/scripts/tiny_llama.py, byte-level tokenizer): long prompt texts
  whose last paragraph is the question; the CLI's RAPID rows equal plain greedy's rows (DESIGN near-tie
  rule, the reference's logits from a teacher-forced forward), in one ragged batch and at batch size 1,
  with τ > 1 and some draft rejected. Negative controls: the retrieval-augmented target
  (``--rapid-augment``, lossy) changes tokens and the same comparison rejects it; a drafter that never
  proposes fails the τ check.
* Default model: the two "ci" prompts of jaxdec/data/prompts/rapid_heldout.jsonl (standard-library
  sources, ~1k tokens) through the CLI with ``--chat``: exactly greedy's tokens (near-tie rule), τ > 1.
  The held-out 2k-6k-token prompts of the same file are the experiment's (experiments/seed_methods_table.py).
* Bad input: one ``jaxdec: error:`` line naming the flag, exit code 2.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "scripts"))

import neartie  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402
from test_bad_input import G, check_bad, no_model_load  # noqa: E402,F401  (fixture)

import jaxdec.cli as cli  # noqa: E402
from jaxdec.speculative.rapid import draft_text, heldout_prompts, split_question  # noqa: E402

WORDS = ("alpha beta gamma delta river stone cloud paper orange copper silver garden window signal "
         "market planet forest ladder pocket mirror").split()


def tiny_long_texts(count=3, seed=0):
    """Long prompt texts for the tiny model: numbered lines of words (one naming a 'key'), a blank line,
    then the question about that key (ASCII, 300-440 bytes: within the tiny model's 512 positions)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        key = f"zeta{i}"
        lines = [f"{j}: " + " ".join(rng.choice(WORDS, 4)) for j in range(10 + i)]
        lines[3 + i] += f" {key} opens the gate"
        out.append("Notes:\n" + "\n".join(lines) + f"\n\nQuestion: what does {key} open?")
    return out


def run_cli(capsys, argv):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    return cap


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_drafted(stats, label=""):
    """τ > 1 and some draft token rejected (acceptance below 1 at some depth): a drafter that never proposes
    fails the first part."""
    assert stats["tau"] > 1.0 and stats["draft_calls"] > 0, (label, "no draft token accepted", stats["tau"])
    assert min(stats["acceptance_per_position"]) < 1.0, (label, "no draft token rejected", stats)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llama import write_hf_folder
    import jaxdec
    d = tmp_path_factory.mktemp("rapid_tiny")
    folder = write_hf_folder(str(d / "tiny"))
    texts = tiny_long_texts()
    pf = d / "long.jsonl"
    pf.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    loaded = jaxdec.load(folder)
    return {"dir": d, "folder": folder, "prompts": str(pf), "texts": texts, "model": loaded.model,
            "params": loaded.params}


def _tiny_argv(t, out, *extra):
    return ["generate", "--model", t["folder"], "--prompts-file", t["prompts"], "--max-new-tokens", "24",
            "--quiet", "--out", str(out), *extra]


RAPID = ("--method", "speculative", "--drafter", "rapid", "--draft-tokens", "4", "--rapid-chunks", "2",
         "--rapid-chunk-chars", "60")


def test_tiny_cli_rapid_equals_greedy(tiny, capsys):
    t = tiny
    lens = [len(x.encode()) for x in t["texts"]]
    assert all(300 <= n <= 440 for n in lens) and len(set(lens)) == len(lens), lens  # long for the toy, ragged
    ref_path, rap_path = t["dir"] / "greedy.jsonl", t["dir"] / "rapid.jsonl"
    run_cli(capsys, _tiny_argv(t, ref_path))
    ref = read_rows(ref_path)
    logits = lazy_teacher_logits(t["model"], t["params"], [r["prompt_ids"] for r in ref], [r["tokens"] for r in ref])
    dlogit = lazy_block_vs_step_dlogit(t["model"], t["params"], ref[0]["prompt_ids"], 16)
    for extra in ((), ("--batch-size", "1")):
        run_cli(capsys, _tiny_argv(t, rap_path, *RAPID, *extra))
        rows = read_rows(rap_path)
        assert [r["prompt_ids"] for r in rows] == [r["prompt_ids"] for r in ref]
        neartie.assert_sequences_match([(f"tiny rapid {extra} prompt {i}", r["tokens"], q["tokens"], lg)
                                        for i, (r, q, lg) in enumerate(zip(rows, ref, logits))], dlogit)
        st = rows[0]["stats"]
        with capsys.disabled():
            print(f"tiny CLI RAPID {extra}: τ {st['tau']:.3f}, acceptance {st['acceptance_per_position']}, "
                  f"drafts {st['draft_prompt_tokens']} of {[len(r['prompt_ids']) for r in rows]} tokens")
        assert_drafted(st, f"tiny rapid {extra}")
        assert st["drafter"] == "rapid" and st["lossless"] is True
        # the draft read the retrieved chunks, not the whole prompt
        assert all(d < len(r["prompt_ids"]) * 0.75 for d, r in zip(st["draft_prompt_tokens"], rows)), st
    # negative control 1: the retrieval-augmented target (lossy) changes tokens, and the comparison says so
    aug = t["dir"] / "aug.jsonl"
    run_cli(capsys, _tiny_argv(t, aug, *RAPID, "--rapid-augment", "60"))
    rows = read_rows(aug)
    assert rows[0]["stats"]["lossless"] is False
    with pytest.raises(AssertionError, match="not excused"):
        neartie.assert_sequences_match([(f"augmented {i}", r["tokens"], q["tokens"], lg)
                                        for i, (r, q, lg) in enumerate(zip(rows, ref, logits))], lambda: 0.0)


def test_tiny_silent_drafter_fails_the_tau_check(tiny):
    """Negative control of `assert_drafted`: a drafter that never proposes (τ = 1) fails it."""
    from test_speculative import SilentDrafter

    from jaxdec import generate
    from jaxdec.speculative import SpeculativeDecoder
    ids = [list(t.encode()) for t in tiny["texts"]]
    g = generate(tiny["model"], tiny["params"], ids, decoder=SpeculativeDecoder(SilentDrafter()), max_new_tokens=8)
    assert g.stats["tau"] == 1.0
    with pytest.raises(AssertionError, match="no draft token accepted"):
        assert_drafted({**g.stats, "draft_calls": g.stats.get("draft_calls", 0)})


def test_draft_text_and_split():
    text = tiny_long_texts(1)[0]
    body, q = split_question(text)
    assert q == "Question: what does zeta0 open?" and body.startswith("Notes:") and text == body + "\n\n" + q
    d = draft_text(text, k=2, chunk_chars=60)
    assert d.endswith("\n\n" + q) and "zeta0 opens the gate" in d and len(d) < len(text) // 2
    for bad in ("no blank line here", "\n\nonly a question", "body only\n\n  \n"):
        with pytest.raises(ValueError, match="last paragraph"):
            split_question(bad)


def test_shipped_prompts():
    rows = heldout_prompts(None)
    assert {r["split"] for r in rows} == {"ci", "heldout"}
    held = heldout_prompts()
    assert len(held) >= 10 and len({r["module"] for r in held}) == len(held)
    for r in rows:
        body, q = split_question(r["prompt"])
        assert q.startswith("Question: " + r["question"]) and r["module"] in body.splitlines()[0]
    # held out from the tests' CI pair and from tests/data/rapid_long_prompts.jsonl's ci split
    assert not {r["module"] for r in held} & {r["module"] for r in heldout_prompts("ci")}


def test_bad_input(capsys, no_model_load, tmp_path):
    R = ("--method", "speculative", "--drafter", "rapid")
    check_bad(capsys, G(*R, "--rapid-chunks", "0"), "--rapid-chunks")
    check_bad(capsys, G(*R, "--rapid-chunk-chars", "-5"), "--rapid-chunk-chars")
    check_bad(capsys, G(*R, "--rapid-augment", "-1"), "--rapid-augment")
    check_bad(capsys, G(*R, "--rapid-augment", "nan"), "--rapid-augment")
    check_bad(capsys, G(*R, "--rapid-alpha", "1.5"), "--rapid-alpha")
    check_bad(capsys, G(*R, "--rapid-alpha", "0.5"), "--rapid-alpha", "--rapid-augment")
    check_bad(capsys, G(*R, "--rapid-augment", "1", "--spec-sampling"), "--rapid-augment", "--spec-sampling")
    check_bad(capsys, G(*R, "--regex", "[0-9]+"), "--regex", "rapid")
    check_bad(capsys, G("--method", "speculative", "--drafter", "pld", "--rapid-chunks", "2"), "--rapid-chunks",
              "--drafter rapid")
    check_bad(capsys, G("--method", "speculative", "--drafter", "rapid", "--mesh", "1x1"), "--mesh", "rapid")


def test_bad_input_after_load(tiny, capsys, tmp_path):
    """A prompt without a question paragraph, and a long prompt beyond the model's context: one line, exit 2."""
    t = tiny
    pf = tmp_path / "p.jsonl"
    pf.write_text(json.dumps({"prompt": t["texts"][0]}) + "\n" + json.dumps({"prompt": "one paragraph only"}) + "\n")
    base = ["generate", "--model", t["folder"], "--prompts-file", str(pf), "--max-new-tokens", "8", *RAPID]
    check_bad(capsys, base, "--drafter rapid, prompt 2", "last paragraph")
    long = "x\n" * 300 + "\n\nQuestion: why?"
    pf.write_text(json.dumps({"prompt": long}) + "\n")
    check_bad(capsys, base[:-len(RAPID)] + list(RAPID) + ["--max-new-tokens", "16"], "--max-new-tokens", "context")


@pytest.mark.slow  # ~2 min of two 1k-token prompts: the acceptance tier; CI keeps the tiny-model CLI checks
def test_default_model_cli_rapid_equals_greedy(model_f32, tmp_path, capsys):
    """The two ~1k-token "ci" prompts of the shipped set (chat template), 16 new tokens, one ragged batch."""
    model, params = model_f32
    rows = heldout_prompts("ci")
    pf = tmp_path / "ci.jsonl"
    pf.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    base = ["generate", "--prompts-file", str(pf), "--chat", "--max-new-tokens", "16", "--quiet"]
    run_cli(capsys, base + ["--out", str(tmp_path / "g.jsonl")])
    ref = read_rows(tmp_path / "g.jsonl")
    lens = [len(r["prompt_ids"]) for r in ref]
    assert all(900 <= n <= 1200 for n in lens) and len(set(lens)) == 2, lens
    run_cli(capsys, base + ["--out", str(tmp_path / "r.jsonl"), "--method", "speculative", "--drafter", "rapid",
                            "--rapid-chunks", "2"])
    out = read_rows(tmp_path / "r.jsonl")
    logits = lazy_teacher_logits(model, params, [r["prompt_ids"] for r in ref], [r["tokens"] for r in ref])
    neartie.assert_sequences_match([(f"default rapid prompt {i}", r["tokens"], q["tokens"], lg)
                                    for i, (r, q, lg) in enumerate(zip(out, ref, logits))],
                                   lazy_block_vs_step_dlogit(model, params, ref[0]["prompt_ids"], 16))
    st = out[0]["stats"]
    print(f"default-model CLI RAPID: prompts {lens} tokens, drafts {st['draft_prompt_tokens']}, τ {st['tau']:.3f}, "
          f"acceptance {st['acceptance_per_position']}")
    assert st["tau"] > 1.0 and st["draft_calls"] > 0
    assert all(d < n * 0.75 for d, n in zip(st["draft_prompt_tokens"], lens))
