"""Declared protocols (`jaxdec.core.protocols`), the named constructors of the speculative methods and the
typed method states. No model is loaded here."""
from __future__ import annotations

import dataclasses
import types

import pytest

from jaxdec.core import protocols as P
from jaxdec.speculative import (DraftModelDrafter, LayerSkipDrafter, NGramDrafter, PromptLookupDrafter,
                                SpeculativeDecoder, TokenRecyclingDrafter)
from jaxdec.speculative import methods as M


def test_hooks_have_one_declared_default():
    bare = object()
    assert P.hook(bare, "cache_headroom") == 0 and P.hook(bare, "shared_prefix_ok") is False
    assert P.hook(bare, "max_children") == 1 and P.hook(bare, "export") is None
    assert P.hook(types.SimpleNamespace(cache_headroom=5), "cache_headroom") == 5
    with pytest.raises(KeyError, match="not a declared hook"):
        P.hook(bare, "cache_headrom")


def test_incomplete_objects_are_refused_by_member_name():
    class NoStep:
        def init(self, *a):
            pass
    with pytest.raises(TypeError, match="lacks step"):
        P.check_decoder(NoStep())

    @dataclasses.dataclass  # not frozen: unhashable, cannot be a static jit argument
    class Mutable:
        def init(self, *a):
            pass

        def step(self, *a):
            pass
    with pytest.raises(TypeError, match="not hashable"):
        P.check_decoder(Mutable())

    class HalfDrafter:
        num_nodes = 3
        max_depth = 3

        def propose(self, *a):
            pass
    with pytest.raises(TypeError, match="lacks is_chain, init, update"):
        SpeculativeDecoder(HalfDrafter())
    with pytest.raises(TypeError, match="lacks vocab_size, num_layers, eos_ids, init_cache"):
        P.check_model(lambda *a: None)


def test_generate_checks_the_decoder_before_tracing(model_q):
    import jaxdec
    model, params = model_q

    @dataclasses.dataclass(frozen=True)
    class OnlyInit:
        def init(self, *a):
            raise AssertionError("must not be reached")
    with pytest.raises(TypeError, match="OnlyInit lacks step"):
        jaxdec.generate(model, params, [[1, 2, 3]], decoder=OnlyInit(), max_new_tokens=2)


def test_named_constructors_build_the_papers_configurations():
    model = types.SimpleNamespace(num_layers=30, vocab_size=49152)
    assert M.prompt_lookup(8) == SpeculativeDecoder(PromptLookupDrafter(8, 3, 1, source="context"))
    assert M.aggressive_decoding(6).drafter.source == "prompt"
    assert M.token_recycling() == SpeculativeDecoder(TokenRecyclingDrafter())
    assert M.aded() == SpeculativeDecoder(NGramDrafter())
    stand = M.stand()
    assert stand.verifier == "sampling" and stand.tree_sampling == "without_replacement"
    assert stand.drafter.mode == "gumbel" and M.stand(sampling=False).drafter.mode == "greedy"
    assert M.swift(model) == SpeculativeDecoder(LayerSkipDrafter(tuple(range(11, 19)), 3))
    assert M.dynamic_exit(model, 26).drafter.skip == tuple(range(26, 30))
    assert M.dynamic_exit(model).drafter.skip == tuple(range(22, 30))
    assert M.token_recycling(tree_size=12).drafter.num_nodes == 12
    with pytest.raises(ValueError, match="exit_layer must be in"):
        M.dynamic_exit(model, 31)
    with pytest.raises(ValueError, match="skip_layers: layer indices"):
        M.swift(model, skip_layers=(40,))
    assert set(M.PAPERS) >= {"prompt_lookup", "token_recycling", "aded", "stand", "swift", "dynamic_exit",
                             "draft_model", "specdec_pp", "pearl"}


def test_draft_model_constructors(model_q):
    model, params = model_q
    dec, p = M.specdec_pp(model, params, draft_layers=6, stop_threshold=0.25)
    assert isinstance(dec.drafter, DraftModelDrafter) and dec.drafter.stop_threshold == 0.25
    assert dec.drafter.draft_model.num_layers == 6 and set(p) == {"target", "draft"}
    pearl, _ = M.pearl(model, params)
    assert pearl.draft_model.num_layers == 27 and pearl.gamma == 4
    with pytest.raises(ValueError, match="draft_layers must be in"):
        M.draft_model(model, params, draft_layers=0)


def test_method_states_are_typed():
    from flax import struct  # noqa: F401
    from jaxdec.search.beam import BeamState
    from jaxdec.search.stochastic import SBSState
    from jaxdec.search.token import TokenState
    from jaxdec.speculative.engine import SpecState
    from jaxdec.speculative.pearl import PearlState
    for cls in (TokenState, SpecState, PearlState, BeamState, SBSState):
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "replace"), cls
        assert cls.__doc__ and "[B" in cls.__doc__, f"{cls.__name__} documents no shapes"


def test_cli_methods_lists_every_method_and_drafter_with_its_paper(capsys):
    from jaxdec import cli
    from jaxdec.speculative.cli import DRAFTERS
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    cli.build_parser()  # plugins registered
    for name in cli.METHODS:
        assert f"\n{name}\n" in "\n" + out, name
        assert name in cli.PAPERS, f"method {name} names no paper"
    for d in DRAFTERS:
        assert f"speculative --drafter {d}\n" in out, d
    assert "paper: ?" not in out
