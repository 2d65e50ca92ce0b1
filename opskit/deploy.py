"""Blue-green deployments: a persisted state machine, the same on every kind of environment.

preflight -> [backup] -> start-color -> wait-ready -> analysis-pre -> switch -> analysis-post -> done

Each step is persisted (the state file of a single-machine environment, a ConfigMap on a cluster) and
written to the audit log before it takes effect, so a deploy killed at any point can be resumed
(`--resume`: the step runs again; every step is idempotent) or undone (`--abort`). Traffic moves only in
`switch`, in one atomic router change: it is never split. After `done` the previous color stays warm for
the model's rollback window, so `rollback` is one switch.

Where a deploy runs is a `Target`: `LocalTarget` here (supervisord processes behind HAProxy),
`opskit.kubedeploy.ClusterTarget` for Kubernetes (Deployments behind an Istio VirtualService).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, cast

import httpx
import yaml
from pydantic import ValidationError

from opskit import (
    analysis,
    audit,
    audit_report,
    backup,
    envstate,
    health,
    localenv,
    lock,
    notify,
    policy,
    traffic,
)
from opskit.errors import BadInput, OperationFailed, OpsError
from opskit.model import COLORS, ROOT, Color, Environment, Faults
from opskit.routers import Router

Migration = Literal["none", "compatible", "breaking"]
Outcome = Literal["done", "aborted", "rolled-back", "held", "planned"]
STEPS = (
    "preflight",
    "backup",
    "start-color",
    "wait-ready",
    "analysis-pre",
    "switch",
    "analysis-post",
    "done",
)
INJECT_KEYS: dict[str, tuple[str, type]] = {
    "error-rate": ("error_rate", float),
    "latency-ms": ("latency_ms", int),
    "crash": ("crash", bool),
    "never-ready": ("never_ready", bool),
}
# Drills only: the deploy kills itself right after persisting this step, before the step takes effect.
STOP_AFTER_VAR = "MAXIMUS_DRILL_KILL_AFTER_STEP"
READY_POLL_S = 0.5
SMOKE_REQUESTS = 100  # enough that a release failing 10% of requests is caught before any user sees it
Events = Callable[[str], None]
OnMeasure = Callable[[analysis.Measurement], None]


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime | None = None) -> str:
    return (moment or _now()).isoformat(timespec="seconds")


def other(color: str) -> str:
    return COLORS[1] if color == COLORS[0] else COLORS[0]


# --- input -------------------------------------------------------------------------------------------------


def parse_inject(env: Environment, text: str | None) -> dict[str, Any]:
    """`--inject error-rate=0.3,latency-ms=500`: fault knobs for drills, accepted on local only."""
    if not text:
        return {}
    if env.kind != "local":
        raise BadInput(f"--inject: fault injection is accepted on local environments only, not on {env.name}")
    faults: dict[str, Any] = {}
    for item in text.split(","):
        key, _, raw = item.strip().partition("=")
        if key not in INJECT_KEYS:
            raise BadInput(f"--inject: unknown key {key!r}; accepted: {', '.join(INJECT_KEYS)}")
        name, kind = INJECT_KEYS[key]
        try:
            if kind is bool:
                if raw not in ("", "true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw in ("", "true", "1")
            else:
                value = kind(raw)
        except ValueError:
            raise BadInput(f"--inject: {key}={raw!r} is not a {kind.__name__}") from None
        faults[name] = value
    try:
        return Faults.model_validate({**env.faults.model_dump(), **faults}).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        key = next(k for k, (name, _) in INJECT_KEYS.items() if name == error["loc"][0])
        raise BadInput(f"--inject: {key}={error['input']!r}: {error['msg']}") from None


def releases(env: Environment) -> dict[str, Migration]:
    """The service's deployable releases and their migration kind (`releases/<service>.yaml`)."""
    path = ROOT / "releases" / f"{env.service.name}.yaml"
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("releases") or []
        return {str(e["version"]): e.get("migration", "none") for e in entries}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise OperationFailed(f"{path.name}: unreadable release catalogue ({exc})") from exc


