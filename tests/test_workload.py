"""The workload (HITL patch service stand-in) against a private, real PostgreSQL 15 and Redis.

Nothing here needs `local_env`: a module fixture starts its own PostgreSQL and Redis on free ports
in a temporary directory, and each test starts `python -m workload` as a subprocess.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from conftest import free_ports
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = Path("/usr/bin/redis-server")
SERVICE_USER = "nobody"  # PostgreSQL refuses to run as root
SEEDED = 5

pytestmark = pytest.mark.skipif(
    not (PG_BIN / "postgres").exists() or not REDIS_SERVER.exists(),
    reason="needs PostgreSQL 15 binaries and redis-server",
)


def _as_service_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", SERVICE_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class RedisServer:
    port: int
    password: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                self.password,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5)
        _wait_for(lambda: self._pings(client), 10, f"redis on port {self.port}")
        client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)


@dataclass
class Backends:
    """A private PostgreSQL (role and database `hitl`) and Redis, with 0600 password files."""

    workdir: Path
    pg_port: int
    pg_password: str
    redis: RedisServer
    password_files: dict[str, Path] = field(default_factory=dict)

    def database_url(self, database: str = "hitl") -> str:
        return f"postgresql://hitl@127.0.0.1:{self.pg_port}/{database}"

    def env(self, database: str = "hitl", redis_port: int | None = None, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "MAXIMUS_SERVICE": "hitl",
            "MAXIMUS_ENVIRONMENT": "test",
            "MAXIMUS_COLOR": "blue",
            "MAXIMUS_VERSION": "1.0.0",
            "MAXIMUS_DATABASE_URL": self.database_url(database),
            "MAXIMUS_DATABASE_PASSWORD_FILE": str(self.password_files["postgres"]),
            "MAXIMUS_REDIS_URL": f"redis://127.0.0.1:{redis_port or self.redis.port}/0",
            "MAXIMUS_REDIS_PASSWORD_FILE": str(self.password_files["redis"]),
        }
        env.update(overrides)
        return env

    def connect(self, database: str = "hitl") -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url(database), password=self.pg_password, autocommit=True)

    def superuser(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=str(self.workdir), port=self.pg_port, user="postgres", dbname="postgres", autocommit=True
        )

    def create_database(self, name: str) -> None:
        with self.superuser() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER hitl").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    workdir = Path(tempfile.mkdtemp(prefix="maximus-workload-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVICE_USER)
        os.chown(workdir, user.pw_uid, user.pw_gid)
    pg_port, redis_port = free_ports(2)
    data = workdir / "pgdata"
    subprocess.run(
        _as_service_user(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = (
        f"-c port={pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={workdir}"
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    subprocess.run(
        _as_service_user(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(workdir / "pg.log"),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    server = RedisServer(redis_port, secrets.token_hex(12), workdir)
    backends = Backends(workdir, pg_port, secrets.token_hex(12), server)
    try:
        with backends.superuser() as conn:
            password = sql.Literal(backends.pg_password)
            conn.execute(sql.SQL("CREATE ROLE hitl LOGIN PASSWORD {}").format(password))
            conn.execute("CREATE DATABASE hitl OWNER hitl")
        for name, password in (("postgres", backends.pg_password), ("redis", server.password)):
            path = workdir / f"{name}.password"
            path.touch(mode=0o600)
            path.write_text(password + "\n")
            backends.password_files[name] = path
        server.start()
        yield backends
    finally:
        server.stop()
        subprocess.run(
            _as_service_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Workload:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def launch(workdir: Path, env: dict[str, str]) -> Workload:
    """Start `python -m workload` on a free port without waiting for it."""
    port = free_ports(1)[0]
    log = workdir / f"workload-{port}.log"
    with log.open("wb") as out:
        command = [sys.executable, "-m", "workload", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Workload(proc, port, log)


def _healthy(workload: Workload) -> bool:
    if workload.proc.poll() is not None:
        raise AssertionError(f"workload exited {workload.proc.returncode}:\n{workload.output()}")
    try:
        return httpx.get(f"{workload.base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start(workdir: Path, env: dict[str, str]) -> Workload:
    """Start the workload and wait until it answers /healthz."""
    workload = launch(workdir, env)
    try:
        _wait_for(lambda: _healthy(workload), 30, "the workload to listen")
    except BaseException:
        workload.stop()
        raise
    return workload


@pytest.fixture
def spawn(backends: Backends) -> Iterator[Any]:
    """Start workloads for one test; every one still running is stopped afterwards."""
    started: list[Workload] = []

    def spawn_one(wait: bool = True, **kwargs: Any) -> Workload:
        env = backends.env(**kwargs)
        workload = start(backends.workdir, env) if wait else launch(backends.workdir, env)
        started.append(workload)
        return workload

    yield spawn_one
    for workload in started:
        workload.stop()


@pytest.fixture(scope="module")
def service(backends: Backends) -> Iterator[Workload]:
    """The long-lived workload most tests talk to."""
    workload = start(backends.workdir, backends.env())
    yield workload
    assert workload.stop() == 0, workload.output()


@pytest.fixture(scope="module", autouse=True)
def unreachable_start(backends: Backends) -> Iterator[tuple[Workload, float]]:
    """Started first, checked last: a workload whose PostgreSQL never answers gives up by itself."""
    dead_port = free_ports(1)[0]
    env = backends.env(MAXIMUS_DATABASE_URL=f"postgresql://hitl@127.0.0.1:{dead_port}/hitl")
    workload = launch(backends.workdir, env)
    yield workload, time.monotonic()
    workload.stop()


def pending_ids(client: httpx.Client) -> list[int]:
    response = client.get("/hitl/patches/pending")
    assert response.status_code == 200, response.text
    return [patch["id"] for patch in response.json()]


def assert_app_headers(response: httpx.Response, color: str = "blue") -> None:
    assert response.headers["X-App-Version"] == "1.0.0"
    assert response.headers["X-App-Color"] == color


# --- the service as users see it -------------------------------------------------------------


def test_pending_lists_seeded_patches(service: Workload) -> None:
    with service.client() as client:
        response = client.get("/hitl/patches/pending")
        assert response.status_code == 200
        patches = response.json()
        assert len(patches) == SEEDED
        assert set(patches[0]) == {"id", "title", "severity", "confidence", "created_at"}
        assert all(0 <= p["confidence"] <= 1 and p["title"] for p in patches)
        assert [p["id"] for p in client.get("/hitl/patches/pending", params={"limit": 2}).json()] == [
            p["id"] for p in patches[:2]
        ]
        for bad in ("0", "501", "many"):
            response = client.get("/hitl/patches/pending", params={"limit": bad})
            assert response.status_code == 422
            assert response.json()["field"] == "limit"


def test_decision_persists_and_leaves_pending(service: Workload, backends: Backends) -> None:
    with service.client() as client:
        patch_id = pending_ids(client)[0]
        response = client.post(
            f"/hitl/patches/{patch_id}/decision",
            json={"decision": "approve", "reason": "  verified on staging  "},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["patch_id"] == patch_id
        assert (body["decision"], body["reason"], body["color"], body["version"]) == (
            "approve",
            "verified on staging",
            "blue",
            "1.0.0",
        )
        assert patch_id not in pending_ids(client)

        again = client.post(f"/hitl/patches/{patch_id}/decision", json={"decision": "reject", "reason": "no"})
        assert again.status_code == 409
        assert "approved" in again.json()["message"]

    with backends.connect() as conn:
        status = conn.execute("SELECT status FROM patches WHERE id = %s", (patch_id,)).fetchone()
        decisions = conn.execute(
            "SELECT decision, reason, color, version FROM decisions WHERE patch_id = %s", (patch_id,)
        ).fetchall()
    assert status == ("approved",)
    assert decisions == [("approve", "verified on staging", "blue", "1.0.0")]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/hitl/patches/abc/decision", {"decision": "approve", "reason": "ok"}, 422, "id"),
        ("/hitl/patches/0/decision", {"decision": "approve", "reason": "ok"}, 422, "id"),
        ("/hitl/patches/99999999999999999999/decision", {"decision": "approve", "reason": "ok"}, 422, "id"),
        ("/hitl/patches/424242/decision", {"decision": "approve", "reason": "ok"}, 404, None),
        ("/hitl/patches/1/decision", {"decision": "maybe", "reason": "ok"}, 422, "decision"),
        ("/hitl/patches/1/decision", {"decision": "approve", "reason": "   "}, 422, "reason"),
        ("/hitl/patches/1/decision", {"decision": "approve", "reason": "x" * 1001}, 422, "reason"),
        ("/hitl/patches/1/decision", {"decision": "approve"}, 422, "reason"),
        ("/hitl/patches/1/decision", None, 422, "body"),
        ("/hitl/patches/1/decision", "{not json", 422, "body"),
    ],
)
def test_decision_rejects_bad_requests(
    service: Workload, path: str, body: Any, status: int, field: str | None
) -> None:
    with service.client() as client:
        if isinstance(body, str):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert_app_headers(response)
    if field is not None:
        assert response.json()["field"] == field
    else:
        assert response.json()["error"] == "not_found"


def test_summary_is_cached_and_invalidated_by_a_decision(service: Workload, backends: Backends) -> None:
    with service.client() as client:
        client.get("/hitl/analytics/summary")
        cached = client.get("/hitl/analytics/summary")
        assert cached.headers["X-Cache"] == "hit"
        before = cached.json()
        assert before["total"] == SEEDED
        assert before["pending"] + before["approved"] + before["rejected"] == before["total"]

        with backends.redis.client() as store:
            assert store.ttl("maximus:hitl:analytics:summary") in range(1, 11)

        patch_id = pending_ids(client)[0]
        decided = client.post(
            f"/hitl/patches/{patch_id}/decision",
            json={"decision": "reject", "reason": "breaks the rollback path"},
        )
        assert decided.status_code == 201
        fresh = client.get("/hitl/analytics/summary")
        assert fresh.headers["X-Cache"] == "miss"
        after = fresh.json()
        assert (after["rejected"], after["pending"]) == (before["rejected"] + 1, before["pending"] - 1)
        decided_count = after["approved"] + after["rejected"]
        assert after["approval_rate"] == pytest.approx(after["approved"] / decided_count, abs=1e-4)
        assert client.get("/hitl/analytics/summary").headers["X-Cache"] == "hit"


def test_every_response_carries_version_headers(service: Workload) -> None:
    with service.client() as client:
        version = client.get("/version")
        expected = {"service": "hitl", "version": "1.0.0", "color": "blue", "environment": "test"}
        assert version.json() == expected
        missing = client.get("/no/such/page")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"
        wrong_method = client.delete("/hitl/patches/pending")
        assert wrong_method.status_code == 405
        for response in (
            version,
            missing,
            wrong_method,
            client.get("/healthz"),
            client.get("/readyz"),
            client.get("/metrics"),
            client.get("/hitl/patches/pending"),
        ):
            assert_app_headers(response)


def test_readyz_when_everything_answers(service: Workload) -> None:
    response = httpx.get(f"{service.base_url}/readyz")
    assert (response.status_code, response.json()["status"]) == (200, "ready")


def test_metrics_use_route_templates(service: Workload) -> None:
    with service.client() as client:
        client.post("/hitl/patches/31337/decision", json={"decision": "approve", "reason": "x"})
        client.get("/definitely/missing")
        text = client.get("/metrics").text
    base = 'environment="test",service="hitl"'
    for name in (
        "maximus_hitl_http_requests_total",
        "maximus_hitl_http_request_duration_seconds_bucket",
        "maximus_hitl_decisions_total",
        "maximus_hitl_build_info",
    ):
        assert f"\n{name}{{" in text
    assert 'route="/hitl/patches/{id}/decision"' in text
    assert 'route="/hitl/patches/pending"' in text
    assert 'route="other"' in text
    assert "31337" not in text and "/definitely/missing" not in text
    assert 'le="0.3"' in text
    assert f'maximus_hitl_build_info{{color="blue",{base},version="1.0.0"}} 1.0' in text
    for decision in ("approve", "reject"):
        assert f'maximus_hitl_decisions_total{{decision="{decision}",{base}}} ' in text


# --- dependencies and faults ------------------------------------------------------------------


def test_readyz_follows_redis(backends: Backends, spawn: Any) -> None:
    own = RedisServer(free_ports(1)[0], backends.redis.password, backends.workdir)
    own.start()
    try:
        workload = spawn(redis_port=own.port)
        ready = f"{workload.base_url}/readyz"
        assert httpx.get(ready).status_code == 200
        own.stop()
        started = time.monotonic()
        down = httpx.get(ready, timeout=10)
        assert time.monotonic() - started < 3
        assert down.status_code == 503
        assert set(down.json()["failed"]) == {"redis"}
        assert httpx.get(f"{workload.base_url}/healthz").status_code == 200
        summary = httpx.get(f"{workload.base_url}/hitl/analytics/summary")  # falls back to PostgreSQL
        assert (summary.status_code, summary.headers["X-Cache"]) == (200, "miss")
        own.start()
        _wait_for(lambda: httpx.get(ready).status_code == 200, 10, "readiness after Redis came back")
    finally:
        own.stop()


def test_error_rate_fault_fails_hitl_routes_only(spawn: Any) -> None:
    workload = spawn(MAXIMUS_FAULT_ERROR_RATE="1.0")
    with workload.client() as client:
        for _ in range(3):
            failed = client.get("/hitl/patches/pending")
            assert failed.status_code == 500
            assert failed.json()["error"] == "injected_fault"
            assert_app_headers(failed)
        assert client.get("/healthz").status_code == 200
        assert client.get("/version").status_code == 200
        metrics = client.get("/metrics").text
    failures = r'maximus_hitl_http_requests_total\{[^}]*route="/hitl/patches/pending"[^}]*status="500"\} 3\.0'
    assert re.search(failures, metrics)


def test_latency_fault_slows_hitl_routes_only(spawn: Any) -> None:
    workload = spawn(MAXIMUS_FAULT_LATENCY_MS="400")
    with workload.client() as client:
        client.get("/healthz")  # connection established outside the measurement
        started = time.monotonic()
        assert client.get("/hitl/patches/pending").status_code == 200
        assert time.monotonic() - started >= 0.4
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() - started < 0.4


def test_crash_fault_exits_before_listening(backends: Backends) -> None:
    workload = launch(backends.workdir, backends.env(MAXIMUS_FAULT_CRASH="true"))
    assert workload.proc.wait(15) != 0
    assert "MAXIMUS_FAULT_CRASH" in workload.output()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", workload.port), timeout=1):
        pass


def test_never_ready_fault(spawn: Any) -> None:
    workload = spawn(MAXIMUS_FAULT_NEVER_READY="1", MAXIMUS_COLOR="green")
    response = httpx.get(f"{workload.base_url}/readyz")
    assert response.status_code == 503
    assert "MAXIMUS_FAULT_NEVER_READY" in str(response.json()["failed"])
    assert_app_headers(response, color="green")
    assert httpx.get(f"{workload.base_url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAXIMUS_FAULT_ERROR_RATE", "2"),
        ("MAXIMUS_FAULT_LATENCY_MS", "-5"),
        ("MAXIMUS_FAULT_CRASH", "sometimes"),
        ("MAXIMUS_COLOR", "purple"),
        ("MAXIMUS_DATABASE_URL", "postgresql://hitl:secret@127.0.0.1:5432/hitl"),
        ("MAXIMUS_REDIS_PASSWORD_FILE", "/nonexistent/redis.password"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(backends: Backends, variable: str, value: str) -> None:
    env = backends.env(**{variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "workload", "--port", str(free_ports(1)[0])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and "accepted" in lines[0]
    assert "secret" not in lines[0]


# --- schema and lifecycle ---------------------------------------------------------------------


def test_restart_keeps_data_and_does_not_reseed(service: Workload, backends: Backends, spawn: Any) -> None:
    def snapshot() -> tuple[Any, ...]:
        with backends.connect() as conn:
            return (
                conn.execute("SELECT id, status FROM patches ORDER BY id").fetchall(),
                conn.execute("SELECT count(*) FROM decisions").fetchone(),
                conn.execute("SELECT version FROM schema_migrations").fetchall(),
            )

    before = snapshot()
    assert len(before[0]) == SEEDED and before[2] == [(1,)]
    restarted = spawn(MAXIMUS_COLOR="green")
    assert snapshot() == before
    assert httpx.get(f"{restarted.base_url}/readyz").status_code == 200


def test_blue_and_green_migrating_at_once_seed_once(backends: Backends, spawn: Any) -> None:
    backends.create_database("hitl_pair")
    pair = [spawn(wait=False, database="hitl_pair", MAXIMUS_COLOR=color) for color in ("blue", "green")]
    for workload in pair:
        _wait_for(lambda w=workload: _healthy(w), 30, "both colors to listen")
    with backends.connect("hitl_pair") as conn:
        assert conn.execute("SELECT count(*) FROM patches").fetchone() == (SEEDED,)
        assert conn.execute("SELECT version FROM schema_migrations").fetchall() == [(1,)]


def test_sigterm_lets_in_flight_requests_finish(spawn: Any) -> None:
    workload = spawn(MAXIMUS_FAULT_LATENCY_MS="1500")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.get, f"{workload.base_url}/hitl/patches/pending", timeout=20)
        time.sleep(0.5)
        workload.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        response = slow.result(timeout=20)
    assert response.status_code == 200
    assert len(response.json()) >= 1
    assert workload.proc.wait(10) == 0, workload.output()
    assert time.monotonic() - signalled < 5


def test_start_gives_up_when_postgres_is_unreachable(unreachable_start: tuple[Workload, float]) -> None:
    workload, launched = unreachable_start
    code = workload.proc.wait(max(1.0, launched + 35 - time.monotonic()))
    output = workload.output()
    assert code == 1, output
    assert "PostgreSQL unreachable after" in output
    assert output.count("retrying") >= 10  # it kept trying for about 20 s before giving up
    assert "Uvicorn running" not in output
