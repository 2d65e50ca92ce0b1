"""The HTTP application: HITL patch endpoints, health, readiness, metrics and injected faults."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
import redis.asyncio as aioredis
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, StringConstraints
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workload import db
from workload.config import Config

log = logging.getLogger("workload")

CACHE_TTL_S = 10
CHECK_TIMEOUT_S = 1.0
REDIS_TIMEOUT_S = 0.5
MAX_BIGINT = 2**63 - 1
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Latency buckets around the 300 ms p95 objective.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """A private registry of maximus_<service>_* metrics, labelled with service and environment."""

    def __init__(self, config: Config) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.base = {"service": config.service, "environment": config.environment}
        prefix = config.metric_prefix
        base_labels = ("service", "environment")
        http_labels = (*base_labels, "route", "method", "status")
        self.requests = Counter(
            f"{prefix}http_requests_total", "HTTP requests answered.", http_labels, registry=self.registry
        )
        self.duration = Histogram(
            f"{prefix}http_request_duration_seconds",
            "Time to answer an HTTP request, injected latency included.",
            http_labels,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            f"{prefix}decisions_total",
            "Patch decisions recorded.",
            (*base_labels, "decision"),
            registry=self.registry,
        )
        self.build_info = Gauge(
            f"{prefix}build_info",
            "Always 1; the labels name the running build.",
            (*base_labels, "version", "color"),
            registry=self.registry,
        )
        self.build_info.labels(**self.base, version=config.version, color=config.color).set(1)
        for decision in ("approve", "reject"):
            self.decisions.labels(**self.base, decision=decision)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"  # bound the label's cardinality
        labels = {**self.base, "route": route, "method": method, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(seconds)


@dataclass
class Runtime:
    """What the running process shares between requests."""

    config: Config
    metrics: Metrics
    pool: AsyncConnectionPool | None = None
    redis: aioredis.Redis | None = None
    shutting_down: bool = False

    def db(self) -> AsyncConnectionPool:
        if self.pool is None:
            raise RuntimeError("the database pool is not open")
        return self.pool

    def cache(self) -> aioredis.Redis:
        if self.redis is None:
            raise RuntimeError("the Redis client is not open")
        return self.redis


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


class ObserveMiddleware:
    """Version headers on every response, request metrics by route template, and the /hitl faults."""

    def __init__(self, app: ASGIApp, runtime: Runtime, routes: list[BaseRoute]) -> None:
        self.app = app
        self.runtime = runtime
        self.routes = routes
        config = runtime.config
        self.headers = {"X-App-Version": config.version, "X-App-Color": config.color}

    def route_of(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.runtime.config
        route = self.route_of(scope)
        started = time.perf_counter()
        sent: dict[str, int] = {}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = int(message["status"])
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers[name] = value
            await send(message)

        try:
            if str(scope["path"]).startswith("/hitl/"):
                if config.fault_latency_ms:
                    await asyncio.sleep(config.fault_latency_ms / 1000)
                if config.fault_error_rate and random.random() < config.fault_error_rate:  # noqa: S311
                    rate = config.fault_error_rate
                    response = error(500, "injected_fault", f"MAXIMUS_FAULT_ERROR_RATE={rate} failed it")
                    await response(scope, receive, send_with_headers)
                    return
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), route)
            if "status" in sent:
                raise
            await error(500, "internal_error", "the request failed; see the service log")(
                scope, receive, send_with_headers
            )
        finally:
            status = sent.get("status", 500)
            self.runtime.metrics.observe(
                route, str(scope.get("method", "")), status, time.perf_counter() - started
            )


class PatchOut(BaseModel):
    id: int
    title: str
    severity: str
    confidence: float
    created_at: datetime


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class DecisionOut(BaseModel):
    id: int
    patch_id: int
    decision: str
    reason: str
    decided_at: datetime
    color: str
    version: str


def _field_of(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err.get("loc", ())]
    if err.get("type") == "json_invalid" or len(loc) < 2:
        return loc[0] if loc else "request"
    return ".".join(loc[1:])


def create_app(config: Config, runtime: Runtime | None = None) -> FastAPI:
    rt = runtime or Runtime(config=config, metrics=Metrics(config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        rt.pool = db.open_pool(config)
        await rt.pool.open(wait=False)
        rt.redis = aioredis.Redis.from_url(
            config.redis_url,
            password=config.redis_password,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            health_check_interval=15,
            max_connections=20,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),  # fail fast: callers fall back
        )
        try:
            yield
        finally:
            rt.shutting_down = True
            await rt.redis.aclose()
            await rt.pool.close(timeout=5.0)

    app = FastAPI(
        title=f"maximus {config.service}",
        version=config.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field_of(e), "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
        first = errors[0] if errors else {"field": "request", "message": "invalid"}
        return error(
            422,
            "invalid_request",
            f"{first['field']}: {first['message']}",
            field=first["field"],
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = error(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error(503, "database_unavailable", "PostgreSQL is not answering; retry later")

    @app.get("/hitl/patches/pending", response_model=list[PatchOut])
    async def pending(limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[PatchOut]:
        rows = await db.pending_patches(rt.db(), limit)
        return [
            PatchOut(
                id=r.id,
                title=r.title,
                severity=r.severity,
                confidence=float(r.confidence),
                created_at=r.created_at,
            )
            for r in rows
        ]

    @app.post("/hitl/patches/{id}/decision", status_code=201, response_model=DecisionOut)
    async def decide(id: Annotated[int, Path(ge=1, le=MAX_BIGINT)], body: DecisionIn) -> Any:
        try:
            row = await db.decide(
                rt.db(), id, body.decision, body.reason, color=config.color, version=config.version
            )
        except db.PatchNotFound:
            return error(404, "not_found", f"patch {id} does not exist")
        except db.PatchAlreadyDecided as exc:
            return error(409, "already_decided", f"patch {id} is already {exc.status}")
        rt.metrics.decisions.labels(**rt.metrics.base, decision=body.decision).inc()
        try:
            await rt.cache().delete(config.cache_key)
        except (RedisError, OSError) as exc:
            log.warning("could not invalidate the analytics cache (it expires in %d s): %s", CACHE_TTL_S, exc)
        return DecisionOut(
            id=row.id,
            patch_id=row.patch_id,
            decision=row.decision,
            reason=row.reason,
            decided_at=row.decided_at,
            color=row.color,
            version=row.version,
        )

    @app.get("/hitl/analytics/summary")
    async def analytics_summary() -> Response:
        cache = rt.cache()
        try:
            cached = await cache.get(config.cache_key)
        except (RedisError, OSError) as exc:
            log.warning("analytics cache unavailable: %s", exc)
            cached = None
        if cached is not None:
            return Response(cached, media_type="application/json", headers={"X-Cache": "hit"})
        body = json.dumps(await db.summary(rt.db()), separators=(",", ":")).encode()
        try:
            await cache.set(config.cache_key, body, ex=CACHE_TTL_S)
        except (RedisError, OSError) as exc:
            log.warning("could not fill the analytics cache: %s", exc)
        return Response(body, media_type="application/json", headers={"X-Cache": "miss"})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if rt.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if rt.shutting_down:
            return JSONResponse({"status": "not_ready", "failed": {"process": "shutting down"}}, 503)
        if config.fault_never_ready:
            return JSONResponse(
                {"status": "not_ready", "failed": {"fault": "MAXIMUS_FAULT_NEVER_READY is set"}}, 503
            )
        results = await asyncio.gather(_check(db.ping(rt.db())), _check(_redis_ping(rt.cache())))
        failed = {name: reason for name, reason in zip(("postgres", "redis"), results, strict=True) if reason}
        if failed:
            return JSONResponse({"status": "not_ready", "failed": failed}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        # The classic 0.0.4 text format: what the platform's Prometheus 2.42 negotiates.
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {
            "service": config.service,
            "version": config.version,
            "color": config.color,
            "environment": config.environment,
        }

    app.add_middleware(ObserveMiddleware, runtime=rt, routes=app.router.routes)
    return app


async def _redis_ping(client: aioredis.Redis) -> None:
    await client.ping()


async def _check(probe: Awaitable[None]) -> str | None:
    """None when the probe finishes within the timeout, else a short reason."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await probe
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return None
