"""Train the hidden-transfer drafter (`jaxdec.speculative.heads.hidden_transfer`) on the self-distillation
corpus: ``python -m train.hidden_transfer [--flags]``.

The target is frozen; only the transfer ``{"w", "b"}`` is trained. Per step and row:

1. ``h`` = the target's residual stream after ``--layer`` t layers at every position (recomputed inside the
   step by a ``layer_range=(0, t)`` call, or stored once up front with ``--hidden stored``: float16
   ``N x T x E``, kept in ``--hidden-cache`` as ``ht<t>-<hash>.npy`` for the next run);
2. the real positions run layers ``[t, L)`` once (no gradient): their keys/values fill a cache, as the
   engine's cache holds the committed context at decoding time;
3. ``--positions`` P anchors n per row are drawn (from the last prompt token on, where drafting happens);
   each anchor's k pseudo states ``transfer(h_n, embed(x_{n+1}))`` sit at positions n+1 .. n+k and run
   layers ``[t, L)`` in ONE call for all P x k of them, with an attention array: pseudo (n, i) sees the
   real cache slots 0..n and the pseudo states (n, j <= i) of its own anchor; then the final norm and the
   LM head. Pseudo (n, i) learns the target's greedy token ``x_{n+i+1}`` (cross-entropy over the full
   vocabulary, weight ``decay**(i-1)``; the corpus is the target's greedy continuations).

Writes ``<out>/heads.safetensors`` (kind "hidden_transfer") like train/medusa.py; ``--export PATH`` copies it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, fit
from train.medusa import run_head_script, save_finished_heads, sequences_to_arrays, split_heldout, store_states


@dataclasses.dataclass(frozen=True)
class HiddenTransferTrainConfig(TrainConfig):
    out: str = "train/work/runs/hidden_transfer"
    data: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    layer: int = 24  # t: transfer at the residual after t layers (the draft runs layers t..L-1)
    num_tokens: int = 4  # k pseudo positions
    positions: int = 16  # anchors per row and step
    decay: float = 0.8  # loss weight of pseudo position i (1-based): decay ** (i - 1)
    seq_len: int = 256
    max_sequences: int = 0  # > 0: use only the first this many corpus sequences (before the held-out split)
    eval_fraction: float = 0.05
    hidden: str = "recompute"  # "recompute": layers [0, t) inside each step; "stored": once, up front
    hidden_cache: str = ""  # with --hidden stored: a folder keeping the layer-t states for the next run
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    export: str = ""

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("layer", "num_tokens", "positions", "seq_len", ("max_sequences", 0)))
        if self.seq_len < self.num_tokens + 2:
            raise ConfigError(f"--seq-len must be >= num_tokens + 2 = {self.num_tokens + 2}, got {self.seq_len}")


def layer_residual(model, tp, tokens, layer: int):
    """The residual stream after ``layer`` layers ``[B,T,E]`` of ``tokens [B,T]`` (layers [0, layer) only)."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(tp, tokens, pos, model.init_cache(b, t), layer_range=(0, layer)).residual


def store_layer_hidden(model, tp, tokens, layer: int, batch_size: int, log=print, cache_dir: str = "",
                       key: str = "") -> np.ndarray:
    """`layer_residual` of every sequence ``[N,T,E]`` float16 (optionally cached in ``cache_dir``)."""
    fwd = jax.jit(lambda p, x: layer_residual(model, p, x, layer).astype(jnp.float16))
    return store_states(fwd, tp, tokens, batch_size, log, cache_dir, key, tag=f"layer{layer}", prefix=f"ht{layer}",
                        what=f"layer-{layer} states")


