"""`invoke demo`: the whole story on a single-machine environment, each step real and checked."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.progress import Progress

from opskit import alert_demo, backup, deploy, envstate, health, load, localenv, output, scan, status, traffic
from opskit.errors import OpsError
from opskit.model import Environment
from opskit.traffic import SteadyLoad

BURST_REQUESTS = 400
DEMO_RPS = 100


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoReport:
    environment: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "ok": self.ok, "steps": [s.__dict__ for s in self.steps]}


StepBody = Callable[[], tuple[bool, str, dict[str, Any]]]


def run(env: Environment, quiet: bool = False) -> DemoReport:
    report = DemoReport(env.name)

    def step(name: str, body: StepBody) -> bool:
        if not quiet:
            output.console.rule(f"[bold]{name}")
        started = time.monotonic()
        try:
            ok, detail, data = body()
        except OpsError as exc:
            ok, detail, data = False, str(exc), {}
        report.steps.append(Step(name, ok, detail, round(time.monotonic() - started, 2), data))
        if not quiet:
            output.console.print(f"{output.verdict(ok)} {detail}")
        return ok

    def provision() -> tuple[bool, str, dict[str, Any]]:
        result = localenv.up(env, on_output=None if quiet else output.progress_line)
        return (
            result.failed == 0,
            f"playbook ok={result.ok} changed={result.changed} in {result.seconds:.1f} s",
            result.as_dict(),
        )

    def show_status() -> tuple[bool, str, dict[str, Any]]:
        current = status.environment_status(env)
        if not quiet:
            output.print_status(current)
        running = all(
            c["state"] == "RUNNING" for c in current["components"] if c["name"] in localenv.REQUIRED
        )
        return running, f"{current['active']['color']} serves {current['active']['version']}", current

    def check_health() -> tuple[bool, str, dict[str, Any]]:
        current = health.check_environment(env)
        if not quiet:
            output.print_health(current)
        passed = sum(c.ok for c in current.checks)
        return current.healthy, f"{passed}/{len(current.checks)} checks pass", current.as_dict()

    def decide() -> tuple[bool, str, dict[str, Any]]:
        return _decide_one(localenv.endpoints(env)["edge"])

    def send_traffic() -> tuple[bool, str, dict[str, Any]]:
        expected = envstate.read_state(env)
        version = expected.colors[expected.active]["version"]
        with Progress(disable=quiet, transient=True) as progress:
            bar = progress.add_task("requests through the edge", total=BURST_REQUESTS)
            result = traffic.burst(
                localenv.endpoints(env)["edge"], BURST_REQUESTS, tick=lambda: progress.advance(bar)
            )
        summary = result.as_dict()
        ok = result.failed == 0 and set(result.versions) == {version}
        return (
            ok,
            (
                f"{result.total} requests, {result.failed} failed, versions {dict(result.versions)}, "
                f"p95 {summary['p95_ms']} ms, {summary['requests_per_second']} req/s"
            ),
            summary,
        )

    def good_release() -> tuple[bool, str, dict[str, Any]]:
        version = _next_release(env)
        with SteadyLoad(localenv.endpoints(env)["edge"], rps=DEMO_RPS) as load:
            result = deploy.deploy(env, version, events=None if quiet else output.event_line)
        served = _edge_version(env)
        ok = result.outcome == "done" and load.report.failed == 0 and served == version
        detail = (
            f"{version} deployed to {result.to_color}: {result.outcome}; under load {load.report.total} "
            f"requests, {load.report.failed} failed; the edge serves {served}"
        )
        return ok, detail, {"deploy": result.as_dict(), "load": load.report.as_dict()}

    def bad_release() -> tuple[bool, str, dict[str, Any]]:
        before = _edge_version(env)
        version = _next_release(env)
        with SteadyLoad(localenv.endpoints(env)["edge"], rps=DEMO_RPS) as load:
            result = deploy.deploy(
                env, version, inject="error-rate=0.3", events=None if quiet else output.event_line
            )
        served = _edge_version(env)
        ok = result.outcome in ("aborted", "rolled-back") and served == before
        detail = (
            f"{version} with 30% errors injected: {result.outcome} ({result.reason}); the edge still serves "
            f"{served}; {load.report.failed} of {load.report.total} requests failed meanwhile"
        )
        return ok, detail, {"deploy": result.as_dict(), "load": load.report.as_dict()}

    def manual_rollback() -> tuple[bool, str, dict[str, Any]]:
        result = deploy.rollback(env, reason="demo: on-call rolls back by hand")
        served = _edge_version(env)
        ok = result.verified and served == result.version
        detail = (
            f"{result.from_color} -> {result.to_color} by {result.path} in {result.seconds:.3f} s; "
            f"the edge serves {served}; notified via {result.notified}"
        )
        return ok, detail, result.as_dict()

    def page_alert() -> tuple[bool, str, dict[str, Any]]:
        return alert_demo.page_alert_fires(env, events=None if quiet else output.event_line)

    steps: tuple[tuple[str, StepBody], ...] = (
        ("provision", provision),
        ("status", show_status),
        ("health", check_health),
        ("a decision through the edge", decide),
        ("traffic through the edge", send_traffic),
        ("a good release under load", good_release),
        ("a manual rollback", manual_rollback),
        ("a bad release, rejected", bad_release),
        ("a bad release that got through pages on-call", page_alert),
        ("a smoke load test", lambda: load.demo_step(env)),
        ("the security scan", scan.demo_step),
        ("a verified backup", lambda: backup.demo_backup(env, quiet)),
        ("the restore drill", lambda: backup.demo_drill(env, quiet)),
        ("status after the story", show_status),
    )
    for name, body in steps:
        if not step(name, body) and name in ("provision", "health"):
            break
    return report


def _next_release(env: Environment) -> str:
    """The next release after the one serving, skipping breaking migrations (the demo restores nothing)."""
    catalogue = [v for v, migration in deploy.releases(env).items() if migration != "breaking"]
    state = envstate.read_state(env)
    current = state.colors[state.active]["version"]
    index = catalogue.index(current) if current in catalogue else -1
    return catalogue[(index + 1) % len(catalogue)]


def _edge_version(env: Environment) -> str | None:
    return traffic.served_version(localenv.endpoints(env)["edge"])


def _decide_one(edge: str) -> tuple[bool, str, dict[str, Any]]:
    with httpx.Client(base_url=edge, timeout=5.0) as client:
        pending = client.get("/hitl/patches/pending", params={"limit": 1})
        if pending.status_code != 200:
            return False, f"listing pending patches answered HTTP {pending.status_code}", {}
        patches = pending.json()
        if not patches:
            return True, "no patch is pending; nothing to decide", {}
        patch_id = patches[0]["id"]
        decision = client.post(
            f"/hitl/patches/{patch_id}/decision",
            json={"decision": "approve", "reason": "demo: reviewed and safe"},
        )
        summary = client.get("/hitl/analytics/summary")
    ok = decision.status_code == 201 and summary.status_code == 200
    return (
        ok,
        (
            f"patch {patch_id} approved (HTTP {decision.status_code}); "
            f"summary {summary.json() if summary.status_code == 200 else summary.status_code}"
        ),
        {"patch": patch_id, "decision_status": decision.status_code},
    )
