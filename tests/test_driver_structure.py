"""Structural checks of "one host driver" (issue 11): the decode loop and the prompt batching each live in
one place. The checks read the package's source (AST), so they run in milliseconds and fail when a new
module grows its own loop or its own padding."""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "jaxdec"

# (module, function) pairs allowed to call lax.while_loop, with the reason
WHILE_LOOP_OK = {
    ("core/loop.py", "decode_loop"): "the decode loop (run_jit's, and phase_times' separately compiled one)",
    ("speculative/drafters.py", "autoregressive_chain"): "a draft chain inside one step (not a decode loop)",
    # masked-diffusion samplers fill a fixed canvas in place (no token appended, no KV cache growing); they take
    # any logits_fn and run outside the driver for now (issue 19: move them onto the driver's loop as Decoders)
    ("diffusion/samplers.py", "_run"): "the masked-diffusion canvas loop",
    ("diffusion/samplers.py", "_run_freedave"): "FreeDave's canvas loop (drafts and verification per round)",
}
# the driver's prompt helpers: who may call them, with the reason
BATCHING = {"pad_batch", "row_keys", "batch_inputs", "prefix_groups"}
BATCHING_OK = {
    "core/driver.py": "the driver",
    "core/slots.py": "prefill of new requests for decode slots (the serving path of the same driver)",
    "core/generate.py": "`score` pads prompt + continuation for one teacher-forced call",
    "cli.py": "--batch-size runs give each row the key of one call over all prompts (row_keys)",
}


def _calls(tree):
    """(enclosing top-level function or method name, called name) for every call in a module."""
    out = []

    def visit(node, fn):
        for child in ast.iter_child_nodes(node):
            name = fn
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn is None:
                name = child.name
            if isinstance(child, ast.ClassDef):
                name = None
            if isinstance(child, ast.Call):
                f = child.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                out.append((fn, called))
            visit(child, name)

    visit(tree, None)
    return out


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        yield rel, _calls(ast.parse(path.read_text(), filename=str(path)))


def test_only_the_loop_module_runs_a_decode_while_loop():
    found = [(rel, fn) for rel, calls in _modules() for fn, called in calls if called == "while_loop"]
    assert ("core/loop.py", "decode_loop") in found  # positive control: the scan sees the real loop
    stray = [f for f in found if f not in WHILE_LOOP_OK]
    assert not stray, f"lax.while_loop outside the driver's loop: {stray}"


def test_only_the_driver_pads_and_batches_prompts():
    found = {(rel, called) for rel, calls in _modules() for _, called in calls if called in BATCHING}
    assert ("core/driver.py", "pad_batch") in found and ("core/driver.py", "row_keys") in found
    stray = sorted(f for f in found if f[0] not in BATCHING_OK)
    assert not stray, f"prompt padding / batching / row keys outside the driver: {stray}"


@pytest.mark.parametrize("source,expect", [
    ("import jax\ndef my_loop(s):\n    return jax.lax.while_loop(c, b, s)\n", ("my_loop", "while_loop")),
    ("class D:\n    def step(self, s):\n        return pad_batch(rows, 8, 0)\n", ("step", "pad_batch")),
])
def test_the_scan_finds_a_planted_call(source, expect):
    """Negative control: a module that grows its own loop or padding is seen by the scan."""
    assert expect in _calls(ast.parse(source))
