"""Lossless weight compression (DFloat11-style bfloat16 exponent entropy coding)."""