def make_loss(model, config, positions: int, decay: float):
    """``loss_fn(transfer params, target params, batch, key) -> (loss, aux)`` for `train.harness.fit`
    (``aux``: ``acc<i>`` the argmax accuracy of pseudo position i, 0-based)."""
    from jaxdec.speculative.heads.hidden_transfer import target_embed, transfer
    ref = model.with_attention("reference")  # differentiable, takes an attention array
    k, t_layer, n_layers = config.num_tokens, config.layer, config.num_layers
    weights = jnp.asarray([decay ** i for i in range(k)], jnp.float32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        if "hidden" in batch:
            h = batch["hidden"].astype(jnp.float32)
        else:
            h = layer_residual(model, tp, tokens, t_layer).astype(jnp.float32)
        h = jax.lax.stop_gradient(h)
        p = min(positions, t)
        pk = p * k
        # the real context's keys/values of layers [t, L) (no gradient)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        real = model(tp, None, pos, model.init_cache(b, t + pk), hidden_in=h, layer_range=(t_layer, n_layers))
        cache = jax.tree.map(jax.lax.stop_gradient, real.cache)
        # anchors n: from the last prompt token on, with a first label x_{n+2}
        ar = jnp.arange(t)[None]
        ok = (ar >= plen[:, None] - 1) & (ar + 2 < length[:, None])
        score = jnp.where(ok, jax.random.uniform(key, (b, t)), -1.0)
        sc, idx = jax.lax.top_k(score, p)  # [B,P]
        sel = sc >= 0
        hn = jnp.take_along_axis(h, idx[:, :, None], axis=1)  # [B,P,E]
        nxt = jnp.take_along_axis(tokens, jnp.minimum(idx + 1, t - 1), axis=1)  # x_{n+1}
        ps = transfer(config, hp, hn, target_embed(model, tp, nxt)).reshape(b, pk, -1)  # [B,P*k,E]
        off = jnp.tile(jnp.arange(k, dtype=jnp.int32), p)  # [P*k] offset i-1
        anc = jnp.repeat(jnp.arange(p, dtype=jnp.int32), k)  # [P*k] anchor slot
        n_of = jnp.repeat(idx, k, axis=1)  # [B,P*k] anchor position
        qpos = n_of + 1 + off[None]
        see_cache = jnp.arange(t + pk)[None, None, :] <= n_of[:, :, None]  # cache slots 0..n (the rest unwritten)
        see_block = (anc[:, None] == anc[None, :]) & (off[None, :] <= off[:, None])  # [P*k,P*k]
        mask = jnp.concatenate([see_cache, jnp.broadcast_to(see_block, (b, pk, pk))], axis=2)
        out = ref(tp, None, qpos, cache, hidden_in=ps, layer_range=(t_layer, n_layers), attention=mask)
        logits = out.logits.astype(jnp.float32).reshape(b, p, k, -1)
        lab_pos = idx[:, :, None] + 2 + jnp.arange(k)[None, None]  # [B,P,k]
        lab = jnp.take_along_axis(tokens[:, None, :], jnp.clip(lab_pos, 0, t - 1).reshape(b, 1, -1), axis=2)
        lab = lab.reshape(b, p, k)
        m = (sel[:, :, None] & (lab_pos < length[:, None, None])).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
        den = jnp.maximum(jnp.sum(m, axis=(0, 1)), 1.0)  # [k]
        ce = jnp.sum((lse - ll) * m, axis=(0, 1)) / den
        acc = jnp.sum((jnp.argmax(logits, -1) == lab) * m, axis=(0, 1)) / den
        loss = jnp.sum(weights * ce) / jnp.sum(weights)
        return loss, {f"acc{i}": acc[i] for i in range(k)}

    return loss_fn


def train_hidden_transfer(cfg: HiddenTransferTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                          target_name: str = "", command: str = "", stop_after=None, log=print):
    """Train the transfer on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads path)
    (``res.ht_config``: the `HiddenTransferConfig`)."""
    from jaxdec.speculative.heads.hidden_transfer import KIND, HiddenTransferConfig, init_params
    mc = getattr(model, "config", None)
    if mc is None or not hasattr(mc, "num_layers"):
        raise ConfigError(f"hidden transfer needs a layered target (a LlamaModel), got {type(model).__name__}")
    if not 1 <= cfg.layer < mc.num_layers:
        raise ConfigError(f"--layer must be in [1, {mc.num_layers - 1}] (the target has {mc.num_layers} layers), "
                          f"got {cfg.layer}")
    if cfg.max_sequences:
        seqs, prompt_lens = seqs[:cfg.max_sequences], prompt_lens[:cfg.max_sequences]
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    hc = HiddenTransferConfig(hidden=int(mc.hidden_size), num_layers=int(mc.num_layers), layer=cfg.layer,
                              num_tokens=cfg.num_tokens, rms_eps=1e-6)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_layer_hidden(model, target_params, arrays["tokens"], cfg.layer, cfg.batch_size, log,
                                              cfg.hidden_cache, f"{fingerprint}|{cfg.weights}")
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": hc.to_dict()}
    loss_fn = make_loss(model, hc, cfg.positions, cfg.decay)
    res = fit(cfg, init_params(hc, cfg.seed), loss_fn, train, frozen=target_params, eval_data=held, meta=meta,
              tokens_per_example=None, stop_after=stop_after, log=log)
    tensors = dict(jax.device_get(res.params))
    gen_tokens = int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr]))
    path = save_finished_heads(res, cfg, KIND, tensors, hc.to_dict(), fingerprint, target_name, command,
                               int(len(tr)), int(np.sum(arrays["length"][tr])), log,
                               data_generated_tokens=gen_tokens, draft_cost=hc.draft_cost)
    res.ht_config = hc
    return res, path


def main(argv=None):
    return run_head_script("hidden_transfer", HiddenTransferTrainConfig, train_hidden_transfer, argv, __doc__)


if __name__ == "__main__":
    main()
