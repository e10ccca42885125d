"""Greedy decoding throughput: jaxdec (float32 and block-quantized weights) vs Hugging Face `generate`.

Both sides decode the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) greedily from the same chat
prompts, at batch 1 and batch 8, for a fixed number of new tokens (EOS ignored: jaxdec gets
``stop_ids=()``, HF gets a generation config without an EOS id, and every output is checked to have
exactly N new tokens). Following DESIGN.md's benchmark rules:

* the clock runs from token ids in to token ids on the host, prefill included, after warm-up
  (`generate` returns host lists; HF's output tensor is read back as a list);
* compile time is reported separately (first call minus the median steady call of the same shape);
* every configuration is run ``--reps`` (>= 5) times, interleaved (rep 1 of every configuration, then
  rep 2, ...), and we report the median with the spread (min, max); ratios vs the peer are the median
  of per-repetition ratios, so both sides of a ratio were measured back to back under the same load;
* the peer runs in float32 with torch's default threads and its default attention.

Runs through experiments/runner.py: one cell per batch size (every system interleaved within it), so an
interrupted run resumes; writes ``experiments/results/bench_greedy.{json,md}`` with the config, commit,
machine and load average.

    python experiments/bench_greedy.py            # 64 new tokens, 7 repetitions
    python experiments/bench_greedy.py --quick    # 16 new tokens, 5 repetitions
    python experiments/bench_greedy.py --smoke    # batch 1, 2 new tokens, to a temp dir (checks it runs)
    python experiments/bench_greedy.py --step     # ms per decode step for each matmul variant
                                                  # (experiments/results/bench_greedy_step.*, perf notes)
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (load average before/after, flags a loaded machine or a slowed peer)
import runner  # noqa: E402  (config -> results/NAME.{json,md}, resumable cells, load average, commit)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarize the plot of Romeo and Juliet.",
    "What are the main differences between a list and a tuple in Python? Answer briefly, with an example "
    "of each and one sentence on when to prefer which.",
    "Hi!",
    "Name four planets of the solar system.",
    "How do I reverse a string in Python?",
    "Write a haiku about autumn rain.",
    "What does HTTP status code 404 mean?",
]


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import peer
    v = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
         "numpy": np.__version__}
    v.update(peer.versions())
    return v


def chat_prompts(n: int) -> list:
    """Token ids of the chat prompts, rendered and tokenized by the peer's tokenizer."""
    from peer import peer_tokenizer
    tok = peer_tokenizer()
    out = []
    for text in PROMPTS[:n]:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return out


class JaxdecRunner:
    def __init__(self, weights: str):
        """weights: "f32", "q", or "q8" (the q blocks with int8 activations: lossy, opt-in)."""
        from peer import default_gguf_path
        from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
        from jaxdec.models.llama import LlamaModel
        r = open_gguf(default_gguf_path())
        cfg, arch = config_from_gguf(r)
        self.model = LlamaModel(cfg)
        self.params = load_gguf_params(r, cfg, arch, "q" if weights == "q8" else weights)
        if weights == "q8":
            from jaxdec.quant import pack_params_q8
            self.params = pack_params_q8(self.params)
        self.name = f"jaxdec-{weights}"

    def __call__(self, prompts: list, n_new: int) -> list:
        from jaxdec.core.generate import generate
        g = generate(self.model, self.params, prompts, method="greedy", max_new_tokens=n_new,
                     batch_size=len(prompts), stop_ids=())
        return g.tokens


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the same GGUF, its own kernels (int8 activations against the 4-bit
    blocks), default threads; driven by its own eval/sample loop, greedy (top_k=1), logits for the last position
    only (its normal setting). One sequence at a time: a batch of b prompts is b sequential generations."""

    def __init__(self, threads: int = 0):
        """threads: 0 keeps llama-cpp-python's default (half the cores: 1 here), else n_threads."""
        import llama_cpp
        from peer import default_gguf_path
        kw = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        self.llm = llama_cpp.Llama(model_path=default_gguf_path(), n_ctx=512, n_batch=512, verbose=False, **kw)
        self.version = getattr(llama_cpp, "__version__", "?")
        self.name = "llama.cpp" + (f"-{threads}threads" if threads else "")

    def __call__(self, prompts: list, n_new: int) -> list:
        outs = []
        for ids in prompts:
            self.llm.reset()
            self.llm.eval(ids)
            out = []
            for _ in range(n_new):
                t = int(self.llm.sample(top_k=1, temp=0.0))
                out.append(t)
                self.llm.eval([t])
            outs.append(out)
        return outs


