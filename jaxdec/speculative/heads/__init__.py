"""Trained draft heads: flax modules, their loaders and their drafters (trained by ``train/``).

* `medusa`: Medusa-1 heads (`MedusaDrafter`, `load_medusa`).
* `artefact`: the heads file format (safetensors + metadata), `target_fingerprint`, `HeadsMismatch`.
* `shipped_heads(kind, model)`: the path of a heads file shipped in the package for a named model, or None.
"""
from __future__ import annotations

import os
from typing import Optional

ARTEFACT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artefacts")


def shipped_path(kind: str, model_name: str) -> str:
    """Where the shipped heads of ``kind`` for the named model live (``make heads`` writes them)."""
    return os.path.join(ARTEFACT_DIR, f"{kind}-{model_name}.safetensors")


def shipped_heads(kind: str, model_name: str) -> Optional[str]:
    """The shipped heads file of ``kind`` for ``model_name`` (a `jaxdec.load` name), or None."""
    p = shipped_path(kind, model_name)
    return p if os.path.isfile(p) else None
