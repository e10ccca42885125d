"""`generate_speculative`: `jaxdec.generate` with a speculative decoder, batch by batch, with statistics
summed over all batches and (optionally) drafter state carried from batch to batch (hot start: Token
Recycling's adjacency matrix, the n-gram tables), as the Token Recycling paper runs its matrix across
queries. Rows see the carried state only through their drafts, so tokens never change (greedy) and
the output distribution never changes (sampling); only τ does.
"""
from __future__ import annotations

from typing import Optional

from jaxdec.core.generate import Generation, generate
from jaxdec.speculative.engine import merge_raw, summarize_stats


def generate_speculative(model, params, prompts, decoder, *, max_new_tokens: int = 64,
                         batch_size: Optional[int] = None, hot_start: bool = True, carry: Optional[dict] = None,
                         seed: int = 0, **kw) -> Generation:
    """Every batch is one `generate` call of exactly ``batch_size`` rows (the last one padded with inert
    rows, dropped from the output), so one compiled program serves all batches.
    ``carry``: drafter state to start from (e.g. a previous result's ``stats["carry"]``)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    bs = min(batch_size or len(prompts), len(prompts))
    tokens, finish, raw, secs, calls, rows = [], [], None, 0.0, 0, []
    text = [] if kw.get("tokenizer") is not None else None
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (bs - real)
        warm = dict(carry) if carry else {}

        def inputs_fn(inputs, _rows, warm=warm, real=real):
            import jax.numpy as jnp
            # padding rows are inert (max_new 0): they emit nothing and count in no statistic
            mx = jnp.where(jnp.arange(inputs["max_new"].shape[0]) < real, inputs["max_new"], 0)
            return {**inputs, **warm, "max_new": mx}

        g = generate(model, params, chunk, decoder=decoder, max_new_tokens=max_new_tokens, batch_size=bs,
                     seed=seed + start, inputs_fn=inputs_fn, **kw)
        raw = merge_raw(raw, g.stats["raw"])
        secs += g.stats["seconds"]
        calls += g.stats["model_calls"]
        tokens += g.tokens[:real]
        finish += g.finish_reason[:real]
        rows += g.prompt_ids[:real]
        if text is not None:
            text += g.text[:real]
        if hot_start:
            carry = g.stats.get("carry") or carry
    new = sum(len(t) for t in tokens)
    stats = {"model_calls": calls, "new_tokens": new, "seconds": secs,
             "tokens_per_second": new / secs if secs > 0 else float("nan"), **summarize_stats(raw)}
    if carry:
        stats["carry"] = carry
    return Generation(prompt_ids=rows, tokens=tokens, finish_reason=finish, stats=stats, text=text)