class PeerRunner:
    """HF transformers `generate`, greedy, float32, default attention; left-padded batches.

    threads=None keeps torch's default thread count (the reference of DESIGN.md). threads=1 is a
    supplementary row: on a shared, oversubscribed CPU, torch's OpenMP threads wait at every op for a
    descheduled partner and the default configuration slows down far more than the work warrants.
    """

    def __init__(self, threads=None):
        import torch
        from peer import peer_model, peer_tokenizer
        self.torch = torch
        self.threads = threads
        self.model = peer_model()
        self.pad = peer_tokenizer().pad_token_id
        if self.pad is None:
            self.pad = 2
        self.name = "hf-transformers" if threads is None else f"hf-transformers-{threads}thread"

    def __call__(self, prompts: list, n_new: int) -> list:
        torch = self.torch
        default = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._generate(prompts, n_new)
        finally:
            torch.set_num_threads(default)

    def _generate(self, prompts: list, n_new: int) -> list:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, eos_token_id=None, pad_token_id=self.pad)
        return out[:, width:].tolist()


def timed(fn, prompts, n_new):
    t0 = time.perf_counter()
    toks = fn(prompts, n_new)
    dt = time.perf_counter() - t0
    lens = {len(t) for t in toks}
    if lens != {n_new}:
        raise RuntimeError(f"{fn.name}: expected exactly {n_new} new tokens per row, got lengths {sorted(lens)}")
    return dt, toks


class Systems:
    """The systems timed by every cell, made once (the first cell that needs them)."""

    def __init__(self, cfg):
        self.cfg, self.runners, self.prompts, self.waited = cfg, None, None, False

    def get(self):
        if self.runners is None:
            import jax
            print(f"jax devices: {jax.devices()}", flush=True)
            self.prompts = chat_prompts(max(max(self.cfg.batches), self.cfg.b1_prompts))
            runners = [PeerRunner()] + ([PeerRunner(threads=1)] if self.cfg.peer_1thread else [])
            if self.cfg.llamacpp:
                try:
                    runners += [LlamaCppRunner(t) for t in self.cfg.llamacpp_threads]
                except ImportError:
                    print("llama.cpp row skipped: llama-cpp-python is not installed (see the README)", flush=True)
            self.runners = runners + [JaxdecRunner(w) for w in self.cfg.jaxdec_weights]
        return self


class OneByOne:
    """A system run at batch 1 over several prompts, one after another (the batch-1 cell's unit of work)."""

    def __init__(self, r):
        self.r, self.name = r, r.name

    def __call__(self, prompts: list, n_new: int) -> list:
        return [row for p in prompts for row in self.r([p], n_new)]


