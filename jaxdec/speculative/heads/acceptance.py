"""SpecDec++'s acceptance-prediction head and its stopping rule (Huang et al. 2024, "SpecDec++: Boosting
Speculative Decoding via Adaptive Candidate Lengths"; facts from the official code, Kaffaljidhmah2/SpecDec_pp).

The head reads the draft model's last (final-norm) hidden state and predicts the probability that the
draft token scored from it is accepted by the target. As in the paper it is a small ResNet: ``num_layers``
residual blocks ``x + SiLU(W x + b)`` on the hidden size, then a linear output. The paper's output is a
2-class softmax (reject, accept); one logit through a sigmoid is the same family and is used here. (The
official code builds its blocks as ``[ResBlock(h)] * n``, i.e. one block's weights repeated n times; the
blocks here have their own weights.)

Stopping rule (the paper's): a row stops drafting once the predicted probability that at least one of
its candidates is rejected, ``1 - prod_i p_accept_i``, exceeds ``threshold``. Alignment: the paper's head
reads the state *after* a draft token and is evaluated one draft call later, so the crossing token and
the next one are both proposed. Here the head reads the state that produces token i's logits (``feat_i``,
the same forward), so the decision for token i comes before it is proposed: token i joins the draft only
while ``1 - surv * p_i <= threshold`` (``surv`` = the product over the tokens already proposed), and the
first ``min_tokens`` tokens always join (the paper's lower bound). For a greedy draft the token is a
function of ``feat_i``, so the head loses no information; no draft call or verify slot is spent on a
token predicted to fail. The draft distribution is untouched: greedy verification stays lossless and
speculative sampling stays exact (the stop depends only on the draft's own states).

Training (``train/specdec_pp.py``): labels from the frozen target and draft on the corpus (teacher
forcing on the target's own text, so the context of position t is what a chain sees when every earlier
candidate was accepted): greedy verification: 1 if the draft's greedy token equals the target's greedy
token there, else 0; sampling: the paper's soft label ``min(1, p(x)/q(x))`` for a draft sample x. Loss:
the paper's weighted BCE, rejections weighted ``weight_mismatch`` (the paper uses 6), normalised by the
total weight: ``sum(w_rej (1-y) (-log(1-p)) + y (-log p)) / sum(w_rej (1-y) + y)``.

* `AcceptanceConfig`, `init_params`, `accept_logit` / `accept_prob` (the head).
* `stop_rule(surv, alive, p_accept, index, threshold, min_tokens)`: the generic rule any chain drafter
  with per-position draft features can apply (see `AcceptanceStop.advance`).
* `AcceptanceStop`: the hashable stop object `jaxdec.speculative.drafters.DraftModelDrafter(stop_head=)`
  takes; its params (`stop_params`: the head's weights and the traced threshold / min_tokens /
  lookahead) travel in the drafter's params: ``{"model": draft params, "stop": stop params}``.
* `load_acceptance(path, fingerprint)`, `build(model, params, heads, ...) -> (decoder, params)`.
* `eagle_stop(...)`: the stop and its params for `jaxdec.speculative.heads.eagle.EagleDrafter` (the head
  reads the EAGLE layer's output that scores each draft token; `jaxdec.speculative.methods.eagle(...,
  stop_head=)`); `drafter_stop(...)` the same for any drafter that names its draft by an id, e.g.
  `jaxdec.speculative.heads.clover.CloverDrafter` (the head reads each Clover head's regressive state;
  `jaxdec.speculative.methods.clover(..., stop_head=)`). A head records the draft it was trained on
  (``AcceptanceConfig.draft``: ``"layers:N"``, ``"draft_lm:..."``, ``"eagle:<sha256 of the EAGLE head's
  weights>"`` or ``"clover:<sha256 of the Clover heads' weights>"``, `jaxdec.speculative.heads.artefact.weights_id`) and
  is refused on any other.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

KIND = "specdec_pp"
EAGLE_PREFIX = "eagle:"  # AcceptanceConfig.draft of a head trained for an EAGLE head
# the shipped name of an acceptance head trained for the shipped EAGLE head (`shipped_heads(EAGLE_SHIPPED, model)`)
EAGLE_SHIPPED = "specdec_pp_eagle"
CLOVER_PREFIX = "clover:"  # ... and for Clover heads (`jaxdec.speculative.heads.clover.draft_id`)
CLOVER_SHIPPED = "specdec_pp_clover"
# the drafter (its --drafter name) each head-draft prefix belongs to, and the shipped acceptance-head name for it
HEAD_DRAFTERS = {EAGLE_PREFIX: ("eagle", EAGLE_SHIPPED), CLOVER_PREFIX: ("clover", CLOVER_SHIPPED)}
LABELS = ("greedy", "sampling")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"AcceptanceConfig.{name} must be an integer >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class AcceptanceConfig:
    """hidden: the draft model's hidden size E. num_layers: residual blocks (the paper's default 3).
    weight_mismatch: the BCE weight of rejected positions (training; the paper's 6). labels: "greedy" or
    "sampling" (what the head was trained to predict). draft: the draft model it was trained on
    (``"layers:N"``: the target's first N layers; ``"draft_lm:<sha256 of its file>[:depth]"``: a distilled
    draft; ``"eagle:<sha256>"``: an EAGLE head, `jaxdec.speculative.heads.eagle.draft_id`;
    ``"clover:<sha256>"``: Clover heads, `jaxdec.speculative.heads.clover.draft_id`; ``""``: unrecorded). draft_file: where that draft's heads file was (for `build`)."""

    hidden: int
    num_layers: int = 3
    weight_mismatch: float = 6.0
    labels: str = "greedy"
    draft: str = ""
    draft_file: str = ""

    def __post_init__(self):
        _int("hidden", self.hidden, 1)
        _int("num_layers", self.num_layers, 0)
        if not (isinstance(self.weight_mismatch, (int, float)) and math.isfinite(self.weight_mismatch)
                and self.weight_mismatch > 0):
            raise ValueError(f"AcceptanceConfig.weight_mismatch must be a finite number > 0, got {self.weight_mismatch!r}")
        if self.labels not in LABELS:
            raise ValueError(f"AcceptanceConfig.labels must be one of {LABELS}, got {self.labels!r}")
        if not isinstance(self.draft, str) or not isinstance(self.draft_file, str):
            raise ValueError("AcceptanceConfig.draft and draft_file must be strings")

    @property
    def draft_layers(self) -> Optional[int]:
        """N of ``draft="layers:N"``, else None."""
        if self.draft.startswith("layers:"):
            return int(self.draft.split(":", 1)[1])
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptanceConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names or "hidden" not in d:
            raise ValueError(f"specdec_pp config must be a dict with keys among {sorted(names)}, got {d!r}")
        return cls(**d)


def init_params(config: AcceptanceConfig, seed: int = 0) -> dict:
    """Blocks ``w [n,E,E]`` (PyTorch-Linear-like scale 1/sqrt(E)), ``b [n,E]``; outputs ``out_w [E,2]``,
    ``out_b [2]`` (a random, untrained head predicts noise around 0.5)."""
    e, n = config.hidden, config.num_layers
    k1, k2 = jax.random.split(jax.random.key(seed))
    s = 1.0 / np.sqrt(e)
    return {"w": jax.random.uniform(k1, (n, e, e), jnp.float32, -s, s), "b": jnp.zeros((n, e), jnp.float32),
            "out_w": jax.random.uniform(k2, (e, 2), jnp.float32, -s, s), "out_b": jnp.zeros((2,), jnp.float32)}


def accept_logits(params, feats):
    """``feats [..., E]`` draft hidden states -> logits ``[..., 2]``: [..., 0] "the draft token scored from
    this state is accepted" (the paper's head), [..., 1] "and the one after it is accepted too, given
    this one was" (the lookahead output, see `stop_rule`)."""
    x = feats.astype(jnp.float32)
    for i in range(params["w"].shape[0]):
        x = x + jax.nn.silu(jnp.einsum("...i,oi->...o", x, params["w"][i]) + params["b"][i])
    return jnp.einsum("...i,io->...o", x, params["out_w"]) + params["out_b"]


def accept_prob(params, feats):
    """``[..., 2]``: P(the draft token scored from ``feats`` is accepted), P(the next one is | this one is)."""
    return jax.nn.sigmoid(accept_logits(params, feats))


def weighted_bce(logit, label, mask, weight_mismatch: float):
    """The paper's loss: soft labels ``label`` in [0, 1] (1 = accepted), rejections weighted
    ``weight_mismatch``, normalised by the total weight of the ``mask``-ed positions."""
    m = mask.astype(jnp.float32)
    y = label.astype(jnp.float32)
    lp1 = jax.nn.log_sigmoid(logit)
    lp0 = jax.nn.log_sigmoid(-logit)
    num = jnp.sum(m * (weight_mismatch * (1.0 - y) * -lp0 + y * -lp1))
    den = jnp.sum(m * (weight_mismatch * (1.0 - y) + y))
    return num / jnp.maximum(den, 1e-9)


# --------------------------------------------------------------------------------------------------
# the stopping rule
# --------------------------------------------------------------------------------------------------

def stop_rule(surv, alive, p_accept, index, threshold, min_tokens=1, p_next=None, lookahead=True):
    """One draft position of the SpecDec++ rule, for any chain drafter (every argument may be traced).

    surv [B]: product of the predicted acceptance of the tokens proposed so far (1 at the start);
    alive [B]: the row still drafts; p_accept [B]: the prediction for the candidate at 0-based ``index``.
    Returns (surv', proposed [B], go_on [B]): the candidate is proposed while the row is alive and either
    ``index < min_tokens`` or ``1 - surv * p_accept <= threshold`` (a row that declines stops for good).
    go_on: whether to spend the next draft call. Without ``p_next`` (or with ``lookahead`` False) it is
    ``proposed`` (the paper's rule: draft while P(some rejection) stays under the threshold). With
    ``p_next [B]`` (the predicted acceptance of the next candidate given this one is accepted: the
    lookahead output) the row goes on only if that candidate is predicted to be proposable too,
    ``1 - surv' * p_next <= threshold`` (or ``index + 1 < min_tokens``), so no draft call is spent on a
    token the rule would then decline."""
    s = surv * p_accept.astype(jnp.float32)
    take = alive & ((index < min_tokens) | (1.0 - s <= threshold))
    go_on = take
    if p_next is not None:
        nxt = (index + 1 < min_tokens) | (1.0 - s * p_next.astype(jnp.float32) <= threshold)
        go_on = take & (nxt | ~jnp.asarray(lookahead, bool))
    return jnp.where(take, s, surv), take, go_on


def check_settings(threshold, min_tokens, lookahead) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or \
            not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if not isinstance(lookahead, (bool, np.bool_)):
        raise ValueError(f"lookahead must be True or False, got {lookahead!r}")


def stop_params(head_params, threshold: float = 0.7, min_tokens: int = 1, lookahead: bool = True) -> dict:
    """The stop's params: the head's weights and the rule's settings as traced scalars (changing the
    threshold, ``min_tokens`` or ``lookahead`` does not recompile): ``{"head", "threshold", "min_tokens",
    "lookahead"}``."""
    check_settings(threshold, min_tokens, lookahead)
    return {"head": head_params, "threshold": jnp.asarray(threshold, jnp.float32),
            "min_tokens": jnp.asarray(min_tokens, jnp.int32), "lookahead": jnp.asarray(bool(lookahead))}


@dataclasses.dataclass(frozen=True)
class AcceptanceStop:
    """The learned stop as a static, hashable object for a chain drafter; its params are `stop_params`.

    The drafter's loop calls ``advance(params, feat [B,E], surv, alive, index) -> (surv, proposed,
    go_on)`` once per draft position, with ``feat`` the draft model's final-norm hidden state that
    produced that position's logits; it proposes the token where ``proposed`` and makes the next draft
    call only for rows that ``go_on`` (see `stop_rule`). ``lookahead`` False is the paper's rule (go on
    while the token was proposed); True also reads the head's lookahead output and skips a draft call
    whose token would be declined (on a CPU a draft call is a large share of a target call)."""

    config: AcceptanceConfig

    def __post_init__(self):
        if not isinstance(self.config, AcceptanceConfig):
            raise TypeError(f"AcceptanceStop.config must be an AcceptanceConfig, got {type(self.config).__name__}")

    def p_accept(self, head_params, feat):
        """``[B, 2]``: see `accept_prob`."""
        return accept_prob(head_params, feat)

    def advance(self, params, feat, surv, alive, index):
        p = self.p_accept(params["head"], feat)
        return stop_rule(surv, alive, p[..., 0], index, params["threshold"], params["min_tokens"], p[..., 1],
                         params["lookahead"])

    def check_params(self, params, where: str = "stop head params") -> None:
        """Head weights (not the settings) of this config's shapes."""
        e, n = self.config.hidden, self.config.num_layers
        want = {"w": (n, e, e), "b": (n, e), "out_w": (e, 2), "out_b": (2,)}
        got = {k: tuple(np.shape(v)) for k, v in params.items()} if isinstance(params, dict) else None
        if got != want:
            raise ValueError(f"{where}: expected tensors {want} for {self.config}, got {got}")


# --------------------------------------------------------------------------------------------------
# loading and the decoder
# --------------------------------------------------------------------------------------------------

def load_acceptance(path: str, fingerprint: Optional[str]):
    """(AcceptanceConfig, head params as float32 jax arrays, metadata) from a heads file, refused with
    `HeadsMismatch` when it was trained for another target (``fingerprint=None`` skips the check)."""
    from jaxdec.speculative.heads.artefact import load_heads
    params, meta = load_heads(path, KIND, fingerprint)
    try:
        config = AcceptanceConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad {KIND} config in its metadata ({e})") from None
    AcceptanceStop(config).check_params(params, f"heads file {str(path)!r}")
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), meta


