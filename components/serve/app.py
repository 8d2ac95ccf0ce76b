"""The inference service: a FastAPI app over one loaded model, served by uvicorn.

    POST /v1/generate  {prompt, negative_prompt, steps, guidance, seed, width, height, frames, format}
                       -> the media bytes (image/png, image/webp, image/gif, video/mp4) with headers
                          X-Reelforge-Model, X-Reelforge-Version, X-Reelforge-Seed, X-Request-Id
    GET  /v1/model     name, version, alias, lineage tags, sampling defaults, distilled or not
    GET  /healthz      the process is alive (200 even while the model loads)
    GET  /readyz       200 once a model is loaded, 503 before
    GET  /metrics      Prometheus: requests by endpoint and status, latency, queue depth, batch
                       sizes, served model version, load failures and swaps

Hardening (limits from `ServeConfig`): request bodies above `max_body_bytes` get 413 (the
Content-Length header and the bytes actually read are both checked); a body that is not a JSON
object gets 400/415; a field out of bounds gets 422 with the field named; a bearer token is
required when the environment variable `auth_token_env` names one is set (401, compared in
constant time); more than `queue_size` waiting requests get 429 with Retry-After; a request not
answered within `request_timeout_s` gets 504. Any other failure gets a generic 500 JSON with a
request id; the traceback goes to the server log, never into a response.

Following an alias (`models:/NAME@ALIAS`): a background task polls the registry every
`poll_interval_s`; a new version is loaded beside the serving one and swapped in between batches
(the batcher reads the current model once per batch, so in-flight requests finish on the old
one). A version that fails to load is logged and counted, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.config import ServeConfig
from components.serve.batching import Job, MicroBatcher, QueueFull
from components.serve.encode import CONTENT_TYPES, encode_media
from components.serve.model_source import LoadedModel, ModelSource, ModelSourceError, size_multiple

log = logging.getLogger("reelforge.serve")

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0


class ApiError(Exception):
    """An answer other than 200: status, message, the offending fields, extra headers."""

    def __init__(self, status: int, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.fields, self.headers = status, message, fields or [], headers or {}


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"invalid request: {field}: {message}", [{"field": field, "message": message}])


class GenerateRequest(BaseModel):
    """The JSON body of POST /v1/generate (strict types: "5" is not a number of steps)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    negative_prompt: StrictStr = ""
    steps: StrictInt | None = Field(None, ge=1)
    guidance: StrictFloat | StrictInt | None = Field(None, ge=0, le=MAX_GUIDANCE)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    width: StrictInt | None = Field(None, ge=1)
    height: StrictInt | None = Field(None, ge=1)
    frames: StrictInt = Field(1, ge=1)
    format: Literal["png", "webp", "gif", "mp4"] | None = None