def resolve(env: Environment, version: str) -> Migration:
    if not env.version_ok(version):
        raise BadInput(
            f"--version: {version!r} does not match the version pattern; "
            f"accepted: {env.service.version_pattern}"
        )
    known = releases(env)
    if version not in known:
        raise BadInput(
            f"--version: {version} is not a release of {env.service.name}; accepted: {', '.join(known)}"
        )
    return known[version]


# --- the report ---------------------------------------------------------------------------------------------


@dataclass
class DeployReport:
    environment: str
    id: str
    version: str
    from_color: str
    to_color: str
    outcome: Outcome = "done"
    reason: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    analyses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("done", "planned")

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "id": self.id,
            "version": self.version,
            "from": self.from_color,
            "to": self.to_color,
            "outcome": self.outcome,
            "ok": self.ok,
            "reason": self.reason,
            "steps": self.steps,
            "analyses": self.analyses,
        }


# --- where a deploy runs ------------------------------------------------------------------------------------


class Target(Protocol):
    """What the state machine needs of an environment. `state.colors` is what should run: each color in it
    runs its version, the others are stopped (scaled to zero on a cluster)."""

    env: Environment
    router: Router
    log: audit.AuditLog
    sleep: Callable[[float], None]
    clock: Callable[[], float]

    def read_state(self) -> envstate.EnvState: ...

    def write_state(self, state: envstate.EnvState) -> None: ...

    def run_colors(self, state: envstate.EnvState) -> None:
        """Make what runs match `state.colors` (already persisted)."""
        ...

    def wait_ready(self, color: str, version: str) -> str | None:
        """None once `color` runs `version` and is ready to take traffic, else why not by the deadline."""
        ...

    def smoke(
        self, color: str, on_measure: Callable[[analysis.Measurement], None]
    ) -> analysis.AnalysisReport:
        """The pre-promotion analysis: real requests to `color` alone."""
        ...

    def metrics(self) -> analysis.MetricProvider: ...

    def unhealthy(self) -> list[str]:
        """The required health checks that do not pass (empty: healthy)."""
        ...

    def lock(self, operation: str, break_stale: bool) -> AbstractContextManager[Any]: ...

    def mark_needs_restore(self, needed: bool) -> None:
        """Record on the router whether rolling back needs the database restored first."""
        ...

    def notify(self, name: str, *, severity: str, summary: str, description: str, runbook: str) -> str: ...

    def backup(self) -> str:
        """A fresh verified database backup; its id."""
        ...


class LocalTarget:
    """A single-machine environment: supervisord's workload programs behind HAProxy, state in state.json."""

    def __init__(self, env: Environment) -> None:
        self.env = env.require_local()
        self.router: Router = localenv.router(env)
        self.log = audit.for_environment(env)
        self.sleep: Callable[[float], None] = time.sleep
        self.clock: Callable[[], float] = time.monotonic

    def read_state(self) -> envstate.EnvState:
        return envstate.read_state(self.env)

    def write_state(self, state: envstate.EnvState) -> None:
        envstate.write_state(self.env, state)

    def run_colors(self, state: envstate.EnvState) -> None:
        localenv.apply_colors(self.env)  # reads the state just written

    def wait_ready(self, color: str, version: str) -> str | None:
        return wait_ready(self.env, self.router, color)  # its program was just (re)started with `version`

    def smoke(
        self, color: str, on_measure: Callable[[analysis.Measurement], None]
    ) -> analysis.AnalysisReport:
        return analysis.run_smoke(self.env, cast("Color", color), SMOKE_REQUESTS, on_measure=on_measure)

    def metrics(self) -> analysis.MetricProvider:
        return analysis.provider_for(self.env)

    def unhealthy(self) -> list[str]:
        return [c.name for c in health.check_environment(self.env).checks if c.required and not c.ok]

    def lock(self, operation: str, break_stale: bool) -> AbstractContextManager[Any]:
        return lock.hold(self.env, operation, break_stale=break_stale)

    def mark_needs_restore(self, needed: bool) -> None:
        """state.json's `previous.needs_restore` carries it here."""

    def notify(self, name: str, *, severity: str, summary: str, description: str, runbook: str) -> str:
        return notify.send(
            self.env, name, severity=severity, summary=summary, description=description, runbook=runbook
        )

    def backup(self) -> str:
        return backup.backup_and_verify(self.env)


