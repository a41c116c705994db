"""FastAPI app speaking the Tinker protocol (see docs/service.md), over a `Service`.

Every error is JSON: 401 for a missing/bad key, 404 for ids the caller cannot see (another
tenant's ids included), 400 for malformed requests, 413 for bodies over the limit, 410 for a
request a previous server process accepted but never finished, and for a sample the rollout engine
failed this time (``Failure.retryable``; the SDK sends the request again on 410). A failed
*operation* (found while running it) is reported through its future as
``{"error", "category"}``, as the SDK expects.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import tempfile
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import Authenticator, AuthError
from .core import Service
from .futures import Failure, Lost
from .protocol import ProtocolError
from .quotas import QuotaExceeded
from .scheduler import UserError
from .store import Invalid, NotFound

log = logging.getLogger("lorafleet.service")
API = "/api/v1"
# the request being served, for log lines (see `RequestContext` and server.configure_logging)
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("lorafleet_request_id", default="-")
request_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("lorafleet_tenant", default="-")


def json_safe(x):
    """``x`` with every non-finite float replaced by None (JSON has no inf / nan)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class SafeJSONResponse(JSONResponse):
    """JSON that never fails on a non-finite float (reported as null)."""

    def render(self, content) -> bytes:
        try:
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode()


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 (by Content-Length, or while reading)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > self.limit):
            return await _send_json(send, 413, {"error": f"request body over the {self.limit}-byte limit",
                                                "detail": f"request body over the {self.limit}-byte limit"})
        total = 0
        started = False

        async def recv():
            nonlocal total
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.limit:
                    raise _TooLarge()
            return msg

        async def snd(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request body over the {self.limit}-byte limit",
                                             "detail": f"request body over the {self.limit}-byte limit"})


async def _send_json(send, status: int, body: dict):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _err(status: int, msg: str) -> JSONResponse:
    return SafeJSONResponse({"error": msg, "detail": msg}, status_code=status)


