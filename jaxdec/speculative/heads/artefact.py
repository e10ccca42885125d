"""Trained-head artefacts: one safetensors file per head set, with the facts that made it.

File layout: every parameter as a tensor named by its pytree path (``"heads/w"``), and the safetensors
header metadata ``{"jaxdec_heads": JSON}`` with

    kind         "medusa" | "eagle" ...
    format       ARTEFACT_FORMAT (bumped when the layout changes)
    config       the head module's configuration (sizes) as a dict
    fingerprint  `target_fingerprint` of the target the heads were trained for
    target       the target's name or file name (for error messages)
    command      the command line that trained it
    data_tokens  training tokens seen; data_examples, steps
    commit       git commit of the code that trained it
    wall_s       training wall time in seconds
    tree         optional: the draft tree chosen at training time (``{"parents": [...], "ranks": [...]}``)

`load_heads` refuses a file for another target (another fingerprint) with `HeadsMismatch`, and a
missing, damaged or foreign file with a ValueError / FileNotFoundError that names it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

ARTEFACT_FORMAT = 1
_META_KEY = "jaxdec_heads"


class HeadsMismatch(ValueError):
    """A heads file trained for another target model or vocabulary."""


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------

_FP_CACHE: dict = {}


def _cache_file() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdec", "fingerprints.json")


def target_fingerprint(path: str) -> str:
    """A hash of a target's weights as stored and its vocabulary: for a GGUF file the tensor infos
    (name, type, shape), the tensor data bytes and the ``tokenizer.ggml.*`` fields; for a Hugging Face
    folder its ``*.safetensors`` files and ``tokenizer.json``. It reads the file, not loaded params, so
    it is the same whether the model is loaded with ``weights="f32"``, ``"q"``, ``"bf16"`` or ``"df11"``.
    Cached per (path, size, mtime) in memory and in ``~/.cache/jaxdec/fingerprints.json``."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if key in _FP_CACHE:
        return _FP_CACHE[key]
    disk = {}
    try:
        with open(_cache_file()) as f:
            disk = json.load(f)
    except (OSError, ValueError):
        disk = {}
    if key in disk:
        _FP_CACHE[key] = disk[key]
        return disk[key]
    fp = _fingerprint_folder(path) if os.path.isdir(path) else _fingerprint_gguf(path)
    _FP_CACHE[key] = fp
    try:
        os.makedirs(os.path.dirname(_cache_file()), exist_ok=True)
        disk[key] = fp
        tmp = _cache_file() + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(disk, f)
        os.replace(tmp, _cache_file())
    except OSError:
        pass
    return fp


def _fingerprint_gguf(path: str) -> str:
    from jaxdec.models.gguf_loader import open_gguf
    r = open_gguf(path)
    h = hashlib.sha256(b"jaxdec-target-v1|gguf|")
    for t in sorted(r.tensors, key=lambda t: t.name):
        h.update(f"{t.name}|{int(t.tensor_type)}|{list(map(int, t.shape))}|".encode())
        h.update(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1).data)
    for name in sorted(k for k in r.fields if k.startswith("tokenizer.ggml.")):
        f = r.fields[name]
        h.update(name.encode())
        for i in f.data:
            h.update(np.ascontiguousarray(f.parts[i]).view(np.uint8).reshape(-1).data)
    return "sha256:" + h.hexdigest()


def _fingerprint_folder(path: str) -> str:
    h = hashlib.sha256(b"jaxdec-target-v1|folder|")
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") or n == "tokenizer.json")
    if not names:
        raise ValueError(f"cannot fingerprint {path!r}: no *.safetensors or tokenizer.json in it")
    for n in names:
        h.update(n.encode())
        with open(os.path.join(path, n), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def params_fingerprint(params, vocab_size: int) -> str:
    """For a model that has no file (tests' tiny models): a hash of its params' bytes and vocab size."""
    import jax
    h = hashlib.sha256(f"jaxdec-target-v1|params|{int(vocab_size)}|".encode())
    for p, x in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(p)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return "sha256:" + h.hexdigest()


def weights_id(kind: str, config: dict, hp, d2t) -> str:
    """``"<kind>:<sha256>"`` of a draft head's config fields (``config``, a JSON-able dict), its weights
    (float32, by name) and its d2t map: the draft id an acceptance head trained for those heads records
    (`jaxdec.speculative.heads.eagle.draft_id`, `jaxdec.speculative.heads.clover.draft_id`)."""
    import jax
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    flat = jax.tree_util.tree_flatten_with_path(hp)[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(jax.tree_util.keystr(path).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    h.update(np.ascontiguousarray(np.asarray(d2t, np.int64)).tobytes())
    return f"{kind}:{h.hexdigest()}"


def expected_fingerprint(model, params, target) -> str:
    """The fingerprint a heads file must carry to be used with this target: ``target`` is the model's file or
    folder (what `jaxdec.load` opened), or a fingerprint string; None: the params' fingerprint (a model with
    no file)."""
    if target is None:
        return params_fingerprint(params, model.vocab_size)
    if isinstance(target, str) and target.startswith("sha256:"):
        return target
    return target_fingerprint(str(target))


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------

def _flatten(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if "/" in str(k):
            raise ValueError(f"param name {k!r} must not contain '/'")
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v))
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def save_heads(path: str, kind: str, params: dict, config: dict, fingerprint: str, **facts) -> str:
    """Write ``params`` (a nested dict of arrays) and the metadata (see the module docstring); atomic."""
    from safetensors.numpy import save_file
    if not fingerprint:
        raise ValueError("save_heads: a target fingerprint is required")
    meta = {"kind": kind, "format": ARTEFACT_FORMAT, "config": config, "fingerprint": fingerprint, **facts}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(_flatten(params), tmp, metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_heads(path: str, kind: Optional[str] = None):
    """(params, meta) from a heads file, with no target check. Errors name the file and what was expected."""
    from safetensors import safe_open
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"heads: expected the path of a heads file, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"heads file {str(path)!r} is a folder: expected the .safetensors file written by a "
                         f"train/ script (a training run's folder holds it as heads.safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"heads file not found: {str(path)!r}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a damaged header or data
        raise ValueError(f"heads file {str(path)!r} is corrupt or not a safetensors file "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if _META_KEY not in header:
        raise ValueError(f"heads file {str(path)!r} has no jaxdec heads metadata (not written by a train/ script)")
    try:
        meta = json.loads(header[_META_KEY])
    except ValueError:
        raise ValueError(f"heads file {str(path)!r}: its metadata is not valid JSON (corrupt file)") from None
    if meta.get("format") != ARTEFACT_FORMAT:
        raise ValueError(f"heads file {str(path)!r} has format {meta.get('format')!r}; this jaxdec reads format "
                         f"{ARTEFACT_FORMAT} (retrain it with this version's train/ scripts)")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"heads file {str(path)!r} holds {meta.get('kind')!r} heads, expected {kind!r}")
    return _unflatten(flat), meta


def load_heads(path: str, kind: str, fingerprint: Optional[str]):
    """(params, meta) of a heads file for the target with ``fingerprint`` (None: no check);
    `HeadsMismatch` when it was trained for another target."""
    params, meta = read_heads(path, kind)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise HeadsMismatch(
            f"heads file {str(path)!r} was trained for another target model or vocabulary (target "
            f"{meta.get('target', '?')!r}, fingerprint {str(meta.get('fingerprint'))[:19]}...), not this one "
            f"(fingerprint {fingerprint[:19]}...): train heads for this model (train/{kind}.py) or pass the "
            f"matching --heads file")
    return params, meta