def target_for(env: Environment) -> Target:
    if env.kind == "kubernetes":
        # imported when used: the cluster side imports this module's state machine
        from opskit import kubedeploy  # noqa: PLC0415

        return kubedeploy.ClusterTarget.connect(env)
    return LocalTarget(env)


# --- the machine --------------------------------------------------------------------------------------------


class Deployment:
    """One deploy of one environment, driven step by step from the persisted state."""

    def __init__(self, target: Target, events: Events | None = None) -> None:
        self.target = target
        self.env = target.env
        self.log = target.log
        self.events = events or (lambda _line: None)
        self.state = target.read_state()
        self.router = target.router

    @property
    def record(self) -> dict[str, Any]:
        return self.state.deploy

    def report(self) -> DeployReport:
        d = self.record
        return DeployReport(
            self.env.name,
            d["id"],
            d["version"],
            d["from"]["color"],
            d["to"]["color"],
            steps=d.setdefault("steps", []),
            analyses=d.setdefault("analyses", []),
        )

    def _persist(self) -> None:
        self.target.write_state(self.state)

    def advance(self, step: str, detail: str = "") -> None:
        """Persist the step, then audit it, then (for drills) die right here if asked to."""
        self.record["step"] = step
        self.record["updated_at"] = _stamp()
        self.record.setdefault("steps", []).append(
            {"step": step, "at": self.record["updated_at"], "detail": detail}
        )
        self._persist()
        self.log.write(
            self.env.name,
            "deploy.step",
            deploy=self.record["id"],
            step=step,
            version=self.record["version"],
            color=self.record["to"]["color"],
            detail=detail,
        )
        self.events(f"{step}: {detail}" if detail else step)
        if os.environ.get(STOP_AFTER_VAR) == step:
            os.kill(os.getpid(), signal.SIGKILL)

    # each step is idempotent: a resume runs the persisted step again

    def start_color(self) -> None:
        to = self.record["to"]
        self.state.colors[to["color"]] = {"version": to["version"], "faults": to["faults"]}
        self._persist()
        self.target.run_colors(self.state)

    def wait_ready(self) -> None:
        to = self.record["to"]
        problem = self.target.wait_ready(to["color"], to["version"])
        if problem is not None:
            raise _Abort(problem)

    def analyse_pre(self) -> None:
        color = self.record["to"]["color"]
        result = self.target.smoke(color, lambda m: self.events(_measured(m)))
        self.record.setdefault("analyses", []).append(result.as_dict())
        self._persist()
        if result.outcome != "promote":
            raise _Abort(f"pre-promotion analysis of {color}: {result.reason}")

    def switch(self) -> None:
        d = self.record
        # Marked first: a crash between the two never leaves a breaking release live without the mark.
        self.target.mark_needs_restore(d["migration"] == "breaking")
        self.router.switch(d["to"]["color"])
        self.state.active = d["to"]["color"]
        warm_until = _now() + timedelta(seconds=self.env.deploy.rollback_window_s)
        self.state.previous = {
            **d["from"],
            "warm_until": _stamp(warm_until),
            "needs_restore": d["migration"] == "breaking",
            "backup": d.get("backup"),
        }
        self._persist()

    def analyse_post(self) -> Outcome:
        color = self.record["to"]["color"]
        result = analysis.run_analysis(
            self.target.metrics(),
            self.env,
            color,
            "post",
            on_measure=lambda m: self.events(_measured(m)),
            sleep=self.target.sleep,
            clock=self.target.clock,
        )
        self.record.setdefault("analyses", []).append(result.as_dict())
        self._persist()
        if result.outcome == "rollback":
            self.rollback_after_switch(f"post-promotion analysis of {color}: {result.reason}")
            return "rolled-back"
        if result.outcome == "hold":
            self.hold(result.reason)
            return "held"
        return "done"

    def hold(self, reason: str) -> None:
        self.record["state"] = "held"
        self.record["reason"] = reason
        self._persist()
        notified = self._notify(
            "MaximusDeployHeld",
            summary=f"deploy {self.record['id']} of {self.env.name} is held",
            description=f"{reason}. Next: `invoke deploy --env {self.env.name} --resume` to analyse "
            f"again, or `invoke rollback --env {self.env.name}`.",
        )
        self.log.write(
            self.env.name, "deploy.held", deploy=self.record["id"], reason=reason, notified=notified
        )

    def _notify(self, name: str, *, summary: str, description: str) -> str:
        """Send a warning; an alert nobody received is said out loud, so the operator pages by hand."""
        channel = self.target.notify(
            name, severity="warning", summary=summary, description=description, runbook=f"alerts/{name}.md"
        )
        if channel == "none":
            self.events(
                f"WARNING: the alert {name} reached nobody (Alertmanager and webhook away): page on-call"
            )
        return channel

    def rollback_after_switch(self, reason: str) -> None:
        """Automatic rollback: back to the warm previous color, the new one stopped."""
        d = self.record
        self.router.switch(d["from"]["color"])
        self.target.mark_needs_restore(False)
        self.state.active = d["from"]["color"]
        self.state.previous = d.get("previous_before")
        self._stop_new_color()
        d["state"], d["reason"] = "rolled-back", reason
        self._persist()
        notified = self._notify(
            "MaximusRollback",
            summary=f"{self.env.name}: release {d['version']} rolled back automatically",
            description=reason,
        )
        self.log.write(
            self.env.name,
            "rollback",
            deploy=d["id"],
            automatic=True,
            reason=reason,
            to=d["from"]["color"],
            version=d["from"]["version"],
            notified=notified,
        )

    def _stop_new_color(self) -> None:
        """Stop the new release's color (unless it took traffic), the deploy still unfinished meanwhile: a
        crash here leaves it `--abort`able, never finished with the color still running."""
        if self.record["to"]["color"] != self.state.active:
            self.state.colors.pop(self.record["to"]["color"], None)
        self._expire_replaced_previous()
        self._persist()
        self.target.run_colors(self.state)

    def _expire_replaced_previous(self) -> None:
        """The release before this deploy ran on the color this deploy took over: it is cold now."""
        previous = self.state.previous
        if previous and previous.get("color") == self.record["to"]["color"]:
            self.state.previous = {**previous, "warm_until": _stamp()}

    def undo(self, reason: str) -> Outcome:
        """Abort: whatever step it stopped at, end on the previous color with the new one stopped."""
        d = self.record
        if self.state.active == d["to"]["color"] or self.router.routing().active == d["to"]["color"]:
            self.router.switch(d["from"]["color"])
            self.state.active = d["from"]["color"]
            self.state.previous = d.get("previous_before")
        self.target.mark_needs_restore(False)
        self._stop_new_color()
        d["state"], d["reason"] = "aborted", reason
        self._persist()
        self.log.write(self.env.name, "deploy.aborted", deploy=d["id"], reason=reason)
        return "aborted"

    def finish(self, outcome: Outcome) -> None:
        d = self.record
        if outcome == "done":
            d["state"] = "done"
        self.state.history = [
            *self.state.history,
            {"at": _stamp(), "operation": f"deploy {d['version']}", "result": d["state"], "id": d["id"]},
        ][-20:]
        if outcome == "done":
            warm_until = (self.state.previous or {}).get("warm_until")
            self.advance(
                "done",
                f"{d['to']['color']} serves {d['version']}; {d['from']['color']} warm until {warm_until}",
            )
        else:
            self._persist()

    def run(self) -> DeployReport:
        """Run from the persisted step to the end; a failure says how to finish or undo the deploy."""
        try:
            return self._run()
        except OpsError as exc:
            if self.record.get("state") in ("in-progress", "held"):
                d, name = self.record, self.env.name
                exc.args = (
                    f"{exc}; deploy {d['id']} stopped at step {d['step']}: "
                    f"`invoke deploy --env {name} --resume` or `--abort`",
                )
            raise

    def _run(self) -> DeployReport:
        d = self.record
        step = d["step"]
        order = STEPS.index(step)
        try:
            if order <= STEPS.index("backup") and d["migration"] == "breaking" and not d.get("backup"):
                self.advance("backup", "a verified backup before a breaking migration")
                d["backup"] = self.target.backup()
                self._persist()
            if order <= STEPS.index("start-color"):
                self.advance("start-color", f"{d['to']['color']} gets {d['version']}")
                self.start_color()
            if order <= STEPS.index("wait-ready"):
                self.advance("wait-ready", f"deadline {self.env.deploy.ready_deadline_s:g} s")
                self.wait_ready()
            if order <= STEPS.index("analysis-pre"):
                self.advance("analysis-pre", f"smoke against {d['to']['color']} directly")
                self.analyse_pre()
        except _Abort as exc:
            aborted = self.undo(str(exc))
            report = self.report()
            report.outcome, report.reason = aborted, str(exc)
            self.finish(aborted)
            return report
        if order <= STEPS.index("switch"):
            self.advance("switch", f"{d['from']['color']} -> {d['to']['color']}")
            self.switch()
        outcome: Outcome = "done"
        if order <= STEPS.index("analysis-post"):
            self.advance("analysis-post", f"window {self.env.deploy.analysis.window_s:g} s")
            outcome = self.analyse_post()
        self.finish(outcome)
        report = self.report()
        report.outcome, report.reason = outcome, d.get("reason", "")
        return report