def create_app(service: Service, auth: Authenticator) -> FastAPI:
    app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=SafeJSONResponse)
    app.state.service = service
    limit = service.config.max_body_bytes

    def status_handler(status: int):
        async def handler(_, e):
            return _err(status, str(e))

        return handler

    for exc, status in ((AuthError, 401), (NotFound, 404), (Invalid, 400), (ProtocolError, 400), (UserError, 400),
                        (Lost, 410)):
        app.add_exception_handler(exc, status_handler(status))

    @app.exception_handler(QuotaExceeded)
    async def _quota(_, e):
        return SafeJSONResponse(e.body(), status_code=429, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(_TooLarge)
    async def _large(_, e):
        return _err(413, f"request body over the {limit}-byte limit")

    @app.exception_handler(ValueError)  # the engine's convention: ValueError = the caller's mistake
    async def _value(_, e):
        return _err(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _val(_, e):
        return _err(400, f"invalid request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e):
        return _err(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _any(_, e):
        log.exception("unhandled error")
        return _err(500, f"internal error: {type(e).__name__}")

    def tenant_of(request: Request) -> str:
        key = request.headers.get("x-api-key")
        if key is None:
            a = request.headers.get("authorization", "")
            key = a[7:] if a.lower().startswith("bearer ") else None
        tenant = auth.tenant_for(key, request.client.host if request.client else None)
        request.scope.setdefault("state", {})["tenant"] = tenant  # for the metrics and log lines
        request_tenant.set(tenant)
        return tenant

    def parse_json(raw: bytes) -> dict:
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Invalid(f"request body is not valid JSON ({e})") from None
        except RecursionError:
            raise Invalid("request body is JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise Invalid("request body must be a JSON object")
        return data

    async def body_json(request: Request) -> dict:
        return parse_json(await _body(request))

    def decompress(raw, zstd: bool) -> bytes:
        """``raw`` (bytes or a binary file) as the body's bytes; zstd streamed, so a bomb stops at
        the limit (whatever its frame header claims)."""
        if not zstd:
            return raw if isinstance(raw, bytes) else raw.read()
        import zstandard

        try:
            out = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read(limit + 1)
        except zstandard.ZstdError as e:
            raise Invalid(f"bad zstd body ({e})") from None
        if len(out) > limit:
            raise _TooLarge()
        return out

    def is_zstd(request: Request) -> bool:
        return request.headers.get("content-encoding", "").lower() == "zstd"

    async def _body(request: Request) -> bytes:
        return decompress(await request.body(), is_zstd(request))

    upload_dir = service.data_dir / "uploads"

    async def spooled_upload(request: Request, handle):
        """Stream the body to a file under DATA_DIR/uploads (never whole in the event loop's
        memory), then read, decode and ``handle(body_dict)`` in a worker thread, so other requests
        stay answered while a large upload is parsed, validated and tokenized."""
        upload_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=upload_dir, suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    if chunk:
                        await run_in_threadpool(f.write, chunk)
            zstd = is_zstd(request)

            def work():
                with open(path, "rb") as f:
                    body = parse_json(decompress(f, zstd))
                return handle(body)

            return await run_in_threadpool(work)
        finally:
            os.unlink(path)

    # ---------------------------------------------------------------- service
    @app.get(f"{API}/healthz")
    async def healthz():
        """ok, or 503 when the scheduler thread died or showed no life for ``health_stall_s``."""
        live = service.scheduler.liveness()
        stall = service.config.health_stall_s
        wedged = not live["alive"] or live["heartbeat_age_s"] > stall
        if wedged:
            why = "the scheduler thread is not running" if not live["alive"] else \
                f"the scheduler showed no life for {live['heartbeat_age_s']:.0f} s (limit {stall:g} s)"
            return SafeJSONResponse({"status": "unhealthy", "error": why, "detail": why, "scheduler": live},
                                    status_code=503)
        return {"status": "ok"}  # the details are in the 503 body and in /metrics

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format (no key, like healthz)."""
        from .metrics import CONTENT_TYPE, render

        body = render(service)
        if body is None:
            return _err(501, "metrics need prometheus_client (pip install -e '.[serve]' -c constraints.txt)")
        return Response(body, media_type=CONTENT_TYPE)

    @app.post(f"{API}/client/config")
    async def client_config(request: Request):
        tenant_of(request)
        return dict(service.config.client_config)

    @app.post(f"{API}/client/dynamic_config")
    async def client_dynamic_config(request: Request):
        tenant_of(request)
        return {}

    @app.api_route(f"{API}/get_server_capabilities", methods=["GET", "POST"])
    async def capabilities(request: Request):
        tenant_of(request)
        return service.capabilities()

    @app.post(f"{API}/create_session")
    async def create_session(request: Request):
        t = tenant_of(request)
        return service.create_session(t, await body_json(request))

    @app.post(f"{API}/session_heartbeat")
    async def heartbeat(request: Request):
        t = tenant_of(request)
        return service.heartbeat(t, await body_json(request))

    @app.post(f"{API}/telemetry")
    async def telemetry(request: Request):
        tenant_of(request)
        await request.body()
        return {"status": "accepted"}

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish(session_id: str, request: Request):
        t = tenant_of(request)
        rid = service.finish_session(t, session_id)
        await service.futures.wait(rid, 30.0)
        return {}

    # ---------------------------------------------------------------- training and sampling
    def json_route(name: str):
        """POST /api/v1/<name>: the tenant's JSON body goes to the service method of that name."""
        method = getattr(service, name)

        async def route(request: Request):
            return method(tenant_of(request), await body_json(request))

        route.__name__ = name
        app.post(f"{API}/{name}")(route)

    for name in ("create_model", "get_info", "optim_step", "save_weights", "save_weights_for_sampler",
                 "load_weights", "create_sampling_session", "asample", "weights_info"):
        json_route(name)

    @app.post(f"{API}/forward_backward")
    async def forward_backward(request: Request):
        t = tenant_of(request)
        ctype = request.headers.get("content-type", "")
        if "protobuf" not in ctype:
            raise Invalid(f"forward_backward takes a protobuf ForwardBackwardRequest "
                          f"(Content-Type: application/x-protobuf), got {ctype or 'no content type'}")
        body = await _body(request)
        # decoding a large protobuf (a Python int per token) and checking it take a while: off the loop
        return await run_in_threadpool(service.forward_backward, t, body)

    @app.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str, request: Request):
        t = tenant_of(request)
        return service.get_sampler(t, sampler_id)

    # ---------------------------------------------------------------- futures
    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(request: Request):
        t = tenant_of(request)
        body = await body_json(request)
        rid = body.get("request_id")
        if not isinstance(rid, str):
            raise Invalid("retrieve_future needs a request_id string")
        service.owner_check(t, rid)
        try:
            out = await service.futures.wait(rid, service.config.long_poll_s)
        except KeyError:
            raise NotFound(f"unknown request_id {rid!r}") from None
        if out is None:
            return {"type": "try_again", "request_id": rid, "queue_state": "active"}
        if isinstance(out, Failure):
            if out.retryable:  # the SDK sends the request again on 410 (RetryableException)
                return SafeJSONResponse({"error": out.error, "category": out.category, "retryable": True},
                                        status_code=410)
            return {"error": out.error, "category": out.category}
        if out.body is not None:
            return Response(out.body, media_type=out.content_type)
        return out.json

    # ---------------------------------------------------------------- jobs (lorafleet submit / status ...)
    jobs = service.jobs

    @app.post(f"{API}/jobs")
    async def submit_job(request: Request):
        t = tenant_of(request)
        return await spooled_upload(request, lambda body: jobs.submit(t, body))

    @app.get(f"{API}/jobs")
    async def list_jobs(request: Request):
        return jobs.list(tenant_of(request))

    @app.get(f"{API}/jobs/{{job_id}}")
    async def job_status(job_id: str, request: Request):
        return jobs.status(tenant_of(request), job_id)

    @app.post(f"{API}/jobs/{{job_id}}/cancel")
    async def cancel_job(job_id: str, request: Request):
        return jobs.cancel(tenant_of(request), job_id)

    @app.get(f"{API}/jobs/{{job_id}}/download")
    async def download_job(job_id: str, request: Request):
        path = jobs.archive(tenant_of(request), job_id)
        return FileResponse(path, media_type="application/gzip", filename=f"{job_id}.tar.gz")

    @app.post(f"{API}/cancel_future")
    async def cancel_future(request: Request):
        tenant_of(request)
        await request.body()
        return {}

    return RequestContext(BodyLimit(app, limit), app)


class RequestContext:
    """Outermost: a request id (the client's ``X-Request-Id`` or a new one, echoed back), the
    tenant for log lines, one access log line, and the request metrics by route and status."""

    def __init__(self, app, fastapi_app):
        self.app, self.routes = app, fastapi_app.router.routes

    def _route(self, scope) -> str:
        from starlette.routing import Match

        for r in self.routes:  # the route's template, never the raw path (ids would explode the labels)
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "other")
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from .metrics import observe_request

        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        t_rid, t_ten = request_id.set(rid), request_tenant.set("-")
        t0, status = time.perf_counter(), 500

        async def snd(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg = dict(msg, headers=list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())])
            await send(msg)

        try:
            await self.app(scope, receive, snd)
        finally:
            dt = time.perf_counter() - t0
            route = self._route(scope)
            tenant = (scope.get("state") or {}).get("tenant", "-")
            observe_request(route, scope.get("method", ""), status, dt, tenant)
            if route != f"{API}/healthz" and route != "/metrics":
                log.info("%s %s -> %d in %.1f ms", scope.get("method"), scope.get("path"), status, dt * 1e3)
            request_id.reset(t_rid)
            request_tenant.reset(t_ten)