def measure_batch(systems, cfg, b: int) -> dict:
    """One cell: every system at batch b, warmed up, then cfg.reps repetitions interleaved across systems.
    At batch 1 each timed call decodes the first ``--b1-prompts`` prompts one after another."""
    st = systems.get()
    runners, n_new = st.runners, cfg.new_tokens
    prompts = [st.prompts[i % len(st.prompts)] for i in range(b)]
    if b == 1 and cfg.b1_prompts > 1:
        prompts = st.prompts[:cfg.b1_prompts]
        runners = [OneByOne(r) for r in runners]
    first, times, tokens = {}, {}, {}
    for r in runners:  # warm-up: the first call compiles; a second call checks steady state
        dt, toks = timed(r, prompts, n_new)
        first[r.name] = dt
        timed(r, prompts, n_new)
        times[r.name], tokens[r.name] = [], toks
        print(f"warm-up {r.name:16s} batch {b}: first call {dt:.2f} s", flush=True)
    if cfg.wait_idle > 0 and not systems.waited:
        t0 = time.time()
        while os.getloadavg()[0] >= cfg.wait_idle and time.time() - t0 < 1800:
            time.sleep(10)
        systems.waited = True
        print(f"load average {os.getloadavg()} after waiting {time.time() - t0:.0f} s", flush=True)
    load_before = os.getloadavg()
    for rep in range(cfg.reps):
        for r in runners:
            dt, toks = timed(r, prompts, n_new)
            times[r.name].append(dt)
            if toks != tokens[r.name]:
                raise RuntimeError(f"{r.name} batch {b}: greedy tokens changed between repetitions")
        print(f"batch {b} rep {rep + 1}/{cfg.reps}: " + ", ".join(
            f"{n} {len(prompts) * n_new / t[-1]:.1f} tok/s" for n, t in times.items()), flush=True)
    load_after = os.getloadavg()
    rows = []
    total = len(prompts) * n_new  # new tokens per timed call
    peer = np.array([total / t for t in times["hf-transformers"]])
    for name, ts in times.items():
        tps = np.array([total / t for t in ts])
        ratio = tps / peer
        steady = float(np.median(ts))
        extra = {}
        if "hf-transformers-1thread" in times:
            peer1 = np.array([total / t for t in times["hf-transformers-1thread"]])
            extra = {"ratio_vs_peer_1thread_median": float(np.median(tps / peer1))}
        rows.append({
            "system": name, "batch": b, "new_tokens": n_new,
            "tokens_per_s_median": float(np.median(tps)), "tokens_per_s_min": float(tps.min()),
            "tokens_per_s_max": float(tps.max()), "seconds": [float(t) for t in ts],
            "ratio_vs_peer_median": float(np.median(ratio)), "ratio_vs_peer_min": float(ratio.min()),
            "ratio_vs_peer_max": float(ratio.max()),
            "first_call_s": first[name], "compile_s_estimate": max(0.0, first[name] - steady), **extra})
    hf = tokens["hf-transformers"]
    f = tokens.get("jaxdec-f32", hf)
    agree = {"batch": b, "rows": len(f), "f32_equals_peer_rows": sum(x == y for x, y in zip(f, hf))}
    for other in [n for n in tokens if n in ("jaxdec-q", "jaxdec-q8") or n.startswith("llama.cpp")]:
        # agreement with f32 greedy (q8 and llama.cpp: int8 activations, lossy)
        agree[f"{other.replace('jaxdec-', '')}_equals_f32_rows"] = sum(x == y for x, y in zip(tokens[other], f))
    return {"results": rows, "token_agreement": agree, "prompt_lengths": [len(p) for p in prompts],
            "load_average_before": load_before, "load_average_after": load_after}


def markdown(rec: dict) -> list:
    c = rec["config"]
    cells = [r for k in rec["cells_order"] if (r := runner.result(rec, k))]
    results = [row for cell in cells for row in cell["results"]]
    lens = sorted({n for cell in cells for n in cell["prompt_lengths"]})
    lines = [
        f"{c['new_tokens']} new tokens per row (EOS ignored), {c['reps']} interleaved repetitions per batch size (one "
        f"cell each), chat prompts of {lens} tokens; time from ids in to ids on host, "
        "prefill included; at batch 1 each timed call decodes " + str(c.get("b1_prompts", 1)) + " prompts one "
        "after another. tok/s = new tokens / seconds; median [min, max]. Ratio = median of "
        "per-repetition ratios to the peer at the same batch size [min, max]. The peer is HF transformers with "
        "torch's default threads (DESIGN.md); `hf-transformers-1thread` (torch.set_num_threads(1)) is a "
        "supplementary reference, because on an oversubscribed CPU torch's OpenMP threads wait at every op for "
        "a descheduled partner and the default peer slows down far more than the work warrants.",
        "",
        *[benchlib.peer_warning(r["seconds"], f"the peer ({r['system']}, batch {r['batch']})")
          for r in results if r["system"].startswith("hf-transformers")],
        "| system | batch | tok/s median [min, max] | ratio vs peer [min, max] | ratio vs 1-thread peer "
        "| first call (s) | compile est. (s) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in sorted(results, key=lambda r: (r["batch"], r["system"])):
        r1 = r.get("ratio_vs_peer_1thread_median")
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['tokens_per_s_median']:.1f} [{r['tokens_per_s_min']:.1f}, "
            f"{r['tokens_per_s_max']:.1f}] | {r['ratio_vs_peer_median']:.2f} [{r['ratio_vs_peer_min']:.2f}, "
            f"{r['ratio_vs_peer_max']:.2f}] | {'-' if r1 is None else f'{r1:.2f}'} | {r['first_call_s']:.1f} "
            f"| {r['compile_s_estimate']:.1f} |")
    lines += ["", "Token agreement (greedy, EOS ignored): " + "; ".join(
        f"batch {a.get('batch', a['rows'])}: " + ", ".join(f"{k.split('_')[0]} == f32 on {v}/{a['rows']} rows" for k, v in a.items()
                                          if k.endswith("_equals_f32_rows"))
        + f", f32 == peer on {a['f32_equals_peer_rows']}/{a['rows']} rows"
        for a in (cell["token_agreement"] for cell in cells)),
        "(rows may differ from the peer after a near-tie; the tests check agreement with the shared near-tie "
        "helper).", ""]
    return lines


