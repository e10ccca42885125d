"""Token-by-token decoding lives in `jaxdec.core.token` (the driver's default decoder); this module keeps
the names importable from `jaxdec.search`."""
from jaxdec.core.token import TokenDecoder, TokenState, row_keys_for_step

__all__ = ["TokenDecoder", "TokenState", "row_keys_for_step"]
