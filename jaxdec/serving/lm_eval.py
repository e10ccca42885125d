"""lm-evaluation-harness (``lm_eval`` on PyPI) adapter: jaxdec as the lm-eval model ``jaxdec``, and local tasks.

    import lm_eval
    from jaxdec.serving.lm_eval import JaxdecLM, task_manager
    lm = JaxdecLM(pretrained="smollm2-135m", weights="q", batch_size=8)  # or JaxdecLM(model=, params=, tokenizer=)
    out = lm_eval.simple_evaluate(lm, tasks=["jaxdec_mc", "jaxdec_gen"], task_manager=task_manager())

    python -m jaxdec.serving.lm_eval --model jaxdec --model_args weights=q --tasks jaxdec_mc,jaxdec_gen

The command line is lm-eval's own (``lm-eval run``) with this module imported first, which registers the
``jaxdec`` model (lm-eval finds models only in its own package), and ``--include_path`` set to the local task
folder `TASKS_DIR` unless given. Requests map onto jaxdec as follows:

* ``loglikelihood``: lm-eval's own context / continuation split (`TemplateLM`: the whole string is encoded and
  the context's tokens cut off), contexts left-truncated to ``max_length``; rows sorted by length and scored
  ``batch_size`` at a time by `jaxdec.score` (teacher forcing; ``top=True`` gives the argmax at each position
  from the same forward, for ``is_greedy``). The last batch repeats its last row up to ``batch_size`` rows, so
  every batch of one length bucket reuses one compiled program.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows (prefix token: BOS, else EOS) of
  ``max_length`` tokens, scored as above and summed per document.
* ``generate_until``: `jaxdec.generate` per group of equal generation settings, ``batch_size`` rows per
  compiled batch, ``until`` as stop strings (decoding stops there; the text is cut before the first one),
  ``max_gen_toks`` new tokens at most, greedy unless ``do_sample`` or ``temperature > 0`` (then top_k / top_p
  / min_p / seed). One decoder per stop-string set, so later calls reuse the compiled loop.

`TASKS_DIR` holds three small tasks over JSONL files in the same folder (no dataset download):
``jaxdec_mc`` (10 questions, 4 choices: acc, acc_norm), ``jaxdec_gen`` (6 short answers: exact_match) and
``jaxdec_ppl`` (3 sentences: perplexities).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from jaxdec.core.protocols import hook

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed")


def task_manager(include_defaults: bool = False, **kwargs):
    """An lm-eval `TaskManager` that knows the local tasks of `TASKS_DIR` (and lm-eval's own only with
    ``include_defaults``: indexing them takes seconds)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS_DIR, include_defaults=include_defaults, **kwargs)


def _positive(name: str, v, default: int) -> int:
    """lm-eval passes model_args as strings and batch sizes as ints, "auto" or "auto:N"."""
    if v is None or (isinstance(v, str) and v.startswith("auto")):
        return default
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = 0
    if isinstance(v, bool) or n < 1 or (isinstance(v, float) and v != n):
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return n