class _Abort(Exception):
    """A step before the switch failed: undo, exit 1."""


def _measured(m: analysis.Measurement) -> str:
    value = "-" if m.value is None else f"{m.value:.4g}"
    return f"  {m.verdict:<7} {m.name} = {value} (threshold {m.threshold:g}) {m.detail}"


# --- the commands -------------------------------------------------------------------------------------------


def _interrupted(state: envstate.EnvState) -> bool:
    return state.deploy.get("state") in ("in-progress", "held")


def deploy(
    env: Environment,
    version: str | None,
    *,
    ticket: str | None = None,
    risk: str | None = None,
    approver: str | None = None,
    change_type: str | None = None,
    inject: str | None = None,
    resume: bool = False,
    abort: bool = False,
    dry_run: bool = False,
    break_stale_lock: bool = False,
    events: Events | None = None,
    target: Target | None = None,
) -> DeployReport:
    if resume and abort:
        raise BadInput("--resume and --abort: choose one")
    if not (resume or abort):
        if version is None:
            raise BadInput(
                f"--version: required; accepted: a release listed in releases/{env.service.name}.yaml"
            )
        migration = resolve(env, version)
        faults = parse_inject(env, inject)
        change = policy.check_change(
            env.name,
            ticket,
            risk,
            approver,
            _now(),
            change_type=change_type,
            migration=migration,
            actor=audit.actor(),
        )
        commit = audit_report.commit_fields()
    target = target or target_for(env)
    if dry_run:
        state = target.read_state()
        planned = DeployReport(
            env.name,
            "dry-run",
            version or "-",
            state.active,
            other(state.active),
            outcome="planned",
            reason="nothing changed",
        )
        planned.steps = [{"step": s, "at": None, "detail": "planned"} for s in STEPS]
        return planned
    with target.lock("deploy", break_stale_lock):
        machine = Deployment(target, events)
        state = machine.state
        if resume or abort:
            if not _interrupted(state):
                raise BadInput(
                    f"--{'resume' if resume else 'abort'}: no deploy of {env.name} is interrupted "
                    "or held; `invoke status` shows the last one"
                )
            if abort:
                report = machine.report()
                report.outcome = machine.undo("aborted by request")
                report.reason = "aborted by request"
                machine.finish(report.outcome)
                return report
            state.deploy["state"] = "in-progress"
            machine.log.write(
                env.name, "deploy.resumed", deploy=state.deploy["id"], step=state.deploy["step"]
            )
            if state.deploy["step"] == "done":
                state.deploy["step"] = "analysis-post"
            return machine.run()
        if _interrupted(state):
            d = state.deploy
            raise OperationFailed(
                f"deploy {d['id']} of {d['version']} stopped at step {d['step']} ({d['state']}); "
                f"run `invoke deploy --env {env.name} --resume` or `--abort` first"
            )
        _preflight(env, machine)
        assert version is not None  # noqa: S101 - checked above
        idle = other(state.active)
        deploy_id = f"d-{_now().strftime('%Y%m%dT%H%M%S')}-{version}"
        state.deploy = {
            "id": deploy_id,
            "state": "in-progress",
            "step": "preflight",
            "version": version,
            "migration": migration,
            "ticket": ticket,
            "started_at": _stamp(),
            "from": {"color": state.active, "version": state.colors[state.active]["version"]},
            "to": {"color": idle, "version": version, "faults": faults},
            "previous_before": state.previous,
            "steps": [],
            "analyses": [],
        }
        machine.log.write(
            env.name,
            "deploy.started",
            deploy=deploy_id,
            version=version,
            ticket=ticket,
            migration=migration,
            inject=faults if inject else None,
            **change.as_audit(),
            **commit,
        )
        machine.advance(
            "preflight", f"{state.active} serves {state.deploy['from']['version']}; {idle} is idle"
        )
        return machine.run()


