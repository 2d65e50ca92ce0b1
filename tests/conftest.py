"""Shared fixtures: a real single-machine environment on free ports, side by side with `local`; the
staging stack's rendered application objects, as a cluster would hold them."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from opskit import model

ROOT = Path(__file__).resolve().parent.parent
PORT_NAMES = (
    "postgres",
    "redis",
    "prometheus",
    "alertmanager",
    "alert_receiver",
    "node_exporter",
    "edge",
    "haproxy_stats",
    "blue",
    "green",
)


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on now (bound and released, never reused by the kernel at once)."""
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def environment_data(name: str, state_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The `local` definition moved to free ports and its own state directory."""
    data = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    data["name"] = name
    data["state_dir"] = str(state_dir)
    data["ports"] = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    data.update(overrides)
    return data


@pytest.fixture(scope="session")
def environments_dir() -> Iterator[Path]:
    """A directory of test environment files, visible to `invoke --env NAME` through the environment."""
    directory = Path(tempfile.mkdtemp(prefix="maximus-envs-"))
    previous = os.environ.get(model.EXTRA_ENVIRONMENTS_VAR)
    os.environ[model.EXTRA_ENVIRONMENTS_VAR] = str(directory)
    yield directory
    if previous is None:
        os.environ.pop(model.EXTRA_ENVIRONMENTS_VAR, None)
    else:
        os.environ[model.EXTRA_ENVIRONMENTS_VAR] = previous


def new_environment(environments_dir: Path, **overrides: Any) -> model.Environment:
    """Write a fresh test environment file and return its validated model (nothing is started)."""
    name = f"test-{secrets.token_hex(3)}"
    state_dir = Path(tempfile.mkdtemp(prefix=f"maximus-{name}-"))
    state_dir.chmod(0o755)  # the service account must reach it
    data = environment_data(name, state_dir, **overrides)
    (environments_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return model.load_environment(name)


@pytest.fixture(scope="session")
def local_env(environments_dir: Path) -> Iterator[model.Environment]:
    """A provisioned, running environment on free ports; purged at the end of the session."""
    from opskit import localenv

    env = new_environment(environments_dir)
    localenv.up(env)
    yield env
    localenv.down(env, purge=True)


@pytest.fixture(scope="session")
def staging_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The staging render's application objects by file name ("virtualservice-hitl", "service-hitl",
    "deployment-hitl-blue", ...), exactly as `invoke stack.render` writes them. Copy before changing."""
    from opskit import stack

    out = tmp_path_factory.mktemp("staging-render")
    stack.render("staging", out)
    directory = out / str(model.load_environment("staging").namespace)
    return {path.stem: yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yaml"))}
