"""`semiar serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

One worker thread per model runs one generation at a time (a static cache is never shared) from
a FIFO queue; a full queue answers 503 with Retry-After; a client that goes away cancels its
generation between two steps. Request handling (validation, the chat template, SSE framing,
metrics) is here; decoding is `Engine.generate`, the loop `semiar generate` runs, so greedy
answers are token-for-token `semiar generate`'s.

Example:
    >>> from semiar.server import Server                                      # doctest: +SKIP
    >>> Server("smollm2-135m-instruct", method="pld").run("127.0.0.1", 8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import Request  # module level: the handlers' annotations must resolve here

from .engine import Engine
from .errors import InvalidArgumentError, SemiarError
from .methods import check_method, make_drafter
from .models.loading import LoadedModel, load_model
from .sampling import SamplingParams


class RequestError(Exception):
    """A request the client must fix: becomes an OpenAI-style JSON error with a 4xx status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics in a registry of the server's own (several servers may share a process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("semiar_requests", "Requests by endpoint and outcome", ["model", "endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("semiar_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.tokens = Counter("semiar_generated_tokens", "Generated tokens", ["model", "method"], registry=r)
        self.forwards = Counter("semiar_target_forwards", "Target decode forwards", ["model", "method"], registry=r)
        self.attempted = Counter("semiar_draft_attempted", "Steps whose draft reached depth d", ["model", "method", "depth"], registry=r)
        self.accepted = Counter("semiar_draft_accepted", "Steps accepted to depth d (acceptance = accepted / attempted)",
                                ["model", "method", "depth"], registry=r)
        self.tps = Histogram("semiar_tokens_per_second", "Tokens/s per request (generation only)", ["model", "method"],
                             buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.tau = Histogram("semiar_tau", "Tokens per target forward, per request", ["model", "method"],
                             buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16), registry=r)
        self.ttft = Histogram("semiar_time_to_first_token_seconds", "Arrival to first token, queue wait included", ["model"],
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.latency = Histogram("semiar_request_seconds", "Arrival to last token", ["model"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.queue_depth = Gauge("semiar_queue_depth", "Requests waiting for the model", ["model"], registry=r)
        self.running = Gauge("semiar_running", "Requests generating now (0 or 1 per model)", ["model"], registry=r)

    def record(self, model: str, method: str, gen) -> None:
        s = gen.stats
        self.prompt_tokens.labels(model).inc(s.prompt_tokens)
        self.tokens.labels(model, method).inc(s.new_tokens)
        self.forwards.labels(model, method).inc(s.target_forwards)
        for d, (t, a) in enumerate(zip(s.attempted_at_depth, s.accepted_at_depth), 1):
            self.attempted.labels(model, method, str(d)).inc(t)
            self.accepted.labels(model, method, str(d)).inc(a)
        if s.target_forwards:
            self.tau.labels(model, method).observe(s.tau)
        if s.seconds > 0:
            self.tps.labels(model, method).observe(s.tokens_per_s)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------- scheduling

@dataclass
class Job:
    prompt_ids: list[int]
    method: str
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class ModelWorker:
    """One model, its drafters, and the thread that runs its requests one at a time, first come
    first served. Drafters are built once per method and reused (each request starts and
    finishes its drafter; the engine owns the cache, made anew per request)."""

    def __init__(self, name: str, target: LoadedModel, method: str, metrics: Metrics, *, draft_model=None,
                 drafter_dir=None, device: str = "cpu", dtype=None, max_queue: int = 128):
        self.name, self.target, self.method, self.metrics = name, target, method, metrics
        self.draft_model, self.drafter_dir, self.device, self.dtype = draft_model, drafter_dir, device, dtype
        self.max_queue = max_queue
        self._drafters: dict[str, Any] = {}
        self._build_lock = threading.Lock()
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.mean_seconds = 1.0  # running mean of a request's service time, for Retry-After
        self.drafter(method)
        self._thread = threading.Thread(target=self._loop, name=f"semiar-{name}", daemon=True)
        self._thread.start()

    def drafter(self, method: str):
        """The drafter for `method` (None for ar), built on first use; raises SemiarError if it
        cannot be built from what the server was started with."""
        check_method(method)
        with self._build_lock:
            if method not in self._drafters:
                self._drafters[method] = make_drafter(method, self.target, draft_model=self.draft_model,
                                                      drafter=self.drafter_dir, device=self.device, dtype=self.dtype)
            return self._drafters[method]

    def warm_up(self) -> None:
        """One short generation before the port opens (CUDA graphs and compiled kernels get built)."""
        ids = self.target.encode("Hello", chat=bool(getattr(self.target.tokenizer, "chat_template", None))) \
            if self.target.tokenizer is not None else [1, 2, 3]
        Engine(self.target, self._drafters[self.method]).generate(ids, max_new_tokens=4).run()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                retry = max(1, math.ceil(self.mean_seconds * self._waiting))
                raise RequestError(f"the queue for {self.name} is full ({self.max_queue} waiting); retry later",
                                   status=503, kind="server_busy", code="queue_full",
                                   headers={"Retry-After": str(retry)})
            self._waiting += 1
            self.metrics.queue_depth.labels(self.name).set(self._waiting)
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.labels(self.name).set(self._waiting)
            if job.cancelled.is_set():
                job.emit("cancelled")
                continue
            self.metrics.running.labels(self.name).set(1)
            t0 = time.perf_counter()
            try:
                self._run(job)
            except SemiarError as e:
                job.emit("error", RequestError(str(e)))
            except Exception as e:  # noqa: BLE001 - a failure in one generation must not stop the server
                job.emit("error", RequestError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                               kind="server_error", code="generation_failed"))
            finally:
                self.metrics.running.labels(self.name).set(0)
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - t0)

    def _run(self, job: Job) -> None:
        gen = Engine(self.target, self.drafter(job.method)).generate(
            job.prompt_ids, max_new_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop)
        it = iter(gen)
        try:
            for chunk in it:
                if job.cancelled.is_set():
                    job.emit("cancelled")
                    return
                job.emit("chunk", chunk.text)
        finally:
            it.close()  # ends the request in the engine (the drafter's finish) even when cancelled
        self.metrics.record(self.name, job.method, gen)
        job.emit("done", gen)


# ---------------------------------------------------------------- request parsing

#: the engine's stop reasons as OpenAI finish reasons; a full context is "length" there, and
#: `usage.stop_reason` keeps the engine's own reason ("context") for clients that want to know
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
#: fields we accept only at their default (anything else would silently change the answer)
UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "top_logprobs": None,
               "logit_bias": None, "best_of": 1, "echo": False, "suffix": None, "tools": None,
               "functions": None, "response_format": None}


