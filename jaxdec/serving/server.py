"""An OpenAI-compatible HTTP server over the decode-slot engine: ``/v1/completions``,
``/v1/chat/completions`` (both with ``stream``: server-sent events, ``usage`` counts) and ``/v1/models``.

    app = create_app(engine, tokenizer, model_name="smollm2-135m")
    serve(app, host="127.0.0.1", port=8000)            # or `jaxdec serve`

One background thread steps the engine while requests wait or run; each HTTP request submits to the
engine and waits on its own asyncio queue, fed from the stepping thread. A client that disconnects has its
request cancelled (its slot is freed at the next step). Bad requests get a 4xx with an OpenAI-style JSON
error ``{"error": {"message", "type", "param", "code"}}``; only loopback hosts are accepted by `serve`.

Supported request fields: ``model``, ``prompt`` (a string or a list of token ids; one prompt) /
``messages``, ``max_tokens`` (``max_completion_tokens`` for chat), ``temperature`` (default 1),
``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop`` (strings, checked on the decoded text), ``stop_token_ids``,
``stream``, ``stream_options.include_usage``, ``n`` (1 only), ``echo`` and ``logprobs`` 0 or 1 (completions:
teacher-forced log-probabilities from `Engine.score`, the same as `jaxdec.score`; with 1, ``top_logprobs`` holds
the most likely token at each position). ``usage.completion_tokens`` counts every generated token, an EOS
included. vLLM's ``/tokenizer_info``, ``/tokenize`` and ``/detokenize`` expose the served tokenizer (lm-eval's
``local-completions`` model tokenizes through them instead of downloading a tokenizer).
Constraints (`jaxdec.constrained`, per request, both endpoints): OpenAI's ``response_format``
(``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``, or ``{"type": "json_object"}``
for any JSON object), or the extension fields ``regex`` (a pattern the whole output matches) and ``choices``
(a list of strings, the output is one of them); at most one per request.
`serve_in_thread` runs an app on a free loopback port inside the calling process (tests, benchmarks).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import threading
import time
import traceback
import uuid
from typing import Optional

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxdec.serving.engine import Engine, RequestError

LOOPBACK_NAMES = ("localhost",)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EngineThread:
    """Steps the engine in one background thread while it has work; `wake` after each submit."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name="jaxdec-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def wake(self):
        self._wake.set()

    def stop(self, timeout: float = 30.0):
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout)

    def _run(self):
        eng = self.engine
        while not self._stop.is_set():
            if not eng.busy:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                eng.step()
            except Exception:  # noqa: BLE001  fail the requests in flight, keep serving
                self.error = traceback.format_exc()
                eng.fail_all("error")


def _field(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise HTTPError(400, f"'{name}' must be {what}, got {json.dumps(v)}", name)
    if not isinstance(v, kinds) or (check is not None and not check(v)):
        raise HTTPError(400, f"'{name}' must be {what}, got {json.dumps(v)[:80]}", name)
    return v


def _constraint(body: dict):
    """The request's constraint in `jaxdec.constrained.as_constraint`'s dict form, or None."""
    found = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise HTTPError(400, "'response_format' must be an object with type 'text', 'json_object' or "
                                 "'json_schema'", "response_format")
        if rf["type"] == "json_object":
            found.append(("response_format", {"json_schema": {"type": "object"}}))
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise HTTPError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                                "response_format")
            found.append(("response_format", {"json_schema": js["schema"]}))
    if body.get("regex") is not None:
        if not isinstance(body["regex"], str) or not body["regex"]:
            raise HTTPError(400, "'regex' must be a non-empty string (a pattern the whole output matches)", "regex")
        found.append(("regex", {"regex": body["regex"]}))
    if body.get("choices") is not None:
        c = body["choices"]
        if not isinstance(c, list) or not c or not all(isinstance(x, str) and x for x in c):
            raise HTTPError(400, "'choices' must be a non-empty list of non-empty strings", "choices")
        found.append(("choices", {"choices": c}))
    if len(found) > 1:
        raise HTTPError(400, f"give at most one constraint per request, got {[f for f, _ in found]}", found[1][0])
    return found[0] if found else None


