"""Search decoders. Host entry points (imported lazily, so `import jaxdec.search` stays cheap):

beam_search (beam, diverse beam, conditional beam), stochastic_beam_search, context_aware_generate,
momentum_generate, adadec_generate, entropy_adaptive_generate, best_of_n, first_finish, rerank, astar_decode, exact_extract,
superposed_generate.
The decoding entry points run init/step decoders through the shared driver, except `astar_decode` and
`exact_extract`: host-level searches (the search stays on the host and calls jitted model pieces; no
init/step). `rerank` only scores given candidates.
See jaxdec/search/README.md for one example of each.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "beam_search": "beam", "BeamSearch": "beam", "NoRepeatNGram": "beam",
    "stochastic_beam_search": "stochastic", "StochasticBeam": "stochastic",
    "context_aware_generate": "cad", "ContextAware": "cad",
    "momentum_generate": "momentum", "Momentum": "momentum",
    "adadec_generate": "adadec", "AdaDec": "adadec",
    "best_of_n": "testtime", "first_finish": "testtime", "rerank": "testtime", "astar_decode": "testtime",
    "FirstFinish": "testtime", "exact_extract": "extract", "span_scores": "extract",
    "entropy_adaptive_generate": "entropy_adaptive", "EntropyAdaptive": "entropy_adaptive",
    "TableModel": "toy", "TokenDecoder": "token",
    "superposed_generate": "superposed", "Superposed": "superposed", "NGramModel": "superposed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxdec.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxdec.search' has no attribute {name!r}")