def _preflight(env: Environment, machine: Deployment) -> None:
    state = machine.state
    failing = machine.target.unhealthy()
    if failing:
        raise OperationFailed(
            f"preflight: {env.name} is not healthy ({', '.join(failing)}); "
            f"`invoke health --env {env.name}` says why; nothing was changed"
        )
    if machine.router.routing().active != state.active:
        raise OperationFailed(
            f"preflight: the edge routes to {machine.router.routing().active} but the state "
            f"says {state.active}; run `invoke status --env {env.name}` and fix it first"
        )


# --- the end of the rollback window -------------------------------------------------------------------------


@dataclass
class ScaleDownReport:
    environment: str
    color: str | None
    version: str | None
    warm_until: str | None
    done: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "color": self.color,
            "version": self.version,
            "warm_until": self.warm_until,
            "done": self.done,
            "reason": self.reason,
        }


def scale_down(
    env: Environment, *, dry_run: bool = False, break_stale_lock: bool = False, target: Target | None = None
) -> ScaleDownReport:
    """Stop the previous color once its rollback window has passed (after that a rollback redeploys it).
    Idempotent; nothing happens while a deploy is interrupted or held, or before the window ends."""
    target = target or target_for(env)
    with target.lock("scale-down", break_stale_lock):
        state = target.read_state()
        previous = state.previous or {}
        color, version, until = previous.get("color"), previous.get("version"), previous.get("warm_until")
        report = ScaleDownReport(env.name, color, version, until, done=False, reason="")
        if _interrupted(state):
            report.reason = f"deploy {state.deploy.get('id')} is {state.deploy['state']}: it decides first"
        elif not color or color == state.active or state.colors.get(color, {}).get("version") != version:
            report.reason = "no previous release is running"
        elif until and datetime.fromisoformat(until) > _now():
            report.reason = f"still warm: its rollback window ends at {until}"
        elif dry_run:
            report.reason = "planned: nothing changed (--dry-run)"
        else:
            state.colors.pop(color)
            target.write_state(state)
            target.run_colors(state)
            target.log.write(env.name, "deploy.scaled-down", color=color, version=version, warm_until=until)
            report.done, report.reason = True, "its rollback window has passed; a rollback now redeploys it"
        return report


