"""jaxdec: LLM decoding as pure, jit-compiled JAX state machines."""
from jaxdec.models.registry import DEFAULT_MODEL, Loaded, load
from jaxdec.core.generate import Generation, generate, score

__all__ = ["DEFAULT_MODEL", "Loaded", "load", "Generation", "generate", "score"]
__version__ = "0.1.0"
