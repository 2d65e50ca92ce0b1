"""The single-machine environment: provision and start it, stop it, and find its parts.

`up` checks the model's ports, then runs `playbooks/local.yml` against this machine with variables
rendered from the environment model. Everything of one environment lives under its state directory and
runs under one supervisord of its own, so several environments run side by side on distinct ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from opskit import envstate
from opskit.errors import BadInput, OperationFailed
from opskit.model import COLORS, ROOT, Environment
from opskit.routers.haproxy import HAProxyRouter

PLAYBOOK = ROOT / "playbooks" / "local.yml"
ANSIBLE_CONFIG = ROOT / "playbooks" / "ansible.cfg"
POSTGRES_PASSWORD = "postgres_password"  # noqa: S105 - a secret's name: the superuser `postgres`
REDIS_PASSWORD = "redis_password"  # noqa: S105 - a secret's name
SECRETS = (POSTGRES_PASSWORD, REDIS_PASSWORD)
PROGRAMS = ("postgres", "redis", "prometheus", "alertmanager", "alert-receiver", "node-exporter", "haproxy")
EDGE_BACKEND = "app"  # the HAProxy backend holding the servers `blue` and `green`
REQUIRED = frozenset(PROGRAMS)  # must be RUNNING whatever the deploy state; the workload colors vary
LISTEN_ADDRESSES = frozenset({"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::1"})  # noqa: S104
RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")
STOP_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class UpReport:
    ok: int
    changed: int
    failed: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- where things are -------------------------------------------------------------------------------------


def etc_dir(env: Environment) -> Path:
    return env.state_path / "etc"


def run_dir(env: Environment) -> Path:
    return env.state_path / "run"


def log_dir(env: Environment) -> Path:
    return env.state_path / "log"


def data_dir(env: Environment) -> Path:
    return env.state_path / "data"


def secrets_dir(env: Environment) -> Path:
    return env.state_path / "secrets"


def supervisor_conf(env: Environment) -> Path:
    return etc_dir(env) / "supervisord.conf"


def supervisord_pidfile(env: Environment) -> Path:
    return run_dir(env) / "supervisord.pid"


def edge_map(env: Environment) -> Path:
    """The HAProxy map holding the active color's backend."""
    return etc_dir(env) / "edge.map"


def router(env: Environment) -> HAProxyRouter:
    return HAProxyRouter(haproxy_socket(env), edge_map(env), EDGE_BACKEND, COLORS)


def haproxy_socket(env: Environment) -> Path:
    """The HAProxy runtime API (admin level) of the environment."""
    return run_dir(env) / "haproxy.sock"


def postgres_socket_dir(env: Environment) -> Path:
    return run_dir(env)


def alerts_file(env: Environment) -> Path:
    """The JSON-lines file the alert receiver appends each Alertmanager payload to."""
    return data_dir(env) / "alerts" / "alerts.jsonl"


def database_name(env: Environment) -> str:
    """The application's PostgreSQL role and database (named after the service)."""
    return env.service.name


def program_name(env: Environment, color: str) -> str:
    """The supervisord program running the workload in `color`."""
    return f"workload-{color}"


def endpoints(env: Environment) -> dict[str, str]:
    """Component -> URL or DSN, never with a password (read those with `read_secret`).

    The keys are the supervisord program names (see `process_status`), plus `edge`; `postgres` is the
    administrative DSN (user and database `postgres`), `database_url` the application's.
    """
    ports = env.local_ports
    return {
        "postgres": f"postgresql://postgres@127.0.0.1:{ports.postgres}/postgres",
        "redis": f"redis://127.0.0.1:{ports.redis}/0",
        "prometheus": f"http://127.0.0.1:{ports.prometheus}",
        "alertmanager": f"http://127.0.0.1:{ports.alertmanager}",
        "alert-receiver": f"http://127.0.0.1:{ports.alert_receiver}",
        "node-exporter": f"http://127.0.0.1:{ports.node_exporter}/metrics",
        "haproxy": f"http://127.0.0.1:{ports.haproxy_stats}/stats",
        "edge": f"http://127.0.0.1:{ports.edge}",
        "workload-blue": f"http://127.0.0.1:{ports.blue}",
        "workload-green": f"http://127.0.0.1:{ports.green}",
    }


def database_url(env: Environment) -> str:
    """The application's DSN (role and database named after the service), without its password."""
    db = database_name(env)
    return f"postgresql://{db}@127.0.0.1:{env.local_ports.postgres}/{db}"


def database_password_secret(env: Environment) -> str:
    """The secret holding the application role's password."""
    return f"{database_name(env)}_password"


