"""Constrained decoding: JSON-schema, regex, Lark and choice constraints as a token mask inside the compiled
loop (`ConstraintMask`, the first processor of the chain, filled on the host through one ordered callback
per step for all rows), with two engines behind one interface (llguidance, outlines-core).

    from jaxdec.constrained import json_schema, regex, lark, choices
    g = jaxdec.generate(m.model, m.params, ids, tokenizer=m.tokenizer, constraint=json_schema(schema))
    g.constraint_ok       # per row: the engine accepts the output

Grammar-aligned sampling (ASAp, host-level): `asap_sample(model_fn, constraint_or_matcher, n, max_len)`, or
on a jaxdec model `grammar_aligned_generate(model, params, prompts, constraint, n=, tokenizer=)` (a Generation).
Monitors (monitor-guided decoding): ``processors=[MonitorProcessor(JediMonitor(code, tokenizer))]``.
"""
from jaxdec.constrained.constraint import Constraint, as_constraint, choices, json_schema, lark, regex  # noqa: F401
from jaxdec.constrained.engines import (ConstraintError, Engine, LLGuidanceEngine, Matcher,  # noqa: F401
                                        OutlinesEngine, get_engine)
from jaxdec.constrained.processor import ConstraintMask, ForkingConstraintMask, Session  # noqa: F401
from jaxdec.constrained.asap import (ASApResult, ASApSampler, DFAMatcher, asap_sample,  # noqa: F401
                                     grammar_aligned_generate)
from jaxdec.constrained.monitor import JediMonitor, Monitor, MonitorProcessor  # noqa: F401
from jaxdec.constrained import api as _api  # noqa: F401,E402  (registers generate(constraint=))
