"""Train Medusa-1 heads on the self-distillation corpus: ``python -m train.medusa [--flags]``.

The target is frozen; its final-norm hidden states are recomputed inside the jitted train step (one
forward of the batch, no gradient), and head k (0-based) at anchor position t learns the target's own
greedy token at t + 2 + k (cross-entropy, head weights ``decay**k``). Anchors are the positions from
the last prompt token on (where drafting happens at inference), ``positions`` of them drawn per row
each step (the step key), so the LM-head logits stay ``[K, B, positions, V]``. ``--hidden stored``
computes the hidden states once up front (float16, ``N x T x E x 2`` bytes in memory) and the step
runs the heads only: on this CPU the frozen forward is ~80 % of a recomputing step (batch 8 x 256
tokens, q weights: ~25 s per step recomputing, ~19 s of it the forward), so stored is the faster
choice whenever the data is seen more than once.

Writes ``<out>/heads.safetensors`` (`jaxdec.speculative.heads.artefact` format: target fingerprint,
command, data size, commit, wall time) besides the harness's checkpoints and logs; ``--export PATH``
also copies it there (``make heads`` exports into the package).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.harness import ArrayData, ConfigError, TrainConfig, check_target_run_flags, config_from_args, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class MedusaTrainConfig(TrainConfig):
    out: str = "train/work/runs/medusa"
    data: str = "train/work/selfdistill"  # a `python -m train.data` folder
    model: str = "smollm2-135m"
    weights: str = "q"  # the target's weights for the hidden states (the fingerprint is the same for all)
    num_heads: int = 4
    num_layers: int = 1
    positions: int = 32  # anchor positions drawn per row and step
    decay: float = 0.8  # loss weight of head k: decay ** k
    seq_len: int = 256  # sequences are cut / padded to this many tokens
    eval_fraction: float = 0.05  # sequences held out for evaluation
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    export: str = ""  # also write the heads file here
    draft_vocab: int = 0  # > 0: heads score only the corpus' most frequent generated tokens (d2t map); 0: all
    hidden: str = "recompute"  # "recompute": the frozen target runs inside each train step; "stored": once, up front
    hidden_cache: str = ""  # with --hidden stored: a folder keeping the states for the next run ("" : none)
    calibrate_tree: bool = False  # after training: choose the draft tree on the measured cost curve (make heads)

    def validate(self) -> None:
        super().validate()
        check_target_run_flags(self, ints=("num_heads", "num_layers", "positions", "seq_len"))
        if isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ConfigError(f"--draft-vocab must be an integer >= 0 (0: the full vocabulary), got {self.draft_vocab!r}")


# --------------------------------------------------------------------------------------------------
# data and loss
# --------------------------------------------------------------------------------------------------

def evenly_spaced(seqs, prompt_lens, n: int):
    """The ``n`` sequences at evenly spaced corpus indices (all when ``n`` is 0 or >= their count), so every
    prompt source keeps its share of a smaller training set. -> (seqs, prompt_lens)."""
    if not n or n >= len(seqs):
        return seqs, prompt_lens
    pick = np.unique(np.linspace(0, len(seqs) - 1, n).round().astype(int))
    return [seqs[i] for i in pick], [prompt_lens[i] for i in pick]


def sequences_to_arrays(seqs, prompt_lens, seq_len: int, pad_id: int = 0) -> dict:
    """Token sequences (prompt then the target's continuation) -> ``tokens [N,T]``, ``length [N]``,
    ``prompt_len [N]`` (cut to ``seq_len``)."""
    n = len(seqs)
    toks = np.full((n, seq_len), pad_id, np.int32)
    length = np.zeros((n,), np.int32)
    for i, s in enumerate(seqs):
        s = np.asarray(s, np.int32)[:seq_len]
        toks[i, :len(s)] = s
        length[i] = len(s)
    return {"tokens": toks, "length": length, "prompt_len": np.minimum(np.asarray(prompt_lens, np.int32), length)}


def build_draft_vocab(seqs, prompt_lens, vocab_size: int, n: int) -> np.ndarray:
    """d2t ``[n]`` int32: the n target tokens the target generates most often in the corpus (ties by
    id), sorted (EAGLE-3's reduced draft vocabulary)."""
    if not 1 <= n <= vocab_size:
        raise ConfigError(f"--draft-vocab must be in [1, {vocab_size}] (0: the full vocabulary), got {n}")
    counts = np.zeros(vocab_size, np.int64)
    for s, p in zip(seqs, prompt_lens):
        np.add.at(counts, np.asarray(s[p:], np.int64), 1)
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:n]).astype(np.int32)


