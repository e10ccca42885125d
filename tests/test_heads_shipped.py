"""The Medusa and EAGLE heads shipped for the default model (issue 15), through greedy verification.

* provenance: each file records the default model's fingerprint, the command, data size, commit and wall
  time that made it, and stays under 20 MB; `methods.medusa/eagle` find it by name;
* lossless: tokens equal plain greedy (q weights, the weights the heads were trained against) on 16
  held-out prompts (10 chat, 6 copy-heavy: jaxdec/data/prompts/heads_heldout.jsonl, never in the training
  corpus) at batch 1 and in ragged batches of 8 (DESIGN's near-tie rule);
* useful: τ of the shipped heads above the same decoder's with untrained (freshly initialised) heads, on
  the held-out prompts (the heads' default: the calibrated chain) and on the committed "should help"
  prompts (tests/data/heldout_tau_prompts.jsonl), where issue 15's bar τ > 1.5 is asserted with each head's
  draft tree chosen on the held-out prompts (`TAU_CONFIG`), its tokens equal to greedy's there too;
* the CLI finds the shipped heads with no --heads flag, and its JSONL stats carry τ and per-position
  acceptance.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import neartie  # noqa: E402
from selfref import lazy_block_vs_step_dlogit, lazy_teacher_logits  # noqa: E402
from test_speculative import assert_accepts_and_rejects, heldout_prompt_ids  # noqa: E402

import jaxdec  # noqa: E402
from jaxdec.cache.kv import bucket  # noqa: E402
from jaxdec.speculative import methods as M  # noqa: E402
from jaxdec.speculative.heads import shipped_heads  # noqa: E402
from jaxdec.speculative.heads.artefact import read_heads, target_fingerprint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(ROOT, "jaxdec", "data", "prompts", "heads_heldout.jsonl")
KINDS = ("medusa", "eagle")
MAX_NEW = 32


def heldout_target(model_q, gguf_path, max_new=MAX_NEW) -> dict:
    """The default model (q weights), the 16 held-out prompts and their greedy reference: what every shipped
    drafter's slow tests check against ("path" and "gguf": the model file)."""
    model, params = model_q
    with open(HELDOUT) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    from peer import peer_chat_ids, peer_tokenizer
    tok = peer_tokenizer()

    def ids(r):
        return peer_chat_ids(r["prompt"]) if r["kind"] == "chat" else tok(r["prompt"], add_special_tokens=False)["input_ids"]
    chat = [ids(r) for r in rows if r["group"] == "chat"][:10]
    copy = [ids(r) for r in rows if r["group"] == "copy"][:6]
    # interleaved, so each batch of 8 holds short chat turns and longer copy prompts (>= 2 length buckets)
    prompts = [p for i in range(10) for p in ([chat[i]] + ([copy[i]] if i < len(copy) else []))]
    ref = jaxdec.generate(model, params, prompts, max_new_tokens=max_new, batch_size=8)
    return {"model": model, "params": params, "prompts": prompts, "ref": ref, "path": gguf_path, "gguf": gguf_path,
            "logits": lazy_teacher_logits(model, params, prompts, ref.tokens),
            "dlogit": lazy_block_vs_step_dlogit(model, params, prompts[0], 16)}


@pytest.fixture(scope="module")
def target(model_q, gguf_path):
    return heldout_target(model_q, gguf_path)


# The draft configuration issue 15's bar (τ > 1.5 on the should-help prompts) is asserted with: per head, the
# highest τ on the 16 held-out prompts among trees of at most 16 nodes (experiments/heads_tau_configs.py ->
# experiments/results/heads_tau_configs.md; none was chosen on the should-help prompts). The heads' default, the
# chain of 1 their calibration chose as the fastest on this CPU, reaches 1.28 (Medusa) and 1.24 (EAGLE) there.
TAU_CONFIG = {"medusa": {"tree": (5, 2)}, "eagle": {"num_tokens": 4, "tree_topk": 4, "tree_nodes": 16}}


def _decoder(t, kind, heads=None, **kw):
    if "tree" in kw:
        from jaxdec.speculative.tree import TreeSpec
        kw["tree"] = TreeSpec.from_widths(kw["tree"])
    return getattr(M, kind)(t["model"], t["params"], heads or shipped_heads(kind, "smollm2-135m"), target=t["path"],
                            **kw)


def assert_greedy_on_should_help(t, should_help, out, name: str) -> None:
    """``out`` (a `generate` result on ``should_help["prompts"]``) holds the greedy reference's tokens (DESIGN's
    near-tie rule)."""
    neartie.assert_sequences_match(
        [(f"{name}, should-help prompt {i}", o, r, lg) for i, (o, r, lg) in
         enumerate(zip(out.tokens, should_help["ref"].tokens, should_help["logits"]))], t["dlogit"])


@pytest.fixture(scope="module")
def should_help(target):
    """The should-help prompts with their greedy reference and teacher logits (for DESIGN's near-tie rule)."""
    prompts = heldout_prompt_ids()
    ref = jaxdec.generate(target["model"], target["params"], prompts, max_new_tokens=MAX_NEW, batch_size=8)
    return {"prompts": prompts, "ref": ref,
            "logits": lazy_teacher_logits(target["model"], target["params"], prompts, ref.tokens)}


