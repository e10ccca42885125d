"""lm-evaluation-harness (issue #20): the `jaxdec` adapter (`jaxdec.serving.lm_eval`) and lm-eval's own
`local-completions` model pointed at `jaxdec serve` give the same scores on the local tasks (a multiple-choice
task, a generate_until task and a loglikelihood_rolling task over JSONL files in the repository), and the
adapter's loglikelihoods equal `jaxdec.score`. lm-eval runs in process (`lm_eval.simple_evaluate`); a guard
refuses every connection that does not go to a loopback address, so nothing here reaches the network
(`local-completions` tokenizes through the server's /tokenize: no tokenizer download)."""
from __future__ import annotations

import ipaddress
import socket

import numpy as np
import pytest

import jaxdec
from jaxdec.serving import Engine

pytest.importorskip("lm_eval")
from jaxdec.serving import lm_eval as jlm  # noqa: E402

NAME = "smollm2-lm-eval"
TASKS = ["jaxdec_mc", "jaxdec_gen", "jaxdec_ppl"]
CACHE, CAP = 256, 16
# DESIGN's float tolerance, applied to a sum of token log-probabilities: per token 1e-4 of the magnitude
LL_RTOL, LL_ATOL = 1e-4, 1e-4


def _loopback(host) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def offline():
    """No connection leaves the machine while this module runs (and the Hugging Face libraries are offline)."""
    mp = pytest.MonkeyPatch()
    real = socket.socket.connect
    attempts = []

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(host):
            attempts.append(address)
            raise OSError(f"test_lm_eval: network access refused ({address})")
        return real(self, address)

    mp.setattr(socket.socket, "connect", connect)
    import lm_eval.evaluator
    mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # torch's environment dump: seconds per run
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield attempts
    mp.undo()
    assert not attempts, f"something tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from jaxdec.models.tokenizer import Tokenizer
    return Tokenizer.load(gguf_path)


@pytest.fixture(scope="module")
def adapter(model_q, tokenizer):
    model, params = model_q
    return jlm.JaxdecLM(model=model, params=params, tokenizer=tokenizer, batch_size=8)


def _evaluate(lm):
    import lm_eval
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=jlm.task_manager(), bootstrap_iters=0,
                                   log_samples=True)


@pytest.fixture(scope="module")
def adapter_run(adapter, offline):
    return _evaluate(adapter)


@pytest.fixture(scope="module")
def server_url(model_q, tokenizer, offline):
    from jaxdec.serving import server as srv
    model, params = model_q
    eng = Engine(model, params, slots=4, cache_size=CACHE, capacity=CAP, keep_results=False)
    with srv.serve_in_thread(srv.create_app(eng, tokenizer, NAME)) as url:
        yield url


def _samples(run, task):
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def _lls(run, task) -> np.ndarray:
    """Per request (document x choice) log-likelihoods of a loglikelihood or rolling task, in document order."""
    out = []
    for s in _samples(run, task):
        for r in s["resps"]:
            out.append(float(r[0][0]) if isinstance(r[0], (tuple, list)) else float(r[0]))
    return np.asarray(out)


