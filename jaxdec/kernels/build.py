"""Compile, cache and load the native CPU kernels (``jaxdec/kernels/cpu/*.cc``).

Cache. One shared library per key in ``$JAXDEC_CACHE_DIR/kernels`` (default
``${XDG_CACHE_HOME:-~/.cache}/jaxdec/kernels``; a temp folder when that is not writable), named
``jaxdec_qmatmul_<key>.so``. The key hashes everything that changes the binary: the sources (every
``cpu/*.cc``/``*.h``, by content), the compiler (resolved path and ``--version``), the flags, the jaxlib
version (its FFI headers) and the CPU (``/proc/cpuinfo`` flags, since the build uses ``-march=native``).

Integrity. A build writes into a private temp folder and renames the library into place (atomic), then
writes a manifest ``<library>.json`` holding the library's SHA-256 and the key inputs, also by rename. A
library is used only when its manifest exists and both checksum and key match; otherwise (a truncated,
overwritten or half-written file, a manifest from another key) it is rebuilt, never loaded. If loading
a verified library still fails (`ctypes` cannot open it or a kernel symbol is missing) it is rebuilt
once and loaded again.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
MAIN_SOURCE = "qmatmul.cc"  # the translation unit compiled (it includes any headers beside it)
BUILD_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")
# the entry points a usable library exports (checked after dlopen)
SYMBOLS = ("JaxdecQ41Matmul", "JaxdecQ80Matmul", "JaxdecF32Matmul", "JaxdecQ8aMatmul", "JaxdecKernelIsa",
           "JaxdecKernelHasQ8a")
PREFIX = "jaxdec_qmatmul_"


def cache_dir() -> str:
    base = os.environ.get("JAXDEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxdec")
    return os.path.join(base, "kernels")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def source_files(source_dir: Optional[str] = None) -> list:
    d = source_dir or SOURCE_DIR
    return sorted(glob.glob(os.path.join(d, "*.cc")) + glob.glob(os.path.join(d, "*.h")))


def source_hash(source_dir: Optional[str] = None) -> str:
    """SHA-256 over the kernel sources (names and contents)."""
    files = source_files(source_dir)
    if not any(os.path.basename(f) == MAIN_SOURCE for f in files):
        raise RuntimeError(f"kernel source {MAIN_SOURCE} missing from {source_dir or SOURCE_DIR} "
                           "(is jaxdec installed with its package data?)")
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    return h.hexdigest()


def compiler() -> tuple:
    """(resolved path, ``--version`` output) of ``$CXX`` (default ``c++``)."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({cxx!r}): {e}") from None
    return os.path.realpath(path), version


def key_inputs(extra_flags: tuple = (), source_dir: Optional[str] = None) -> dict:
    """Everything the cached library depends on (hashed into its name)."""
    import jax
    import jaxlib
    cxx, version = compiler()
    return {"sources": source_hash(source_dir), "compiler": cxx, "compiler_version": version,
            "flags": list(BUILD_FLAGS + tuple(extra_flags)), "include": jax.ffi.include_dir(),
            "jaxlib": jaxlib.__version__, "cpu": cpu_flags()}


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(lib: str) -> str:
    return lib + ".json"


def verify(lib: str, key: Optional[str] = None) -> bool:
    """True when ``lib`` and its manifest exist, the manifest is for ``key`` (if given) and the library's
    SHA-256 is the one recorded at build time."""
    try:
        with open(manifest_path(lib)) as f:
            m = json.load(f)
        if key is not None and m.get("key") != key:
            return False
        return m.get("sha256") == _sha256(lib)
    except (OSError, ValueError, AttributeError):
        return False


def _writable(d: str) -> bool:
    try:
        os.makedirs(d, exist_ok=True)
        return os.access(d, os.W_OK)
    except OSError:
        return False


def library_path(extra_flags: tuple = (), out_dir: Optional[str] = None,
                 source_dir: Optional[str] = None) -> tuple:
    """(path the library for these inputs has, its key, the key inputs); nothing is built."""
    inputs = key_inputs(extra_flags, source_dir)
    key = cache_key(inputs)
    d = out_dir or cache_dir()
    if not _writable(d):
        d = os.path.join(tempfile.gettempdir(), f"jaxdec-kernels-{os.getuid()}")
    return os.path.join(d, f"{PREFIX}{key}.so"), key, inputs


def compile_library(inputs: dict, key: str, path: str, source_dir: Optional[str] = None) -> str:
    """Compile into a private temp folder beside ``path``, then rename library and manifest into place."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    src = os.path.join(source_dir or SOURCE_DIR, MAIN_SOURCE)
    flags = list(inputs["flags"]) + ["-I", inputs["include"]]
    with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
        so = os.path.join(tmp, "lib.so")
        r = subprocess.run([inputs["compiler"], *flags, src, "-o", so], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the native kernels failed:\n{r.stderr[-2000:]}")
        man = os.path.join(tmp, "manifest.json")
        with open(man, "w") as f:
            json.dump({"key": key, "sha256": _sha256(so), "inputs": inputs}, f, indent=1, sort_keys=True)
        # library first, manifest last: a reader that sees a manifest matching the file sees a whole build;
        # a race between two builders at worst leaves a mismatch that the next reader rebuilds
        os.replace(so, path)
        os.replace(man, manifest_path(path))
    return path


def build(extra_flags: tuple = (), out_dir: Optional[str] = None, force: bool = False,
          source_dir: Optional[str] = None) -> str:
    """Path of a verified library for these inputs, compiling it when missing, corrupt or ``force``."""
    return ensure(extra_flags, out_dir, force, source_dir)[0]


def ensure(extra_flags: tuple = (), out_dir: Optional[str] = None, force: bool = False,
           source_dir: Optional[str] = None) -> tuple:
    """(path, compiled): ``compiled`` says whether this call ran the compiler."""
    path, key, inputs = library_path(extra_flags, out_dir, source_dir)
    if not force and verify(path, key):
        return path, False
    return compile_library(inputs, key, path, source_dir), True


def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for s in SYMBOLS:
        getattr(lib, s)  # AttributeError when a symbol is missing
    return lib


def load(extra_flags: tuple = (), out_dir: Optional[str] = None, source_dir: Optional[str] = None) -> tuple:
    """(ctypes library, path, compiled): build if needed, open, and rebuild once if opening fails."""
    path, compiled = ensure(extra_flags, out_dir, source_dir=source_dir)
    try:
        return _open(path), path, compiled
    except (OSError, AttributeError):
        path, _ = ensure(extra_flags, out_dir, force=True, source_dir=source_dir)
        return _open(path), path, True