def _fingerprint(model, params, target):
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    return expected_fingerprint(model, params, target)


def file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def draft_from_file(model, params, path: str, target=None, depth: Optional[int] = None):
    """(draft model, draft params, draft id) of a distilled draft's heads file
    (`jaxdec.speculative.heads.draft_lm`), checked against the target."""
    from jaxdec.speculative.heads import draft_lm
    dec, p = draft_lm.build(model, params, path, target=target, depth=depth)
    dm = dec.drafter.draft_model
    return dm, p["draft"], f"draft_lm:{file_sha256(path)}:{dm.num_layers}"


def resolve_draft(model, params, config: Optional[AcceptanceConfig], draft_layers=None, draft=None, target=None):
    """(draft model, draft params) for a head: ``draft=(model, params)`` or a distilled draft's heads file
    path, else the target's first ``draft_layers`` layers, else the draft the head was trained on
    (``config.draft``), else half the target's layers. A draft other than the recorded one is refused."""
    from jaxdec.speculative.drafters import truncated_draft
    if draft is not None and draft_layers is not None:
        raise ValueError("give draft_layers or draft=(model, params), not both")
    rec = config.draft if config is not None else ""
    for prefix, (name, _) in HEAD_DRAFTERS.items():
        if rec.startswith(prefix):
            what = "an EAGLE head" if name == "eagle" else "Clover heads"
            raise ValueError(f"stop_head: the acceptance head was trained for {what} ({rec[:30]}...), not for a draft "
                             f"model: use jaxdec.speculative.methods.{name}(..., stop_head=) with those heads")
    if draft is None:
        if draft_layers is None:
            if rec.startswith("draft_lm:"):
                root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
                f = config.draft_file if os.path.isabs(config.draft_file) else os.path.join(root, config.draft_file)
                if not (config.draft_file and os.path.isfile(f)):
                    raise ValueError(f"draft: the acceptance head was trained on a distilled draft ({rec[:30]}...) "
                                     f"whose file {config.draft_file!r} is not here: pass draft=")
                dm, dp, did = draft_from_file(model, params, f, target, int(rec.rsplit(":", 1)[1]))
                if did != rec:
                    raise ValueError(f"draft: {config.draft_file!r} is not the draft the acceptance head was trained "
                                     f"on (file changed: {did[:40]}... vs {rec[:40]}...)")
                return dm, dp
            draft_layers = config.draft_layers if config is not None and config.draft_layers else model.num_layers // 2
        if isinstance(draft_layers, bool) or not isinstance(draft_layers, (int, np.integer)) or \
                not 1 <= draft_layers:
            raise ValueError(f"draft_layers must be an integer in [1, {model.num_layers}], got {draft_layers!r}")
        if rec.startswith("layers:") and int(draft_layers) != config.draft_layers:
            raise ValueError(f"draft_layers={draft_layers}: the acceptance head was trained on the target's first "
                             f"{config.draft_layers} layers ({rec!r}); its predictions do not transfer to another draft")
        if rec.startswith("draft_lm:"):
            raise ValueError(f"draft_layers={draft_layers}: the acceptance head was trained on a distilled draft "
                             f"({rec[:30]}...), not on the target's first layers")
        if draft_layers > model.num_layers:
            raise ValueError(f"draft_layers must be an integer in [1, {model.num_layers}], got {draft_layers!r}")
        return truncated_draft(model, params, int(draft_layers))
    if isinstance(draft, (str, os.PathLike)):
        dm, dp, did = draft_from_file(model, params, str(draft), target)
        if rec and rec != did:
            raise ValueError(f"draft: the acceptance head was trained on {rec[:40]}..., this draft is {did[:40]}...")
        return dm, dp
    if not (isinstance(draft, tuple) and len(draft) == 2):
        raise TypeError(f"draft must be a (model, params) pair or a draft_lm heads file, got {type(draft).__name__}")
    dm, dp = draft
    if dm.vocab_size != model.vocab_size:
        raise ValueError(f"draft model vocabulary ({dm.vocab_size}) differs from the target's ({model.vocab_size})")
    return dm, dp


