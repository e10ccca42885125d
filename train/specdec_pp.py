"""Train SpecDec++'s acceptance-prediction head (`jaxdec.speculative.heads.acceptance`):
``python -m train.specdec_pp [--flags]``.

The target and the draft model are frozen. One pass over the corpus, up front, runs both on the
target's own text (teacher forcing: position t sees the true prefix, which is what a draft chain sees
when every earlier candidate was accepted) and stores, per position t from the last prompt token on:

* the draft's final-norm hidden state ``h_t`` (float16), the head's input;
* the label of the draft token scored from ``h_t``: ``--labels greedy``: 1 if the draft's greedy token
  equals the target's greedy token at t, else 0 (greedy verification accepts exactly then);
  ``--labels sampling``: the paper's soft label ``min(1, p(x)/q(x))`` for one draft sample ``x ~ q``
  (p, q: the target's and draft's softmax at t, temperature 1).

Then the head is trained with the paper's weighted BCE (rejections weighted ``--weight-mismatch``,
6 in the paper) on those stored pairs. The draft is the target's first ``--draft-layers`` layers (default
half, as `jaxdec.speculative.methods.draft_model`) or ``--draft FILE``, a distilled draft's heads file
(`jaxdec.speculative.heads.draft_lm`, ``--draft-depth`` for an S2D exit); the choice is recorded in the
heads file's config (``draft``), and `acceptance.build` refuses another draft.

``--drafter eagle`` (``--eagle FILE``, default the EAGLE head shipped for ``--model``): the head is
trained to stop an EAGLE chain (`jaxdec.speculative.methods.eagle(..., stop_head=)`). Labels come from
teacher forcing the EAGLE head on the target's text: its output ``o_t`` over (target feature at t, token
t + 1) scores the token at t + 2 exactly as the first draft of a chain whose last accepted token is
t + 1; greedy label 1 iff the head's top token (through d2t) equals the target's argmax there, sampling
label ``min(1, p(x)/q(x))`` for ``x ~ q`` over the draft vocabulary. Deeper chain positions read the
head's own outputs, not the target's features; they are labelled by unrolling the head over the
sequence as train/eagle.py's training-time test does (``--depths D`` passes, pass s + 1 fed the
outputs of pass s as features): pass s at t is the depth-(s + 1) draft of the token at t + 2, given
every earlier draft of that chain was accepted. This is an approximation at depth >= 2: in a real chain
the layer's cache holds the target's features at every earlier position, while the unrolled pass's
attention sees its own outputs there (train/eagle.py's training-time test has the same gap); depths past
``D`` get no labels of their own (the head applies what it learned at D). The lookahead output learns
the next depth's label at t + 1 (the deepest pass learns its own depth's, the same approximation). The
heads file records the EAGLE head's `jaxdec.speculative.heads.eagle.draft_id` (``draft``), so
`methods.eagle` refuses the head on another EAGLE head.

``--drafter clover`` (``--clover FILE``, default the Clover heads shipped for ``--model``): the head is
trained to stop a Clover chain (`jaxdec.speculative.methods.clover(..., stop_head=)`) and reads each Clover
head's regressive state ``s_k``. Labels teacher-force Clover as train/clover.py trains it: the augmenting
block over the target's features of the whole sequence (causal, so its state at t is the one the drafter
computes incrementally), then at every anchor t the K heads with their regressive inputs set to the true
tokens (head k, 0-based, reads token t + 1 + k and scores t + 2 + k). Head 1 at t is exactly the first draft
of a chain whose last accepted token is t + 1. Head k's state is exactly the chain's when heads 1 .. k - 1
drafted the true tokens, which is what "every earlier draft accepted" means under greedy verification of the
target's greedy text (the self-distillation corpus); on other text (and for sampling labels, where an
accepted draw is not always the corpus token) the deeper labels are teacher-forced approximations, the
same as the draft-model labels. Greedy label 1 iff head k's top token (through d2t) is the target's argmax
at t + 1 + k; sampling ``min(1, p(x)/q(x))`` for ``x ~ q`` over the draft vocabulary. The lookahead output
learns head k + 1's label at the same anchor (the last head's is unused: the chain ends there). The heads
file records the Clover heads' `jaxdec.speculative.heads.clover.draft_id`, so `methods.clover` refuses the
head on other heads.

Target states: ``--hidden stored`` reads/writes the target's final-norm hidden states through
train.medusa's shared cache (``--hidden-cache``) and scores them with the LM head; ``recompute`` runs the
target in the label pass. Writes ``<out>/heads.safetensors`` (kind "specdec_pp") like train/medusa.py.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import (evenly_spaced, run_head_script, save_finished_heads, sequences_to_arrays, split_heldout,
                          store_hidden)


@dataclasses.dataclass(frozen=True)
class SpecDecPPTrainConfig(TrainConfig):
    out: str = "train/work/runs/specdec_pp"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    draft_layers: int = 0  # the target's first N layers as the draft (0: half the target's layers)
    draft: str = ""  # or a distilled draft's heads file (train/distill_draft.py)
    draft_depth: int = 0  # with --draft: the exit (0: its deepest)
    drafter: str = "draft-model"  # the drafter the head stops: "draft-model", "eagle" or "clover"
    eagle: str = ""  # --drafter eagle: the EAGLE heads file ("": the one shipped for --model)
    clover: str = ""  # --drafter clover: the Clover heads file ("": the one shipped for --model)
    depths: int = 3  # --drafter eagle: chain depths labelled by unrolled passes (see the module docstring)
    num_layers: int = 3  # residual blocks of the head (the paper's 3)
    weight_mismatch: float = 6.0  # BCE weight of rejected positions (the paper's 6)
    labels: str = "greedy"  # "greedy" (0/1: draft argmax == target argmax) or "sampling" (min(1, p/q))
    seq_len: int = 256
    max_seqs: int = 0  # use N evenly spaced corpus sequences (0: all)
    label_batch: int = 4  # sequences per forward in the label pass
    eval_fraction: float = 0.05
    hidden: str = "recompute"
    hidden_cache: str = ""
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=(("num_layers", 0), ("seq_len", 3), "label_batch", ("draft_layers", 0),
                                           ("draft_depth", 0), ("max_seqs", 0)))
        if not (isinstance(self.weight_mismatch, (int, float)) and np.isfinite(self.weight_mismatch)
                and self.weight_mismatch > 0):
            raise ConfigError(f"--weight-mismatch must be a finite number > 0, got {self.weight_mismatch!r}")
        if self.labels not in ("greedy", "sampling"):
            raise ConfigError(f"--labels must be 'greedy' or 'sampling', got {self.labels!r}")
        if self.draft and self.draft_layers:
            raise ConfigError("give --draft-layers or --draft FILE, not both")
        if self.draft_depth and not self.draft:
            raise ConfigError("--draft-depth needs --draft FILE")
        if self.drafter not in ("draft-model", "eagle", "clover"):
            raise ConfigError(f"--drafter must be 'draft-model', 'eagle' or 'clover', got {self.drafter!r}")
        if isinstance(self.depths, bool) or not isinstance(self.depths, int) or self.depths < 1:
            raise ConfigError(f"--depths must be an integer >= 1, got {self.depths!r}")
        if self.drafter != "draft-model" and (self.draft or self.draft_layers or self.draft_depth):
            raise ConfigError(f"--draft / --draft-layers / --draft-depth choose a draft model: not with "
                              f"--drafter {self.drafter} (its draft is --{self.drafter} FILE)")
        for name in ("eagle", "clover"):
            if getattr(self, name) and self.drafter != name:
                raise ConfigError(f"--{name} FILE needs --drafter {name}")
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):  # before the target loads
                raise ConfigError(f"--{name}: no such file {getattr(self, name)!r}")
        if self.depths != 3 and self.drafter != "eagle":
            raise ConfigError("--depths is used only with --drafter eagle (a draft model's label pass reads its "
                              "own chain states; Clover's labels every head of its chain)")


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------

def label_positions(length, prompt_len, t: int):
    """``[N,T]`` bool: positions whose next token the target generated (t >= prompt_len - 1) and that
    have a successor in the sequence (t < length - 1)."""
    ar = np.arange(t)[None]
    return (ar >= (np.asarray(prompt_len)[:, None] - 1)) & (ar < (np.asarray(length)[:, None] - 1))


def make_label_fn(model, dm, labels: str, stored: bool):
    """jitted ``(target params, draft params, tokens [b,T], target hidden [b,T,E] or None, key)
    -> (draft hidden [b,T,E] float16, label [b,T] float32)``."""

    def fn(tp, dp, tokens, thid, key):
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        _, tl = target_logits(model, tp, tokens, thid if stored else None)
        o = dm(dp, tokens, pos, dm.init_cache(b, t))
        dl = o.logits.astype(jnp.float32)
        if labels == "greedy":
            y = (jnp.argmax(dl, -1) == jnp.argmax(tl, -1)).astype(jnp.float32)
        else:
            lp = jax.nn.log_softmax(tl, -1)
            y = sampling_label(key, jax.nn.log_softmax(dl, -1), lambda x: jnp.take_along_axis(lp, x[..., None], -1)[..., 0])
        return o.hidden.astype(jnp.float16), y

    return jax.jit(fn)


def target_logits(model, tp, tokens, thid=None):
    """(final-norm hidden states [b,T,E], logits [b,T,V] float32) of the target on ``tokens``: the stored
    states ``thid`` scored by the LM head, or (None) a forward."""
    from jaxdec.quant import matmul
    from jaxdec.speculative.heads.medusa import lm_head
    if thid is not None:
        hidden = thid.astype(jnp.float32)
        return hidden, matmul(hidden, lm_head(model, tp)).astype(jnp.float32)
    b, t = tokens.shape
    o = model(tp, tokens, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), model.init_cache(b, t))
    return o.hidden, o.logits.astype(jnp.float32)


def draft_vocab_label(labels: str, key, dl, tl, d2t):
    """The label of the draft token scored by ``dl [..., Vd]`` (a reduced draft vocabulary, target ids
    ``d2t``) against the target's logits ``tl [..., V]`` there: greedy 1 iff ``d2t[argmax dl]`` is the
    target's argmax; sampling ``min(1, p(x)/q(x))`` for ``x ~ q``."""
    if labels == "greedy":
        return (d2t[jnp.argmax(dl, -1)] == jnp.argmax(tl, -1)).astype(jnp.float32)
    lp = jax.nn.log_softmax(tl, -1)
    return sampling_label(key, jax.nn.log_softmax(dl, -1), lambda x: jnp.take_along_axis(lp, d2t[x][..., None], -1)[..., 0])


