"""Native kernels kept as real source files.

``cpu/*.cc``: the XLA FFI CPU kernels behind `jaxdec.quant.matmul` (block-quantized and float32 matrix
products). They ship as package data and are compiled with the system C++ compiler (``-march=native``)
into a per-user cache, either ahead of time (``python -m jaxdec.kernels build``, which ``make install``
runs) or on first use. `jaxdec.kernels.build` owns the cache: its key, the atomic write, the checksum
checked before a library is loaded and the one rebuild when loading fails.

This package imports nothing else from jaxdec (the loaders that register the kernels with XLA live with
the code that calls them, `jaxdec.quant.native`).
"""
