"""``python -m jaxdec.kernels build|check|path``: compile the native CPU kernels ahead of first use.

build  compile into the cache unless a verified library is already there, load it once; prints its path
check  exit 0 when the cache holds a verified library for this machine, compiler and jaxlib, else 1
path   print where that library lives (built or not)
Exit status 2: this machine cannot build them (not x86-64, no compiler, compile error); jaxdec then uses
its pure-XLA path.
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import sys

from jaxdec.kernels import build as kb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdec.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("build", "check", "path"))
    p.add_argument("--out-dir", default=None, help="cache folder (default: $JAXDEC_CACHE_DIR/kernels)")
    p.add_argument("--force", action="store_true", help="build: recompile even if a verified library exists")
    a = p.parse_args(argv)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"jaxdec: native kernels are x86-64 only (this is {platform.machine()})", file=sys.stderr)
        return 2
    try:
        path, key, _ = kb.library_path(out_dir=a.out_dir)
        if a.command == "path":
            print(path)
            return 0
        if a.command == "check":
            ok = kb.verify(path, key)
            print(("ok " if ok else "missing or invalid ") + path)
            return 0 if ok else 1
        if a.force:
            kb.ensure(out_dir=a.out_dir, force=True)
        lib, path, compiled = kb.load(out_dir=a.out_dir)
    except RuntimeError as e:
        print(f"jaxdec: native kernels not built: {e}", file=sys.stderr)
        return 2
    lib.JaxdecKernelIsa.restype = ctypes.c_char_p
    print(f"{'built' if compiled else 'cached'} {path} ({lib.JaxdecKernelIsa().decode()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