def make_loss(model, config, positions: int, decay: float, d2t=None):
    """``loss_fn(head_params, target_params, batch, key) -> (loss, aux)`` for `train.harness.fit`.
    With ``d2t`` the heads score only those tokens; labels outside them are left out of the loss
    (``aux["in_vocab"]``: the share of labels inside)."""
    from jaxdec.speculative.heads.medusa import draft_head, head_logits
    k_heads = config.num_heads
    weights = jnp.asarray([decay ** k for k in range(k_heads)], jnp.float32)
    if d2t is not None:
        t2d_np = np.full((model.vocab_size,), -1, np.int32)
        t2d_np[np.asarray(d2t)] = np.arange(len(d2t), dtype=np.int32)

    def loss_fn(hp, tp, batch, key):
        tokens, length, plen = batch["tokens"], batch["length"], batch["prompt_len"]
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if "hidden" in batch:  # stored by `store_hidden`
            hid = batch["hidden"].astype(jnp.float32)
        else:
            hid = jax.lax.stop_gradient(model(tp, tokens, pos, model.init_cache(b, t)).hidden)  # [B,T,E]
        ar = jnp.arange(t)[None]
        ok = (ar >= plen[:, None] - 1) & (ar + 2 < length[:, None])  # anchors with a first label
        p = min(positions, t)
        score = jnp.where(ok, jax.random.uniform(key, (b, t)), -1.0)
        sc, idx = jax.lax.top_k(score, p)  # [B,P]
        sel = sc >= 0
        hs = jnp.take_along_axis(hid, idx[:, :, None], axis=1)  # [B,P,E]
        head_w = None if d2t is None else draft_head(model, tp, d2t)
        logits = head_logits(config, hp, model, tp, hs, head_w)  # [K,B,P,V or Vd]
        lab_pos = idx[None] + 2 + jnp.arange(k_heads)[:, None, None]  # [K,B,P]
        lab = jnp.take_along_axis(jnp.broadcast_to(tokens[None], (k_heads, b, t)), jnp.clip(lab_pos, 0, t - 1), axis=2)
        m = (sel[None] & (lab_pos < length[None, :, None])).astype(jnp.float32)
        in_vocab = jnp.ones_like(m)
        if d2t is not None:
            lab = jnp.asarray(t2d_np)[lab]
            in_vocab = (lab >= 0).astype(jnp.float32)
            lab = jnp.maximum(lab, 0)
        n_all = jnp.maximum(jnp.sum(m), 1.0)
        m = m * in_vocab
        lse = jax.nn.logsumexp(logits, axis=-1)
        ll = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
        ce = jnp.sum((lse - ll) * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)  # [K]
        acc = jnp.sum((jnp.argmax(logits, -1) == lab) * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
        loss = jnp.sum(weights * ce) / jnp.sum(weights)
        aux = {f"acc{k}": acc[k] for k in range(k_heads)}
        if d2t is not None:
            aux["in_vocab"] = jnp.sum(m) / n_all
        return loss, aux

    return loss_fn


def store_states(fwd, params, tokens, batch_size: int, log=print, cache_dir: str = "", key: str = "",
                 tag: str = "", prefix: str = "hidden", what: str = "hidden states") -> np.ndarray:
    """``fwd(params, tokens [b,T]) -> float16 [b,T,...]`` (jitted) over every sequence, in batches (the last one
    padded); with ``cache_dir`` kept as ``<prefix>-<hash>.npy`` (hash of ``key``, the tokens' shape, ``tag`` and
    the tokens) and read back on the next call. ``what`` names the states in the progress lines."""
    import hashlib
    n, t = tokens.shape
    path = None
    if cache_dir:
        h = hashlib.sha256(f"{key}|{tokens.shape}|{tag}".encode() + np.ascontiguousarray(tokens, np.int32).tobytes())
        path = os.path.join(cache_dir, f"{prefix}-{h.hexdigest()[:20]}.npy")
        if os.path.isfile(path):
            hid = np.load(path)
            log(f"stored {what}: {hid.shape} float16 read from {path}")
            return hid
    t0 = time.time()
    out = []
    for lo in range(0, n, batch_size):
        x = tokens[lo:lo + batch_size]
        pad = batch_size - len(x)
        h = np.asarray(fwd(params, np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x))
        out.append(h[:len(x)])
        if lo == 0 or (lo // batch_size) % 10 == 9:
            done = lo + len(x)
            log(f"{what}: {done}/{n} sequences, {time.time() - t0:.0f} s, ETA "
                f"{(time.time() - t0) / done * (n - done):.0f} s")
    hid = np.concatenate(out)
    log(f"stored {what}: {hid.shape} float16, {hid.nbytes / 2**20:.1f} MiB in {time.time() - t0:.1f} s")
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, hid)
        os.replace(tmp, path)
    return hid


def store_hidden(model, target_params, tokens, batch_size: int, log=print, cache_dir: str = "",
                 key: str = "", layers: tuple = ()) -> np.ndarray:
    """The target's final-norm hidden states ``[N,T,E]`` float16 of every sequence (one forward each);
    with ``layers`` (the model's ``hidden_layers``), ``[N,T,k+1,E]``: the residual stream after each of
    those layers, then the final-norm hidden state.

    cache_dir: a folder keeping them as ``hidden-<hash>.npy`` (hash of ``key``, e.g. the target's
    fingerprint and weight kind, and of the tokens), so the Medusa and EAGLE runs of one corpus compute
    them once; "" keeps nothing."""
    t = tokens.shape[1]

    def forward(tp, x):
        o = model(tp, x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), x.shape), model.init_cache(x.shape[0], t),
                  **({"hidden_layers": tuple(layers)} if layers else {}))
        if not layers:
            return o.hidden.astype(jnp.float16)
        return jnp.concatenate([jnp.moveaxis(o.layer_hidden, 0, 2), o.hidden[:, :, None]], axis=2).astype(jnp.float16)

    return store_states(jax.jit(forward), target_params, tokens, batch_size, log, cache_dir, key,
                        tag=str(tuple(layers)) if layers else "")