# ------------------------------------------------------------------ one-decode-step micro-benchmark
def _seed_matmul(x, w):
    """The block-quantized matmul this project started from: dequantize the whole matrix, then einsum."""
    import jax.numpy as jnp
    from jaxdec import quant
    if isinstance(w, quant.LayerSlice):
        w = w.materialize()
    return jnp.einsum("...i,oi->...o", x, quant.dequantize(w))


def _stand_in_matmul(x, w):
    """A near-free stand-in with the right output shape: what the step costs besides the matmuls."""
    import jax.numpy as jnp
    return jnp.broadcast_to(x.sum(-1, keepdims=True), x.shape[:-1] + (w.shape[-2],))


def _sliced_layers(layers):
    """The scan slices every stacked weight (the original behaviour: each layer's weights are copied)."""
    return layers, lambda p, i: p


STEP_VARIANTS = {
    # name: (weights, matmul, layer params, environment, scan unroll, description)
    "f32": ("f32", "auto", "in_place", {"JAXDEC_F32_NATIVE_MAX_ROWS": "0"}, 1,
            "float32 weights, XLA dot (the scan copies each layer's weights)"),
    "f32-native": ("f32", "auto", "in_place", {}, 1,
                   "float32 weights, native kernel reading layer weights in place (default for <= 32 rows)"),
    "q-seed": ("q", "seed", "sliced", {}, 1, "seed: dequantize whole matrix + XLA dot, scan slices layers"),
    "q-xla": ("q", "xla", "in_place", {}, 1, "pure-XLA fallback: two nibble-half dots, layers by index"),
    "q-native-sliced": ("q", "native", "sliced", {}, 1, "native kernel, scan slices (copies) layer weights"),
    "q-native": ("q", "native", "in_place", {}, 1, "native kernel, layer weights read in place (default)"),
    "q-native-1thread": ("q", "native", "in_place", {"JAXDEC_QMATMUL_THREADS": "1"}, 1,
                         "native kernel, one thread for every product"),
    "q-native-2thread-all": ("q", "native", "in_place", {"JAXDEC_QMATMUL_MIN_PARALLEL": "0"}, 1,
                             "native kernel, two threads even for small products"),
    "q-native-unroll2": ("q", "native", "in_place", {}, 2, "native kernel, layer scan unrolled x2"),
    "matmul-free": ("f32", "stand_in", "in_place", {}, 1, "matmuls replaced by a stand-in: the rest of the step"),
}