def secret_names(env: Environment) -> tuple[str, ...]:
    return (*SECRETS, database_password_secret(env))


def read_secret(env: Environment, name: str) -> str:
    """A generated secret of the environment: postgres_password, <db>_password or redis_password."""
    accepted = secret_names(env)
    if name not in accepted:
        raise BadInput(f"secret: {name!r} is unknown; accepted: {', '.join(accepted)}")
    path = secrets_dir(env) / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise OperationFailed(
            f"environment {env.name}: secret {name} does not exist yet; "
            f"run `invoke local.up --env {env.name}`"
        ) from None


# --- persisted state (opskit.envstate owns state.json; up creates it only if missing) ---------------------


def state_file(env: Environment) -> Path:
    return envstate.state_path(env)


# --- processes ----------------------------------------------------------------------------------------------


def supervisord_process(env: Environment) -> psutil.Process | None:
    """The environment's supervisord, if its pidfile names a live supervisord."""
    try:
        pid = int(supervisord_pidfile(env).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    if "supervisord" not in cmdline or str(supervisor_conf(env)) not in cmdline:
        return None
    return proc


def running(env: Environment) -> bool:
    """True when the environment's supervisord is alive (its programs may still be starting)."""
    return supervisord_process(env) is not None


def _own_pids(env: Environment) -> set[int]:
    proc = supervisord_process(env)
    if proc is None:
        return set()
    try:
        return {proc.pid} | {child.pid for child in proc.children(recursive=True)}
    except psutil.Error:
        return {proc.pid}


def _listeners() -> dict[int, int | None]:
    """Port -> pid (None when unknown) of every TCP socket listening on a loopback or wildcard address."""
    found: dict[int, int | None] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.ip not in LISTEN_ADDRESSES:
            continue
        if found.get(conn.laddr.port) is None:
            found[conn.laddr.port] = conn.pid
    return found


def _process_name(pid: int | None) -> str:
    if pid is None:
        return "pid unknown"
    try:
        return f"pid {pid}, {psutil.Process(pid).name()}"
    except psutil.Error:
        return f"pid {pid}"


def preflight(env: Environment) -> None:
    """Refuse (BadInput, nothing changed) when a port of the model is taken by anything not ours."""
    listeners = _listeners()
    own = _own_pids(env)
    for field, port in env.local_ports.model_dump().items():
        if port not in listeners:
            continue
        pid = listeners[port]
        if pid is not None and pid in own:
            continue
        raise BadInput(
            f"ports.{field}: {port} is taken by another process ({_process_name(pid)}); "
            "choose a free port in the environment file"
        )


STATUS_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<state>[A-Z]+)\s*(?P<description>.*)$")


def process_status(env: Environment) -> dict[str, dict[str, Any]]:
    """Program -> {"state", "pid", "description"} as supervisord reports it; empty when it is not running."""
    if not running(env):
        return {}
    result: dict[str, dict[str, Any]] = {}
    for line in supervisorctl(env, "status", check=False).splitlines():
        match = STATUS_LINE.match(line.strip())
        if match is None or ":" in match["name"]:
            continue
        pid = re.search(r"\bpid (\d+)", match["description"])
        result[match["name"]] = {
            "state": match["state"],
            "pid": int(pid.group(1)) if pid else None,
            "description": match["description"].strip(),
        }
    return result