def split_heldout(n: int, fraction: float, seed: int = 1234):
    """Deterministic (train indices, held-out indices) of n sequences (at least one of each)."""
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(1, int(round(n * fraction))), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train", "jaxdec"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def train_medusa(cfg: MedusaTrainConfig, model, target_params, seqs, prompt_lens, fingerprint: str,
                 target_name: str = "", command: str = "", stop_after=None, log=print):
    """Train heads on ``seqs``; writes ``<out>/heads.safetensors``; returns (FitResult, heads path)."""
    from jaxdec.speculative.heads.medusa import KIND, MedusaConfig, init_params
    if len(seqs) < 2:
        raise ConfigError(f"need at least 2 training sequences, got {len(seqs)}")
    e = int(model(target_params, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                  model.init_cache(1, 1)).hidden.shape[-1])
    mcfg = MedusaConfig(hidden=e, num_heads=cfg.num_heads, num_layers=cfg.num_layers, draft_vocab=cfg.draft_vocab)
    arrays = sequences_to_arrays(seqs, prompt_lens, cfg.seq_len, int(getattr(model, "pad_id", 0)))
    if cfg.hidden == "stored":
        arrays["hidden"] = store_hidden(model, target_params, arrays["tokens"], cfg.batch_size, log,
                                        cfg.hidden_cache, f"{fingerprint}|{cfg.weights}")
    tr, ho = split_heldout(len(seqs), cfg.eval_fraction)
    train = ArrayData({k: v[tr] for k, v in arrays.items()})
    held = ArrayData({k: v[ho] for k, v in arrays.items()})
    gen_tokens = int(np.sum(arrays["length"][tr] - arrays["prompt_len"][tr]))
    meta = {"fingerprint": fingerprint, "kind": KIND, "heads_config": mcfg.to_dict()}
    d2t = None
    if cfg.draft_vocab:
        d2t = build_draft_vocab([seqs[i] for i in tr], [prompt_lens[i] for i in tr], model.vocab_size,
                                cfg.draft_vocab)
        meta["d2t_sha256"] = __import__("hashlib").sha256(d2t.tobytes()).hexdigest()
    loss_fn = make_loss(model, mcfg, cfg.positions, cfg.decay, d2t)
    res = fit(cfg, init_params(mcfg, cfg.seed), loss_fn, train, frozen=target_params, eval_data=held, meta=meta,
              tokens_per_example=None, stop_after=stop_after, log=log)
    tensors = dict(jax.device_get(res.params))
    if d2t is not None:
        tensors["d2t"] = d2t
    extra = {}
    if cfg.calibrate_tree and int(res.state.step) == cfg.steps:
        paths = label_rank_paths(model, mcfg, res.params, target_params, {k: v[ho] for k, v in arrays.items()}, d2t)
        extra = calibrate_tree(model, mcfg, res.params, target_params, paths, d2t, log)
    path = save_finished_heads(res, cfg, KIND, tensors, mcfg.to_dict(), fingerprint, target_name, command,
                               int(len(tr)), int(np.sum(arrays["length"][tr])), log,
                               data_generated_tokens=gen_tokens, **extra)
    res.d2t = d2t
    return res, path


