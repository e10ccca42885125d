"""Training scripts for jaxdec's artefacts (draft heads, ...), run as ``python -m train.<name>``.

`train.harness` is the one harness every script uses; `train.data` writes the self-distillation corpus.
``train`` imports ``jaxdec``; ``jaxdec`` never imports ``train`` (tests/test_layering.py checks it).
"""
