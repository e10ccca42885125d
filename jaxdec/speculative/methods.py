"""Named constructors for the speculative methods of the papers, so a researcher writes
``generate(m.model, m.params, ids, decoder=swift(m.model))`` instead of assembling drafter, tree and
verifier by hand. The CLI (`jaxdec generate --method speculative --drafter NAME`) builds its decoders
with these functions, and `PAPERS` lists what each implements (``jaxdec methods`` prints it).

Greedy verification (``sampling=False``) gives exactly the greedy tokens; ``sampling=True`` verifies
by lossless speculative sampling under the rows' `SamplingParams` (pass ``sampling=`` to `generate`).
Methods that run a separate draft model return ``(decoder, params)``: pass those params to `generate`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jaxdec.speculative.drafters import (DEFAULT_RECYCLING_RANK_PROBS, DraftModelDrafter, LayerSkipDrafter,
                                         NGramDrafter, PromptLookupDrafter, TokenRecyclingDrafter, truncated_draft)
from jaxdec.speculative.engine import SpeculativeDecoder, with_draft_params
from jaxdec.speculative.tree import TreeSpec

# name -> (paper, what the constructor builds)
PAPERS = {
    "prompt_lookup": ("Saxena 2023, Prompt Lookup Decoding", "n-gram match in the context, copied as a chain"),
    "aggressive_decoding": ("Ge et al. 2022, Lossless Acceleration ... by Aggressive Decoding (input copy)",
                            "n-gram match in the input only"),
    "input_guided": ("Ge et al. 2022, Lossless Acceleration ... by Aggressive Decoding (input-guided, IAD)",
                     "the input copied from an aligned pointer, re-aligned after each mismatch"),
    "token_recycling": ("Luo et al. 2024, Turning Trash into Treasure (Token Recycling)",
                        "adjacency matrix of past top-k candidates, static draft tree"),
    "aded": ("Zhang et al. 2024, ADED: adaptive n-gram decoding", "tri-gram table tree, greedy drafts"),
    "stand": ("Song et al. 2025, STAND: stochastic adaptive n-gram drafting",
              "n-gram table with Gumbel-top-k trees; under sampling, recursive rejection without replacement"),
    "swift": ("Xia et al. 2024, SWIFT: on-the-fly self-speculative decoding (layer skip)",
              "the target with a set of middle layers skipped drafts a chain"),
    "dynamic_exit": ("DEL: dynamic exit layer for self-speculative decoding",
                     "the target's first layers (an early exit) draft a chain"),
    "draft_model": ("Leviathan et al. 2023 / Chen et al. 2023, speculative decoding with a draft model",
                    "a separate (here: layer-truncated) model drafts a chain"),
    "specdec_pp": ("Huang et al. 2024, SpecDec++: stop drafting when acceptance looks unlikely",
                   "draft model chain stopped by a learned acceptance head (or the draft's confidence); "
                   "EAGLE and Clover chains too (eagle / clover(..., stop_head=))"),
    "clover": ("Xiao et al. 2024, Clover: regressive lightweight speculative decoding with sequential knowledge",
               "trained heads with a regressive connection, an attention decoder and an augmenting block"),
    "draft_lm": ("Kavehzadeh et al. 2024, S2D: sorted speculative decoding (and a plain distilled draft)",
                 "a few target-initialised layers distilled from the target; S2D: every exit a draft"),
    "pearl": ("Liu et al. 2025, PEARL: parallel speculative decoding with adaptive draft length",
              "pre-verify / post-verify schedule with a draft model"),
    "medusa": ("Cai et al. 2024, Medusa: multiple decoding heads (Medusa-1: frozen target, trained heads)",
               "K trained heads on the target's last hidden state draft a chain or Cartesian tree"),
    "eagle": ("Li et al. 2024, EAGLE-1/2/3: feature-level autoregressive draft head",
              "one trained decoder layer over the target's (fused low/mid/high) features drafts a chain, "
              "reduced draft vocabulary"),
    "hidden_transfer": ("Wu et al. 2024, Parallel Decoding via Hidden Transfer for lossless LLM acceleration",
                        "learned pseudo hidden states for the next positions carried through the target's last "
                        "layers draft a chain or tree"),
    "ppd": ("Chen et al. 2024, Hardware-aware parallel prompt decoding (PPD)",
            "trained prompt-token embeddings ride in the verify call (ensemble attention) and guess the next "
            "tokens; a sparse tree sized from the measured cost curve"),
    "lud": ("Sun et al. 2024, Decoding at the speed of thought: lexical units for parallel decoding",
            "a head proposes the next confident multi-token unit (labels from the target's confidence), verified "
            "greedily"),
    "longspec": ("Yang et al. 2025, LongSpec: long-context speculative decoding with efficient drafting and "
                 "verification", "a draft head with a constant-size memory (attention sinks + sliding window) "
                 "trained with anchor-offset positions"),
}


def _verifier(sampling: bool) -> str:
    return "sampling" if sampling else "greedy"


def _tree(tree: Optional[TreeSpec], size: Optional[int]) -> Optional[TreeSpec]:
    if tree is not None and size is not None:
        raise ValueError("give tree or tree_size, not both")
    if size is not None:
        if size < 1:
            raise ValueError(f"tree_size must be >= 1, got {size}")
        return TreeSpec.from_rank_probs(size, DEFAULT_RECYCLING_RANK_PROBS, max_depth=6)
    return tree


def prompt_lookup(num_tokens: int = 8, max_ngram: int = 3, sampling: bool = False) -> SpeculativeDecoder:
    return SpeculativeDecoder(PromptLookupDrafter(num_tokens, max_ngram, 1, source="context"), _verifier(sampling))


def aggressive_decoding(num_tokens: int = 8, max_ngram: int = 3, sampling: bool = False) -> SpeculativeDecoder:
    return SpeculativeDecoder(PromptLookupDrafter(num_tokens, max_ngram, 1, source="prompt"), _verifier(sampling))


def input_guided(num_tokens: int = 16, max_ngram: int = 3, sampling: bool = False) -> SpeculativeDecoder:
    """Input-guided aggressive decoding (`jaxdec.speculative.aggressive`): for prompts that ask to correct
    or reformat a given text, the draft is the input copied from the point of divergence."""
    from jaxdec.speculative.aggressive import InputGuidedDrafter
    return SpeculativeDecoder(InputGuidedDrafter(num_tokens, max_ngram), _verifier(sampling))


def token_recycling(tree: Optional[TreeSpec] = None, tree_size: Optional[int] = None,
                    sampling: bool = False) -> SpeculativeDecoder:
    t = _tree(tree, tree_size)
    return SpeculativeDecoder(TokenRecyclingDrafter(t) if t else TokenRecyclingDrafter(), _verifier(sampling))


def aded(tree: Optional[TreeSpec] = None, tree_size: Optional[int] = None, sampling: bool = False) -> SpeculativeDecoder:
    t = _tree(tree, tree_size)
    return SpeculativeDecoder(NGramDrafter(t) if t else NGramDrafter(), _verifier(sampling))


def stand(tree: Optional[TreeSpec] = None, tree_size: Optional[int] = None, sampling: bool = True) -> SpeculativeDecoder:
    """Under sampling: Gumbel-top-k draft trees verified without replacement (the paper's setting);
    greedy: the same n-gram tables with greedy drafts."""
    t = _tree(tree, tree_size)
    mode = "gumbel" if sampling else "greedy"
    drafter = NGramDrafter(t, mode=mode) if t else NGramDrafter(mode=mode)
    if sampling:
        return SpeculativeDecoder(drafter, "sampling", tree_sampling="without_replacement")
    return SpeculativeDecoder(drafter, "greedy")


def swift(model, skip_layers: Optional[Sequence[int]] = None, num_tokens: int = 3,
          sampling: bool = False) -> SpeculativeDecoder:
    """``skip_layers``: the layers the draft pass leaves out (default: the middle ~quarter, 11..18 of 30)."""
    n = model.num_layers
    skip = (tuple(range(round(n * 11 / 30), round(n * 19 / 30))) if skip_layers is None
            else tuple(int(i) for i in skip_layers))
    if any(not 0 <= i < n for i in skip):
        raise ValueError(f"skip_layers: layer indices must be in [0, {n}), got {list(skip)}")
    return SpeculativeDecoder(LayerSkipDrafter(skip, num_tokens, sample=sampling), _verifier(sampling))


def dynamic_exit(model, exit_layer: Optional[int] = None, num_tokens: int = 3,
                 sampling: bool = False) -> SpeculativeDecoder:
    """Drafts with layers ``[0, exit_layer)`` (default three quarters of the stack)."""
    n = model.num_layers
    e = (3 * n) // 4 if exit_layer is None else int(exit_layer)
    if not 1 <= e <= n:
        raise ValueError(f"exit_layer must be in [1, {n}], got {e}")
    return SpeculativeDecoder(LayerSkipDrafter(tuple(range(e, n)), num_tokens, sample=sampling), _verifier(sampling))


def _draft(model, params, draft_layers, draft):
    if draft is not None and draft_layers is not None:
        raise ValueError("give draft_layers or draft=(model, params), not both")
    if draft is None:
        if not 1 <= draft_layers <= model.num_layers:
            raise ValueError(f"draft_layers must be in [1, {model.num_layers}], got {draft_layers}")
        return truncated_draft(model, params, int(draft_layers))
    dm, dp = draft
    if dm.vocab_size != model.vocab_size:
        raise ValueError(f"draft model vocabulary ({dm.vocab_size}) differs from the target's ({model.vocab_size})")
    return dm, dp


def draft_model(model, params, draft_layers: Optional[int] = None, draft=None, num_tokens: int = 3,
                sampling: bool = False, stop_threshold: Optional[float] = None):
    """-> (decoder, params). The draft is ``draft=(model, params)`` or the target's first ``draft_layers``
    layers (default half)."""
    if draft is None and draft_layers is None:
        draft_layers = model.num_layers // 2
    dm, dp = _draft(model, params, draft_layers, draft)
    dec = SpeculativeDecoder(DraftModelDrafter(dm, num_tokens, sample=sampling, stop_threshold=stop_threshold),
                             _verifier(sampling))
    return dec, with_draft_params(params, dp)


def specdec_pp(model, params, draft_layers: Optional[int] = None, draft=None, num_tokens: int = 8,
               stop_threshold: Optional[float] = None, sampling: bool = False, stop_head=None, target=None):
    """-> (decoder, params): a draft-model chain that stops once the predicted probability that some of its
    tokens is rejected exceeds ``stop_threshold``. stop_head: the paper's learned acceptance head (a file
    written by ``train/specdec_pp.py`` for this draft, checked against ``target`` like `medusa`, or an
    ``(AcceptanceConfig, params)`` pair; `jaxdec.speculative.heads.acceptance`; default threshold 0.7);
    None: the draft's own confidence predicts acceptance (default threshold 0.3)."""
    if stop_head is None:
        return draft_model(model, params, draft_layers, draft, num_tokens, sampling,
                           0.3 if stop_threshold is None else stop_threshold)
    from jaxdec.speculative.heads.acceptance import build
    return build(model, params, stop_head, target=target, draft_layers=draft_layers, draft=draft, num_tokens=num_tokens,
                 threshold=0.7 if stop_threshold is None else stop_threshold, sampling=sampling)