def test_adapter_and_local_completions_on_jaxdec_serve_give_the_same_scores(adapter_run, server_url, offline):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    api = LocalCompletionsAPI(model=NAME, base_url=server_url + "/v1/completions", max_retries=1)
    assert api.tokenizer_backend == "remote"  # found the server's /tokenize: no Hugging Face tokenizer
    served = _evaluate(api)
    ours = adapter_run
    for task in TASKS:
        assert [s["doc_id"] for s in _samples(ours, task)] == [s["doc_id"] for s in _samples(served, task)]
    # multiple choice: the same accuracy, from the same per-choice log-likelihoods and greedy flags
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["jaxdec_mc"][metric] == served["results"]["jaxdec_mc"][metric], metric
    a, b = _lls(ours, "jaxdec_mc"), _lls(served, "jaxdec_mc")
    assert len(a) == 40 and np.ptp(a) > 1.0  # 10 questions x 4 choices, and the choices differ
    np.testing.assert_allclose(a, b, rtol=LL_RTOL, atol=LL_ATOL)
    greedy = lambda run: [bool(r[0][1]) for s in _samples(run, "jaxdec_mc") for r in s["resps"]]  # noqa: E731
    assert greedy(ours) == greedy(served) and any(greedy(ours))
    # generate_until: the same answers, text for text (greedy, cut at "\n" / ".")
    ga = [s["resps"][0][0] for s in _samples(ours, "jaxdec_gen")]
    gb = [s["resps"][0][0] for s in _samples(served, "jaxdec_gen")]
    assert ga == gb and len(set(ga)) > 1, (ga, gb)
    assert ours["results"]["jaxdec_gen"]["exact_match,strip"] == served["results"]["jaxdec_gen"]["exact_match,strip"]
    # loglikelihood_rolling: the same document log-likelihoods and perplexities
    np.testing.assert_allclose(_lls(ours, "jaxdec_ppl"), _lls(served, "jaxdec_ppl"), rtol=LL_RTOL, atol=LL_ATOL)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"]["jaxdec_ppl"][metric], served["results"]["jaxdec_ppl"][metric],
                                   rtol=1e-4)


def _score_sums(model, params, ctxs, conts, rows=8) -> np.ndarray:
    """jaxdec.score of each pair, summed, in document order, `rows` pairs per call (the last call repeats its last
    pair): the batch shape the adapter uses, so no new program is compiled (the adapter sorts by length: other
    batches)."""
    out = []
    for s in range(0, len(ctxs), rows):
        c, x = ctxs[s:s + rows], conts[s:s + rows]
        n = len(c)
        lps = jaxdec.score(model, params, c + c[-1:] * (rows - n), x + x[-1:] * (rows - n))[:n]
        out += [float(lp.sum()) for lp in lps]
    return np.asarray(out)


def test_adapter_loglikelihoods_equal_jaxdec_score(adapter_run, adapter, model_q, tokenizer):
    """Directly on the first two questions (8 choices) and every perplexity document; the other choices are
    compared with the server's log-probabilities above, which `Engine.score` takes from `jaxdec.score`."""
    model, params = model_q
    # multiple choice: lm-eval's own context / continuation split, scored by jaxdec.score
    pairs = [adapter._encode_pair(*args) for s in _samples(adapter_run, "jaxdec_mc")[:2] for args in s["arguments"]]
    got = _lls(adapter_run, "jaxdec_mc")[:len(pairs)]
    want = _score_sums(model, params, [c for c, _ in pairs], [x for _, x in pairs])
    assert len(pairs) == 8 and pairs[0][1] == tokenizer.encode(" Paris")
    np.testing.assert_allclose(got, want, rtol=LL_RTOL, atol=LL_ATOL)
    # negative control: an off-by-one context (its last token, ":", dropped) is told apart by this tolerance
    # for every choice
    moved = _score_sums(model, params, [c[:-1] for c, _ in pairs], [x for _, x in pairs])
    assert np.all(np.abs(got - moved) > LL_ATOL + LL_RTOL * np.abs(moved))
    # rolling: a document's log-likelihood is its tokens after the BOS prefix
    docs = [s["arguments"][0][0] for s in _samples(adapter_run, "jaxdec_ppl")]
    ids = [tokenizer.encode(d) for d in docs]
    want = _score_sums(model, params, [[tokenizer.bos_id]] * len(ids), ids)
    np.testing.assert_allclose(_lls(adapter_run, "jaxdec_ppl"), want, rtol=LL_RTOL, atol=LL_ATOL)


