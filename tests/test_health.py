"""status and health against a real running environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opskit import health, localenv
from opskit.model import Environment

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
        check=False,
    )


def test_health_json_reports_every_component_healthy(local_env: Environment) -> None:
    result = invoke("health", "--env", local_env.name, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    names = {c["name"]: c for c in report["checks"]}
    assert report["healthy"] is True
    assert set(names) >= {"postgres", "redis", "prometheus", "alertmanager", "haproxy", "workload-blue"}
    assert all(c["verdict"] == "pass" for c in names.values())


def test_status_json_lists_endpoints_without_secrets(local_env: Environment) -> None:
    result = invoke("status", "--env", local_env.name, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["active"] == {"color": "blue", "version": local_env.service.version}
    assert report["edge"] == f"http://127.0.0.1:{local_env.local_ports.edge}"
    components = {c["name"]: c for c in report["components"]}
    assert components["postgres"]["endpoint"].endswith(f":{local_env.local_ports.postgres}/postgres")
    assert all(c["state"] == "RUNNING" for n, c in components.items() if n in localenv.REQUIRED)
    for secret in (localenv.POSTGRES_PASSWORD, localenv.REDIS_PASSWORD):
        assert localenv.read_secret(local_env, secret) not in result.stdout


@pytest.fixture
def hung_alertmanager(local_env: Environment) -> Iterator[int]:
    """Alertmanager frozen with SIGSTOP: its port accepts connections but nothing answers."""
    pid = localenv.process_status(local_env)["alertmanager"]["pid"]
    assert pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_hung_component_fails_at_its_own_timeout_without_delaying_the_others(
    local_env: Environment, hung_alertmanager: int
) -> None:
    started = time.monotonic()
    report = health.check_environment(local_env)
    elapsed = time.monotonic() - started
    by_name = {c.name: c for c in report.checks}
    assert not report.healthy
    assert by_name["alertmanager"].verdict == "timeout"
    assert all(c.ok for n, c in by_name.items() if n != "alertmanager")
    assert elapsed < health.HTTP_TIMEOUT_S + 1.5
    result = invoke("health", "--env", local_env.name)
    assert result.returncode == 1
    assert "unhealthy: alertmanager" in result.stderr


def test_a_stopped_workload_fails_its_check(local_env: Environment) -> None:
    localenv.supervisorctl(local_env, "stop", "workload-blue")
    try:
        report = health.check_environment(local_env)
        by_name = {c.name: c for c in report.checks}
        assert by_name["workload-blue"].verdict == "fail"
        assert "ConnectError" in by_name["workload-blue"].detail
        assert not report.healthy
    finally:
        localenv.supervisorctl(local_env, "start", "workload-blue")