def _number(body: dict, key: str, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", param=key)
    if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise RequestError(f"'{key}' must be in {rng}, got {v!r}", param=key)
    return v


def _check_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise RequestError(f"only n = 1 is supported, got {body.get('n')!r}", param="n")
    for key, default in UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and v != default and v != [] and not (key == "logprobs" and v is False):
            raise RequestError(f"'{key}' is not supported by semiar serve", param=key, code="unsupported_parameter")


def _message_text(m: Any, i: int) -> tuple[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
    c = m.get("content")
    if isinstance(c, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
        c = "".join(p["text"] for p in c)
    if c is None:
        c = ""
    if not isinstance(c, str):
        raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return m["role"], c


# ---------------------------------------------------------------- the app

class Server:
    """Loads the model (and its drafters) once, then serves the OpenAI API. `run` opens the port."""

    def __init__(self, model: str | LoadedModel, *, method: str = "ar", draft_model: Optional[str] = None,
                 drafter: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
                 max_queue: int = 128, served_name: Optional[str] = None, warm_up: bool = True,
                 cuda_graphs: Optional[bool] = None, compile: bool = False):
        check_method(method)
        if max_queue < 1:
            raise InvalidArgumentError(f"max-queue must be >= 1, got {max_queue}")
        target = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype,
                                                                         cuda_graphs=cuda_graphs, compile=compile)
        if target.tokenizer is None:
            raise InvalidArgumentError(f"model {target.name} has no tokenizer; a server needs one")
        if draft_model is not None:
            draft_model = load_model(draft_model, device=device, dtype=dtype or target.dtype_spec,
                                     cuda_graphs=cuda_graphs, compile=compile)
        self.name = served_name or (model if isinstance(model, str) else target.name)
        self.aliases = {self.name, target.name}
        self.metrics = Metrics()
        self.worker = ModelWorker(self.name, target, method, self.metrics, draft_model=draft_model,
                                  drafter_dir=drafter, device=device, dtype=dtype, max_queue=max_queue)
        if warm_up:
            self.worker.warm_up()
        self.created = int(time.time())
        self.app = self._make_app()

    # -- parsing shared by both endpoints
    def _parse(self, body: dict, chat: bool) -> tuple[Job, dict]:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError("'model' is required", param="model")
        if model not in self.aliases:
            raise RequestError(f"the model {model!r} does not exist; this server serves {self.name!r}",
                               status=404, param="model", code="model_not_found")
        _check_unsupported(body)
        tok = self.worker.target.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise RequestError("'messages' must be a non-empty list", param="messages")
            messages = [dict(zip(("role", "content"), _message_text(m, i))) for i, m in enumerate(msgs)]
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"model {self.name} has no chat template; use /v1/completions", param="messages")
            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001 - a template that rejects these messages (roles, order)
                raise RequestError(f"the chat template rejects these messages: {e}", param="messages") from None
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = list(prompt)
                vocab = self.worker.target.config.vocab_size
                if not all(0 <= t < vocab for t in ids):
                    raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            elif isinstance(prompt, str):
                ids = self.worker.target.encode(prompt)
            else:
                raise RequestError("'prompt' must be a string (one prompt per request) or a list of token ids",
                                   param="prompt")
        target = self.worker.target
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(ids) >= target.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens but {self.name} has a context of "
                               f"{target.context_length}; shorten it", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        # unclamped: the engine stops at the context's end and says so (stop reason "context");
        # left out, the answer may run to the end of the context
        max_tokens = _number(body, key, target.context_length, lo=1, integer=True)
        temperature = _number(body, "temperature", 1.0, lo=0, hi=2)  # OpenAI's default; 0 is greedy
        top_p = _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
        top_k = _number(body, "top_k", 0, lo=0, integer=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"'seed' must be an integer, got {seed!r}", param="seed")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError("'stop' must be a string or a list of at most 4 strings", param="stop")
        method = body.get("method", self.worker.method)
        if not isinstance(method, str):
            raise RequestError("'method' must be a string", param="method")
        try:
            self.worker.drafter(method)  # builds it now: a method the server cannot run is a 400
            sampling = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=seed)
        except SemiarError as e:
            raise RequestError(str(e), param="method" if "method" in str(e) or "drafter" in str(e) else None) from None
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options")
        opts = {"stream": bool(body.get("stream", False)), "include_usage": bool(so.get("include_usage", False))}
        job = Job(ids, method, max_tokens, sampling, stop, asyncio.get_running_loop())
        return job, opts

    def _usage(self, gen, method: str) -> dict:
        s = gen.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                "total_tokens": s.prompt_tokens + s.new_tokens, "method": method,
                "target_forwards": s.target_forwards, "tau": round(s.tau, 4),
                "accept_by_depth": [round(x, 4) for x in s.accept_by_depth],
                "tokens_per_s": round(s.tokens_per_s, 3), "stop_reason": gen.stop_reason}

    def _make_app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app = FastAPI(title="semiar", docs_url=None, redoc_url=None, openapi_url=None)
        server, worker, metrics = self, self.worker, self.metrics

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request, exc):
            return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

        @app.exception_handler(Exception)
        async def _any_error(request, exc):  # a bug of ours: still JSON, the server keeps serving
            return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

        def reject(e: RequestError, endpoint: str):
            metrics.requests.labels(server.name, endpoint, "rejected" if e.status == 503 else "bad_request").inc()
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": server.name, "queue_depth": worker.waiting}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                                "owned_by": "semiar"}]}

        @app.get("/metrics")
        async def prom():
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

        async def handle(request: Request, chat: bool):
            endpoint = "chat" if chat else "completions"
            try:
                raw = await request.body()
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    raise RequestError(f"the request body is not valid JSON: {e}") from None
                job, opts = server._parse(body, chat)
                worker.submit(job)
            except RequestError as e:
                return reject(e, endpoint)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if opts["stream"]:
                return StreamingResponse(server._sse(job, rid, chat, opts["include_usage"], endpoint),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await server._complete(request, job, rid, chat, endpoint)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        return app

    def _envelope(self, rid: str, chat: bool, stream: bool) -> dict:
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if stream and chat else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.name}

    def _choice(self, chat: bool, text: Optional[str], finish, stream: bool, first: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if stream:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    def _finished(self, job: Job, endpoint: str, outcome: str, first_at: Optional[float]) -> None:
        self.metrics.requests.labels(self.name, endpoint, outcome).inc()
        if outcome == "ok":
            self.metrics.latency.labels(self.name).observe(time.perf_counter() - job.arrived)
            if first_at is not None:
                self.metrics.ttft.labels(self.name).observe(first_at - job.arrived)

    async def _complete(self, request, job: Job, rid: str, chat: bool, endpoint: str):
        from fastapi.responses import JSONResponse

        parts, first_at = [], None
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        self._finished(job, endpoint, "cancelled", None)
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if kind == "chunk":
                    if payload and first_at is None:
                        first_at = time.perf_counter()
                    parts.append(payload)
                elif kind == "done":
                    self._finished(job, endpoint, "ok", first_at)
                    gen = payload
                    out = self._envelope(rid, chat, False)
                    out["choices"] = [self._choice(chat, gen.text, FINISH[gen.stop_reason], False)]
                    out["usage"] = self._usage(gen, job.method)
                    return JSONResponse(out)
                elif kind == "error":
                    self._finished(job, endpoint, "error", None)
                    return JSONResponse(payload.body(), status_code=payload.status)
                else:  # cancelled
                    self._finished(job, endpoint, "cancelled", None)
                    return JSONResponse(error_body("cancelled"), status_code=499)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def _sse(self, job: Job, rid: str, chat: bool, include_usage: bool, endpoint: str):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        first, first_at, outcome = True, None, "cancelled"
        try:
            if chat:  # the role first, as OpenAI does
                yield event({**self._envelope(rid, chat, True), "choices": [self._choice(chat, "", None, True, True)]})
                first = False
            while True:
                kind, payload = await job.events.get()
                if kind == "chunk":
                    if not payload:
                        continue
                    if first_at is None:
                        first_at = time.perf_counter()
                    yield event({**self._envelope(rid, chat, True), "choices": [self._choice(chat, payload, None, True, first)]})
                    first = False
                elif kind == "done":
                    gen = payload
                    env = self._envelope(rid, chat, True)
                    yield event({**env, "choices": [self._choice(chat, None if chat else "", FINISH[gen.stop_reason], True)]})
                    if include_usage:
                        yield event({**env, "choices": [], "usage": self._usage(gen, job.method)})
                    outcome = "ok"
                    break
                elif kind == "error":
                    outcome = "error"
                    yield event(payload.body())
                    break
                else:
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the stream ended
            if outcome == "cancelled":
                job.cancelled.set()
            self._finished(job, endpoint, outcome, first_at)

    def run(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
        """Open the port and serve until interrupted."""
        import uvicorn

        try:
            uvicorn.run(self.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        finally:
            self.worker.stop()


class BackgroundServer:
    """Serve `server` from a thread on 127.0.0.1 (tests, load tests): `with BackgroundServer(s) as url:`.
    Port 0 picks a free port; leaving the block stops the server."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self._uv = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                                                 timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uv.run, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self._uv.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=10)
