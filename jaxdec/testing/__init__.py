"""Test-only helpers shipped with jaxdec, outside the production packages: tiny deterministic models that
obey the model interface, for tests and experiments of new decoding methods.

* `jaxdec.testing.toy_search`: `TableModel` (next-token logits from a table over the previous tokens).
* `jaxdec.testing.toy_speculative`: `TrigramModel` and exact joint distributions for speculative tests.

Nothing in the production packages imports this package (tests/test_layering.py checks it).
"""
