"""`generate_speculative`: `jaxdec.generate` with a speculative decoder and hot start on by default.

Statistics are summed over all batches by the driver, and drafter state is carried from batch to
batch (hot start: Token Recycling's adjacency matrix, the n-gram tables), as the Token Recycling paper
runs its matrix across queries. Rows see the carried state only through their drafts, so tokens never
change (greedy) and the output distribution never changes (sampling); only τ does.
"""
from __future__ import annotations

from typing import Optional

from jaxdec.core.generate import Generation, generate


def generate_speculative(model, params, prompts, decoder, *, max_new_tokens: int = 64,
                         batch_size: Optional[int] = None, hot_start: bool = True, carry=None,
                         seed: int = 0, **kw) -> Generation:
    """`generate(decoder=decoder, hot_start=True)`: every batch is one compiled call of ``batch_size`` rows
    (the last one padded with inert rows, dropped from the output), and each batch starts from the
    drafter state the batch before exported. ``carry``: drafter state to start from (a `DrafterCarry`
    or a previous result's ``stats["carry"]``)."""
    return generate(model, params, prompts, decoder=decoder, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    seed=seed, carry=carry, hot_start=hot_start, **kw)