@register_model("jaxdec")
class JaxdecLM(TemplateLM):
    """An lm-eval model over a jaxdec model: ``pretrained`` (a model name, GGUF file or HF folder, as
    `jaxdec.load` takes it) with ``weights`` ("q", "f32", "bf16", "df11"), or an already loaded ``model``,
    ``params`` and ``tokenizer``. ``batch_size``: rows per scoring call and per compiled generation batch;
    ``max_length``: tokens of context a request may use (default: the model's context); ``max_gen_toks``:
    new tokens when a task does not say."""

    def __init__(self, pretrained: Optional[str] = None, weights: str = "q", batch_size=8, max_length=None,
                 max_gen_toks=256, model=None, params=None, tokenizer=None, max_batch_size=None, device=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)}: jaxdec takes pretrained, weights, batch_size, "
                             f"max_length, max_gen_toks")
        if model is None:
            import jaxdec
            loaded = jaxdec.load(pretrained or jaxdec.DEFAULT_MODEL, weights=weights)
            model, params, tokenizer = loaded.model, loaded.params, loaded.tokenizer
        elif params is None or tokenizer is None or pretrained is not None:
            raise ValueError("give either pretrained= (a model to load) or model=, params= and tokenizer= together")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = _positive("batch_size", batch_size, 8)
        context = hook(model, "max_position") or 2048
        self.max_length = _positive("max_length", max_length, context)
        if self.max_length > context:
            raise ValueError(f"max_length ({self.max_length}) exceeds the model's context ({context})")
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks, 256)
        self._decoders: dict = {}
        del max_batch_size, device  # lm-eval passes them to every model; one device, no automatic batch size

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list:
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """``requests``: (cache key, context ids, continuation ids) triples -> (sum log p, is_greedy) each."""
        from jaxdec.core.generate import score
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length - 1:
                raise ValueError(f"request {i}: the continuation has {len(cont)} tokens; max_length is "
                                 f"{self.max_length} (with at least one context token)")
            ctx = list(ctx)[-(self.max_length - len(cont)):] if ctx else [self.prefix_token_id]
            rows.append((ctx, list(cont)))
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        todo = [i for i in order if rows[i][1]]
        for i in order:
            if not rows[i][1]:  # nothing to score
                out[i] = (0.0, True)
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            full = chunk + chunk[-1:] * (self.batch_size - len(chunk))  # one batch shape per length bucket
            scored = score(self.model, self.params, [rows[i][0] for i in full], [rows[i][1] for i in full], top=True)
            for i, (lp, top, _) in zip(chunk, scored):
                out[i] = (float(lp.sum()), bool((top == rows[i][1]).all()))
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        lls = self._loglikelihood_tokens(windows) if windows else []
        out = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, lls):
            out[r] += ll
        for req, ll in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return out

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) and s for s in until):
            raise ValueError(f"until must be a string or a list of non-empty strings, got {until!r}")
        max_new = _positive("max_gen_toks", kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)),
                            self.max_gen_toks)
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        sampling = {k: kw.pop(k) for k in _SAMPLING_KEYS if k in kw}
        if kw:
            raise ValueError(f"generation_kwargs {sorted(kw)} are not supported by jaxdec (it takes until, "
                             f"max_gen_toks, do_sample, {', '.join(_SAMPLING_KEYS)})")
        seed = int(sampling.pop("seed", 0))
        if sample or temperature > 0:
            sampling["temperature"] = temperature if temperature > 0 else 1.0
            return dict(until=until, max_new_tokens=max_new, method="sample", sampling=sampling, seed=seed)
        return dict(until=until, max_new_tokens=max_new, method="greedy", sampling=None, seed=seed)

    def _decoder(self, until: list, greedy: bool):
        """One decoder per (stop strings, greedy) for this model's life: a stop-string checker is a static
        argument hashed by identity, so a new one per call would compile the decode loop again."""
        key = (tuple(until), greedy)
        if key not in self._decoders:
            from jaxdec.core.stopping import StopStringChecker
            from jaxdec.core.token import TokenDecoder
            check = StopStringChecker(self.tokenizer, until) if until else None
            self._decoders[key] = TokenDecoder(greedy=greedy, stop_checker=check,
                                               stop_window=check.window if check else 0)
        return self._decoders[key]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        from jaxdec.core.generate import generate
        groups: dict = {}
        for i, req in enumerate(requests):
            ctx, gen_kwargs = req.args[0], req.args[1]
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append((i, ctx, gen_kwargs))
        out: list = [None] * len(requests)
        for items in groups.values():
            st = self._generation_settings(items[0][2])
            keep = self.max_length - st["max_new_tokens"]
            if keep < 1:
                raise ValueError(f"max_gen_toks ({st['max_new_tokens']}) leaves no room for a context within "
                                 f"max_length ({self.max_length})")
            ids = [self.tok_encode(ctx, left_truncate_len=keep) or [self.prefix_token_id] for _, ctx, _ in items]
            g = generate(self.model, self.params, ids, decoder=self._decoder(st["until"], st["method"] == "greedy"),
                         sampling=st["sampling"], seed=st["seed"], max_new_tokens=st["max_new_tokens"],
                         tokenizer=self.tokenizer, batch_size=min(self.batch_size, len(ids)))
            for (i, ctx, gen_kwargs), text in zip(items, g.text):
                for s in st["until"]:
                    text = text.split(s)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", (ctx, gen_kwargs), text)
        return out

    def get_model_info(self) -> dict:
        return {"jaxdec_model": type(self.model).__name__, "tokenizer": self.tokenizer_name,
                "max_length": self.max_length, "batch_size": self.batch_size}


def main(argv=None) -> None:
    """lm-eval's command line with the ``jaxdec`` model registered and the local tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("run", "ls", "validate", "-h", "--help"):
        args.insert(0, "run")
    if args[:1] in (["run"], ["ls"]) and "--include_path" not in args:
        args += ["--include_path", TASKS_DIR]
    sys.argv = ["lm-eval"] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