MAX_RANK = 8  # candidates per head a calibrated tree may use


def label_rank_paths(model, mcfg, head_params, target_params, arrays, d2t=None) -> np.ndarray:
    """``[A, K]``: at every anchor t (from the last prompt token on) of the given sequences, the rank of
    the target's token x_{t+2+k} among head k's logits (`MAX_RANK`: not in the first MAX_RANK, outside
    the draft vocabulary or past the sequence's end); `jaxdec.speculative.calibrate.tree_from_paths`
    turns them into a tree."""
    from jaxdec.speculative.heads.medusa import draft_head, head_logits
    head_w = None if d2t is None else draft_head(model, target_params, d2t)
    t2d = None
    if d2t is not None:
        t2d = np.full((model.vocab_size,), -1, np.int64)
        t2d[np.asarray(d2t)] = np.arange(len(d2t))
    k_heads = mcfg.num_heads

    from_hidden = jax.jit(lambda hp, tp, hw, h: head_logits(mcfg, hp, model, tp, h, hw))

    @jax.jit
    def recompute(hp, tp, hw, tokens):  # [1,T] -> [K,T,V]
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        hid = model(tp, tokens, pos, model.init_cache(1, tokens.shape[1])).hidden[0]
        return head_logits(mcfg, hp, model, tp, hid, hw)

    out = []
    for i in range(len(arrays["tokens"])):
        toks, n, plen = arrays["tokens"][i], int(arrays["length"][i]), int(arrays["prompt_len"][i])
        args = (head_params, target_params, head_w)
        lg = np.asarray(from_hidden(*args, jnp.asarray(arrays["hidden"][i], jnp.float32)) if "hidden" in arrays
                        else recompute(*args, jnp.asarray(toks[None])))  # [K,T,V]
        for t in range(max(plen - 1, 0), n - 2):
            row = []
            for k in range(k_heads):
                j = t + 2 + k
                lab = int(toks[j]) if j < n else -1
                if lab >= 0 and t2d is not None:
                    lab = int(t2d[lab])
                row.append(MAX_RANK if lab < 0 else min(MAX_RANK, int(np.sum(lg[k, t] > lg[k, t, lab]))))
            out.append(row)
    return np.asarray(out, np.int32).reshape(-1, k_heads)


