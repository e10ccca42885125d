"""Glue between `generate` / `beam_search` and the constraint session: validate ``constraint=``, compile
it per row, add `ConstraintMask` to a decoder that can honour it (or refuse the decoder by name), wrap
the driver's per-batch ``inputs_fn`` so the session knows which rows each batch holds, and report
``constraint_ok`` per output row."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

from jaxdec.constrained.constraint import Constraint, as_constraint
from jaxdec.constrained.engines import ConstraintError, get_engine
from jaxdec.constrained.processor import ConstraintMask, ForkingConstraintMask, Session, activate

SUPPORTED = ("greedy and sampling (generate, best_of_n), beam_search (diverse and conditional too), "
             "stochastic_beam_search, context_aware_generate, momentum_generate, FirstFinish over a token decoder, "
             "and SpeculativeDecoder (chain or tree drafters)")


def per_prompt(constraint, n_prompts: int, who: str = "constraint") -> list:
    """``constraint`` (one for all rows, or a list with one entry per prompt, None = unconstrained) as a
    list of `Constraint | None`, one per prompt."""
    if isinstance(constraint, (list, tuple)):
        if len(constraint) != n_prompts:
            raise ValueError(f"{who}: a list of constraints needs one entry per prompt ({n_prompts}), got "
                             f"{len(constraint)}")
        return [None if c is None else as_constraint(c, f"{who}[{i}]") for i, c in enumerate(constraint)]
    c = as_constraint(constraint, who)
    return [c] * n_prompts


def compile_rows(cons: list, tokenizer, model) -> list:
    """[(engine, compiled) | None] per prompt; engines and grammars are cached per tokenizer."""
    if tokenizer is None:
        raise ValueError("constraint= needs tokenizer= (the grammar engines work on the tokenizer's vocabulary)")
    eos = tuple(getattr(model, "eos_ids", ()) or ())
    out, seen = [], {}
    for c in cons:
        if c is None:
            out.append(None)
            continue
        key = (c.engine, c.key())
        if key not in seen:
            eng = get_engine(c.engine, tokenizer, int(model.vocab_size), eos[0] if eos else None)
            seen[key] = (eng, eng.compile(c))
        out.append(seen[key])
    return out


# decoders that honour a constraint (named, not imported: jaxdec.constrained imports no method family). Their
# step runs the processor chain on every row's logits (the mask first) and commits tokens that rows grow by;
# the beam-like ones (rows reordered within a prompt) call post_commit with the parent rows.
HONOURING = {"jaxdec.core.token.TokenDecoder", "jaxdec.search.beam.BeamSearch",
             "jaxdec.speculative.engine.SpeculativeDecoder", "jaxdec.search.stochastic.StochasticBeam",
             "jaxdec.search.cad.ContextAware", "jaxdec.search.momentum.Momentum"}


# decoders that wrap an honouring decoder (field ``inner``) and run its step unchanged apart from marking rows
# done (First Finish Search stops a prompt's group when one row ends): the mask goes to the inner decoder
WRAPPERS = {"jaxdec.search.testtime.FirstFinish"}


def _qualname(decoder) -> str:
    cls = type(decoder)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_decoder(decoder, who: str) -> None:
    """Refuse decoders that cannot honour a constraint, naming them. Speculative decoding takes chain and
    tree drafters alike (each draft node is masked by the matcher state along its path)."""
    if _qualname(decoder) in WRAPPERS:
        inner = decoder.inner
        if _qualname(inner) not in HONOURING:
            raise ValueError(f"{who}: the decoder {type(decoder).__name__} wraps {type(inner).__name__}, which cannot "
                             f"honour constraint= (supported: {SUPPORTED})")
        return
    if _qualname(decoder) not in HONOURING:
        raise ValueError(f"{who}: the decoder {type(decoder).__name__} cannot honour constraint= (supported: "
                         f"{SUPPORTED})")


@dataclasses.dataclass
class Constrained:
    """A prepared constrained run: the decoder with the mask added, the wrapped ``inputs_fn`` and the
    session (mask timings: ``session.mask_seconds``)."""

    decoder: object
    inputs_fn: object
    session: Session
    prompts: list  # per prompt (engine, compiled) | None

    @contextlib.contextmanager
    def running(self):
        with activate(self.session):
            yield self.session

    def mark(self, hypotheses: Sequence[list]) -> None:
        """Add ``"constraint_ok"`` to each hypothesis dict (``{"tokens": ...}``) of each prompt."""
        for i, hyps in enumerate(hypotheses):
            for h, hok in zip(hyps, self.ok([h["tokens"] for h in hyps], [i] * len(hyps))):
                h["constraint_ok"] = hok

    def ok(self, rows_tokens: Sequence[Sequence[int]], prompt_of_row: Sequence[int]) -> list:
        """``constraint_ok`` per output row: the engine consumes every token (EOS included) and is in an
        accepting state at the end; None for unconstrained rows."""
        out = []
        for toks, p in zip(rows_tokens, prompt_of_row):
            u = self.prompts[p]
            if u is None:
                out.append(None)
                continue
            m = u[0].matcher(u[1])
            good = all(m.consume(int(t)) for t in toks)
            out.append(bool(good and m.accepting()))
        return out


def prepare(decoder, constraint, *, n_prompts: int, samples: int, expand: int, tokenizer, model,
            inputs_fn=None, who: str = "generate", mask: bool = True) -> Optional[Constrained]:
    """None without a constraint; else the decoder (with `ConstraintMask` added first among the user's
    processors) and a session for units = prompts x samples (each unit ``expand`` state rows, whose
    matchers fork when the decoder reorders them: beam-like decoders, ``expand > 1``)."""
    if constraint is None:
        return None
    check_decoder(decoder, who)
    cons = per_prompt(constraint, n_prompts)
    if all(c is None for c in cons):
        return None
    compiled = compile_rows(cons, tokenizer, model)
    units = [u for u in compiled for _ in range(samples)]
    session = Session(units, expand=expand, enabled=mask)
    mask_cls = ForkingConstraintMask if expand > 1 else ConstraintMask  # beams reorder rows: fork in post_commit
    wrapper = None
    if _qualname(decoder) in WRAPPERS:
        wrapper, decoder = decoder, decoder.inner
    decoder = dataclasses.replace(decoder, processors=(mask_cls(int(model.vocab_size)),)
                                  + tuple(decoder.processors))
    if wrapper is not None:
        decoder = dataclasses.replace(wrapper, inner=decoder)

    def fn(inputs, chunk):
        session.begin_batch(int(inputs.batch))
        return inputs if inputs_fn is None else inputs_fn(inputs, chunk)

    return Constrained(decoder=decoder, inputs_fn=fn, session=session, prompts=compiled)


def grouped(decoder, constraint, prompts, rows_per_prompt: int, *, tokenizer, model, inputs_fn=None,
            who: str) -> Optional[Constrained]:
    """`prepare` for a decoder run by ``jaxdec.search.common.run_grouped`` (each prompt owns
    ``rows_per_prompt`` rows that it reorders: beam and stochastic beam search)."""
    if constraint is None:
        return None
    from jaxdec.core.driver import _check_prompts
    return prepare(decoder, constraint, n_prompts=len(_check_prompts(prompts, model.vocab_size)), samples=1,
                   expand=int(rows_per_prompt), tokenizer=tokenizer, model=model, inputs_fn=inputs_fn, who=who)


def running(cons: Optional[Constrained]):
    """The run's context (the active session), or a null context without a constraint."""
    return cons.running() if cons is not None else contextlib.nullcontext()


def _register():
    from jaxdec.core import generate as core_generate
    if prepare not in core_generate.CONSTRAINTS:
        core_generate.CONSTRAINTS[:] = [prepare]


_register()

__all__ = ["Constraint", "ConstraintError", "prepare", "grouped", "running", "per_prompt", "check_decoder"]
