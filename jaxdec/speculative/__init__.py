"""Speculative decoding: drafters propose static-shaped trees, one target call verifies them.

    from jaxdec.speculative import SpeculativeDecoder, PromptLookupDrafter
    dec = SpeculativeDecoder(PromptLookupDrafter(num_tokens=8))
    out = jaxdec.generate(model, params, prompts, decoder=dec, max_new_tokens=128)
    out.stats["tau"], out.stats["acceptance_per_position"]
"""
from jaxdec.speculative.tree import Draft, TreeSpec, ancestor_mask, block_depths
from jaxdec.speculative.verify import Verdict, greedy_verify, sampling_verify_chain, sampling_verify_tree
from jaxdec.speculative.engine import SpeculativeDecoder, emit_block, summarize_stats, merge_raw
from jaxdec.speculative.drafters import PromptLookupDrafter, TokenRecyclingDrafter, default_recycling_tree, ngram_lookup

__all__ = ["Draft", "TreeSpec", "ancestor_mask", "block_depths", "Verdict", "greedy_verify", "sampling_verify_chain",
           "sampling_verify_tree", "SpeculativeDecoder", "emit_block", "summarize_stats", "merge_raw",
           "PromptLookupDrafter", "TokenRecyclingDrafter", "default_recycling_tree", "ngram_lookup"]
