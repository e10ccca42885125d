"""Loader of the native CPU kernels (sources and build cache: `jaxdec.kernels`): registers them with XLA
as FFI custom-call targets and builds the calls."""
from __future__ import annotations

import os
import platform
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.kernels import build as kernel_build
from jaxdec.quant.formats import LayerSlice, PackedQ8

_TARGETS = {"q4_1": "jaxdec_q4_1_matmul", "q8_0": "jaxdec_q8_0_matmul", "f32": "jaxdec_f32_matmul",
            "q8a": "jaxdec_q8a_matmul"}


def _threads() -> int:
    try:
        return max(0, int(os.environ.get("JAXDEC_QMATMUL_THREADS", "0")))
    except ValueError:
        raise ValueError("JAXDEC_QMATMUL_THREADS must be an integer >= 0") from None


def _min_parallel_work() -> int:
    """Multiply-adds below which a product runs on one thread (``JAXDEC_QMATMUL_MIN_PARALLEL``)."""
    try:
        return max(0, int(os.environ.get("JAXDEC_QMATMUL_MIN_PARALLEL", str(1 << 20))))
    except ValueError:
        raise ValueError("JAXDEC_QMATMUL_MIN_PARALLEL must be an integer >= 0") from None


def build_native(extra_flags: tuple = (), out_dir: Optional[str] = None) -> str:
    """Path of a verified compiled kernel library (built when missing or corrupt); see `jaxdec.kernels.build`."""
    return kernel_build.build(tuple(extra_flags), out_dir)


class _Native:
    """A loaded kernel library, registered with XLA under ``jaxdec_{q4_1,q8_0,f32}_matmul{suffix}``."""

    def __init__(self, path: str, suffix: str = "", lib=None):
        """``lib``: the library already opened (by `jaxdec.kernels.build.load`); else ``path`` is opened."""
        import ctypes
        self.path = path
        self.lib = lib if lib is not None else ctypes.CDLL(path)
        self.lib.JaxdecKernelIsa.restype = ctypes.c_char_p
        self.isa = self.lib.JaxdecKernelIsa().decode()
        self.targets = {k: v + suffix for k, v in _TARGETS.items()}
        jax.ffi.register_ffi_target(self.targets["q4_1"], jax.ffi.pycapsule(self.lib.JaxdecQ41Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(self.targets["q8_0"], jax.ffi.pycapsule(self.lib.JaxdecQ80Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(self.targets["f32"], jax.ffi.pycapsule(self.lib.JaxdecF32Matmul),
                                    platform="cpu")
        jax.ffi.register_ffi_target(self.targets["q8a"], jax.ffi.pycapsule(self.lib.JaxdecQ8aMatmul),
                                    platform="cpu")
        self.has_q8a = bool(self.lib.JaxdecKernelHasQ8a())  # the int8-activation kernel needs AVX512-VNNI

    @staticmethod
    def _attrs() -> dict:
        return {"max_threads": np.int64(_threads()), "min_parallel_work": np.int64(_min_parallel_work())}

    def call_f32(self, x: jax.Array, w: jax.Array, index=0) -> jax.Array:
        """The float32 custom call: ``x [..., in] @ w[index].T`` for ``w [L, out, in]`` (or ``[out, in]``,
        index 0); the layer is read in place (an out-of-range index is clamped)."""
        if w.ndim not in (2, 3) or x.shape[-1] != w.shape[-1]:
            raise ValueError(f"call_f32 needs x [..., in] and W [L, out, in] or [out, in]; got {x.shape}, {w.shape}")
        res = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[-2],), jnp.float32)
        call = jax.ffi.ffi_call(self.targets["f32"], res, vmap_method="sequential")
        return call(x.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(index, jnp.int32), **self._attrs())

    def call_q8a(self, x: jax.Array, w) -> jax.Array:
        """The int8-activation custom call (lossy): float32 ``x [..., in]`` against a 2-D `PackedQ8` or a
        LayerSlice of a PackedQ8 stack; x is quantized per 32-element block inside the kernel."""
        if isinstance(w, LayerSlice):
            p, index = w.w, jnp.asarray(w.index, jnp.int32)
        else:
            p, index = w, jnp.zeros((), jnp.int32)
        if not isinstance(p, PackedQ8) or x.shape[-1] != p.shape[-1]:
            raise ValueError(f"call_q8a needs x [..., in] and a PackedQ8 [out, in]; got {x.shape}, {type(p).__name__}")
        res = jax.ShapeDtypeStruct(x.shape[:-1] + (p.out,), jnp.float32)
        call = jax.ffi.ffi_call(self.targets["q8a"], res, vmap_method="sequential")
        offset = p.offset if p.offset is not None else p.scale  # Q8_0 has none; the kernel ignores it
        return call(x.astype(jnp.float32), p.codes, p.scale, offset, index, q41=np.int64(p.kind == "q4_1"),
                    **self._attrs())

    def call(self, x: jax.Array, w) -> jax.Array:
        """The custom call itself (float32 ``x [..., in]``, a 2-D QTensor or a LayerSlice of a QTensor stack)."""
        if isinstance(w, LayerSlice) and not w.quantized:
            return self.call_f32(x, w.w, w.index)
        if isinstance(w, LayerSlice):
            q, index = w.w, jnp.asarray(w.index, jnp.int32)
        else:
            q, index = w, jnp.zeros((), jnp.int32)
        res = jax.ShapeDtypeStruct(x.shape[:-1] + (q.scale.shape[-2],), jnp.float32)
        attrs = self._attrs()
        call = jax.ffi.ffi_call(self.targets[q.kind], res, vmap_method="sequential")
        sdt = q.scale.dtype if q.scale.dtype in (jnp.float16, jnp.float32) else jnp.float32
        if q.kind == "q4_1":
            return call(x, q.codes, q.scale.astype(sdt), q.offset.astype(sdt), index, **attrs)
        return call(x, q.codes, q.scale.astype(sdt), index, **attrs)


_NATIVE_STATE: dict = {}


def native_kernels(required: bool = False) -> Optional[_Native]:
    """The registered native kernels, building them on first use; None (with one warning) if impossible."""
    if "lib" not in _NATIVE_STATE:
        lib, err = None, None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            err = f"native kernels are x86-64 only (this is {platform.machine()})"
        elif "cpu" not in {d.platform for d in jax.devices("cpu")}:
            err = "no CPU backend"
        else:
            try:
                handle, path, compiled = kernel_build.load()
                lib = _Native(path, lib=handle)
                _NATIVE_STATE["compiled"] = compiled
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the XLA path
                err = str(e)
        _NATIVE_STATE["lib"], _NATIVE_STATE["error"] = lib, err
        if lib is None and os.environ.get("JAXDEC_QMATMUL", "auto") != "xla":
            warnings.warn(f"jaxdec: native matmul kernels unavailable, using the slower XLA path ({err}); "
                          f"tests/test_quant.py fails on this unless JAXDEC_ALLOW_NO_NATIVE=1",
                          RuntimeWarning, stacklevel=3)
    if required and _NATIVE_STATE["lib"] is None:
        raise RuntimeError(f"JAXDEC_QMATMUL=native but the native kernels are unavailable: {_NATIVE_STATE['error']}")
    return _NATIVE_STATE["lib"]
