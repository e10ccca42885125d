"""The native kernels' build cache (`jaxdec.kernels.build`): an ahead-of-time build (what `make install`
runs) leaves a verified library that first use loads without compiling; a corrupt, garbage or stale
library is rebuilt, never loaded, and the rebuilt one computes the same products bit for bit; another
source gives another library; with no compiler the pure-XLA path runs.

Every test builds into its own temp folder (never the user's cache). Like tests/test_quant.py, a machine
that cannot build the kernels opts out with ``JAXDEC_ALLOW_NO_NATIVE=1`` (those tests are then skipped).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import quant
from jaxdec.kernels import build as kb
from jaxdec.kernels.__main__ import main as kernels_main
from jaxdec.quant import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOW_NO_NATIVE = os.environ.get("JAXDEC_ALLOW_NO_NATIVE", "0") == "1"


@pytest.fixture(scope="module")
def default_lib():
    lib = quant.native_kernels()
    if lib is None:
        why = f"native CPU kernels unavailable ({native._NATIVE_STATE.get('error')})"
        if ALLOW_NO_NATIVE:
            pytest.skip(why + ", JAXDEC_ALLOW_NO_NATIVE=1")
        pytest.fail(why + ": set JAXDEC_ALLOW_NO_NATIVE=1 only on a machine that cannot build them")
    return lib


@pytest.fixture(scope="module")
def built(default_lib, tmp_path_factory):
    """A cache folder filled the way `make install` fills it: ``python -m jaxdec.kernels build`` (one fresh
    compile, never copied from the user's cache); (folder, library path, check before, build, check after)."""
    d = str(tmp_path_factory.mktemp("cache"))
    before = _check(os.path.join(d, "kernels"))
    build = _run(["-m", "jaxdec.kernels", "build"], {"JAXDEC_CACHE_DIR": d})
    after = _check(os.path.join(d, "kernels"))
    assert build.returncode == 0, build.stdout + build.stderr
    path = build.stdout.split()[1]
    return os.path.dirname(path), path, before, build, after


def _copy_cache(src_dir, dst_dir):
    os.makedirs(dst_dir, exist_ok=True)
    for f in os.listdir(src_dir):
        if f.startswith(kb.PREFIX):
            shutil.copy2(os.path.join(src_dir, f), os.path.join(dst_dir, f))
    return os.path.join(dst_dir, kb.library_path(out_dir=dst_dir)[0].rsplit(os.sep, 1)[1])


def _operands():
    rng = np.random.default_rng(0)
    out, nb = 48, 8
    q8 = quant.QTensor(jnp.asarray(rng.integers(-128, 128, (out, nb, 32), dtype=np.int8)),
                       jnp.asarray(rng.random((out, nb), np.float32)), None, "q8_0")
    q4 = quant.QTensor(jnp.asarray(rng.integers(0, 256, (out, nb, 16), dtype=np.uint8)),
                       jnp.asarray(rng.random((out, nb), np.float32)),
                       jnp.asarray(rng.standard_normal((out, nb), np.float32)), "q4_1")
    f32 = jnp.asarray(rng.standard_normal((2, out, nb * 32), np.float32))
    x = jnp.asarray(rng.standard_normal((3, nb * 32), np.float32))
    return x, q8, q4, f32


def _products(lib):
    x, q8, q4, f32 = _operands()
    return [np.asarray(jax.jit(lib.call)(x, q8)), np.asarray(jax.jit(lib.call)(x, q4)),
            np.asarray(jax.jit(lib.call_f32)(x, f32, jnp.int32(1)))]


def _assert_same_products(lib, ref_lib):
    got, ref = _products(lib), _products(ref_lib)
    x, q8, q4, f32 = _operands()
    # the reference library computes the products (not, say, zeros): close to the XLA ones
    xla = np.asarray(x) @ np.asarray(quant.dequantize(q8)).T
    np.testing.assert_allclose(ref[0], xla, rtol=1e-5, atol=1e-6 * float(np.abs(xla).max()))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)  # same sources, flags, compiler: the same bits


def _check(out_dir):
    """``python -m jaxdec.kernels check --out-dir out_dir`` in this process: (exit status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = kernels_main(["check", "--out-dir", out_dir])
    return rc, buf.getvalue()


def _run(args, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_ahead_of_time_build_is_what_first_use_loads(built):
    """`python -m jaxdec.kernels build` (run by `make install`) fills the cache; `check` verifies it; a
    fresh process's first `native_kernels()` loads that file without compiling."""
    d, path, before, build, after = built
    assert before[0] == 1 and before[1].split() == ["missing", "or", "invalid", path], before
    assert build.stdout.startswith("built "), build.stdout + build.stderr
    assert d == os.path.join(os.path.dirname(d), "kernels") and kb.verify(path)
    assert after[0] == 0 and after[1].split() == ["ok", path], after
    stat = os.stat(path)
    code = ("from jaxdec.quant import native; lib = native.native_kernels(required=True); "
            "print(lib.path, native._NATIVE_STATE['compiled'])")
    r = _run(["-c", code], {"JAXDEC_CACHE_DIR": os.path.dirname(d)})
    assert r.returncode == 0 and r.stdout.split() == [path, "False"], r.stdout + r.stderr
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten


def test_corrupt_library_is_rebuilt_not_loaded(built, default_lib, tmp_path):
    path = _copy_cache(built[0], str(tmp_path))
    assert kb.verify(path)
    garbled = tmp_path / "garbled.so"  # bytes overwritten in the middle: the checksum catches it too
    shutil.copy2(path, garbled)
    with open(garbled, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(8192))
    os.replace(garbled, path)
    assert not kb.verify(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)  # a half-written file
    assert not kb.verify(path)
    got, compiled = kb.ensure(out_dir=str(tmp_path))
    assert got == path and compiled and kb.verify(path)
    _assert_same_products(native._Native(path, suffix="_rebuilt_test"), default_lib)


def test_unloadable_library_with_matching_checksum_is_rebuilt_once(built, default_lib, tmp_path):
    """A file that passes the checksum but cannot be opened (here: not a shared library at all) is
    rebuilt once by `load`, which then opens the new one."""
    path = _copy_cache(built[0], str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"not an ELF file\n" * 64)
    man = json.load(open(kb.manifest_path(path)))
    man["sha256"] = kb._sha256(path)
    json.dump(man, open(kb.manifest_path(path), "w"))
    assert kb.verify(path)  # the checksum alone cannot tell
    handle, got, compiled = kb.load(out_dir=str(tmp_path))
    assert got == path and compiled and kb.verify(path)
    assert open(path, "rb").read(4) == b"\x7fELF"
    _assert_same_products(native._Native(path, suffix="_unloadable_test", lib=handle), default_lib)


def test_manifest_of_another_key_is_stale(built, tmp_path):
    path = _copy_cache(built[0], str(tmp_path))
    _, key, _ = kb.library_path(out_dir=str(tmp_path))
    assert kb.verify(path, key)
    man = json.load(open(kb.manifest_path(path)))
    man["key"] = "0" * 16
    json.dump(man, open(kb.manifest_path(path), "w"))
    assert not kb.verify(path, key)
    os.remove(kb.manifest_path(path))
    assert not kb.verify(path)


def test_key_covers_sources_flags_compiler_and_jaxlib(built, tmp_path, monkeypatch):
    """Another source gives another library path (and the old library does not verify for its key); flags,
    compiler, jaxlib version and CPU are in the key too."""
    base = kb.key_inputs()
    assert {"sources", "compiler", "compiler_version", "flags", "jaxlib", "cpu"} <= set(base)
    assert base["compiler"] == os.path.realpath(shutil.which(os.environ.get("CXX", "c++")))
    assert base["compiler_version"].strip() and "-march=native" in base["flags"]
    for k, v in (("flags", base["flags"] + ["-DX"]), ("compiler_version", "other"), ("jaxlib", "0.0.0"),
                 ("cpu", "flags: sse2")):
        assert kb.cache_key(dict(base, **{k: v})) != kb.cache_key(base), k

    src = tmp_path / "src"
    shutil.copytree(kb.SOURCE_DIR, src)
    with open(src / kb.MAIN_SOURCE, "a") as f:
        f.write("\n// a changed source\n")
    assert kb.source_hash(str(src)) != base["sources"]
    old = _copy_cache(built[0], str(tmp_path / "cache"))
    new, key, inputs = kb.library_path(out_dir=str(tmp_path / "cache"), source_dir=str(src))
    assert new != old and inputs["sources"] == kb.source_hash(str(src))
    assert kb.verify(old) and not kb.verify(old, key)  # the old library is not taken for the new source


def test_no_compiler_falls_back_to_xla(default_lib, tmp_path, monkeypatch):
    """No C++ compiler and an empty cache: one warning, no native library, and `matmul` runs the XLA path
    (the same products up to summation order)."""
    monkeypatch.setenv("JAXDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("JAXDEC_QMATMUL", "auto")
    monkeypatch.setattr(native, "_NATIVE_STATE", {})
    with pytest.warns(RuntimeWarning, match="native matmul kernels unavailable"):
        assert quant.native_kernels() is None
    assert "no C++ compiler" in native._NATIVE_STATE["error"]
    x, q8, _, _ = _operands()
    hlo = jax.jit(quant.matmul).lower(x, q8).compile().as_text()
    assert "custom_call_target" not in hlo
    y = np.asarray(jax.jit(quant.matmul)(x, q8))
    ref = _products(default_lib)[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    assert not os.listdir(tmp_path)  # nothing was written