def supervisorctl(env: Environment, *args: str, check: bool = True) -> str:
    """Run the environment's supervisorctl; its output. Exit 3 (some program not running) is not an error."""
    cmd = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(supervisor_conf(env)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    if check and proc.returncode not in (0, 3):
        raise OperationFailed(
            f"environment {env.name}: supervisorctl {' '.join(args)} failed "
            f"({output.strip() or proc.returncode}); "
            f"is it up? run `invoke local.up --env {env.name}`"
        )
    return output


# --- up -----------------------------------------------------------------------------------------------------


def playbook_vars(env: Environment, state: envstate.EnvState) -> dict[str, Any]:
    """The playbook's variables, all rendered from the model and the persisted state."""
    return {
        "ansible_python_interpreter": sys.executable,
        # The venv's own name for its interpreter, not the alias that started this process: program files
        # must render the same from `invoke` and `python -m invoke`, or a deploy restarts the live color.
        "maximus_python": str(Path(sys.prefix, "bin", "python3")),
        "maximus_repo_root": str(ROOT),
        "maximus_env": env.name,
        "maximus_state_dir": str(env.state_path),
        "maximus_ports": env.local_ports.model_dump(),
        "maximus_components": {name: c.model_dump() for name, c in env.components.items()},
        "maximus_service": env.service.model_dump(mode="json"),
        "maximus_edge_backend": EDGE_BACKEND,
        "maximus_active": state.active,
        "maximus_colors": {
            color: {
                "version": spec["version"],
                "faults": env.faults.model_copy(update=spec.get("faults") or {}).model_dump(),
            }
            for color, spec in sorted(state.colors.items())
        },
    }


class _Run:
    """Follows ansible-playbook's default output: the current task, the first failure, the recap."""

    def __init__(self) -> None:
        self.task = ""
        self.failure: str | None = None
        self.recap: tuple[int, int, int, int] | None = None
        self._in_recap = False

    def feed(self, line: str) -> None:
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            self.task = line[line.index("[") + 1 : line.rindex("]")] if "]" in line else line
        elif line.startswith("PLAY RECAP"):
            self._in_recap = True
        elif self._in_recap and (match := RECAP.match(line)):
            ok, changed, unreachable, failed = (int(g) for g in match.groups())
            self.recap = (ok, changed, unreachable, failed)
        elif line.startswith(("fatal:", "failed:")) and self.failure is None:
            self.failure = f"task '{self.task}': {_failure_message(line)}"


def _failure_message(line: str) -> str:
    _, _, body = line.partition("=> ")
    try:
        result = json.loads(body)
    except ValueError:
        return body.strip() or line.strip()
    if not isinstance(result, dict):
        return str(result)
    parts = [str(result[key]).strip() for key in ("msg", "stderr") if result.get(key)]
    if not parts and result.get("results"):
        parts = [str(r.get("msg", "")) for r in result["results"] if isinstance(r, dict) and r.get("failed")]
    message = "; ".join(p for p in parts if p) or body.strip()
    return " ".join(message.split())[:600]


def up(env: Environment, *, on_output: Callable[[str], None] | None = None) -> UpReport:
    """Provision and start the environment; idempotent (a second run changes and restarts nothing)."""
    if os.geteuid() != 0:
        raise BadInput("local.up: must run as root (it installs packages and creates the service account)")
    preflight(env)
    state_path = env.state_path
    state_path.mkdir(parents=True, exist_ok=True)
    if not state_file(env).exists():
        envstate.write_state(env, envstate.read_state(env))
    return _provision(env, (), on_output)


def apply_colors(env: Environment, *, on_output: Callable[[str], None] | None = None) -> UpReport:
    """Start, change or stop the workload colors to match state.json; nothing else is touched."""
    if not running(env):
        raise OperationFailed(
            f"environment {env.name} is not running; run `invoke local.up --env {env.name}`"
        )
    return _provision(env, ("workload",), on_output)


def _provision(env: Environment, tags: tuple[str, ...], on_output: Callable[[str], None] | None) -> UpReport:
    variables = playbook_vars(env, envstate.read_state(env))
    started = time.monotonic()
    fd, vars_path = tempfile.mkstemp(prefix="maximus-vars-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(variables, out)
        run = _run_playbook(vars_path, tags, on_output)
    finally:
        Path(vars_path).unlink(missing_ok=True)
    seconds = round(time.monotonic() - started, 2)
    if run.failure is not None or run.recap is None or run.recap[3] or run.recap[2]:
        detail = run.failure or "the playbook stopped without a recap"
        raise OperationFailed(
            f"environment {env.name}: local.up failed at {detail}; "
            f"logs are in {log_dir(env)}; fix the cause and run `invoke local.up --env {env.name}` again"
        )
    ok, changed, _, failed = run.recap
    return UpReport(ok=ok, changed=changed, failed=failed, seconds=seconds)


def _run_playbook(vars_path: str, tags: tuple[str, ...], on_output: Callable[[str], None] | None) -> _Run:
    cmd = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        *(["--tags", ",".join(tags)] if tags else []),
        "--inventory",
        "localhost,",
        "--connection",
        "local",
        "--extra-vars",
        f"@{vars_path}",
        str(PLAYBOOK),
    ]
    environ = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_CONFIG),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
    }
    run = _Run()
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            run.feed(line)
            if on_output is not None:
                on_output(line)
        proc.wait()
    if proc.returncode != 0 and run.failure is None:
        run.failure = f"ansible-playbook exit code {proc.returncode} (task '{run.task}')"
    return run


# --- down ---------------------------------------------------------------------------------------------------


def down(env: Environment, *, purge: bool = False) -> None:
    """Stop every process of the environment (idempotent); `purge` also deletes its state directory."""
    proc = supervisord_process(env)
    if proc is not None:
        try:
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            procs = [proc]
        supervisorctl(env, "shutdown", check=False)
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=10)
    if purge and env.state_path.exists():
        shutil.rmtree(env.state_path)