def calibrate_tree(model, mcfg, head_params, target_params, paths, d2t=None, log=print) -> dict:
    """The Medusa tree for this machine: the target's cost curve (batch 1) and the heads' own cost are
    measured, and `choose_tree_from_paths` keeps the size with the best predicted speedup on the
    held-out rank paths. -> ``{"tree": ..., "calibration": ...}`` for the heads file's metadata."""
    from jaxdec.speculative.calibrate import choose_tree_from_paths, measure_cost_curve
    from jaxdec.speculative.heads.medusa import draft_head, head_logits
    curve = measure_cost_curve(model, target_params, batch=1, context=128, reps=5)
    head_w = None if d2t is None else draft_head(model, target_params, d2t)
    f = jax.jit(lambda hp, tp, hw, h: head_logits(mcfg, hp, model, tp, h, hw))
    args = (head_params, target_params, head_w, jnp.zeros((1, mcfg.hidden), jnp.float32))
    jax.block_until_ready(f(*args))
    secs = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        secs.append(time.perf_counter() - t0)
    draft_cost = float(np.min(secs)) / curve["seconds"][1]
    tree, speed, table = choose_tree_from_paths(curve, paths, draft_cost=draft_cost, max_rank=MAX_RANK)
    log(f"tree: {tree.num_nodes} nodes, depth {tree.max_depth}, predicted speedup {speed:.2f} (draft cost "
        f"{draft_cost:.3f} of a target call; {len(paths)} held-out positions)")
    return {"tree": {"parents": list(tree.parents), "ranks": list(tree.ranks)},
            "calibration": {"predicted_speedup": speed, "draft_cost": draft_cost, "positions": int(len(paths)),
                            "cost_curve": {str(k): v for k, v in curve["relative"].items()},
                            "candidates": [list(r) for r in table]}}


def save_finished_heads(res, cfg, kind, tensors, config: dict, fingerprint: str, target_name: str, command: str,
                        data_examples: int, data_tokens: int, log=print, **extra) -> str:
    """Write ``<out>/heads.safetensors`` with its provenance once the run has reached ``cfg.steps`` (a run
    stopped early writes nothing); -> the heads path either way."""
    from jaxdec.speculative.heads.artefact import save_heads
    path = os.path.join(cfg.out, "heads.safetensors")
    if int(res.state.step) == cfg.steps:
        save_heads(path, kind, tensors, config, fingerprint, target=target_name, command=command,
                   data_examples=data_examples, data_tokens=data_tokens, steps=cfg.steps, commit=git_commit(),
                   wall_s=round(res.wall_s, 1),
                   final_eval=res.final_eval, **extra)
        log(f"heads: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return path


def run_head_script(name: str, config_cls, train_fn, argv=None, doc=None):
    """The ``main`` of a head-training script: flags, the frozen target, its corpus (refused when another
    target generated it), ``train_fn(cfg, model, params, seqs, prompt_lens, fingerprint, target_name=,
    command=)``, and the ``--export`` copy of the heads file."""
    prog = f"python -m train.{name}"
    cfg = config_from_args(config_cls, argv, prog=prog, description=doc)
    import jaxdec
    from jaxdec.speculative.heads.artefact import target_fingerprint
    from train.data import load_corpus
    t0 = time.time()
    m = jaxdec.load(cfg.model, weights=cfg.weights)
    fp = target_fingerprint(m.path)
    corpus = load_corpus(cfg.data)
    if corpus["fingerprint"] != fp:
        raise SystemExit(f"train.{name}: error: --data {cfg.data!r} was generated by another target "
                         f"({corpus['target']!r}); regenerate it with python -m train.data --model {cfg.model}")
    print(f"target {cfg.model} ({os.path.basename(m.path)}) loaded in {time.time() - t0:.1f} s; corpus "
          f"{len(corpus['seqs'])} sequences, {corpus['tokens']:,} tokens")
    command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    res, path = train_fn(cfg, m.model, m.params, corpus["seqs"], corpus["prompt_lens"], fp,
                         target_name=cfg.model, command=command)
    if cfg.export and os.path.isfile(path):
        os.makedirs(os.path.dirname(os.path.abspath(cfg.export)), exist_ok=True)
        shutil.copyfile(path, cfg.export)
        print(f"exported {cfg.export}")
    return res, path


def main(argv=None):
    return run_head_script("medusa", MedusaTrainConfig, train_medusa, argv, __doc__)

if __name__ == "__main__":
    main()