def shipped_provenance(kind: str, script: str, gguf_path: str):
    """The file shipped for the default model under ``kind``: present, <= 20 MB, made for this model (its
    fingerprint) by ``python -m <script>`` on > 10k corpus tokens, with steps, wall time and commit. -> (params,
    meta)."""
    path = shipped_heads(kind, "smollm2-135m")
    assert path is not None, f"no {kind} file shipped (make heads)"
    assert os.path.getsize(path) <= 20 * 2**20
    hp, meta = read_heads(path, kind)
    assert meta["fingerprint"] == target_fingerprint(gguf_path)
    assert meta["command"].startswith(f"python -m {script}")
    assert meta["data_tokens"] > 10_000 and meta["steps"] > 0 and meta["wall_s"] > 0 and len(meta["commit"]) >= 40
    return hp, meta


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_file_provenance_and_size(kind, gguf_path):
    shipped_provenance(kind, f"train.{kind}", gguf_path)


def assert_lossless_batch8_and_batch1(t, dec, params, name: str, max_new: int = MAX_NEW) -> None:
    """A shipped drafter's decoder on `heldout_target`'s prompts: the greedy reference's tokens (DESIGN's
    near-tie rule) in ragged batches of 8 and at batch 1, with drafts both accepted and rejected."""
    assert len(t["prompts"]) >= 16 and len({bucket(len(p)) for p in t["prompts"]}) >= 2  # ragged batches of 8
    pairs = []
    for bs in (8, 1):
        out = jaxdec.generate(t["model"], params, t["prompts"], decoder=dec, max_new_tokens=max_new, batch_size=bs)
        pairs += [(f"{name} b{bs} prompt {i}", o, r, lg) for i, (o, r, lg) in
                  enumerate(zip(out.tokens, t["ref"].tokens, t["logits"]))]
        assert_accepts_and_rejects(out.stats, f"{name} b{bs}")
    neartie.assert_sequences_match(pairs, t["dlogit"])


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_heads_lossless_batch1_and_ragged_batch8(target, kind):
    assert_lossless_batch8_and_batch1(target, *_decoder(target, kind), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_heads_beat_untrained_heads(target, should_help, kind):
    """τ of the shipped heads against the same decoder with freshly initialised heads (the negative
    control: an untrained Medusa head repeats the target's next token, an untrained EAGLE layer is
    random): with the heads' default draft on 8 of the held-out prompts, and with `TAU_CONFIG`'s tree on
    the committed should-help prompts, where issue 15's τ > 1.5 is asserted and the tree's tokens must
    equal greedy's (DESIGN's near-tie rule)."""
    from jaxdec.speculative.heads import eagle as E, medusa as Md
    t = target
    path = shipped_heads(kind, "smollm2-135m")
    if kind == "medusa":
        cfg, _, _, d2t = Md.load_medusa(path, None)
        untrained = (cfg, Md.init_params(cfg, 1)) + ((d2t,) if d2t is not None else ())
    else:
        cfg, _, _, d2t = E.load_eagle(path, None)
        untrained = (cfg, E.init_params(cfg, 1), d2t)
    taus = {}
    for set_name, prompts, kw in (("held-out", t["prompts"][:8], {}),
                                  ("should-help", should_help["prompts"], TAU_CONFIG[kind])):
        for name, heads in (("shipped", path), ("untrained", untrained)):
            dec, params = _decoder(t, kind, heads, **kw)
            out = jaxdec.generate(t["model"], params, prompts, decoder=dec, max_new_tokens=MAX_NEW, batch_size=8)
            taus[set_name, name] = out.stats["tau"]
            if set_name == "should-help" and name == "shipped":
                assert_greedy_on_should_help(t, should_help, out, f"{kind} tree")
    print(f"{kind} τ: {taus}")
    for set_name in ("held-out", "should-help"):
        assert taus[set_name, "shipped"] > taus[set_name, "untrained"] + 0.1, taus
    assert taus["held-out", "shipped"] > 1.1, taus
    assert taus["should-help", "shipped"] > 1.5, taus


def test_cli_finds_shipped_heads_and_reports_tau(tmp_path):
    """`--drafter medusa|eagle|s2d|clover|hidden-transfer|ppd|lud|longspec` and `--stop-head` with no path: the shipped files; stats carry τ
    and per-position acceptance, and the tokens are the CLI's greedy tokens."""
    from jaxdec.cli import main
    common = ["--chat", "--quiet", "--weights", "q", "--max-new-tokens", "16",
              "--prompt", "Repeat exactly: one two three four five six seven eight nine ten."]
    ref = str(tmp_path / "g.jsonl")
    assert main(["generate", "--method", "greedy", *common, "--out", ref]) == 0
    # issue 16's shipped files by name too: the S2D draft at its shallow exit, Clover, and the draft-model drafter
    # stopped by the SpecDec++ head (trained on that distilled draft's deepest exit; its recorded draft)
    runs = [(kind, [kind]) for kind in KINDS] + [("s2d", ["s2d", "--draft-depth", "1"]), ("clover", ["clover"]),
                                                 ("stop-head", ["draft-model", "--stop-head"])]
    # session 12's: hidden transfer, PPD's prompt tokens, lexical units and the LongSpec draft (issues 16, 21)
    runs += [(d, [d]) for d in ("hidden-transfer", "ppd", "lud", "longspec")]
    for kind, drafter in runs:
        out = str(tmp_path / f"{kind}.jsonl")
        assert main(["generate", "--method", "speculative", "--drafter", *drafter, *common, "--out", out]) == 0
        (rec,) = [json.loads(x) for x in open(out)]
        st = rec["stats"]
        assert st["tau"] >= 1.0 and len(st["acceptance_per_position"]) >= 1 and st["target_calls"] >= 1, st
        assert rec["tokens"] == json.loads(open(ref).read())["tokens"], kind
