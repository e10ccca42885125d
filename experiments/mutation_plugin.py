"""pytest plugin for `experiments/mutation_checks.py`: applies the deliberately broken variant named by
``JAXDEC_MUTATION`` before any test runs (module attributes are looked up at trace time, so every
program traced in this process sees the mutation). Never loaded by the test suite itself."""
from __future__ import annotations

import os


def _silent_drafter():
    import jax.numpy as jnp
    from jaxdec.speculative import drafters
    orig = drafters.PromptLookupDrafter.propose

    def propose(self, *a, **k):
        draft, dstate, cache = orig(self, *a, **k)
        return draft.replace(valid=jnp.zeros_like(draft.valid)), dstate, cache  # never proposes anything

    drafters.PromptLookupDrafter.propose = propose


def _wrong_key_fold():
    import importlib
    wrong = lambda keys, num_new: keys  # noqa: E731 - every token of a row drawn with the same key
    for mod, attr in (("jaxdec.core.keys", "token_keys"), ("jaxdec.core.token", "token_keys"),
                      ("jaxdec.search.token", "row_keys_for_step")):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, attr):
            setattr(m, attr, wrong)


def _frozen_counter():
    from jaxdec.core import loop
    loop.count_trace = lambda name: None


def _no_residual():
    from jaxdec.speculative import verify
    verify._residual = lambda p, q: p  # the correction after a rejection is drawn from p, not norm(max(p-q, 0))


MUTATIONS = {"silent_drafter": _silent_drafter, "wrong_key_fold": _wrong_key_fold,
             "frozen_counter": _frozen_counter, "no_residual": _no_residual}


def pytest_configure(config):
    name = os.environ.get("JAXDEC_MUTATION")
    if name in MUTATIONS:
        MUTATIONS[name]()