def draft_hidden_size(dm, dp) -> int:
    """E of a draft model's hidden states (traced with `jax.eval_shape`, nothing compiled)."""
    out = jax.eval_shape(lambda p: dm(p, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                      dm.init_cache(1, 1)).hidden, dp)
    return int(out.shape[-1])


def build(model, params, heads, target=None, draft_layers: Optional[int] = None, draft=None, num_tokens: int = 8,
          threshold: float = 0.7, sampling: bool = False, min_tokens: int = 1, lookahead: bool = True):
    """-> (decoder, params): a draft-model chain of up to ``num_tokens`` that stops by the learned head.

    heads: a heads file written by ``train/specdec_pp.py`` (checked against the target like
    `jaxdec.speculative.methods.medusa`: ``target`` = the target's model file or folder, a fingerprint
    string, or None to fingerprint ``params``), or an in-memory ``(AcceptanceConfig, head params)`` pair.
    The draft (see `resolve_draft`) must be the one the head was trained on. threshold: stop once the
    predicted P(at least one rejection) would exceed it (larger: longer drafts). min_tokens: candidates
    always proposed (the paper's lower bound). lookahead: see `AcceptanceStop` (False: the paper's rule
    exactly as stated). sampling: the draft's
    tokens are drawn from its distribution and verified by speculative sampling (exact); otherwise greedy
    drafts and greedy verification (lossless)."""
    from jaxdec.speculative.drafters import DraftModelDrafter
    from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
    config, hp, _ = load_stop_head(model, params, heads, target)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    check_settings(threshold, min_tokens, lookahead)
    stop = AcceptanceStop(config)
    stop.check_params(hp, "heads")
    dm, dp = resolve_draft(model, params, config, draft_layers, draft, target)
    e = draft_hidden_size(dm, dp)
    if e != config.hidden:
        raise ValueError(f"heads: the acceptance head reads hidden size {config.hidden}, the draft model's is {e}")
    dec = SpeculativeDecoder(DraftModelDrafter(dm, int(num_tokens), sample=sampling, stop_head=stop),
                             "sampling" if sampling else "greedy")
    return dec, with_draft_params(params, {"model": dp, "stop": stop_params(hp, threshold, min_tokens, lookahead)})


