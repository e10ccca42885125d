"""Pallas kernels for jaxdec, each with a plain-jnp reference (tested in interpret mode on CPU)."""
