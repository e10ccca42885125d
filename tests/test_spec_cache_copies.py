"""The speculative engine keeps the KV cache out of its `lax.cond` (block call vs one-token call): the model
returns the block's keys/values (`write_cache=False`) and the engine writes them after the cond. Passed through
the cond, XLA:CPU copied the whole cache twice per step (into the cond's result, then into the loop's buffer)
and twice more in the block branch: ~18 MB per step at 192 slots, growing with the cache.

Checked on the compiled decode loop (the program `generate` runs): no cache-sized copy with the deferred
write, and the same tokens and statistics as the old path, which (negative control) has the copies. The
same for the `lax.switch` over verify block lengths (``verify_buckets``)."""
from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from jaxdec import generate
from jaxdec.core import loop
from jaxdec.models.llama import LlamaModel
from jaxdec.speculative import PromptLookupDrafter, SpeculativeDecoder


@dataclasses.dataclass(frozen=True)
class _WritesInCond(LlamaModel):
    """The same model without the deferred write: the engine takes its old path."""
    supports_deferred_kv_write = False


def _run_and_hlo(model, params, prompts, monkeypatch, decoder=None):
    seen = {}
    orig = loop.run_jit

    def spy(*args, **kw):
        seen["args"], seen["kw"] = args, kw
        return orig(*args, **kw)

    monkeypatch.setattr(loop, "run_jit", spy)
    decoder = decoder or SpeculativeDecoder(PromptLookupDrafter(num_tokens=8, max_ngram=3))
    out = generate(model, params, prompts, decoder=decoder, max_new_tokens=24, stop_ids=())
    monkeypatch.setattr(loop, "run_jit", orig)
    size = seen["kw"].get("cache_size", seen["args"][6] if len(seen["args"]) > 6 else None)
    return out, orig.lower(*seen["args"], **seen["kw"]).compile().as_text(), size


def _cache_copies(hlo: str, model, prompts, size: int) -> int:
    """Copies of a whole cache buffer ``[L,B,KVH,S,D]``, except those of the zero-filled initial cache."""
    c = model.config
    shape = rf"f32\[{c.num_layers},{len(prompts)},{c.num_kv_heads},{size},{c.head_dim}\]"
    return len(re.findall(rf"= {shape}(\{{[^}}]*\}})? copy\(%(?!wrapped_broadcast)", hlo))


def test_speculative_loop_copies_no_cache(model_f32, chat_prompt_ids, monkeypatch):
    model, params = model_f32
    assert getattr(model, "supports_deferred_kv_write", False)
    prompts = [chat_prompt_ids[0] + chat_prompt_ids[0][-12:]]  # a repeated tail: prompt lookup drafts
    new, hlo_new, size = _run_and_hlo(model, params, prompts, monkeypatch)
    old_model = _WritesInCond(**{f.name: getattr(model, f.name) for f in dataclasses.fields(LlamaModel)})
    old, hlo_old, size_old = _run_and_hlo(old_model, params, prompts, monkeypatch)
    assert size == size_old and size > 0
    assert new.tokens == old.tokens and new.stats["tau"] == old.stats["tau"]
    assert new.stats["raw"]["pos_accepted"] == old.stats["raw"]["pos_accepted"]
    assert 0 < new.stats["block_calls"] < new.stats["model_calls"], "both branches of the cond must run"
    assert _cache_copies(hlo_old, model, prompts, size) >= 4  # the negative control: the old path copies
    assert _cache_copies(hlo_new, model, prompts, size) == 0


def test_verify_buckets_switch_copies_no_cache(monkeypatch):
    """The same with `verify_buckets` (a `lax.switch` over block lengths, tests/test_verify_buckets.py): the
    deferred write keeps the cache out of every branch, on the tiny random Llama; negative control: the
    in-call write passes the cache through the switch and is copied."""
    import sys
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from test_verify_buckets import RaggedDrafter
    from tiny_llama import tiny_llama, tiny_prompts

    model, params = tiny_llama()
    prompts = tiny_prompts(2)
    dec = SpeculativeDecoder(RaggedDrafter(PromptLookupDrafter(num_tokens=8, max_ngram=3), seed=4),
                             verify_buckets="auto")
    new, hlo_new, size = _run_and_hlo(model, params, prompts, monkeypatch, dec)
    old_model = _WritesInCond(**{f.name: getattr(model, f.name) for f in dataclasses.fields(LlamaModel)})
    old, hlo_old, size_old = _run_and_hlo(old_model, params, prompts, monkeypatch, dec)
    assert size == size_old and size > 0
    assert new.tokens == old.tokens and new.stats["raw"]["bucket_steps"] == old.stats["raw"]["bucket_steps"]
    steps = new.stats["raw"]["bucket_steps"]
    assert sum(s > 0 for s in steps) >= 3 and sum(steps[1:-1]) > 0, steps  # truncated blocks really ran
    assert _cache_copies(hlo_old, model, prompts, size) >= 4  # the negative control: the old path copies
    assert _cache_copies(hlo_new, model, prompts, size) == 0
