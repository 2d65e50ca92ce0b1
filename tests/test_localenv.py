"""The single-machine environment, for real: provisioned by the playbook, run by its own supervisord."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from opskit import localenv
from opskit.errors import BadInput
from opskit.model import Environment
from tests.conftest import new_environment

pytestmark = pytest.mark.localenv


def program_pids(env: Environment) -> dict[str, int]:
    return {name: p["pid"] for name, p in localenv.process_status(env).items() if p["state"] == "RUNNING"}


def wait_until(predicate: object, timeout: float = 20.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return bool(predicate())


def connect_postgres(env: Environment) -> psycopg.Connection[tuple[object, ...]]:
    db = localenv.database_name(env)
    return psycopg.connect(
        host="127.0.0.1",
        port=env.local_ports.postgres,
        user=db,
        dbname=db,
        password=localenv.read_secret(env, localenv.database_password_secret(env)),
        connect_timeout=5,
        autocommit=True,
    )


def test_second_up_changes_and_restarts_nothing(local_env: Environment) -> None:
    before = program_pids(local_env)
    assert {
        "postgres",
        "redis",
        "prometheus",
        "alertmanager",
        "haproxy",
        "alert-receiver",
        "node-exporter",
        "workload-blue",
    } <= set(before)
    supervisord = localenv.supervisord_process(local_env)
    assert supervisord is not None

    report = localenv.up(local_env)

    assert report.failed == 0
    assert report.changed == 0, report
    assert program_pids(local_env) == before
    again = localenv.supervisord_process(local_env)
    assert again is not None and again.pid == supervisord.pid
    print(f"no-op up: {report.seconds:.1f} s")


def test_state_file_names_the_active_color(local_env: Environment) -> None:
    state = json.loads(localenv.state_file(local_env).read_text())
    assert state["active"] == "blue"
    assert state["colors"]["blue"]["version"] == local_env.service.version
    assert set(state["colors"]["blue"]["faults"]) == {"error_rate", "latency_ms", "crash", "never_ready"}


def test_each_service_answers(local_env: Environment) -> None:
    urls = localenv.endpoints(local_env)
    assert all("password" not in url and ":@" not in url for url in urls.values())
    assert set(urls) == localenv.REQUIRED | {"edge", "workload-blue", "workload-green"}
    assert localenv.database_url(local_env).endswith(f":{local_env.local_ports.postgres}/hitl")
    assert all(
        p["state"] == "RUNNING"
        for n, p in localenv.process_status(local_env).items()
        if n in localenv.REQUIRED
    )

    with connect_postgres(local_env) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (localenv.database_name(local_env),)

    client = redis.Redis(
        host="127.0.0.1",
        port=local_env.local_ports.redis,
        password=localenv.read_secret(local_env, "redis_password"),
        socket_timeout=5,
    )
    assert client.ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=local_env.local_ports.redis, socket_timeout=5).get("x")

    for path in (
        urls["prometheus"] + "/-/ready",
        urls["alertmanager"] + "/-/ready",
        urls["alert-receiver"] + "/-/ready",
    ):
        assert httpx.get(path, timeout=5).status_code == 200, path
    assert httpx.get(urls["haproxy"], timeout=5).status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{local_env.local_ports.haproxy_stats}/metrics", timeout=5)
    assert "haproxy_process_" in metrics.text
    assert httpx.get(urls["workload-blue"] + "/healthz", timeout=5).status_code == 200


def test_prometheus_scrapes_every_part(local_env: Environment) -> None:
    url = localenv.endpoints(local_env)["prometheus"] + "/api/v1/targets"

    def all_up() -> bool:
        targets = httpx.get(url, timeout=5).json()["data"]["activeTargets"]
        jobs = {(t["labels"]["job"], t["labels"].get("color")): t["health"] for t in targets}
        return jobs == {
            ("prometheus", None): "up",
            ("alertmanager", None): "up",
            ("haproxy", None): "up",
            ("textfile", None): "up",
            ("workload", "blue"): "up",
        }

    assert wait_until(all_up, timeout=30)
    rules = httpx.get(localenv.endpoints(local_env)["prometheus"] + "/api/v1/rules", timeout=5).json()
    names = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert "ServiceDown" in names


def test_edge_reaches_the_blue_workload(local_env: Environment) -> None:
    response = httpx.get(localenv.endpoints(local_env)["edge"] + "/version", timeout=5)
    assert response.status_code == 200
    assert response.headers["X-App-Version"] == local_env.service.version
    assert response.headers["X-App-Color"] == "blue"
    assert response.json()["environment"] == local_env.name


def test_alert_receiver_records_webhooks(local_env: Environment) -> None:
    url = localenv.endpoints(local_env)["alert-receiver"]
    payload = {
        "receiver": "local-receiver",
        "status": "firing",
        "alerts": [{"labels": {"alertname": "Probe"}}],
    }
    assert httpx.post(url + "/alerts", json=payload, timeout=5).status_code == 200
    assert payload in httpx.get(url + "/alerts", timeout=5).json()
    last = localenv.alerts_file(local_env).read_text().splitlines()[-1]
    assert json.loads(last) == payload


def test_preflight_refuses_a_port_taken_by_another_process(
    environments_dir: Path, local_env: Environment
) -> None:
    env = new_environment(environments_dir)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", env.local_ports.redis))
    squatter.listen()
    try:
        with pytest.raises(BadInput) as caught:
            localenv.up(env)
    finally:
        squatter.close()
    message = str(caught.value)
    assert message.startswith(
        f"ports.redis: {env.local_ports.redis} is taken by another process (pid {os.getpid()}"
    )
    assert "\n" not in message
    assert caught.value.exit_code == 2
    assert list(env.state_path.iterdir()) == []
    assert not localenv.running(env)
    env.state_path.rmdir()


def test_preflight_accepts_the_environments_own_ports(local_env: Environment) -> None:
    localenv.preflight(local_env)


def test_two_environments_run_side_by_side(environments_dir: Path, local_env: Environment) -> None:
    other = new_environment(environments_dir)
    try:
        report = localenv.up(other)
        assert report.failed == 0
        for env in (local_env, other):
            response = httpx.get(localenv.endpoints(env)["edge"] + "/version", timeout=5)
            assert response.json()["environment"] == env.name
        assert localenv.read_secret(other, "redis_password") != localenv.read_secret(
            local_env, "redis_password"
        )
        own, theirs = localenv.supervisord_process(local_env), localenv.supervisord_process(other)
        assert own is not None and theirs is not None and own.pid != theirs.pid
    finally:
        localenv.down(other, purge=True)
    assert not localenv.running(other)
    assert not other.state_path.exists()
    assert localenv.running(local_env)


def test_up_starts_a_stopped_program_and_touches_nothing_else(local_env: Environment) -> None:
    before = program_pids(local_env)
    localenv.supervisorctl(local_env, "stop", "workload-blue")
    try:
        report = localenv.up(local_env)
    finally:
        localenv.supervisorctl(local_env, "start", "workload-blue", check=False)
    assert report.changed == 1, report
    after = program_pids(local_env)
    assert after["workload-blue"] != before["workload-blue"]
    assert {n: p for n, p in after.items() if n != "workload-blue"} == {
        n: p for n, p in before.items() if n != "workload-blue"
    }


def test_down_then_up_keeps_the_data(local_env: Environment) -> None:
    marker = f"kept-{time.time_ns()}"
    with connect_postgres(local_env) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS localenv_survival (marker text PRIMARY KEY)")
        conn.execute("INSERT INTO localenv_survival VALUES (%s)", (marker,))

    localenv.down(local_env)
    assert not localenv.running(local_env)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", local_env.local_ports.postgres)) != 0
    localenv.down(local_env)  # idempotent when already down

    report = localenv.up(local_env)
    assert report.failed == 0
    with connect_postgres(local_env) as conn:
        row = conn.execute("SELECT marker FROM localenv_survival WHERE marker = %s", (marker,)).fetchone()
    assert row == (marker,)


def test_playbook_output_is_parsed_into_a_report_or_the_failing_task() -> None:
    run = localenv._Run()
    for line in (
        "TASK [Wait for the services to listen] *****",
        'failed: [localhost] (item=blue) => {"changed": false, "msg": "Timeout when waiting"}',
        "fatal: [localhost]: FAILED! => {}",
        "PLAY RECAP *****",
        "localhost : ok=22   changed=3    unreachable=0    failed=1    skipped=5    rescued=0    ignored=0",
    ):
        run.feed(line)
    assert run.recap == (22, 3, 0, 1)
    assert run.failure == "task 'Wait for the services to listen': Timeout when waiting"


def test_unknown_secret_is_bad_input(local_env: Environment) -> None:
    with pytest.raises(BadInput, match="secret: 'nope' is unknown; accepted: postgres_password"):
        localenv.read_secret(local_env, "nope")


def test_metrics_written_as_files_reach_prometheus(local_env: Environment) -> None:
    """The backup drill writes its timestamps as a file; node_exporter's textfile collector serves them."""
    metric = "maximus_test_textfile_probe_seconds"
    path = local_env.state_path / "metrics" / "probe.prom"
    path.write_text(f'# TYPE {metric} gauge\n{metric}{{service="hitl"}} 42\n')
    query = f"http://127.0.0.1:{local_env.local_ports.prometheus}/api/v1/query"
    try:
        assert wait_until(
            lambda: httpx.get(query, params={"query": metric}, timeout=5).json()["data"]["result"],
            timeout=30,
        )
        result = httpx.get(query, params={"query": metric}, timeout=5).json()["data"]["result"]
        assert result[0]["value"][1] == "42"
    finally:
        path.unlink()
