"""The README's code examples run as written: each ```python block after a `<!-- readme-test: NAME -->`
marker is executed here (its own asserts are the checks)."""
from __future__ import annotations

import os
import re
import sys
import types

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks() -> dict:
    text = open(README).read()
    found = re.findall(r"<!-- readme-test: ([\w-]+) -->\s*```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def test_readme_has_the_tested_examples():
    assert {"decoder", "processor", "slots"} <= set(blocks())


@pytest.mark.parametrize("name", ["decoder", "processor", "slots"])
def test_readme_example_runs(name):
    code = blocks()[name]
    mod = types.ModuleType(f"readme_{name}")  # a real module: dataclasses look their class's module up
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(code, f"README.md:{name}", "exec"), mod.__dict__)
    finally:
        del sys.modules[mod.__name__]
