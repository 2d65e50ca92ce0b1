"""Health checks of an environment, run concurrently, each bounded by its own timeout.

A check that cannot measure never passes: a timeout and an unreachable endpoint are failures with the
reason in `detail`. A hung component costs its own timeout and delays nothing else.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import httpx
import psycopg
import redis.asyncio as aioredis

from opskit import envstate, kuberollout, localenv
from opskit.errors import BadInput, OperationFailed
from opskit.kube import KubeClient, KubeError
from opskit.model import COLORS, Environment
from opskit.routers import RouterError

Verdict = Literal["pass", "fail", "timeout"]
Probe = Callable[[], Awaitable[str]]

HTTP_TIMEOUT_S = 2.0
DATABASE_TIMEOUT_S = 3.0
KUBE_TIMEOUT_S = 5.0
GATEWAY_KEY_VAR = "MAXIMUS_GATEWAY_API_KEY"


@dataclass(frozen=True)
class Check:
    name: str
    endpoint: str
    required: bool
    timeout_s: float
    probe: Probe


@dataclass(frozen=True)
class CheckResult:
    name: str
    endpoint: str
    required: bool
    verdict: Verdict
    detail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


@dataclass(frozen=True)
class HealthReport:
    environment: str
    checks: list[CheckResult]

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def as_dict(self) -> dict[str, object]:
        return {
            "environment": self.environment,
            "healthy": self.healthy,
            "checks": [{**asdict(c), "ok": c.ok} for c in self.checks],
        }


async def _run_one(check: Check) -> CheckResult:
    started = time.monotonic()
    try:
        detail = await asyncio.wait_for(check.probe(), timeout=check.timeout_s)
        verdict: Verdict = "pass"
    except TimeoutError:
        verdict, detail = "timeout", f"no answer within {check.timeout_s:g} s"
    except Exception as exc:  # any failure to measure is a failed check, with its reason
        verdict, detail = "fail", _reason(exc)
    return CheckResult(
        check.name, check.endpoint, check.required, verdict, detail, round(time.monotonic() - started, 3)
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_checks(environment: str, checks: list[Check]) -> HealthReport:
    results = await asyncio.gather(*(_run_one(c) for c in checks))
    return HealthReport(environment, list(results))


def _http_ready(url: str, expect: str | None = None) -> Probe:
    async def probe() -> str:
        async with httpx.AsyncClient(timeout=None) as client:  # noqa: S113 - bounded by the check's timeout
            response = await client.get(url)
        if response.status_code != 200:
            raise OperationFailed(f"HTTP {response.status_code}: {response.text.strip()[:120]}")
        if expect is not None and expect not in response.text:
            raise OperationFailed(f"answer lacks {expect!r}")
        return f"HTTP {response.status_code}"

    return probe


def _postgres(env: Environment) -> Probe:
    async def probe() -> str:
        conn = await psycopg.AsyncConnection.connect(
            host="127.0.0.1",
            port=env.local_ports.postgres,
            dbname="postgres",
            user="postgres",
            password=localenv.read_secret(env, localenv.POSTGRES_PASSWORD),
            connect_timeout=int(DATABASE_TIMEOUT_S),
        )
        async with conn:
            cursor = await conn.execute("SELECT 1")
            row = await cursor.fetchone()
        if row != (1,):
            raise OperationFailed(f"SELECT 1 returned {row!r}")
        return "SELECT 1 ok"

    return probe


def _redis(env: Environment) -> Probe:
    async def probe() -> str:
        client = aioredis.Redis(
            host="127.0.0.1",
            port=env.local_ports.redis,
            password=localenv.read_secret(env, localenv.REDIS_PASSWORD),
        )
        try:
            if not await client.ping():
                raise OperationFailed("PING was not answered with PONG")
        finally:
            await client.aclose()
        return "PONG"

    return probe


def _haproxy(env: Environment, active: str) -> Probe:
    url = f"http://127.0.0.1:{env.local_ports.haproxy_stats}/stats;csv"
    backend = f"{localenv.EDGE_BACKEND}_{active}"

    async def probe() -> str:
        async with httpx.AsyncClient(timeout=None) as client:  # noqa: S113 - bounded by the check's timeout
            response = await client.get(url)
        response.raise_for_status()
        rows = list(csv.DictReader(io.StringIO(response.text.lstrip("# "))))
        status = next(
            (r["status"] for r in rows if r.get("pxname") == backend and r["svname"] == active), None
        )
        if status is None:
            raise OperationFailed(f"server {backend}/{active} missing from the stats")
        if not status.startswith("UP"):
            raise OperationFailed(f"active server {active} is {status}")
        return f"edge routes to {active} ({status})"

    return probe


def local_checks(env: Environment, color: str | None = None) -> list[Check]:
    """The checks of a single-machine environment; `color` narrows the workload checks to that color."""
    if color is not None and color not in COLORS:
        raise BadInput(f"--color: {color!r} is not a color; accepted: {', '.join(COLORS)}")
    ports = env.local_ports
    state = envstate.read_state(env)
    active = state.active
    http = "http://127.0.0.1:{}"
    checks = [
        Check("postgres", localenv.endpoints(env)["postgres"], True, DATABASE_TIMEOUT_S, _postgres(env)),
        Check("redis", localenv.endpoints(env)["redis"], True, HTTP_TIMEOUT_S, _redis(env)),
        Check(
            "prometheus",
            http.format(ports.prometheus),
            True,
            HTTP_TIMEOUT_S,
            _http_ready(http.format(ports.prometheus) + "/-/ready"),
        ),
        Check(
            "alertmanager",
            http.format(ports.alertmanager),
            True,
            HTTP_TIMEOUT_S,
            _http_ready(http.format(ports.alertmanager) + "/-/ready"),
        ),
        Check(
            "alert-receiver",
            http.format(ports.alert_receiver),
            True,
            HTTP_TIMEOUT_S,
            _http_ready(http.format(ports.alert_receiver) + "/-/ready"),
        ),
        Check(
            "haproxy",
            f"http://127.0.0.1:{ports.haproxy_stats}/stats",
            True,
            HTTP_TIMEOUT_S,
            _haproxy(env, active),
        ),
    ]
    for each in COLORS:
        if color is not None and each != color:
            continue
        deployed = each in state.colors
        if not deployed and each != color:
            continue
        url = http.format(getattr(ports, each))
        required = each in (color, active)
        checks.append(Check(f"workload-{each}", url, required, HTTP_TIMEOUT_S, _http_ready(url + "/readyz")))
    return checks


# --- a cluster ----------------------------------------------------------------------------------------------


def _in_thread(call: Callable[[], str]) -> Probe:
    """A blocking check (the Kubernetes client is synchronous) as a probe bounded by its timeout."""

    async def probe() -> str:
        return await asyncio.to_thread(call)

    return probe


def _routing(env: Environment, client: KubeClient) -> str:
    routing = kuberollout.router_for(env, client).routing()
    if routing.active is None:
        raise OperationFailed(f"traffic is split {routing.weights}; `invoke status` shows the deploy")
    return f"all traffic to {routing.active}"


def _color(env: Environment, client: KubeClient, color: str) -> str:
    deployment = kuberollout.read_deployment(client, env, color)
    if deployment is None:
        raise OperationFailed(f"Deployment {kuberollout.deployment_name(env, color)} does not exist")
    ready, wanted = kuberollout.ready_replicas(deployment), env.service.replicas.min
    version = kuberollout.deployment_version(deployment)
    if ready < wanted:
        raise OperationFailed(f"{ready}/{wanted} replicas ready ({version})")
    return f"{ready} replicas ready ({version})"


def _proxied_ready(http: Callable[[], httpx.Client]) -> Callable[[], str]:
    def call() -> str:
        with http() as client:
            response = client.get("-/ready")
        if response.status_code != 200:
            raise OperationFailed(f"HTTP {response.status_code}: {response.text.strip()[:120]}")
        return f"HTTP {response.status_code}"

    return call


def _edge(env: Environment, edge: str, transport: httpx.BaseTransport | None) -> Callable[[], str]:
    def call() -> str:
        key = os.environ.get(GATEWAY_KEY_VAR)
        if not key:
            raise OperationFailed(f"${GATEWAY_KEY_VAR} is not set: the gateway cannot be asked")
        with httpx.Client(base_url=edge, transport=transport, timeout=HTTP_TIMEOUT_S) as client:
            response = client.get("healthz", headers={"X-API-Key": key})
        if response.status_code != 200:
            raise OperationFailed(f"HTTP {response.status_code}: {response.text.strip()[:120]}")
        return f"HTTP 200 from {response.headers.get('X-App-Color', '?')}"

    return call


def cluster_checks(
    env: Environment,
    client: KubeClient,
    color: str | None = None,
    edge_transport: httpx.BaseTransport | None = None,
) -> list[Check]:
    """The checks of a Kubernetes environment, all through its API server (and its gateway)."""
    if color is not None and color not in COLORS:
        raise BadInput(f"--color: {color!r} is not a color; accepted: {', '.join(COLORS)}")
    try:
        active = kuberollout.router_for(env, client).routing().active
    except (RouterError, KubeError):
        active = None  # the routing check says why
    namespace = kuberollout.observability_namespace(env)
    api = "kubernetes API"
    checks = [
        Check("routing", api, True, KUBE_TIMEOUT_S, _in_thread(lambda: _routing(env, client))),
        Check(
            "prometheus",
            f"{kuberollout.PROMETHEUS_SERVICE}.{namespace}",
            True,
            KUBE_TIMEOUT_S,
            _in_thread(_proxied_ready(lambda: kuberollout.prometheus_http(env, client))),
        ),
        Check(
            "alertmanager",
            f"{kuberollout.ALERTMANAGER_SERVICE}.{namespace}",
            True,
            KUBE_TIMEOUT_S,
            _in_thread(_proxied_ready(lambda: kuberollout.alertmanager(env, client))),
        ),
    ]
    edge = kuberollout.edge(env)
    if edge is not None:
        checks.append(Check("edge", edge, True, HTTP_TIMEOUT_S, _in_thread(_edge(env, edge, edge_transport))))
    for each in COLORS:
        if color is not None and each != color:
            continue
        required = each in (color, active)
        if not required:
            deployment = kuberollout.read_deployment(client, env, each)
            if deployment is None or kuberollout.desired_replicas(deployment) == 0:
                continue  # scaled down: nothing to check
        name = kuberollout.deployment_name(env, each)
        checks.append(
            Check(
                f"workload-{each}",
                name,
                required,
                KUBE_TIMEOUT_S,
                _in_thread(partial(_color, env, client, each)),
            )
        )
    return checks


def check_environment(
    env: Environment,
    color: str | None = None,
    *,
    client: KubeClient | None = None,
    edge_transport: httpx.BaseTransport | None = None,
) -> HealthReport:
    if env.kind == "kubernetes":
        client = client or kuberollout.client_for(env)
        return asyncio.run(run_checks(env.name, cluster_checks(env, client, color, edge_transport)))
    return asyncio.run(run_checks(env.name, local_checks(env, color)))
