"""Speculative decoding: drafters propose static-shaped trees, one target call verifies them.

    import jaxdec
    from jaxdec.speculative import SpeculativeDecoder, PromptLookupDrafter, TokenRecyclingDrafter
    m = jaxdec.load()
    out = jaxdec.generate(m.model, m.params, prompts, decoder=SpeculativeDecoder(PromptLookupDrafter(8)),
                          max_new_tokens=128)
    out.tokens                      # exactly the greedy tokens
    out.stats["tau"], out.stats["acceptance_per_position"], out.stats["target_calls"]

Pieces (each a frozen dataclass of static configuration, run by the spine's `lax.while_loop` driver):

* `SpeculativeDecoder(drafter, verifier="greedy"|"sampling", tree_sampling="iid"|"without_replacement")`
  (`engine`): draft -> one target call over the tree -> verify -> KV compaction -> bonus token, per-row
  ragged acceptance, EOS accepted mid-draft and ``max_new`` respected exactly.
* Trees (`tree`): `TreeSpec` templates (chain, per-depth widths, best-first from per-rank acceptance),
  `Draft` (tokens, parents, validity, q), the ancestor mask.
* Verifiers (`verify`): greedy match on trees; speculative sampling with residual resampling on chains;
  recursive rejection sampling on trees (i.i.d. or without-replacement siblings).
* Drafters (`drafters`): `PromptLookupDrafter` (PLD / input-copy aggressive decoding),
  `TokenRecyclingDrafter`, `NGramDrafter` (ADED-style tri-grams; STAND-style Gumbel-top-k trees with q),
  `LayerSkipDrafter` (SWIFT/DEL self-speculation through the target's ``layers`` mask),
  `DraftModelDrafter` (a separate model with its own cache; `truncated_draft` makes one from the target),
  both model drafters with SpecDec++-style confidence stopping (``stop_threshold``).
* `PearlDecoder` (`pearl`): PEARL's pre-verify / post-verify schedule with a draft model (adaptive draft
  length), one step of the same loop; phase counts and a two-device parallel-time model in ``stats``.
* `calibrate`: measured cost curve -> tree size (saveable config); `layer_select`: SWIFT-style skip-set
  search and DEL-style exit choice from teacher-forced match rates.
* `toy.TrigramModel`: a context-dependent toy LM behind the model interface for exact/statistical tests.
* `cli`: ``jaxdec generate --method speculative --drafter pld|recycling|aded|stand|swift|del|draft-model|pearl``.

Statistics: ``generate`` sums the counters of every batch before `summarize`; to combine separate
``generate`` calls, sum their ``stats["raw"]`` with `merge_raw` and call `summarize_stats`.
"""
from jaxdec.speculative.tree import Draft, TreeSpec, ancestor_mask, block_depths
from jaxdec.speculative.verify import Verdict, greedy_verify, sampling_verify_chain, sampling_verify_tree
from jaxdec.speculative.engine import (SpeculativeDecoder, emit_block, merge_raw, summarize_stats,
                                       with_draft_params)
from jaxdec.speculative.drafters import (DraftModelDrafter, LayerSkipDrafter, NGramDrafter, PromptLookupDrafter,
                                         TokenRecyclingDrafter, default_recycling_tree, ngram_lookup, truncated_draft)
from jaxdec.speculative.pearl import PearlDecoder, curve_from_calibration

__all__ = ["Draft", "TreeSpec", "ancestor_mask", "block_depths", "Verdict", "greedy_verify", "sampling_verify_chain",
           "sampling_verify_tree", "SpeculativeDecoder", "emit_block", "summarize_stats", "merge_raw",
           "with_draft_params", "PromptLookupDrafter", "TokenRecyclingDrafter", "NGramDrafter", "LayerSkipDrafter",
           "DraftModelDrafter", "default_recycling_tree", "ngram_lookup", "truncated_draft", "PearlDecoder",
           "curve_from_calibration"]