def _step_fn(model, variant, n_steps):
    """jit(n_steps greedy decode steps in a while_loop) traced under the variant's matmul settings."""
    import functools
    import jax
    import jax.numpy as jnp
    from jaxdec import quant
    from jaxdec.models import llama
    weights, mm, layers, env, unroll, _ = STEP_VARIANTS[variant]
    matmul = {"seed": _seed_matmul, "stand_in": _stand_in_matmul}.get(mm) or functools.partial(quant.matmul, impl=mm)
    split = _sliced_layers if layers == "sliced" else quant.scan_layer_params

    def steps(params, tok, cache):
        def body(c):
            i, tok_, cache_ = c
            out = model(params, tok_, cache_.lengths[:, None], cache_)
            return i + 1, jnp.argmax(out.logits, -1).astype(jnp.int32), out.cache
        return jax.lax.while_loop(lambda c: c[0] < n_steps, body, (0, tok, cache))[1:]

    jitted = jax.jit(steps)

    def traced(params, tok, cache):  # patches apply while the first call traces; later calls hit the cache
        saved = {k: os.environ.get(k) for k in env}
        # the model calls quant_matmul(x, w, impl=model.matmul_impl); the variant's matmul replaces it
        patches = {"quant_matmul": lambda x, w, impl=None: matmul(x, w), "scan_layer_params": split}
        old = {k: getattr(llama, k) for k in patches}
        old_scan = jax.lax.scan
        os.environ.update(env)
        for k, v in patches.items():
            setattr(llama, k, v)
        if unroll != 1:
            jax.lax.scan = functools.partial(old_scan, unroll=unroll)
        try:
            return jitted(params, tok, cache)
        finally:
            jax.lax.scan = old_scan
            for k, v in old.items():
                setattr(llama, k, v)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return traced, weights


class StepModel:
    """The default model with both weight kinds, loaded once (the first cell that needs it)."""

    def __init__(self):
        self.model = None

    def get(self):
        if self.model is None:
            from peer import default_gguf_path
            from jaxdec.models.gguf_loader import config_from_gguf, load_gguf_params, open_gguf
            from jaxdec.models.llama import LlamaModel
            r = open_gguf(default_gguf_path())
            cfg, arch = config_from_gguf(r)
            self.model = LlamaModel(cfg)
            self.params = {w: load_gguf_params(r, cfg, arch, w) for w in ("f32", "q")}
        return self


def measure_step(sm, cfg, b: int) -> dict:
    """One cell: ms per decode step (cache holding 40 tokens) at batch b for each variant, interleaved."""
    import jax
    import jax.numpy as jnp
    st = sm.get()
    model, params = st.model, st.params
    names = list(cfg.variants) or list(STEP_VARIANTS)
    n_steps = cfg.step_count
    cache = model.init_cache(b, 256).replace(lengths=jnp.full((b,), 40, jnp.int32))
    tok = jnp.ones((b, 1), jnp.int32)
    fns = {n: _step_fn(model, n, n_steps) for n in names}
    first, ms = {}, {n: [] for n in names}
    for n, (f, w) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(params[w], tok, cache))
        first[n] = time.perf_counter() - t0
    load_before = os.getloadavg()
    for _ in range(cfg.reps):
        for n, (f, w) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params[w], tok, cache))
            ms[n].append((time.perf_counter() - t0) / n_steps * 1e3)
    base = np.array(ms["f32"]) if "f32" in ms else None
    rows = []
    for n in names:
        v = np.array(ms[n])
        row = {"variant": n, "batch": b, "description": STEP_VARIANTS[n][5],
               "ms_per_step_median": float(np.median(v)),
               "ms_min": float(v.min()), "ms_max": float(v.max()), "tokens_per_s": float(b * 1e3 / np.median(v)),
               "first_call_s": first[n], "load_average_before": load_before}
        if base is not None:
            row["speedup_vs_f32_median"] = float(np.median(base / v))
        rows.append(row)
        print(f"batch {b} {n:22s} {np.median(v):8.2f} ms/step [{v.min():.2f}, {v.max():.2f}]"
              + (f"  x{row['speedup_vs_f32_median']:.2f} vs f32" if base is not None else ""), flush=True)
    return {"results": rows}


