"""The alerting drill of a single-machine environment: a bad release serving real traffic drives the SLO
page alert to fire in the environment's real Prometheus and to reach its alert receiver.

The deploy gate stops a bad release before users see it, so the drill stands in for a gate that let one
through: it runs the active release with an injected error rate on the idle color (as `invoke deploy
--inject error-rate=0.9` would), sends it a steady stream of user requests directly, and waits for the page
alert (`AvailabilityBudgetBurn`, severity critical, window 1h: 14.4x the budget over 1h and 5m) as
Prometheus evaluates the very rules of infra/ and Alertmanager routes it to the PagerDuty stand-in. The
windows are the real ones of the SLO: on an environment whose traffic of the last hour is modest, a burst
of 5xx passes 1.44% over both windows within seconds, and the alert fires after its `for` of one minute.
Afterwards the idle color gets back what it ran before (nothing, or the warm previous release); the drill
holds the environment's lock throughout and writes an audit record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from opskit import audit, deploy, envstate, localenv, lock
from opskit.errors import OperationFailed
from opskit.model import Environment
from opskit.traffic import SteadyLoad

PAGE_ALERT = "AvailabilityBudgetBurn"
PAGE_WINDOW = "1h"
PAGE_RECEIVER = "pagerduty"
DRILL_FAULT = "error-rate=0.9"
DRILL_RPS = 40.0
USER_PATHS = ("/hitl/patches/pending", "/hitl/analytics/summary")
POLL_S = 2.0
Events = Callable[[str], None]


def received(env: Environment, alertname: str, receiver: str | None = None) -> list[dict[str, Any]]:
    """Firing alerts named `alertname` the local receiver recorded (from `receiver`, if given)."""
    url = localenv.endpoints(env)["alert-receiver"] + "/alerts"
    try:
        payloads = httpx.get(url, timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return []
    return [
        {**alert, "receiver": payload.get("receiver")}
        for payload in payloads
        if isinstance(payload, dict) and (receiver is None or payload.get("receiver") == receiver)
        for alert in payload.get("alerts", [])
        if alert.get("labels", {}).get("alertname") == alertname and alert.get("status") == "firing"
    ]


def firing_in_prometheus(env: Environment, alertname: str) -> list[dict[str, str]]:
    """The labels of every firing instance of `alertname` in the environment's Prometheus."""
    url = localenv.endpoints(env)["prometheus"] + "/api/v1/query"
    query = f'ALERTS{{alertname="{alertname}", alertstate="firing"}}'
    try:
        answer = httpx.get(url, params={"query": query}, timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return []
    return [dict(r["metric"]) for r in answer.get("data", {}).get("result", [])]


def _is_page(alert: dict[str, Any], env: Environment) -> bool:
    labels: dict[str, str] = alert.get("labels", {})
    wanted = {"severity": "critical", "window": PAGE_WINDOW, "environment": env.name}
    return all(labels.get(k) == v for k, v in wanted.items())


def page_alert_fires(
    env: Environment, timeout_s: float = 240.0, events: Events | None = None
) -> tuple[bool, str, dict[str, Any]]:
    """Run the drill; (ok, one line saying what happened, the figures)."""
    say = events or (lambda _line: None)
    env = env.require_local()
    log = audit.for_environment(env)
    with lock.hold(env, "alert-drill"):
        state = envstate.read_state(env)
        if state.deploy.get("state") in ("in-progress", "held"):
            raise OperationFailed(
                f"deploy {state.deploy.get('id')} of {env.name} is {state.deploy['state']}; "
                f"finish it (`invoke deploy --env {env.name} --resume` or `--abort`) before the drill"
            )
        color = deploy.other(state.active)
        version = state.colors[state.active]["version"]
        before = state.colors.get(color)
        faults = deploy.parse_inject(env, DRILL_FAULT)
        log.write(env.name, "drill.alert.started", color=color, version=version, inject=faults)
        drill_started = time.monotonic()
        fired_after: float | None = None
        page: list[dict[str, Any]] = []
        sent: dict[str, Any] = {}
        try:
            state.colors[color] = {"version": version, "faults": faults}
            envstate.write_state(env, state)
            say(f"{color} runs {version} with {DRILL_FAULT} (the bad release)")
            localenv.apply_colors(env)
            problem = deploy.wait_ready(env, localenv.router(env), color)
            if problem is not None:
                raise OperationFailed(f"alert drill: the bad release on {color} did not start: {problem}")
            target = localenv.endpoints(env)[localenv.program_name(env, color)]
            say(f"{DRILL_RPS:g} user requests/s straight to {color}; waiting for {PAGE_ALERT} to page")
            started = time.monotonic()
            deadline = started + timeout_s
            with SteadyLoad(target, rps=DRILL_RPS, paths=USER_PATHS) as load:
                while time.monotonic() < deadline:
                    page = [a for a in received(env, PAGE_ALERT, PAGE_RECEIVER) if _is_page(a, env)]
                    if page:
                        fired_after = time.monotonic() - started
                        break
                    time.sleep(POLL_S)
            sent = load.report.as_dict()
        finally:
            state = envstate.read_state(env)
            if before is None:
                state.colors.pop(color, None)
            else:
                state.colors[color] = before
            envstate.write_state(env, state)
            localenv.apply_colors(env)
        in_prometheus = firing_in_prometheus(env, PAGE_ALERT)
        ok = fired_after is not None
        log.write(
            env.name,
            "drill.alert.finished",
            ok=ok,
            alert=PAGE_ALERT,
            seconds=None if fired_after is None else round(fired_after, 1),
        )
        total = time.monotonic() - drill_started
    data = {
        "alert": PAGE_ALERT,
        "color": color,
        "seconds_to_page": None if fired_after is None else round(fired_after, 1),
        "drill_seconds": round(total, 1),
        "requests": sent.get("total"),
        "failed": sent.get("failed"),
        "receiver": PAGE_RECEIVER,
        "received": page[:1],
        "firing_in_prometheus": in_prometheus,
    }
    if fired_after is None:
        return (
            False,
            f"{PAGE_ALERT} did not reach the receiver within {timeout_s:g} s; check "
            f"`invoke health --env {env.name}` and Prometheus's /alerts page",
            data,
        )
    return (
        True,
        f"{PAGE_ALERT} (critical, window 1h) paged via {PAGE_RECEIVER} {fired_after:.0f} s after the bad "
        f"release took traffic ({sent.get('failed')} of {sent.get('total')} requests failed); "
        f"{color} is back as it was",
        data,
    )