def load_stop_head(model, params, heads, target=None, name: str = "heads"):
    """(AcceptanceConfig, head params, from a file?) of a heads file written by ``train/specdec_pp.py``
    (checked against the target) or an in-memory ``(AcceptanceConfig, params)`` pair."""
    if isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], AcceptanceConfig):
        return heads[0], heads[1], False
    if isinstance(heads, (str, os.PathLike)):
        config, hp, _ = load_acceptance(heads, _fingerprint(model, params, target))
        return config, hp, True
    raise TypeError(f"{name} must be a heads file path or an (AcceptanceConfig, params) pair, got "
                    f"{type(heads).__name__}")


def check_draft_record(config: AcceptanceConfig, want: str, what: str, from_file: bool = True,
                       name: str = "stop_head") -> None:
    """Refuse a head trained on another draft than ``want`` (the draft id it will stop). An in-memory head
    with no recorded draft (``draft=""``) is taken as given; a file must record the right one."""
    rec = config.draft
    if rec == want or (not rec and not from_file):
        return
    got = f"{rec[:46]}..." if rec else "an unrecorded draft"
    raise ValueError(f"{name}: the acceptance head was trained on {got}, not on {what} ({want[:46]}...): its "
                     f"predictions do not transfer to another draft; train one for it with python -m train.specdec_pp")