def step_markdown(rec: dict) -> list:
    lines = [f"Each call runs {rec['config']['step_count']} greedy decode steps in a jitted while_loop (cache of 256 "
             "positions holding 40 tokens); ms per step, median [min, max] over interleaved repetitions; speed-up "
             "= median of per-repetition f32/variant ratios. One cell per batch size.", "",
             "| batch | variant | what | ms/step median [min, max] | tok/s | speed-up vs f32 | load avg |",
             "| ---: | --- | --- | --- | ---: | ---: | --- |"]
    for k in rec["cells_order"]:
        for r in (runner.result(rec, k) or {"results": []})["results"]:
            sp = r.get("speedup_vs_f32_median")
            lines.append(f"| {r['batch']} | {r['variant']} | {r['description']} | {r['ms_per_step_median']:.2f} "
                         f"[{r['ms_min']:.2f}, {r['ms_max']:.2f}] | {r['tokens_per_s']:.1f} | "
                         f"{'-' if sp is None else f'{sp:.2f}'} | {r['load_average_before'][0]:.1f} |")
    return lines


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = dataclasses.field(default=64, metadata={"help": "new tokens per row"})
    reps: int = dataclasses.field(default=0, metadata={"help": "timed repetitions, >= 5 (default 7; --step 9)"})
    batches: tuple[int, ...] = (1, 8)
    b1_prompts: int = dataclasses.field(default=12, metadata={
        "help": "prompts the batch-1 cell decodes one after another per timed call (at most 12)"})
    jaxdec_weights: tuple[str, ...] = dataclasses.field(default=("f32", "q"), metadata={
        "help": "jaxdec rows: f32, q, q8 (int8 activations, lossy)"})
    llamacpp: bool = dataclasses.field(default=True, metadata={
        "help": "the llama.cpp row (skipped with a message when llama-cpp-python is not installed)"})
    llamacpp_threads: tuple[int, ...] = dataclasses.field(default=(0, 2), metadata={
        "help": "a llama.cpp row per thread count (0: its default, half the cores)"})
    peer_1thread: bool = dataclasses.field(default=True, metadata={
        "help": "the supplementary torch.set_num_threads(1) peer row (--no-peer-1thread skips it)"})
    wait_idle: float = runner.select(0.0, "before timing, wait (up to 30 min) until the 1-minute load average "
                                          "is below this")
    step: bool = runner.select(False, "micro-benchmark instead: ms per decode step for each matmul variant "
                                      "(results/bench_greedy_step.*, perf notes)")
    variants: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "--step: variants to time (default all): " + ", ".join(STEP_VARIANTS)})
    step_count: int = dataclasses.field(default=8, metadata={"help": "--step: decode steps per timed call"})


QUICK = Config(new_tokens=16, reps=5)
SMOKE = Config(new_tokens=2, reps=5, batches=(1,), peer_1thread=False, llamacpp=False, b1_prompts=2)


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE, presets={"quick": QUICK})
    ap = opts.parser
    cfg = dataclasses.replace(cfg, reps=cfg.reps or (9 if cfg.step else 7))
    if cfg.reps < 5:
        ap.error("--reps must be >= 5 (DESIGN.md: median of at least 5 interleaved repetitions)")
    if cfg.new_tokens < 1 or any(b < 1 for b in cfg.batches):
        ap.error("--new-tokens and --batches must be positive")
    if not 1 <= cfg.b1_prompts <= len(PROMPTS):
        ap.error(f"--b1-prompts must be in 1..{len(PROMPTS)}")
    bad = [v for v in cfg.variants if v not in STEP_VARIANTS]
    if bad:
        ap.error(f"unknown --variants {bad}; known: {', '.join(STEP_VARIANTS)}")
    cells = [f"b{b}" for b in cfg.batches]
    if cfg.step:
        sm = StepModel()
        deps = lambda c: ["reps", "variants", "step_count"]  # noqa: E731
        rec = runner.run_experiment("bench_greedy_step", cfg, cells, lambda c: measure_step(sm, cfg, int(c[1:])),
                                    opts=opts, markdown=step_markdown, depends=deps, info=versions,
                                    title="One decode step of the default model: matmul variants")
        print("\n".join(step_markdown(rec)))
        return
    systems = Systems(cfg)
    deps = lambda c: ["new_tokens", "reps", "peer_1thread", "batches", "jaxdec_weights", "llamacpp",  # noqa: E731
                      "b1_prompts", "llamacpp_threads"]
    rec = runner.run_experiment("bench_greedy", cfg, cells, lambda c: measure_batch(systems, cfg, int(c[1:])),
                                opts=opts, markdown=markdown, depends=deps, info=versions,
                                title="Greedy decoding throughput: jaxdec vs HF transformers")
    print("\n".join(markdown(rec)))


if __name__ == "__main__":
    main()
