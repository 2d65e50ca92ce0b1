"""Helpers shared by the deploy tests: the command line in a subprocess, the edge, consistency checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from opskit import audit, envstate, localenv
from opskit.model import Environment

ROOT = Path(__file__).resolve().parent.parent
# `python -m invoke` with this very interpreter: the local environment's programs are rendered with the
# interpreter path of whoever runs the playbook, so a different one (the `invoke` script's python3) would
# re-render, and restart, the serving color at the next deploy.
INVOKE = [sys.executable, "-m", "invoke"]
# Short analysis windows keep the suite fast; 12 s still spans two scrapes (every 5 s) of the new color.
RELEASES = ("1.1.0", "1.2.0", "1.3.0")
FAST_DEPLOY = {
    "ready_deadline_s": 10,
    "analysis": {"interval_s": 2, "window_s": 12, "max_failures": 1},
    "rollback_window_s": 900,
}


def invoke(
    *args: str, extra_env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run one `invoke` task the way an operator does; its exit code and output."""
    return subprocess.run(
        [*INVOKE, *args],
        cwd=ROOT,
        env={**os.environ, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_invoke(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*INVOKE, *args],
        cwd=ROOT,
        env={**os.environ, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def edge_url(env: Environment) -> str:
    return localenv.endpoints(env)["edge"]


def edge_answer(env: Environment) -> tuple[str | None, str | None]:
    """(X-App-Version, X-App-Color) of one fresh request through the edge."""
    answer = httpx.get(edge_url(env) + "/version", timeout=5.0)
    assert answer.status_code == 200, answer.text
    return answer.headers.get("X-App-Version"), answer.headers.get("X-App-Color")


def running_workloads(env: Environment) -> set[str]:
    """Colors whose workload program runs (or is starting)."""
    prefix = localenv.program_name(env, "blue").removesuffix("blue")
    return {
        name.removeprefix(prefix)
        for name, process in localenv.process_status(env).items()
        if name.startswith(prefix) and process.get("state") in ("RUNNING", "STARTING", "BACKOFF")
    }


def assert_consistent(env: Environment) -> envstate.EnvState:
    """state.json, HAProxy and the edge agree; no color runs that the state does not list; audit intact."""
    state = envstate.read_state(env)
    routed = localenv.router(env).routing().active
    version, color = edge_answer(env)
    assert state.active == routed == color, (state.active, routed, color)
    assert version == state.colors[state.active]["version"], (version, state.colors)
    assert running_workloads(env) <= set(state.colors), (running_workloads(env), state.colors)
    assert state.active in running_workloads(env)
    log = audit.for_environment(env)
    log.sync()
    report = log.verify()
    assert report.ok, report.as_dict()
    return state


def active_version(env: Environment) -> str:
    state = envstate.read_state(env)
    return str(state.colors[state.active]["version"])


@dataclass
class Probe:
    started: float
    answered: float
    version: str | None
    color: str | None
    ok: bool


@dataclass
class EdgeProber:
    """One request at a time through the edge, each on a fresh connection, in time order."""

    url: str
    interval_s: float = 0.01
    probes: list[Probe] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            begun = time.monotonic()
            try:
                answer = httpx.get(self.url + "/version", timeout=5.0, headers={"Connection": "close"})
                self.probes.append(
                    Probe(
                        begun,
                        time.monotonic(),
                        answer.headers.get("X-App-Version"),
                        answer.headers.get("X-App-Color"),
                        answer.status_code < 500,
                    )
                )
            except httpx.HTTPError:
                self.probes.append(Probe(begun, time.monotonic(), None, None, False))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - begun)))

    def between(self, start: float, end: float) -> list[Probe]:
        """The probes sent and answered within [start, end]: routed in that interval, whatever the GIL did."""
        return [p for p in self.probes if start <= p.started and p.answered <= end]


@contextmanager
def probing(env: Environment, interval_s: float = 0.01) -> Iterator[EdgeProber]:
    prober = EdgeProber(edge_url(env), interval_s)
    thread = threading.Thread(target=prober.run, daemon=True)
    thread.start()
    try:
        yield prober
    finally:
        prober._stop.set()
        thread.join(timeout=10)


_LOAD_SCRIPT = """
import json, sys
from opskit.traffic import SteadyLoad
with SteadyLoad(sys.argv[1], rps=float(sys.argv[2]), concurrency=64) as load:
    print("started", flush=True)
    sys.stdin.read()
print(json.dumps(load.report.as_dict()), flush=True)
"""


class LoadProcess:
    """SteadyLoad in a process of its own, so the test's own work does not slow its rate down.

    with LoadProcess(edge_url, rps=200) as load:
        ...
    load.report  # TrafficReport.as_dict(): total, failed, statuses, versions, colors, requests_per_second
    """

    def __init__(self, base_url: str, rps: float = 200) -> None:
        self.args = [sys.executable, "-c", _LOAD_SCRIPT, base_url, str(rps)]
        self.report: dict[str, Any] = {}

    def __enter__(self) -> LoadProcess:
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "started"
        return self

    def __exit__(self, *_exc: object) -> None:
        stdout, _ = self.process.communicate(timeout=30)
        self.report = json.loads(stdout.strip().splitlines()[-1])


def alerts_received(env: Environment) -> list[dict[str, object]]:
    """Every alert the environment's alert receiver got (via Alertmanager or straight by webhook)."""
    answer = httpx.get(f"http://127.0.0.1:{env.local_ports.alert_receiver}/alerts", timeout=5.0)
    answer.raise_for_status()
    return [alert for payload in answer.json() for alert in payload.get("alerts", [])]


def alert_names(env: Environment) -> list[str]:
    return [str(a.get("labels", {}).get("alertname")) for a in alerts_received(env)]  # type: ignore[union-attr]


def next_release(env: Environment) -> str:
    """A release that neither color runs now, so the edge shows which one serves."""
    taken = {c["version"] for c in envstate.read_state(env).colors.values()}
    return next(v for v in RELEASES if v not in taken)
