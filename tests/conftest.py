"""Session fixtures: the default model is loaded once, the peer runs once per reference set."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import peer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_PROMPTS = os.path.join(ROOT, "jaxdec", "data", "prompts", "chat_prompts.jsonl")


def read_prompts(path=CHAT_PROMPTS):
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def pytest_configure(config):
    """Property tests report how many examples ran (passing / invalid, per test) in the summary: a
    strategy whose examples `assume` mostly away would otherwise pass on a handful of cases unseen."""
    if hasattr(config.option, "hypothesis_show_statistics"):
        config.option.hypothesis_show_statistics = True


@pytest.fixture(scope="session", autouse=True)
def _peer_torch_one_thread():
    """Tests compare results with the peer, never its speed: one torch thread keeps the peer from
    stalling at every op's thread barrier when the CPU is oversubscribed (seen: 48 tokens taking 30 s
    instead of 3 s at load 6 on 2 cores). Benchmarks set their own thread counts."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gguf_path():
    return peer.default_gguf_path()


def _load(weights):
    from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
    from jaxdec.models.llama import LlamaModel
    r = open_gguf(peer.default_gguf_path())
    cfg, arch = config_from_gguf(r)
    return LlamaModel(cfg), load_gguf_params(r, cfg, arch, weights)


@pytest.fixture(scope="session")
def model_f32():
    """(model, params) of the default model with float32 weights."""
    return _load("f32")


@pytest.fixture(scope="session")
def model_q():
    """(model, params) with GGUF block-quantized weights kept as stored."""
    return _load("q")


@pytest.fixture(scope="session")
def chat_prompt_ids():
    """Chat prompts rendered and tokenized by the peer tokenizer (independent of jaxdec)."""
    return [peer.peer_chat_ids(q) for q in read_prompts()]


@pytest.fixture(scope="session")
def peer_greedy_refs(chat_prompt_ids):
    """n -> the peer's greedy continuations (48 new tokens) and step logits of the first n chat prompts
    (8 in CI, 20 in the `slow` acceptance tier); each prompt runs once however many tiers ask."""
    memo = {}

    def get(n):
        for ids in chat_prompt_ids[len(memo):n]:
            memo[len(memo)] = peer.peer_greedy(ids, 48)
        return [memo[i] for i in range(n)]
    return get
