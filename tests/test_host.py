"""The machine as the playbook left it, checked with testinfra: packages, listeners, files, routing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import testinfra

from opskit import localenv
from opskit.model import Environment

pytestmark = pytest.mark.localenv

PACKAGES = (
    "postgresql",
    "redis-server",
    "prometheus",
    "prometheus-alertmanager",
    "prometheus-node-exporter",
    "haproxy",
)
CONFIGS = (
    "postgresql.conf",
    "pg_hba.conf",
    "redis.conf",
    "prometheus.yml",
    "alertmanager.yml",
    "haproxy.cfg",
)
HOLDS_A_SECRET = ("redis.conf",)


@pytest.fixture(scope="module")
def host() -> Any:
    return testinfra.get_host("local://")


@pytest.mark.parametrize("package", PACKAGES)
def test_package_installed(host: Any, package: str, local_env: Environment) -> None:
    assert host.package(package).is_installed


def test_node_exporter_serves_only_files_written_by_tools(host: Any, local_env: Environment) -> None:
    metrics = httpx.get(localenv.endpoints(local_env)["node-exporter"], timeout=5).text
    assert 'node_scrape_collector_success{collector="textfile"} 1' in metrics
    assert "node_cpu_seconds_total" not in metrics


def test_service_account(host: Any, local_env: Environment) -> None:
    user = host.user("maximus")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert user.group == "maximus"


@pytest.mark.parametrize(
    "port_name",
    [
        "postgres",
        "redis",
        "prometheus",
        "alertmanager",
        "alert_receiver",
        "node_exporter",
        "edge",
        "haproxy_stats",
        "blue",
    ],
)
def test_listening_on_loopback(host: Any, local_env: Environment, port_name: str) -> None:
    port = getattr(local_env.local_ports, port_name)
    assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_programs_run_as_the_service_account(host: Any, local_env: Environment) -> None:
    programs = localenv.process_status(local_env)
    assert set(programs) >= localenv.REQUIRED | {"workload-blue"}
    for name, program in programs.items():
        assert program["state"] == "RUNNING", (name, program)
        assert host.check_output(f"ps -o user= -p {program['pid']}").strip() == "maximus", name
    supervisord = localenv.supervisord_process(local_env)
    assert supervisord is not None and supervisord.username() == "root"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file(host: Any, local_env: Environment, name: str) -> None:
    config = host.file(str(localenv.etc_dir(local_env) / name))
    assert config.is_file
    assert config.user == "maximus"
    assert config.mode == (0o600 if name in HOLDS_A_SECRET else 0o644)


def test_secrets_are_private(host: Any, local_env: Environment) -> None:
    directory = host.file(str(localenv.secrets_dir(local_env)))
    assert directory.user == "maximus"
    assert directory.mode == 0o700
    names = sorted(p.name for p in localenv.secrets_dir(local_env).iterdir())
    # the backup key appears with the first backup (opskit/backup_crypto.py)
    assert (
        set(localenv.secret_names(local_env))
        <= set(names)
        <= {*localenv.secret_names(local_env), "backup_key"}
    )
    for name in names:
        secret = host.file(str(localenv.secrets_dir(local_env) / name))
        assert (secret.user, secret.group, secret.mode) == ("maximus", "maximus", 0o600)
        assert len(secret.content_string.strip()) >= 32


def test_supervisor_control_is_root_only(host: Any, local_env: Environment) -> None:
    sock = host.file(str(localenv.run_dir(local_env) / "supervisord.sock"))
    assert sock.is_socket
    assert (sock.user, sock.mode) == ("root", 0o700)
    conf = host.file(str(localenv.supervisor_conf(local_env)))
    assert (conf.user, conf.mode) == ("root", 0o600)


def test_postgres_data_is_private_and_scram_only(host: Any, local_env: Environment) -> None:
    data = host.file(str(localenv.data_dir(local_env) / "postgres"))
    assert (data.user, data.mode) == ("maximus", 0o700)
    hba = host.file(str(localenv.etc_dir(local_env) / "pg_hba.conf")).content_string
    methods = {line.split()[-1] for line in hba.splitlines() if line.strip() and not line.startswith("#")}
    assert methods == {"scram-sha-256"}


def test_haproxy_routes_to_the_active_color(host: Any, local_env: Environment) -> None:
    runtime = host.file(str(localenv.haproxy_socket(local_env)))
    assert runtime.is_socket and runtime.user == "maximus" and runtime.mode == 0o600
    active = json.loads(Path(localenv.state_file(local_env)).read_text())["active"]

    router = localenv.router(local_env)
    assert router.routing().active == active
    assert (
        f"active {localenv.EDGE_BACKEND}_{active}"
        in host.file(str(localenv.edge_map(local_env))).content_string
    )
    assert router.server_up(active)
    response = httpx.get(localenv.endpoints(local_env)["edge"] + "/version", timeout=5)
    assert response.headers["X-App-Color"] == active