def sampling_label(key, lq, lp_of):
    """The paper's soft label ``min(1, p(x)/q(x))`` for ``x ~ q``: ``lq [..., Vq]`` the draft's
    log-probabilities, ``lp_of(x)`` the target's log-probability of draft index ``x``."""
    x = jax.random.categorical(key, lq, axis=-1)
    return jnp.exp(jnp.minimum(lp_of(x) - jnp.take_along_axis(lq, x[..., None], -1)[..., 0], 0.0))


def batched_labels(fn, tokens, target_hidden, batch: int, seed: int, log, what: str):
    """``fn(tokens [batch,T], target states or None, key) -> (feat, label)`` over every ``batch`` sequences
    (the last batch padded with copies) -> the two concatenated over the N sequences, as numpy."""
    n = tokens.shape[0]
    key = jax.random.key(seed)
    feats, ys = [], []
    t0 = time.time()
    for lo in range(0, n, batch):
        x = tokens[lo:lo + batch]
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
        th = None
        if target_hidden is not None:
            th = target_hidden[lo:lo + batch]
            th = np.concatenate([th, np.repeat(th[-1:], pad, 0)]) if pad else th
        f, y = fn(jnp.asarray(x), th, jax.random.fold_in(key, lo))
        feats.append(np.asarray(f)[:batch - pad])
        ys.append(np.asarray(y)[:batch - pad])
        done = lo + batch - pad
        if lo == 0 or (lo // batch) % 20 == 19 or done == n:
            log(f"{what}: {done}/{n} sequences, {time.time() - t0:.0f} s, ETA {(time.time() - t0) / done * (n - done):.0f} s")
    return np.concatenate(feats), np.concatenate(ys)


def label_pass(model, tparams, dm, dparams, arrays: dict, labels: str, batch: int, seed: int = 0,
               target_hidden=None, log=print) -> dict:
    """Run the frozen target and draft over ``arrays["tokens"]`` -> ``{"feat" [N,T,E] f16, "label" [N,T],
    "mask" [N,T]}`` (see the module docstring)."""
    tokens = arrays["tokens"]
    t = tokens.shape[1]
    fn = make_label_fn(model, dm, labels, target_hidden is not None)
    feats, ys = batched_labels(lambda x, th, key: fn(tparams, dparams, x, th, key), tokens, target_hidden, batch, seed,
                               log, "labels")
    mask = label_positions(arrays["length"], arrays["prompt_len"], t)
    return {"feat": feats, "label": ys.astype(np.float32), "mask": mask}


def make_eagle_label_fn(model, ecfg, labels: str, stored: bool, depths: int):
    """jitted ``(target params, EAGLE head params, head_w, d2t, tokens [b,T], stored target states or None,
    key) -> (EAGLE outputs [b,D,T-1,E] float16, labels [b,D,T-1])``: pass s's output at t and the label of
    the token it scores (t + 2; see the module docstring)."""
    from jaxdec.quant import matmul
    from jaxdec.speculative.heads.eagle import draft_inputs, layer_params, target_features
    from jaxdec.speculative.heads.medusa import lm_head
    from train.eagle import split_stored
    lm = ecfg.layer_model("reference")

    def fn(tp, hp, head_w, d2t, tokens, thid, key):
        b, t = tokens.shape
        if stored:
            hidden, lh = split_stored(ecfg, thid.astype(jnp.float32))
            tl = matmul(hidden, lm_head(model, tp)).astype(jnp.float32)
        else:
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            o = model(tp, tokens, pos, model.init_cache(b, t), hidden_layers=ecfg.model_layers)
            hidden, lh, tl = o.hidden, o.layer_hidden, o.logits.astype(jnp.float32)
        hid = target_features(ecfg, hp, hidden, lh)  # [b,T,E]
        n = t - 1  # o_t for t = 0 .. T-2 scores the token at t + 2, whose target logits are tl[:, t + 1]
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        nxt = tokens[:, 1:]
        tgt = tl[:, 1:]
        lpar = layer_params(hp, head_w)
        feat, outs, ys = hid[:, :n], [], []
        for s in range(depths):
            out = lm(lpar, None, pos, lm.init_cache(b, n), embeds=draft_inputs(hp, model, tp, feat, nxt))
            y = draft_vocab_label(labels, jax.random.fold_in(key, s), out.logits.astype(jnp.float32), tgt, d2t)
            outs.append(out.hidden.astype(jnp.float16))
            ys.append(y)
            feat = jnp.concatenate([hid[:, :1], out.hidden[:, :-1].astype(jnp.float32)], axis=1)  # f_{t+1} <- o_t
        return jnp.stack(outs, 1), jnp.stack(ys, 1)

    return jax.jit(fn)


def eagle_label_positions(length, prompt_len, t: int, depths: int):
    """``[N,D,T-1]`` bool: pass s at t labels the token at t + 2 (generated by the target and inside the
    sequence) for a chain whose last accepted token, t + 1 - s, is at the last prompt token or later."""
    ar = np.arange(t - 1)[None, None]
    s = np.arange(depths)[None, :, None]
    plen = np.asarray(prompt_len)[:, None, None]
    return (ar >= plen - 2 + s) & (ar + 2 < np.asarray(length)[:, None, None])


def eagle_label_pass(model, tparams, ecfg, hp, d2t, arrays: dict, labels: str, batch: int, depths: int, seed: int = 0,
                     target_hidden=None, log=print) -> dict:
    """The EAGLE head unrolled ``depths`` passes over ``arrays["tokens"]`` -> ``{"feat" [N,D*(T-1),E] f16,
    "label", "mask", "label_next", "mask_next" [N,D*(T-1)]}``: the passes side by side on one axis; the
    ``*_next`` pair is the lookahead output's target (depth s + 1 at t + 1; the deepest pass its own)."""
    t = arrays["tokens"].shape[1]
    fn = make_eagle_label_fn(model, ecfg, labels, target_hidden is not None, depths)
    feat, y = heads_labels(fn, model, tparams, hp, d2t, arrays["tokens"], target_hidden, batch, seed, log,
                           "eagle labels")  # [N,D,n,E], [N,D,n]
    m = eagle_label_positions(arrays["length"], arrays["prompt_len"], t, depths)
    deeper = np.concatenate([y[:, 1:], y[:, -1:]], axis=1)  # depth s + 1 (the deepest: itself) ...
    mdeep = np.concatenate([m[:, 1:], m[:, -1:]], axis=1)
    y1 = np.concatenate([deeper[:, :, 1:], np.zeros_like(y[:, :, :1])], axis=2)  # ... at t + 1
    m1 = m & np.concatenate([mdeep[:, :, 1:], np.zeros_like(m[:, :, :1])], axis=2)
    return _depths_flat(feat, y, m, y1, m1)


def heads_labels(fn, model, tparams, hp, d2t, tokens, target_hidden, batch: int, seed: int, log, what: str):
    """An EAGLE or Clover label function ``fn(target params, head params, head_w, d2t, tokens, target states,
    key)`` over every ``batch`` sequences (`batched_labels`) -> (features, float32 labels) as numpy."""
    from jaxdec.speculative.heads.medusa import draft_head
    head_w = draft_head(model, tparams, d2t)
    d2t_j = jnp.asarray(np.asarray(d2t), jnp.int32)
    feat, y = batched_labels(lambda x, th, key: fn(tparams, hp, head_w, d2t_j, x, th, key), tokens, target_hidden,
                             batch, seed, log, what)
    return feat, y.astype(np.float32)


def _depths_flat(feat, y, m, y1, m1) -> dict:
    """A label pass's ``[N,D,n,...]`` arrays with the depths side by side on one axis ``[N,D*n,...]``."""
    flat = lambda a: a.reshape(a.shape[0], -1, *a.shape[3:])  # noqa: E731
    return {"feat": flat(feat), "label": flat(y), "mask": flat(m), "label_next": flat(y1), "mask_next": flat(m1)}


def make_clover_label_fn(model, ccfg, labels: str):
    """jitted ``(target params, Clover head params, head_w, d2t, tokens [b,T], stored target states or None,
    key) -> (head states [b,K,T-1,E] float16, labels [b,K,T-1])``: head k's state at anchor t and the label
    of the token it scores (t + 2 + k; see the module docstring)."""
    from jaxdec.speculative.heads.clover import augment, heads_chain, target_embed
    kk = ccfg.num_tokens

    def fn(tp, hp, head_w, d2t, tokens, thid, key):
        b, t = tokens.shape
        hidden, tl = target_logits(model, tp, tokens, thid)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        aug, _ = augment(ccfg, hp, head_w, hidden, pos, ccfg.aug_model().init_cache(b, t))  # [b,T,E]
        n = t - 1  # anchors 0 .. T-2 (head 1 reads the token after the anchor)
        at = jnp.minimum(jnp.arange(n)[:, None] + 1 + jnp.arange(kk)[None], t - 1)  # [n,K] token head k reads
        dl, st = heads_chain(ccfg, hp, head_w, aug[:, :n], tokens[:, at], lambda ids: target_embed(model, tp, ids),
                             states=True)  # [K,b,n,Vd], [K,b,n,E]
        # head k at anchor a scores token a + 2 + k: the target's logits at a + 1 + k
        ys = [draft_vocab_label(labels, jax.random.fold_in(key, k), dl[k].astype(jnp.float32), tl[:, at[:, k]], d2t)
              for k in range(kk)]
        return jnp.moveaxis(st, 0, 1).astype(jnp.float16), jnp.stack(ys, 1)

    return jax.jit(fn)


def clover_label_positions(length, prompt_len, t: int, kk: int):
    """``[N,K,T-1]`` bool: head k at anchor a (the chain after the token at a + 1, whose target feature is at
    a) labels the token at a + 2 + k: valid when the token at a + 1 was generated (a >= prompt_len - 1) and
    a + 2 + k is inside the sequence."""
    ar = np.arange(t - 1)[None, None]
    k = np.arange(kk)[None, :, None]
    return (ar >= np.asarray(prompt_len)[:, None, None] - 1) & (ar + 2 + k < np.asarray(length)[:, None, None])


def clover_label_pass(model, tparams, ccfg, hp, d2t, arrays: dict, labels: str, batch: int, seed: int = 0,
                      target_hidden=None, log=print) -> dict:
    """Clover teacher-forced over ``arrays["tokens"]`` -> ``{"feat" [N,K*(T-1),E] f16, "label", "mask",
    "label_next", "mask_next" [N,K*(T-1)]}``: the K heads side by side on one axis; the ``*_next`` pair is
    the lookahead output's target (head k + 1 at the same anchor; none for the last head)."""
    tokens = arrays["tokens"]
    feat, y = heads_labels(make_clover_label_fn(model, ccfg, labels), model, tparams, hp, d2t, tokens, target_hidden,
                           batch, seed, log, "clover labels")  # [N,K,n,E], [N,K,n]
    m = clover_label_positions(arrays["length"], arrays["prompt_len"], tokens.shape[1], ccfg.num_tokens)
    y1 = np.concatenate([y[:, 1:], np.zeros_like(y[:, :1])], axis=1)
    m1 = m & np.concatenate([m[:, 1:], np.zeros_like(m[:, :1])], axis=1)
    return _depths_flat(feat, y, m, y1, m1)


def make_loss(weight_mismatch: float):
    """The weighted BCE of the head's output 0 (label y_t) plus that of its lookahead output 1 (label
    y_{t+1}: under teacher forcing the true token at t+1 is the draft's token at t when that one is
    accepted, so y_{t+1} is the next candidate's acceptance given this one's)."""
    from jaxdec.speculative.heads.acceptance import accept_logits, weighted_bce

    def loss_fn(hp, frozen, batch, key):
        logits = accept_logits(hp, batch["feat"])
        y, m = batch["label"], batch["mask"].astype(jnp.float32)
        if "label_next" in batch:  # given by the label pass (EAGLE: the next depth's label)
            y1, m1 = batch["label_next"], batch["mask_next"].astype(jnp.float32)
        else:
            y1 = jnp.concatenate([y[:, 1:], jnp.zeros_like(y[:, :1])], axis=1)
            m1 = m * jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
        loss0 = weighted_bce(logits[..., 0], y, m, weight_mismatch)
        loss1 = weighted_bce(logits[..., 1], y1, m1, weight_mismatch)
        p = jax.nn.sigmoid(logits[..., 0])
        n = jnp.maximum(jnp.sum(m), 1.0)
        aux = {"loss_accept": loss0, "loss_next": loss1,
               "acc": jnp.sum(m * ((p > 0.5) == (y > 0.5))) / n,  # 0.5-threshold agreement with the label
               "brier": jnp.sum(m * (p - y) ** 2) / n, "mean_p": jnp.sum(m * p) / n, "mean_label": jnp.sum(m * y) / n}
        return loss0 + loss1, aux

    return loss_fn


def resolve_train_draft(cfg: SpecDecPPTrainConfig, model, target_params, fingerprint: str):
    """(draft model, draft params, recorded draft id, draft file)."""
    from jaxdec.speculative.drafters import truncated_draft
    from jaxdec.speculative.heads.acceptance import draft_from_file
    if cfg.draft:
        from train.medusa import ROOT
        dm, dp, did = draft_from_file(model, target_params, cfg.draft, fingerprint, cfg.draft_depth or None)
        path = os.path.abspath(cfg.draft)
        rel = os.path.relpath(path, ROOT)  # recorded relative to the repository when inside it
        return dm, dp, did, path if rel.startswith("..") else rel
    n = cfg.draft_layers or model.num_layers // 2
    if not 1 <= n <= model.num_layers:
        raise ConfigError(f"--draft-layers must be in [1, {model.num_layers}] (0: half), got {cfg.draft_layers}")
    dm, dp = truncated_draft(model, target_params, n)
    return dm, dp, f"layers:{n}", ""


def resolve_train_heads(cfg: SpecDecPPTrainConfig, fingerprint: str):
    """(heads config, head params, d2t, draft id, recorded file) of ``--eagle`` / ``--clover`` (per
    ``--drafter``; default: the heads shipped for ``--model``)."""
    from jaxdec.speculative.heads import shipped_heads
    from jaxdec.speculative.heads.acceptance import heads_module
    from train.medusa import ROOT
    d = cfg.drafter
    draft_id, load = heads_module(d)
    path = getattr(cfg, d) or shipped_heads(d, cfg.model)
    if path is None:
        raise ConfigError(f"--{d}: no {d} heads are shipped for --model {cfg.model!r}; pass --{d} FILE (written by "
                          f"python -m train.{d})")
    if not os.path.isfile(path):
        raise ConfigError(f"--{d}: no such file {path!r}")
    hcfg, hp, _, d2t = load(path, fingerprint)
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return hcfg, hp, np.asarray(d2t), draft_id(hcfg, hp, d2t), os.path.abspath(path) if rel.startswith("..") else rel


def train_specdec_pp(cfg: SpecDecPPTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                     target_name: str = "", command: str = "", stop_after=None, log=print, draft=None, eagle=None,
                     clover=None):
    """Label pass, then `fit`; writes ``<out>/heads.safetensors``; returns (FitResult, heads path).
    draft: an in-memory ``(draft model, draft params, draft id)`` instead of the config's choice; eagle
    (``--drafter eagle``) / clover (``--drafter clover``): in-memory ``(EagleConfig or CloverConfig, head
    params, d2t)`` instead of ``--eagle`` / ``--clover``."""
    from jaxdec.speculative.heads.acceptance import KIND, AcceptanceConfig, draft_hidden_size, heads_module, init_params
    cfg.validate()
    seqs, prompt_lens = evenly_spaced(seqs, prompt_lens, cfg.max_seqs)  # every prompt source keeps its share
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    given = {"eagle": eagle, "clover": clover}
    for name, v in given.items():
        if v is not None and cfg.drafter != name:
            raise ConfigError(f"{name}= needs --drafter {name}")
    if cfg.drafter != "draft-model":  # EAGLE or Clover heads
        if draft is not None:
            raise ConfigError(f"draft= (a draft model) does not apply to --drafter {cfg.drafter}: pass {cfg.drafter}=")
        if given[cfg.drafter] is not None:
            hcfg, ehp, d2t = given[cfg.drafter]
            d2t = np.asarray(d2t)
            did, dfile = heads_module(cfg.drafter)[0](hcfg, ehp, d2t), ""
        else:
            hcfg, ehp, d2t, did, dfile = resolve_train_heads(cfg, fingerprint)
        hidden_size = hcfg.hidden
    else:
        if draft is not None:
            dm, dp, did = draft
            dfile = ""
        else:
            dm, dp, did, dfile = resolve_train_draft(cfg, model, target_params, fingerprint)
        hidden_size = draft_hidden_size(dm, dp)
    acfg = AcceptanceConfig(hidden=hidden_size, num_layers=cfg.num_layers,
                            weight_mismatch=float(cfg.weight_mismatch), labels=cfg.labels, draft=did, draft_file=dfile)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    thid = None
    if cfg.hidden == "stored":
        layers = (hcfg.model_layers or ()) if cfg.drafter == "eagle" else ()
        thid = store_hidden(model, target_params, arrays["tokens"], cfg.label_batch, log, cfg.hidden_cache,
                            f"{fingerprint}|{cfg.weights}", *((layers,) if layers else ()))
    t0 = time.time()
    if cfg.drafter == "eagle":
        lab = eagle_label_pass(model, target_params, hcfg, ehp, d2t, arrays, cfg.labels, cfg.label_batch,
                               cfg.depths, cfg.seed, thid, log)
    elif cfg.drafter == "clover":
        lab = clover_label_pass(model, target_params, hcfg, ehp, d2t, arrays, cfg.labels, cfg.label_batch, cfg.seed,
                                thid, log)
    else:
        lab = label_pass(model, target_params, dm, dp, arrays, cfg.labels, cfg.label_batch, cfg.seed, thid, log)
    label_s = time.time() - t0
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    m = lab["mask"]
    stats = {"label_positions": int(m[tr].sum()), "label_mean": round(float(lab["label"][tr][m[tr]].mean()), 4),
             "label_pass_s": round(label_s, 1)}
    log(f"labels: {stats['label_positions']:,} training positions, mean acceptance {stats['label_mean']:.3f} "
        f"(draft {did[:40]}, labels {cfg.labels}), {label_s:.0f} s")
    data = {k: lab[k] for k in ("feat", "label", "mask", "label_next", "mask_next") if k in lab}
    if cfg.drafter != "draft-model":  # training positions of the first draft (the rest: deeper drafts)
        depths = cfg.depths if cfg.drafter == "eagle" else hcfg.num_tokens
        first = m[tr].reshape(len(tr), depths, -1)[:, 0]
        stats["label_mean_depth1"] = round(float(lab["label"][tr].reshape(len(tr), depths, -1)[:, 0][first].mean()), 4)
        stats["depths"] = depths
    train = ArrayData({k: v[tr] for k, v in data.items()})
    held = ArrayData({k: v[ho] for k, v in data.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": acfg.to_dict()}
    res = fit(cfg, init_params(acfg, cfg.seed), make_loss(float(cfg.weight_mismatch)), train, eval_data=held,
              meta=meta, stop_after=stop_after, log=log)
    path = save_finished_heads(res, cfg, KIND, dict(jax.device_get(res.params)), acfg.to_dict(), fingerprint,
                               target_name, command, int(len(tr)), int(np.sum(arrays["length"][tr])), log,
                               data_generated_tokens=int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr])),
                               **stats)
    res.acceptance_config = acfg
    res.labels = lab
    res.split = (tr, ho)
    return res, path


def main(argv=None):
    return run_head_script("specdec_pp", SpecDecPPTrainConfig, train_specdec_pp, argv, __doc__)


if __name__ == "__main__":
    main()
