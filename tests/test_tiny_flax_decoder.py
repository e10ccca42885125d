"""A tiny non-Llama decoder written with flax.linen runs through the same loop (the model interface is
all a decoder needs). It uses learned absolute positions, LayerNorm and GELU: nothing Llama-specific.
It implements the required protocol members plus the optional ``embed``/``embeds=`` pair (so superposed
decoding runs on it) and leaves the other optional members out (`truncated_draft` refuses it by name)."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.attention.reference import attend, causal_block_mask
from jaxdec.cache import KVCache, append
from jaxdec.cache.kv import swap_heads_slots
from jaxdec.core.generate import generate, score
from jaxdec.models.interface import ModelOutput

V, E, H, MAXPOS = 37, 32, 4, 128


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, positions, kc, vc, lengths, mask):
        b, t, _ = x.shape
        h = nn.LayerNorm()(x)
        q = nn.Dense(E)(h).reshape(b, t, H, E // H)
        k = nn.Dense(E)(h).reshape(b, t, H, E // H)
        v = nn.Dense(E)(h).reshape(b, t, H, E // H)
        a = attend(q, kc, vc, lengths, k, v, mask, positions)
        x = x + nn.Dense(E)(a.reshape(b, t, E))
        x = x + nn.Dense(E)(nn.gelu(nn.Dense(2 * E)(nn.LayerNorm()(x))))
        return x, k, v


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens, positions, kc, vc, lengths, mask, embeds=None):
        table = nn.Embed(V, E, name="tok")
        x = (table(tokens) if embeds is None else embeds) + nn.Embed(MAXPOS, E)(positions)
        x, k, v = Block()(x, positions, kc, vc, lengths, mask)
        h = nn.LayerNorm()(x)
        return nn.Dense(V)(h), h, k, v


@dataclasses.dataclass(frozen=True)
class TinyFlaxDecoder:
    """Adapter: a linen module's `apply` behind jaxdec's model interface."""
    vocab_size: int = V
    num_layers: int = 1
    eos_ids: tuple = (0,)

    def init_cache(self, batch, size):
        return KVCache.create(1, batch, size, H, E // H)

    def embed(self, params, ids):
        return params["params"]["tok"]["embedding"][ids].astype(jnp.float32)

    def __call__(self, params, tokens, positions, cache, mask=None, layers=None, logits_at=None,
                 return_layer_hidden=False, *, embeds=None):
        b, t = positions.shape
        mask = causal_block_mask(b, t) if mask is None else mask
        # KVCache buffers are head-major [L,B,KVH,S,D]; this module's attention reads [B,S,KVH,D]
        kc, vc = swap_heads_slots(cache.k)[0], swap_heads_slots(cache.v)[0]
        logits, h, k, v = TinyLM().apply(params, tokens, positions, kc, vc, cache.lengths, mask, embeds=embeds)
        cache = append(cache, k[None], v[None])
        if logits_at is not None:
            logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
        return ModelOutput(logits, h, cache, None)


def _params():
    m = TinyFlaxDecoder()
    c = m.init_cache(1, 4)
    z = jnp.zeros((1, 4), jnp.int32)
    return TinyLM().init(jax.random.PRNGKey(0), z, z, swap_heads_slots(c.k)[0], swap_heads_slots(c.v)[0], c.lengths,
                         causal_block_mask(1, 4))


def _naive_greedy(model, params, prompt, n, width=32):
    """Uncached reference: re-run the whole sequence for every new token. The sequence is padded to a
    fixed width (one compile); under the causal mask the padding cannot change earlier positions."""
    fwd = jax.jit(lambda p, toks: model(p, toks, jnp.arange(width)[None], model.init_cache(1, width)).logits)
    seq = list(prompt)
    for _ in range(n):
        t = len(seq)
        logits = fwd(params, jnp.asarray([seq + [1] * (width - t)]))
        nxt = int(jnp.argmax(logits[0, t - 1]))
        seq.append(nxt)
        if nxt in model.eos_ids:
            break
    return seq[len(prompt):]


def test_tiny_flax_decoder_greedy_equals_uncached_reference():
    model, params = TinyFlaxDecoder(), _params()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, size=n).tolist() for n in (3, 9, 5)]
    g = generate(model, params, prompts, max_new_tokens=12)
    for p, toks in zip(prompts, g.tokens):
        assert toks == _naive_greedy(model, params, p, 12)


def test_tiny_flax_decoder_score_equals_uncached_logprobs():
    model, params = TinyFlaxDecoder(), _params()
    prompt, cont = [3, 5, 7], [11, 2, 30, 4]
    lp = score(model, params, [prompt], [cont])[0]
    seq = prompt + cont
    out = model(params, jnp.asarray([seq]), jnp.arange(len(seq))[None], model.init_cache(1, len(seq)))
    ref = jax.nn.log_softmax(out.logits[0], -1)
    want = [float(ref[len(prompt) - 1 + i, c]) for i, c in enumerate(cont)]
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)


def test_tiny_flax_decoder_optional_members():
    """``embed``/``embeds=`` are enough for superposed decoding (k = 1 is greedy); ``truncate`` is absent,
    and `truncated_draft` says so by name."""
    import pytest
    from jaxdec.search.superposed import superposed_generate
    from jaxdec.speculative import truncated_draft
    model, params = TinyFlaxDecoder(), _params()
    prompts = [[3, 5, 7], [11, 2, 30, 4, 9]]
    g = superposed_generate(model, params, prompts, num_drafts=1, max_new_tokens=6)
    assert g.tokens == generate(model, params, prompts, max_new_tokens=6).tokens
    with pytest.raises(TypeError, match="`truncate`"):
        truncated_draft(model, params, 1)
