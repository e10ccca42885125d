"""The speculative engine keeps the KV cache out of its `lax.cond` (block call vs one-token call): the model
returns the block's keys/values (`write_cache=False`) and the engine writes them after the cond. Passed through
the cond, XLA:CPU copied the whole cache twice per step (into the cond's result, then into the loop's buffer)
and twice more in the block branch: ~18 MB per step at 192 slots, growing with the cache.

Checked on the compiled decode loop (the program `generate` runs): no cache-sized copy with the deferred
write, and the same tokens and statistics as the old path, which (negative control) has the copies."""
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


def _run_and_hlo(model, params, prompts, monkeypatch):
    seen = {}
    orig = loop.run_jit

    def spy(*args, **kw):
        seen["args"], seen["kw"] = args, kw
        return orig(*args, **kw)

    monkeypatch.setattr(loop, "run_jit", spy)
    out = generate(model, params, prompts, decoder=SpeculativeDecoder(PromptLookupDrafter(num_tokens=8, max_ngram=3)),
                   max_new_tokens=24, stop_ids=())
    monkeypatch.setattr(loop, "run_jit", orig)
    size = seen["kw"].get("cache_size", seen["args"][6] if len(seen["args"]) > 6 else None)
    return out, orig.lower(*seen["args"], **seen["kw"]).compile().as_text(), size


def _cache_copies(hlo: str, model, prompts, size: int) -> int:
    """Copies of a whole cache buffer ``[L,B,S,KVH,D]``, except those of the zero-filled initial cache."""
    c = model.config
    shape = rf"f32\[{c.num_layers},{len(prompts)},{size},{c.num_kv_heads},{c.head_dim}\]"
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
