"""A tiny random-weight Llama whose head counts (16 query / 8 KV heads) and MLP width divide a model
axis of 2, 4 or 8, so the mesh tests exercise the attention-head split the default model (9 / 3 heads)
never gets. Its untied LM head (split over the vocabulary like the embedding) favours the successor of the
current token in fixed 4-token cycles, blurred by the random layers (weights N(0, scale)): greedy text
partly repeats, so prompt lookup has drafts to accept (tau ~ 2 at 16 new tokens), and sampling at
temperature 1 still differs from greedy at most steps. Imported by the mesh scripts in this folder (run
as subprocesses with their own XLA_FLAGS)."""
from __future__ import annotations

import numpy as np

V, E, F, L, H, KVH, D = 256, 64, 128, 2, 16, 8, 4


def tiny_llama(seed: int = 0, scale: float = 0.13, head: float = 0.1):
    """(model, params): fixed random weights from ``seed`` (layers N(0, scale), embeddings N(0, 1), the
    head ``head`` x the embedding of each id's predecessor in its cycle)."""
    import jax.numpy as jnp

    from jaxdec.models.config import LlamaConfig
    from jaxdec.models.llama import LlamaModel
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=KVH,
                      head_dim=D, rope_theta=10000.0, tie_embeddings=False, eos_ids=(0,), max_position=512)
    rng = np.random.default_rng(seed)

    def w(*shape, sd=scale):
        return jnp.asarray(rng.normal(0.0, sd, shape), jnp.float32)

    embed = w(V, E, sd=1.0)
    order = rng.permutation(np.arange(3, V))  # cycles of 4 over the ids 3.. (never the stop id 0)
    prev = np.arange(V)
    for c in range(0, len(order), 4):
        cyc = order[c:c + 4]
        prev[cyc] = np.roll(cyc, 1)  # row v of the head is the embedding of v's predecessor
    params = {"embed": embed, "lm_head": head * embed[prev], "final_norm": jnp.ones((E,), jnp.float32),
              "layers": {"attn_norm": jnp.ones((L, E), jnp.float32), "wq": w(L, H * D, E), "wk": w(L, KVH * D, E),
                         "wv": w(L, KVH * D, E), "wo": w(L, E, H * D), "mlp_norm": jnp.ones((L, E), jnp.float32),
                         "w_gate": w(L, F, E), "w_up": w(L, F, E), "w_down": w(L, E, F)}}
    return LlamaModel(cfg, matmul_impl="xla"), params


def tiny_prompts(count: int = 8, seed: int = 1) -> list:
    """``count`` prompts of 5..12 tokens (ids 3..V-1: never the stop id 0), each repeating a short
    pattern so prompt lookup finds n-grams to copy."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        pat = rng.integers(3, V, 3).tolist()
        n = 5 + (i * 5) % 8
        out.append((pat * 4)[:n])
    return out