def test_server_logprobs_carry_the_top_token(server_url, model_q, tokenizer):
    """echo + logprobs=1 (what loglikelihood clients send): every prompt token's log-probability and the most
    likely token there with its own, equal to jaxdec.score; the top token's log-probability is the maximum. With
    max_tokens=1 at temperature 0 the server answers from one forward (no decode slot): its token is the
    engine's first greedy token."""
    import json
    import urllib.request
    model, params = model_q
    ids = tokenizer.encode("Question: What is the capital of France?\nAnswer: Paris")

    def complete(n):
        req = urllib.request.Request(server_url + "/v1/completions", json.dumps(
            {"model": NAME, "prompt": ids, "max_tokens": n, "echo": True, "logprobs": 1, "temperature": 0}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    one, two = complete(1), complete(2)  # one forward; the engine (2 tokens) then teacher forcing
    lp = one["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 1
    assert one["usage"]["completion_tokens"] == 1 and two["usage"]["completion_tokens"] == 2
    lp2 = two["choices"][0]["logprobs"]
    assert lp2["tokens"][:len(ids) + 1] == lp["tokens"]  # the same greedy token
    np.testing.assert_allclose(lp2["token_logprobs"][1:len(ids) + 1], lp["token_logprobs"][1:], rtol=LL_RTOL,
                               atol=LL_ATOL)
    want = jaxdec.score(model, params, [ids[:1]], [ids[1:]])[0]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, rtol=LL_RTOL, atol=LL_ATOL)
    tops = lp["top_logprobs"][1:]
    assert all(len(t) == 1 for t in tops)
    best = [max(t.values()) for t in tops]
    assert all(b >= x - 1e-6 for b, x in zip(best, lp["token_logprobs"][1:]))
    # where the prompt's token is the model's first choice the values are equal; elsewhere the top one is higher
    hits = [abs(b - x) < 1e-6 for b, x in zip(best, lp["token_logprobs"][1:])]
    assert any(hits) and not all(hits) and hits[-1]  # the new token is the greedy one


def test_tokenizer_endpoints_and_bad_input(server_url, tokenizer, adapter):
    import json
    import urllib.error
    import urllib.request

    def post(path, body):
        req = urllib.request.Request(server_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with urllib.request.urlopen(server_url + "/tokenizer_info", timeout=60) as r:
        info = json.loads(r.read())
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    text = "Hello, world! <|im_end|>"
    code, out = post("/tokenize", {"prompt": text, "add_special_tokens": False})
    assert code == 200 and out["tokens"] == tokenizer.encode(text) and out["tokens"][-1] == tokenizer.eos_id
    code, out = post("/detokenize", {"tokens": tokenizer.encode("Hello, world!")})
    assert code == 200 and out["prompt"] == "Hello, world!"
    for path, body, param in [("/tokenize", {"prompt": 3}, "prompt"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens"),
                              ("/tokenize", {"prompt": "x", "model": "gpt-9"}, "model")]:
        code, out = post(path, body)
        assert 400 <= code < 500 and out["error"]["param"] == param, (path, body, out)
    # the adapter refuses what it cannot honour, by name
    with pytest.raises(ValueError, match="unknown model_args.*dtype"):
        jlm.JaxdecLM(model=adapter.model, params=adapter.params, tokenizer=tokenizer, dtype="float16")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        jlm.JaxdecLM(model=adapter.model, params=adapter.params, tokenizer=tokenizer, batch_size=0)
    with pytest.raises(ValueError, match=r"generation_kwargs \['repetition_penalty'\]"):
        adapter._generation_settings({"until": ["\n"], "repetition_penalty": 1.3})
    with pytest.raises(ValueError, match="max_length"):
        adapter._loglikelihood_tokens([(None, [1], [5] * adapter.max_length)])


@pytest.mark.slow
def test_command_line_runs_lm_eval_with_the_jaxdec_model(tmp_path):
    """`python -m jaxdec.serving.lm_eval` is lm-eval's own command line with the `jaxdec` model registered and the
    local tasks on its include path (a fresh interpreter: loads the default model itself)."""
    import glob
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-m", "jaxdec.serving.lm_eval", "--model", "jaxdec", "--model_args",
                        "weights=q,batch_size=4", "--tasks", "jaxdec_mc", "--limit", "4", "--output_path",
                        str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    files = glob.glob(str(tmp_path / "**" / "results*.json"), recursive=True)
    assert len(files) == 1, (files, r.stdout[-2000:])
    res = json.load(open(files[0]))["results"]["jaxdec_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0 and res["alias"] == "jaxdec_mc"