def heads_module(drafter: str):
    """(draft_id, load) of the heads a learned stop can stop by id: ``drafter`` "eagle" or "clover";
    ``load(path, fingerprint) -> (config, params, metadata, d2t)``, ``draft_id(config, params, d2t)``."""
    if drafter == "eagle":
        from jaxdec.speculative.heads.eagle import draft_id, load_eagle as load
    elif drafter == "clover":
        from jaxdec.speculative.heads.clover import draft_id, load_clover as load
    else:
        raise ValueError(f"drafter must be 'eagle' or 'clover', got {drafter!r}")
    return draft_id, load


def heads_draft_id(drafter: str, path: str) -> str:
    """The draft id (`jaxdec.speculative.heads.artefact.weights_id`) of an EAGLE or Clover heads file,
    without the target check."""
    draft_id, load = heads_module(drafter)
    cfg, hp, _, d2t = load(path, None)
    return draft_id(cfg, hp, d2t)


def check_file_for_drafter(path: str, drafter: str = "draft-model", heads: Optional[str] = None) -> None:
    """Before any model loads (the CLI): the head in ``path`` must have been trained for the drafter it will
    stop: ``drafter`` "eagle" or "clover" with its heads file ``heads``, or "draft-model" (then not for an
    EAGLE or Clover head). ValueError if not."""
    from jaxdec.speculative.heads.artefact import read_heads
    _, meta = read_heads(path, KIND)
    try:
        config = AcceptanceConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"heads file {str(path)!r}: bad {KIND} config in its metadata ({e})") from None
    if drafter == "draft-model":
        for prefix, (name, _) in HEAD_DRAFTERS.items():
            if config.draft.startswith(prefix):
                what = "an EAGLE head" if name == "eagle" else "Clover heads"
                raise ValueError(f"{str(path)!r} was trained for {what} ({config.draft[:30]}...), not for a draft "
                                 f"model: use it with --drafter {name}")
        return
    what = "the EAGLE head" if drafter == "eagle" else "the Clover heads"
    check_draft_record(config, heads_draft_id(drafter, heads), f"{what} {os.path.basename(str(heads))!r}",
                       name=repr(str(path)))