def _stops(body: dict) -> list:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s) or len(s) > 4:
        raise HTTPError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    return s


class _Job:
    """One HTTP request's view of its engine request: an asyncio queue of (tokens, finish) events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def on_tokens(self, rid, toks, reason):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (list(toks), reason))


class _Text:
    """Incremental detokenization with stop strings: `feed(tokens)` returns the new text that is safe to
    send (held back while it may be the start of a stop string or an incomplete UTF-8 character)."""

    def __init__(self, tokenizer, stops: list):
        self.tok, self.stops = tokenizer, stops
        self.ids: list = []
        self.sent = 0  # characters of the full text already sent
        self.stopped = False

    def _full(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def feed(self, toks: list, final: bool) -> str:
        self.ids.extend(toks)
        text = self._full()
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                text, self.stopped, final = text[:i], True, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = max((k for s in self.stops for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
            end -= hold
        end = max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out


def create_app(engine: Engine, tokenizer, model_name: str = "jaxdec", runner: Optional[EngineThread] = None):
    """The FastAPI app over ``engine`` (its `EngineThread` starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    runner = runner or EngineThread(engine)
    if engine.tokenizer is None:
        engine.tokenizer = tokenizer  # constraints compile on the served tokenizer

    @asynccontextmanager
    async def lifespan(app):
        if not runner.thread.is_alive():
            runner.start()
        yield
        runner.stop()

    app = FastAPI(title="jaxdec", lifespan=lifespan)
    app.state.engine, app.state.runner = engine, runner

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _any_error(request, exc):  # never a crash page: a JSON 500
        return JSONResponse(HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").body(),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc):
        return JSONResponse(HTTPError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def _body(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise HTTPError(400, "the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    async def _json(request: Request, model_required: bool = True) -> dict:
        body = await _body(request)
        m = body.get("model")
        if m is None and not model_required:
            return body
        if not isinstance(m, str):
            raise HTTPError(400, "'model' is required: a string naming the served model", "model")
        if m != model_name:
            raise HTTPError(404, f"model {m!r} is not served here; this server serves {model_name!r}", "model",
                            "model_not_found")
        return body

    def _sampling(body: dict, chat: bool) -> dict:
        n = _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
        del n
        limit = engine.capacity
        default_max = 16 if not chat else limit
        key = "max_tokens"
        mt = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None else None
        if mt is not None:
            key = "max_completion_tokens"
        max_tokens = _field(body, key, int, default_max, lambda v: v >= 0, "an integer >= 1 (0 only with echo)")
        kw = dict(
            max_new_tokens=max_tokens,
            temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
            top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            top_k=_field(body, "top_k", int, 0, lambda v: v >= 0 or v == -1, "an integer >= 0 (0 or -1: off)"),
            min_p=float(_field(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")),
            seed=_field(body, "seed", int, 0, lambda v: -2**63 <= v < 2**63, "a 64-bit integer"),
            stop_ids=_field(body, "stop_token_ids", list, [], lambda v: all(isinstance(t, int) and not isinstance(t, bool)
                                                                           for t in v), "a list of token ids"),
        )
        kw["top_k"] = max(kw["top_k"], 0)
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise HTTPError(400, f"'{name}' is not supported (give 0 or leave it out)", name)
        return kw

    def _prompt_ids(body: dict) -> list:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise HTTPError(400, "'prompt' is empty", "prompt")
            return tokenizer.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise HTTPError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt)", "prompt")

    def _chat_ids(body: dict) -> list:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise HTTPError(400, f"messages[{i}] must be an object with a role (system, user, assistant) and a "
                                     f"string content", "messages")
            out.append({"role": m["role"], "content": m["content"]})
        return tokenizer.encode(tokenizer.apply_chat_template(out, add_generation_prompt=True))

    def _submit(ids, kw, job, cons=None):
        try:
            rid = engine.submit(ids, on_tokens=job.on_tokens, constraint=None if cons is None else cons[1], **kw)
        except RequestError as e:
            msg = str(e)
            param = next((f for f in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop_ids")
                          if msg.startswith(f)), "prompt")
            if cons is not None and msg.startswith("constraint"):
                param = cons[0]
            param = {"max_new_tokens": "max_tokens", "stop_ids": "stop_token_ids"}.get(param, param)
            msg = msg.replace("max_new_tokens", "max_tokens").replace("stop_ids", "stop_token_ids")
            raise HTTPError(400, msg, param, "context_length_exceeded" if "too long" in msg else None) from None
        runner.wake()
        return rid

    async def _events(rid, job, text: _Text, request: Request):
        """Yields (new_text, new_token_ids, finish_reason or None); cancels the engine request on exit before
        the end (client gone, stop string)."""
        finished = False
        try:
            while True:
                try:
                    toks, reason = await asyncio.wait_for(job.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if reason == "error":
                    raise HTTPError(500, "the engine failed while decoding this request", kind="server_error")
                final = reason is not None
                piece = text.feed(toks, final)
                if text.stopped:
                    finished = True
                    yield piece, toks, "stop"
                    return
                if final:
                    finished = True
                    yield piece, toks, {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
                    return
                yield piece, toks, None
        finally:
            if not finished:
                engine.cancel(rid)
                runner.wake()

    def _usage(n_prompt, n_new):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def _logprobs(prompt_ids, new_ids, echo, top, greedy_next=False):
        """OpenAI completions `logprobs` from teacher forcing (`Engine.score`, one forward): each token's
        log-probability and (``top`` >= 1) the most likely token there with its own; the first prompt token has
        None. greedy_next: the one new token is the greedy choice after the prompt, read from the same forward
        (``new_ids`` is ignored). Returns (logprobs, new_ids)."""
        scored = prompt_ids + ([0] if greedy_next else new_ids)  # 0: the new token's place, filled below
        start = 1 if echo else len(prompt_ids)  # score from the second prompt token, or from the new tokens
        lps: list = [None] if echo else []
        tops: list = [None] if echo else []
        if len(scored) > start:
            lp, best, best_lp = engine.score([scored[:start]], [scored[start:]])[0]
            lp = [float(x) for x in lp]
            if greedy_next:
                new_ids, lp[-1] = [int(best[-1])], float(best_lp[-1])
            lps += lp
            tops += [{tokenizer.decode([int(b)]): float(v)} for b, v in zip(best, best_lp)]
        toks = [tokenizer.decode([t]) for t in (prompt_ids if echo else []) + new_ids]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return ({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops if top else None, "text_offset": offsets},
                new_ids)

    async def _handle(request: Request, chat: bool):
        body = await _json(request)
        kw = _sampling(body, chat)
        stops = _stops(body)
        cons = _constraint(body)
        stream = _field(body, "stream", bool, False, None, "true or false")
        opts = _field(body, "stream_options", dict, {}, None, "an object")
        include_usage = bool(opts.get("include_usage", False))
        echo = logprobs = top = False
        if not chat:
            echo = _field(body, "echo", bool, False, None, "true or false")
            lp = _field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "an integer in [0, 5]")
            if lp not in (None, 0, 1):
                raise HTTPError(400, "'logprobs' > 1 (top alternatives) is not supported; give 0 or 1", "logprobs")
            logprobs, top = lp is not None, lp == 1
            if (echo or logprobs) and stream:
                raise HTTPError(400, "'echo' and 'logprobs' are not supported with stream=true", "stream")
        elif body.get("logprobs"):
            raise HTTPError(400, "'logprobs' is not supported on /v1/chat/completions", "logprobs")
        ids = _chat_ids(body) if chat else _prompt_ids(body)
        created = int(time.time())
        # what loglikelihood clients send (lm-eval: echo, logprobs, one greedy token): the prompt's log-probabilities
        # and the greedy next token come from one forward, without a decode slot
        scoring = (echo and logprobs and not stream and not stops and kw["max_new_tokens"] == 1
                   and kw["temperature"] == 0 and cons is None)
        if kw["max_new_tokens"] == 0 or scoring:
            if not echo or stream:
                raise HTTPError(400, "'max_tokens' must be an integer >= 1 (0 only with echo and no stream)",
                                "max_tokens")
            try:
                ids = engine.check(ids, 1)
            except RequestError as e:
                raise HTTPError(400, str(e).replace("max_new_tokens", "max_tokens"), "prompt") from None
            lp, new = None, []
            if logprobs:
                lp, new = await asyncio.get_running_loop().run_in_executor(None, _logprobs, ids, [], True, top,
                                                                           scoring)
            reason = "stop" if new and new[0] in set(engine.eos_ids) | set(kw["stop_ids"]) else "length"
            choice = {"index": 0, "text": tokenizer.decode(ids) + tokenizer.decode(new, skip_special_tokens=True),
                      "logprobs": lp, "finish_reason": reason}
            return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": created,
                    "model": model_name, "choices": [choice], "usage": _usage(len(ids), len(new))}
        job = _Job(asyncio.get_running_loop())
        rid = _submit(ids, kw, job, cons)
        text = _Text(tokenizer, stops)
        oid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"

        def chunk(piece, reason, first=False):
            if chat:
                delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first \
                    else {}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
            return {"id": oid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model_name,
                    "choices": [choice]}

        if stream:
            async def sse():
                n_new, first = 0, True
                async for piece, toks, reason in _events(rid, job, text, request):
                    n_new += len(toks)
                    if piece or reason or first:
                        yield f"data: {json.dumps(chunk(piece, reason, first))}\n\n"
                        first = False
                if include_usage:
                    u = {"id": oid, "object": obj + ".chunk" if chat else obj, "created": created,
                         "model": model_name, "choices": [], "usage": _usage(len(ids), n_new)}
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        parts, new_ids, reason = [], [], None
        async for piece, toks, r in _events(rid, job, text, request):
            parts.append(piece)
            new_ids.extend(toks)
            reason = r
        if reason is None:  # client went away
            return JSONResponse(HTTPError(499, "client closed the request").body(), status_code=499)
        out_text = "".join(parts)
        usage = _usage(len(ids), len(new_ids))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out_text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            lp = None
            if logprobs:
                lp, _ = await asyncio.get_running_loop().run_in_executor(None, _logprobs, ids, new_ids, echo, top)
            if echo:
                out_text = tokenizer.decode(ids) + out_text
            choice = {"index": 0, "text": out_text, "logprobs": lp, "finish_reason": reason}
        return {"id": oid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "jaxdec"}]}

    # vLLM's tokenizer endpoints: lm-eval's `local-completions` finds them and tokenizes through the server
    # (its "remote" tokenizer backend), so it needs no Hugging Face tokenizer download
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        pad = tokenizer.pad_id
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "pad_token": None if pad is None else tokenizer.id_to_token(pad),
                "chat_template": tokenizer.chat_template, "model_max_length": engine.cache_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request, model_required=False)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise HTTPError(400, "'prompt' must be a string", "prompt")
        add = _field(body, "add_special_tokens", bool, True, None, "true or false")
        ids = tokenizer.encode(text, add_special_tokens=add)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.cache_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request, model_required=False)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < engine.model.vocab_size for t in ids):
            raise HTTPError(400, f"'tokens' must be a list of token ids in [0, {engine.model.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(ids)}

    @app.get("/health")
    async def health():
        return {"status": "ok" if runner.error is None else "degraded", "busy": engine.busy}

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run ``app`` on uvicorn (blocking). Only loopback hosts: put a reverse proxy in front to go further."""
    if not is_loopback(host):
        raise ValueError(f"host must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0,
                    log_level: str = "warning"):
    """Serve ``app`` from a background thread on a socket bound to ``(host, port)`` (port 0: a free one);
    yields the base URL (``http://host:port``) once the server accepts requests, and stops the server and the
    app's engine thread on exit (tests, benchmarks, in-process clients such as lm-eval)."""
    import socket
    uv = make_server(app, host, port, log_level)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="jaxdec-http", daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        while not uv.started:
            if not th.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.05)
        bound = sock.getsockname()[1]
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    finally:
        uv.should_exit = True
        th.join(timeout)
        sock.close()
        runner = getattr(app.state, "runner", None)
        if th.is_alive() or (runner is not None and runner.thread.is_alive()):
            raise RuntimeError("the server or its engine thread did not stop")


def make_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """A `uvicorn.Server` for ``app`` (not started): tests run it in a thread and set ``should_exit``."""
    if not is_loopback(host):
        raise ValueError(f"host must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
    import uvicorn
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