# --- rollback -----------------------------------------------------------------------------------------------


@dataclass
class RollbackReport:
    environment: str
    from_color: str
    to_color: str
    version: str
    path: Literal["switch", "redeploy"]
    reason: str
    seconds: float
    notified: str
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "from": self.from_color,
            "to": self.to_color,
            "version": self.version,
            "path": self.path,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "notified": self.notified,
            "verified": self.verified,
        }


def _warm(env: Environment, state: envstate.EnvState, router: Any) -> bool:
    """The previous release still runs on its color, inside the rollback window, and HAProxy sees it UP."""
    previous = state.previous or {}
    until = previous.get("warm_until")
    if until and datetime.fromisoformat(until) < _now():
        return False
    if state.colors.get(previous.get("color", ""), {}).get("version") != previous.get("version"):
        return False  # its color was stopped or now runs another release
    try:
        return bool(router.server_up(previous["color"]))
    except OpsError:
        return False


def rollback(
    env: Environment, *, reason: str | None = None, force: bool = False, break_stale_lock: bool = False
) -> RollbackReport:
    """Back to the previous release: one switch when its color is warm, else a redeploy of it."""
    if env.kind == "kubernetes":
        from opskit import kubedeploy  # noqa: PLC0415 - see target_for

        return kubedeploy.rollback(env, reason=reason, force=force, break_stale_lock=break_stale_lock)
    env = env.require_local()
    started = time.monotonic()
    reason = reason or "no reason given"
    with lock.hold(env, "rollback", break_stale=break_stale_lock):
        state = envstate.read_state(env)
        previous = state.previous
        d = state.deploy
        if _interrupted(state) and state.active != d["to"]["color"]:
            raise OperationFailed(
                f"deploy {d['id']} stopped at step {d['step']}, before its switch: traffic is still on "
                f"{state.active}; clean it up with `invoke deploy --env {env.name} --abort`"
            )
        if not previous:
            raise OperationFailed(
                f"{env.name}: nothing to roll back to (no previous release recorded); "
                "`invoke status` shows what runs"
            )
        if previous.get("needs_restore") and not force:
            raise BadInput(
                f"rollback: {state.colors[state.active]['version']} ran a breaking migration, so "
                f"{previous['version']} needs the database as it was: first run `invoke db.restore --env "
                f"{env.name} --backup {previous.get('backup')} --force`, then this again with --force"
            )
        router = localenv.router(env)
        current = {"color": state.active, "version": state.colors[state.active]["version"]}
        target = previous["color"]
        path: Literal["switch", "redeploy"] = "switch"
        if not _warm(env, state, router):
            path = "redeploy"
            state.colors[target] = {"version": previous["version"], "faults": env.faults.model_dump()}
            envstate.write_state(env, state)
            localenv.apply_colors(env)
            problem = wait_ready(env, router, target)
            if problem is not None:
                raise OperationFailed(
                    f"rollback: {problem}; traffic stays where it was; "
                    f"`invoke health --env {env.name} --color {target}`"
                )
        state.deploy = (
            {**state.deploy, "state": "rolled-back"}
            if state.deploy.get("state") in ("in-progress", "held")
            else state.deploy
        )
        router.switch(target)
        state.active = target
        warm_until = _now() + timedelta(seconds=env.deploy.rollback_window_s)
        state.previous = {**current, "warm_until": _stamp(warm_until), "needs_restore": False, "backup": None}
        state.history = [
            *state.history,
            {
                "at": _stamp(),
                "operation": f"rollback to {previous['version']}",
                "result": "done",
                "reason": reason,
            },
        ][-20:]
        envstate.write_state(env, state)
        seconds = time.monotonic() - started
        verified = (
            router.routing().active == target
            and traffic.served_version(localenv.endpoints(env)["edge"]) == previous["version"]
        )
        audit.for_environment(env).write(
            env.name,
            "rollback",
            automatic=False,
            reason=reason,
            to=target,
            version=previous["version"],
            path=path,
            seconds=round(seconds, 3),
        )
    notified = notify.send(
        env,
        "MaximusRollback",
        severity="warning",
        summary=f"{env.name}: rolled back to {previous['version']}",
        description=f"{reason} (from {current['version']} on {current['color']})",
        runbook="alerts/MaximusRollback.md",
    )
    return RollbackReport(
        env.name, current["color"], target, previous["version"], path, reason, seconds, notified, verified
    )


def wait_ready(env: Environment, router: Any, color: str) -> str | None:
    """Wait until `color` answers /readyz and HAProxy sees it UP; None, or why not by the model's deadline."""
    program = localenv.program_name(env, color)
    url = localenv.endpoints(env)[program] + "/readyz"
    deadline = time.monotonic() + env.deploy.ready_deadline_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        process = localenv.process_status(env).get(program, {}).get("state")
        if process == "FATAL":
            last = "its process crashed at start (FATAL)"
            break
        if process in ("BACKOFF", "EXITED"):
            last = f"its process keeps exiting at start ({process})"
            time.sleep(READY_POLL_S)
            continue
        try:
            answer = httpx.get(url, timeout=2.0)
            if answer.status_code == 200 and router.server_up(color):
                return None
            last = f"/readyz answered {answer.status_code}: {answer.text.strip()[:160]}"
        except httpx.HTTPError as exc:
            last = f"/readyz: {type(exc).__name__}"
        time.sleep(READY_POLL_S)
    return f"{color} was not ready within {env.deploy.ready_deadline_s:g} s: {last}"