def drafter_stop(model, params, heads, hidden: int, want: str, what: str, feature: str, target=None,
                 threshold: float = 0.7, min_tokens: int = 1, lookahead: bool = True):
    """-> (AcceptanceStop, its params) for a drafter whose draft is named ``want`` (its draft id, e.g.
    `jaxdec.speculative.heads.clover.draft_id`; ``what`` names it in errors) and whose stop head reads
    ``feature`` of size ``hidden``. heads: as `load_stop_head`; it must have been trained for that draft."""
    config, hp, from_file = load_stop_head(model, params, heads, target, "stop_head")
    check_settings(threshold, min_tokens, lookahead)
    stop = AcceptanceStop(config)
    stop.check_params(hp, "stop_head")
    check_draft_record(config, want, what, from_file)
    if config.hidden != hidden:
        raise ValueError(f"stop_head: the acceptance head reads hidden size {config.hidden}, {feature} has {hidden}")
    return stop, stop_params(hp, threshold, min_tokens, lookahead)


def eagle_stop(model, params, heads, eagle_config, eagle_hp, d2t, target=None, threshold: float = 0.7,
               min_tokens: int = 1, lookahead: bool = True):
    """-> (AcceptanceStop, its params) for `jaxdec.speculative.heads.eagle.EagleDrafter(stop_head=)`.

    heads: as `load_stop_head`; it must have been trained for this EAGLE head (``config.draft`` =
    `jaxdec.speculative.heads.eagle.draft_id` of ``eagle_hp``/``d2t``) and read its hidden size."""
    from jaxdec.speculative.heads.eagle import draft_id
    return drafter_stop(model, params, heads, eagle_config.hidden, draft_id(eagle_config, eagle_hp, d2t),
                        "this EAGLE head", "the EAGLE layer's output", target, threshold, min_tokens, lookahead)


def with_settings(params, threshold: Optional[float] = None, min_tokens: Optional[int] = None,
                  lookahead: Optional[bool] = None):
    """`build`'s params with other stop settings (same compiled program): e.g. a threshold sweep."""
    sp = params["draft"]["stop"]
    t = float(sp["threshold"]) if threshold is None else threshold
    m = int(sp["min_tokens"]) if min_tokens is None else min_tokens
    la = bool(sp["lookahead"]) if lookahead is None else lookahead
    return {**params, "draft": {**params["draft"], "stop": stop_params(sp["head"], t, m, la)}}
