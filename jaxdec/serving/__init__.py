"""Serving: an engine over fixed decode slots (`engine.Engine`) and an OpenAI-compatible HTTP server
(`server`, `jaxdec serve`)."""
from jaxdec.serving.engine import Engine, RequestError, Result

__all__ = ["Engine", "RequestError", "Result"]