@dataclass(frozen=True)
class Params:
    """A validated request with every default filled in from the model."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    frames: int
    format: str

    def batch_key(self) -> tuple:
        """What must match for two requests to share a model call (not the prompt, seed or format)."""
        return (self.steps, self.guidance, self.width, self.height, self.frames, bool(self.negative_prompt))


def resolve_params(request: GenerateRequest, model: LoadedModel, config: ServeConfig) -> Params:
    """Fill defaults from the model and check the limits that depend on the model and `config` (422 naming the field)."""
    generator = model.generator
    prompt = request.prompt
    for name, text in (("prompt", prompt), ("negative_prompt", request.negative_prompt)):
        try:
            text.encode("utf-8")  # JSON may carry lone surrogates (\ud800) that no tokenizer accepts
        except UnicodeEncodeError:
            raise _invalid(name, "is not valid Unicode text (a lone surrogate)") from None
    if not prompt.strip():
        raise _invalid("prompt", "must not be blank")
    if len(prompt) > config.max_prompt_chars:
        raise _invalid("prompt", f"{len(prompt)} characters, at most {config.max_prompt_chars} (serve.max_prompt_chars)")
    if len(request.negative_prompt) > config.max_prompt_chars:
        raise _invalid("negative_prompt", f"{len(request.negative_prompt)} characters, at most "
                       f"{config.max_prompt_chars} (serve.max_prompt_chars)")
    steps = generator.default_steps if request.steps is None else request.steps
    if steps > config.max_steps:
        raise _invalid("steps", f"{steps} is above the limit of {config.max_steps} (serve.max_steps)")
    guidance = generator.default_guidance if request.guidance is None else float(request.guidance)
    if not math.isfinite(guidance):
        raise _invalid("guidance", "must be a finite number")
    multiple = size_multiple(generator)
    sizes = {}
    for name in ("width", "height"):
        value = getattr(request, name) or generator.image_size
        if value > config.max_side:
            raise _invalid(name, f"{value} is above the limit of {config.max_side} px (serve.max_side)")
        if value % multiple:
            raise _invalid(name, f"{value} is not a multiple of {multiple} (this model's latent downsampling x patch size)")
        sizes[name] = value
    frames = request.frames
    step_t, patch_t = int(generator.codec.temporal_downsample), int(generator.model.config.patch_size_t)
    if frames > config.max_frames:
        raise _invalid("frames", f"{frames} is above the limit of {config.max_frames} (serve.max_frames)")
    if (frames - 1) % step_t or ((frames - 1) // step_t + 1) % patch_t:
        raise _invalid("frames", f"{frames} does not fit this model: 1 + a multiple of {step_t}"
                       + (f", in groups of {patch_t} latent frames" if patch_t > 1 else ""))
    media_format = request.format or ("png" if frames == 1 else "mp4")
    if media_format == "png" and frames > 1:
        raise _invalid("format", f"png holds one image but frames is {frames}; use gif, webp or mp4")
    seed = secrets.randbelow(2**31) if request.seed is None else request.seed
    return Params(prompt, request.negative_prompt, steps, guidance, seed, sizes["width"], sizes["height"], frames,
                  media_format)


@dataclass
class Generated:
    """One request's answer from the worker thread."""

    data: bytes
    model: LoadedModel


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("reelforge_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("reelforge_request_latency_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("reelforge_queue_depth", "Generation requests waiting for the model",
                                 registry=self.registry)
        buckets = sorted({1, 2, 4, 8, 16, 32, max_batch} & set(range(1, max_batch + 1)) | {max_batch})
        self.batch_size = Histogram("reelforge_batch_size", "Requests per model call (micro-batching)",
                                    registry=self.registry, buckets=buckets)
        self.model_info = Info("reelforge_model", "The model version being served", registry=self.registry)
        self.model_loads = Counter("reelforge_model_loads", "Model versions loaded and swapped in",
                                   registry=self.registry)
        self.load_failures = Counter("reelforge_model_load_failures", "Model versions that failed to load "
                                     "(the previous one kept serving)", registry=self.registry)
        self.poll_failures = Counter("reelforge_registry_poll_failures", "Registry alias polls that failed",
                                     registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class ServiceState:
    """What the handlers share: the current model (swapped atomically), the batcher, metrics, config."""

    def __init__(self, source: ModelSource, config: ServeConfig, fps: float) -> None:
        self.source, self.config, self.fps = source, config, fps
        self.model: LoadedModel | None = None
        self.failed_version = ""  # the alias's last version that did not load (not retried until it moves)
        self.load_error = ""
        self.metrics = Metrics(config.max_batch)
        self.batcher = MicroBatcher(self.run_batch, max_batch=config.max_batch, queue_size=config.queue_size,
                                    batch_wait_s=config.batch_wait_ms / 1000.0,
                                    on_batch=self.metrics.batch_size.observe, on_depth=self.metrics.queue_depth.set)

    def swap(self, model: LoadedModel) -> None:
        """Serve `model` from the next batch on (one reference assignment: atomic for the worker)."""
        self.model = model
        self.metrics.model_loads.inc()
        self.metrics.model_info.info({"name": model.name, "version": model.version, "alias": model.alias,
                                      "distilled": str(model.generator.distilled).lower()})

    def run_batch(self, jobs: list[Job]) -> list[Any]:
        """Worker thread: one model call for the batch, then one encoding per request."""
        from models.generate import to_uint8

        model = self.model  # read once: a swap during this batch affects the next one only
        assert model is not None
        params: list[Params] = [job.payload for job in jobs]
        first = params[0]
        pixels = model.generator.generate_tensor(
            [p.prompt for p in params], steps=first.steps, guidance=first.guidance, seed=[p.seed for p in params],
            frames=first.frames, height=first.height, width=first.width, batch_size=len(params),
            negative_prompts=[p.negative_prompt for p in params] if first.negative_prompt else None,
        )
        media = to_uint8(pixels)  # [B,H,W,3] or [B,T,H,W,3]
        if media.ndim == 4:
            media = media[:, None]
        # Clips play at the rate the model was trained on when its directory records one.
        fps = float((model.generator.config.get("sampling") or {}).get("fps", self.fps))
        results: list[Any] = []
        for clip, p in zip(media, params, strict=True):
            try:
                results.append(Generated(encode_media(clip, p.format, fps), model))
            except Exception as error:  # noqa: BLE001 - one request's encoding failure is its own 500
                results.append(error)
        return results

    async def load_and_follow(self, on_ready: Callable[[LoadedModel], None],
                              on_fatal: Callable[[str], None]) -> None:
        """Load the model, then (for an alias) poll the registry and swap in new versions."""
        try:
            model = await asyncio.to_thread(self.source.load)
        except Exception as error:  # noqa: BLE001 - nothing to serve: say why and stop the server
            self.metrics.load_failures.inc()
            self.load_error = str(error)
            log.error("cannot load %s: %s", self.source.spec, error,
                      exc_info=not isinstance(error, ModelSourceError))
            on_fatal(str(error))
            return
        self.swap(model)
        on_ready(model)
        if not self.source.follows_alias:
            return
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - following must outlive any one bad poll
                self.metrics.poll_failures.inc()
                log.exception("registry poll failed unexpectedly (still serving)")

    async def poll_once(self) -> None:
        """One look at the alias: load and swap in a new version; keep the old one when it fails."""
        current = self.model
        try:
            version = await asyncio.to_thread(self.source.latest_version)
        except Exception as error:  # noqa: BLE001 - the registry may be briefly down: keep serving
            self.metrics.poll_failures.inc()
            log.warning("registry poll failed (still serving v%s): %s", current.version if current else "?", error)
            return
        if current is not None and version == current.version or version == self.failed_version:
            return
        log.info("alias %s now names v%s: loading it in the background", self.source.spec, version)
        try:
            model = await asyncio.to_thread(self.source.load, version)
        except Exception as error:  # noqa: BLE001
            self.failed_version = version
            self.metrics.load_failures.inc()
            log.error("v%s of %s failed to load; still serving v%s: %s", version, self.source.spec,
                      current.version if current else "?", error, exc_info=not isinstance(error, ModelSourceError))
            return
        self.failed_version = ""
        self.swap(model)
        log.info("now serving %s v%s (was v%s)", model.name, model.version, current.version if current else "?")


def _error_response(status: int, message: str, request_id: str, fields: list[dict[str, str]] | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": request_id}
    if fields:
        body["field"] = fields[0]["field"]
        body["errors"] = fields
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-Id": request_id})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes by header (before reading) and by count (while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is above the limit of {limit} (serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a body longer than declared, or chunked without a length
            raise ApiError(413, f"request body is above the limit of {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_request(body: bytes, content_type: str) -> GenerateRequest:
    """JSON object -> GenerateRequest; 415 for another content type, 400 for bad JSON, 422 naming the fields."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    try:
        data = json.loads(body, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object", [{"field": "body", "message": "not an object"}])
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as error:
        fields = [{"field": ".".join(str(part) for part in e["loc"]) or "body", "message": e["msg"]}
                  for e in error.errors(include_url=False, include_input=False)]
        raise ApiError(422, "invalid request: " + ", ".join(f["field"] for f in fields), fields) from None


def create_app(source: ModelSource, config: ServeConfig, *, fps: float = 8.0,
               on_ready: Callable[[LoadedModel], None] | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service over `source`. The model loads in the background once the app starts (/readyz says when).

    `on_ready(model)` runs when the first model is loaded; `on_fatal(message)` when it cannot be
    (the CLI stops the server with exit code 1). The bearer token is read from the environment
    variable `config.auth_token_env` now; unset or empty = no authentication.
    """
    state = ServiceState(source, config, fps)
    token = os.environ.get(config.auth_token_env, "")
    on_ready = on_ready or (lambda model: None)
    on_fatal = on_fatal or (lambda message: None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        loader = asyncio.create_task(state.load_and_follow(on_ready, on_fatal), name="reelforge-model-loader")
        try:
            yield
        finally:
            loader.cancel()
            await state.batcher.stop()

    app = FastAPI(title="reelforge", summary="Text-to-image and text-to-video generation", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = state

    def check_auth(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def current_model() -> LoadedModel:
        model = state.model
        if model is None:
            raise ApiError(503, "the model is still loading" if not state.load_error else "no model loaded",
                           headers={"Retry-After": "5"})
        return model

    @app.middleware("http")
    async def observe(request: Request, call_next):
        """Request id, metrics by endpoint and status, and the last line of defence: a generic 500."""
        request_id = request.headers.get("x-request-id", "")
        if not (0 < len(request_id) <= 64 and request_id.replace("-", "").isalnum()):
            request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - the traceback goes to the log, a request id to the client
            log.exception("request %s %s failed (request id %s)", request.method, request.url.path, request_id)
            response = _error_response(500, "internal error", request_id)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")  # unmatched paths share one label (bounded cardinality)
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        response.headers.setdefault("X-Request-Id", request_id)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.message, request.state.request_id, error.fields, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail), getattr(request.state, "request_id", ""),
                               headers=dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", uuid.uuid4().hex)
        log.error("request %s %s failed (request id %s)", request.method, request.url.path, request_id,
                  exc_info=error)
        return _error_response(500, "internal error", request_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive and its event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """200 once a model is loaded (503 before, or when it could not be loaded)."""
        model = state.model
        if model is None:
            return _error_response(503, "not ready: " + (state.load_error or "the model is loading"),
                                   request.state.request_id)
        return JSONResponse({"status": "ready", "name": model.name, "version": model.version})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model_info(request: Request) -> dict[str, Any]:
        """The model being served: identity, lineage tags, sampling defaults."""
        check_auth(request)
        return current_model().describe()

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        """Generate one image or clip; the body is the media file."""
        started = time.monotonic()
        check_auth(request)
        model = current_model()
        body = await _read_body(request, config.max_body_bytes)
        params = resolve_params(_parse_request(body, request.headers.get("content-type", "")), model, config)
        try:
            job = state.batcher.submit(params.batch_key(), params)
        except QueueFull:
            retry = max(1, math.ceil(config.request_timeout_s / 4))
            raise ApiError(429, "over capacity: too many requests waiting, retry later",
                           headers={"Retry-After": str(retry)}) from None
        remaining = config.request_timeout_s - (time.monotonic() - started)
        try:
            result: Generated = await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, remaining))
        except (asyncio.TimeoutError, TimeoutError):
            state.batcher.cancel(job)
            raise ApiError(504, f"not answered within {config.request_timeout_s:g} s (serve.request_timeout_s)") from None
        return Response(result.data, media_type=CONTENT_TYPES[params.format], headers={
            "X-Reelforge-Model": result.model.name, "X-Reelforge-Version": result.model.version,
            "X-Reelforge-Seed": str(params.seed), "X-Reelforge-Steps": str(params.steps),
        })

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0 = any free one), so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(source: ModelSource, config: ServeConfig, *, fps: float = 8.0) -> int:
    """Run the service until SIGINT/SIGTERM (uvicorn drains in-flight requests); the exit code.

    Prints `serving <name> v<version> on http://host:port` once the model is loaded (the deploy
    stage waits for it and for GET /readyz == 200). Exit code 1 when the model cannot be loaded.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as error:
        print(f"error: cannot listen on {config.host}:{config.port}: {error}", flush=True)
        return 2
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    exit_code = 0
    server: uvicorn.Server | None = None

    def ready(model: LoadedModel) -> None:
        alias = f" (alias {model.alias})" if model.alias else ""
        print(f"serving {model.name} v{model.version} on http://{shown_host}:{port}{alias}", flush=True)

    def fatal(message: str) -> None:
        nonlocal exit_code
        exit_code = 1
        print(f"error: cannot serve {source.spec}: {message}", flush=True)
        if server is not None:
            server.should_exit = True

    app = create_app(source, config, fps=fps, on_ready=ready, on_fatal=fatal)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30,
                                           server_header=False))
    server.run(sockets=[sock])
    return exit_code