def pearl(model, params, draft_layers: Optional[int] = None, draft=None, gamma: int = 4, sampling: bool = False):
    """-> (PearlDecoder, params); default draft: the target's first 90 % of layers."""
    from jaxdec.speculative.pearl import PearlDecoder
    if draft is None and draft_layers is None:
        draft_layers = (model.num_layers * 9) // 10
    dm, dp = _draft(model, params, draft_layers, draft)
    return PearlDecoder(dm, gamma, verifier=_verifier(sampling)), with_draft_params(params, dp)


def medusa(model, params, heads, target=None, tree: Optional[TreeSpec] = None, sampling: bool = False):
    """-> (decoder, params). Medusa-1 heads drafting for the target.

    heads: a heads file written by ``train/medusa.py`` (checked against the target, refused with
    `jaxdec.speculative.heads.artefact.HeadsMismatch` when trained for another one), or an in-memory
    ``(MedusaConfig, head params)`` pair, or ``(MedusaConfig, head params, d2t)`` with a reduced draft
    vocabulary (no check). target: the target's model file or folder (what
    `jaxdec.load` opened: ``m.path``), or a fingerprint string; None: the model has no file and its
    params are fingerprinted (`params_fingerprint`). tree: a `TreeSpec` (depth <= heads; default the
    tree stored with the heads, else the chain of all heads). sampling: each head's token drawn from its
    distribution and verified by speculative sampling (a chain; lossless for sampling)."""
    import os
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    import numpy as np
    from jaxdec.speculative.heads.medusa import (MedusaConfig, MedusaDrafter, draft_head, load_medusa,
                                                 tree_from_meta)
    d2t = None
    if isinstance(heads, tuple) and len(heads) in (2, 3) and isinstance(heads[0], MedusaConfig):
        config, hp = heads[:2]
        d2t = heads[2] if len(heads) == 3 else None
        stored_tree = None
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, meta, d2t = load_medusa(heads, fp)
        stored_tree = tree_from_meta(meta)
    else:
        raise TypeError(f"heads must be a heads file path or a (MedusaConfig, params) pair, got {type(heads).__name__}")
    if sampling and tree is None:
        stored_tree = None  # sampling drafts a chain (each head's token drawn from its q)
    drafter = MedusaDrafter(config, tree if tree is not None else stored_tree, sample=sampling)
    dparams = {"heads": hp, "target": params}
    if (d2t is None) != (config.draft_vocab == 0):
        raise ValueError(f"medusa: draft_vocab={config.draft_vocab} needs a d2t map of that many token ids "
                         f"(and none for the full vocabulary)")
    if d2t is not None:
        d2t = np.asarray(d2t)
        if d2t.shape != (config.draft_vocab,) or d2t.min() < 0 or d2t.max() >= model.vocab_size:
            raise ValueError(f"medusa: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
        dparams["d2t"] = d2t.astype(np.int32)
        dparams["head_w"] = draft_head(model, params, d2t)
    return SpeculativeDecoder(drafter, _verifier(sampling)), with_draft_params(params, dparams)


def clover(model, params, heads, target=None, sampling: bool = False, stop_head=None,
           stop_threshold: Optional[float] = None, verify_buckets=None):
    """-> (decoder, params). Clover heads (`jaxdec.speculative.heads.clover`): a heads file written by
    ``train/clover.py`` (checked against the target like `medusa`) or a ``(CloverConfig, params, d2t)``
    triple; sampling: drafts drawn from the heads' distributions, verified by speculative sampling.

    stop_head: SpecDec++'s learned stop on the chain (`jaxdec.speculative.heads.acceptance`): a heads file
    written by ``train/specdec_pp.py --drafter clover`` for these heads (checked against the target, and
    refused when trained for another draft), or an ``(AcceptanceConfig, params)`` pair; the chain stops
    once the predicted P(some draft token is rejected) would exceed ``stop_threshold`` (default 0.7).
    verify_buckets: `SpeculativeDecoder`'s (default "auto" with a stop head; the engine's without)."""
    from jaxdec.speculative.heads.clover import build, draft_id, resolve_heads
    if stop_head is None:
        if stop_threshold is not None:
            raise ValueError("stop_threshold is used only with stop_head (SpecDec++'s learned stop)")
        return build(model, params, heads, target=target, sampling=sampling, verify_buckets=verify_buckets)
    from jaxdec.speculative.heads.acceptance import drafter_stop
    config, hp, d2t = resolve_heads(model, params, heads, target)
    stop = drafter_stop(model, params, stop_head, config.hidden, draft_id(config, hp, d2t), "these Clover heads",
                        "the Clover heads' state", target, 0.7 if stop_threshold is None else stop_threshold)
    return build(model, params, (config, hp, d2t), sampling=sampling, stop=stop,
                 verify_buckets="auto" if verify_buckets is None else verify_buckets)


def draft_lm(model, params, heads, target=None, depth: Optional[int] = None, num_tokens: int = 4,
             sampling: bool = False, siblings: int = 1):
    """-> (decoder, params). A small draft model distilled from the target, or exit ``depth`` of an S2D
    network of sorted nested drafts (`jaxdec.speculative.heads.draft_lm`): a heads file written by
    ``train/distill_draft.py`` (checked against the target like `medusa`) or a ``(DraftLMConfig, params,
    d2t)`` triple; drafts chains of ``num_tokens`` (``siblings`` w > 1: plus each depth's next w - 1 best
    tokens as leaves, a tree at the chain's draft calls; greedy verification)."""
    from jaxdec.speculative.heads.draft_lm import build
    return build(model, params, heads, target=target, depth=depth, num_tokens=num_tokens, sampling=sampling,
                 siblings=siblings)


def hidden_transfer(model, params, heads, target=None, sampling: bool = False, tree: Optional[TreeSpec] = None):
    """-> (decoder, params). Hidden-transfer drafting (`jaxdec.speculative.heads.hidden_transfer`): learned
    pseudo hidden states for the next positions, carried through the target's last layers; a heads file
    written by ``train/hidden_transfer.py`` (checked against the target like `medusa`) or an in-memory
    ``(HiddenTransferConfig, params)`` pair;
    sampling: a chain drawn from the pseudo positions' distributions, verified by speculative sampling."""
    from jaxdec.speculative.heads.hidden_transfer import build
    return build(model, params, heads, target=target, tree=tree, sampling=sampling)


def ppd(model, params, heads, target=None, inline: bool = True, tree=None, sampling: bool = False):
    """-> (decoder, params). PPD's trained prompt tokens (`jaxdec.speculative.heads.ppd`): a file written by
    ``train/ppd.py`` (checked against the target like `medusa`) or a ``(PPDConfig, params)`` pair. inline
    (the paper's layout): the prompt tokens ride in the verify call (the engine's ``extra_inputs`` hook);
    False: a separate draft call per step. tree: None (the chain of the guesses), a `TreeSpec` (node at
    depth d, rank r: depth d's r-th best guess) or "auto" (the hardware-aware tree from the measured cost
    curve). Greedy verification; sampling: a chain (tree None or a chain) drawn from the guesses'
    distributions, verified by speculative sampling (lossless for sampling), in either layout."""
    from jaxdec.speculative.heads.ppd import build
    return build(model, params, heads, target=target, inline=inline, tree=tree, sampling=sampling)


def lud(model, params, heads, target=None, cut: Optional[float] = None, tree: Optional[TreeSpec] = None,
        lossy: bool = False):
    """-> (decoder, params). Lexical-unit drafting (`jaxdec.speculative.heads.lexical_units`): a head
    proposing the next confident multi-token unit, cut where it predicts the unit ends; a file written by
    ``train/lexical_units.py`` (checked against the target like `medusa`) or an in-memory triple. tree: a
    static `TreeSpec` of alternative units (node at depth d, rank r: token head d - 1's r-th best token; the
    same cut per depth); None: the chain. Greedy verification (lossless), unless ``lossy=True``: the paper's
    unverified acceptance of the kept unit (chain only; NOT the greedy output)."""
    from jaxdec.speculative.heads.lexical_units import build
    return build(model, params, heads, target=target, cut=cut, tree=tree, lossy=lossy)


def longspec(model, params, heads, target=None, num_tokens: Optional[int] = None):
    """-> (decoder, params). LongSpec's constant-memory draft head for long contexts
    (`jaxdec.speculative.heads.longspec`): a file written by ``train/longspec.py`` (checked against the
    target like `medusa`) or an in-memory triple; greedy verification."""
    from jaxdec.speculative.heads.longspec import build
    return build(model, params, heads, target=target, num_tokens=num_tokens)


def eagle(model, params, heads, target=None, sampling: bool = False, num_tokens: Optional[int] = None,
          tree_topk: Optional[int] = None, tree_nodes: Optional[int] = None, stop_head=None,
          stop_threshold: Optional[float] = None, verify_buckets=None):
    """-> (decoder, params). The EAGLE-style head (`jaxdec.speculative.heads.eagle`): a heads file
    written by ``train/eagle.py`` (checked against the target like `medusa`) or an in-memory
    ``(EagleConfig, head params, d2t)`` triple. sampling: the chain is drawn from the draft's distribution
    and verified by speculative sampling (lossless for sampling). num_tokens / tree_topk / tree_nodes
    override the stored chain length (the tree's depth) and EAGLE-2 dynamic tree (``tree_topk=0``: a
    chain).

    stop_head: SpecDec++'s learned stop on the chain (`jaxdec.speculative.heads.acceptance`): a heads file
    written by ``train/specdec_pp.py --drafter eagle`` for this EAGLE head (checked against the target,
    and refused when trained for another draft), or an ``(AcceptanceConfig, params)`` pair; the chain
    stops once the predicted P(some draft token is rejected) would exceed ``stop_threshold`` (default
    0.7). verify_buckets: `SpeculativeDecoder`'s (default "auto" with a stop head, so a short draft pays a
    short verify block; () without)."""
    import os
    import numpy as np
    from jaxdec.speculative.heads.artefact import expected_fingerprint
    from jaxdec.speculative.heads.eagle import EagleConfig, EagleDrafter, load_eagle
    from jaxdec.speculative.heads.medusa import draft_head
    if isinstance(heads, tuple) and len(heads) == 3 and isinstance(heads[0], EagleConfig):
        config, hp, d2t = heads
    elif isinstance(heads, (str, os.PathLike)):
        fp = expected_fingerprint(model, params, target)
        config, hp, _, d2t = load_eagle(heads, fp)
    else:
        raise TypeError(f"heads must be a heads file path or an (EagleConfig, params, d2t) triple, got "
                        f"{type(heads).__name__}")
    import dataclasses
    over = {k: v for k, v in (("num_tokens", num_tokens), ("tree_topk", tree_topk), ("tree_nodes", tree_nodes))
            if v is not None}
    if over.get("tree_topk") == 0 and "tree_nodes" not in over:
        over["tree_nodes"] = 0
    if over:
        config = dataclasses.replace(config, **over)
    d2t = np.asarray(d2t)
    if d2t.shape != (config.draft_vocab,) or d2t.min() < 0 or d2t.max() >= model.vocab_size:
        raise ValueError(f"eagle: d2t must be {config.draft_vocab} token ids in [0, {model.vocab_size})")
    dparams = {"heads": hp, "target": params, "d2t": d2t.astype(np.int32), "head_w": draft_head(model, params, d2t)}
    if stop_head is None:
        if stop_threshold is not None:
            raise ValueError("stop_threshold is used only with stop_head (SpecDec++'s learned stop)")
        return SpeculativeDecoder(EagleDrafter(config, sample=sampling), _verifier(sampling),
                                  verify_buckets=verify_buckets or ()), with_draft_params(params, dparams)
    if config.tree_topk:
        raise ValueError(f"stop_head: SpecDec++'s learned stop ends a chain; this EAGLE head drafts a dynamic tree "
                         f"(tree_topk={config.tree_topk}): pass tree_topk=0")
    from jaxdec.speculative.heads.acceptance import eagle_stop
    stop, sp = eagle_stop(model, params, stop_head, config, hp, d2t, target,
                          0.7 if stop_threshold is None else stop_threshold)
    dec = SpeculativeDecoder(EagleDrafter(config, sample=sampling, stop_head=stop), _verifier(sampling),
                             verify_buckets="auto" if verify_buckets is None else verify_buckets)
    return dec, with_draft_params(params, {**dparams, "stop": sp})
