"""Telling people: an alert through Alertmanager, or straight to the environment's webhook when
Alertmanager is away. Whatever happened, the caller learns which channel carried it (or none)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from opskit.kube import KubeError
from opskit.model import Environment

TIMEOUT_S = 2.0
WEBHOOK_VAR = "MAXIMUS_NOTIFY_WEBHOOK"
RUNBOOKS = "runbooks"


def _alert(
    env: Environment, name: str, *, severity: str, summary: str, description: str, runbook: str
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        # A distinct event label: a second rollback within the repeat interval is a new alert, not a repeat.
        "labels": {
            "event": now.strftime("%Y%m%dT%H%M%S.%f"),
            "alertname": name,
            "severity": severity,
            "environment": env.name,
            "service": env.service.name,
        },
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{RUNBOOKS}/{runbook}",
        },
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(hours=1)).isoformat(),
    }


def send(
    env: Environment,
    name: str,
    *,
    severity: str,
    summary: str,
    description: str,
    runbook: str,
    alertmanager: httpx.Client | None = None,
) -> str:
    """Deliver one alert; return the channel that took it: "alertmanager", "webhook" or "none".

    A single-machine environment's Alertmanager and alert receiver are on loopback. A cluster's
    Alertmanager is reached through `alertmanager` (the API server's service proxy), its webhook is
    $MAXIMUS_NOTIFY_WEBHOOK (a receiver of Alertmanager's webhook payload).
    """
    alert = _alert(env, name, severity=severity, summary=summary, description=description, runbook=runbook)
    if env.kind == "local":
        ports = env.local_ports
        alertmanager = httpx.Client(base_url=f"http://127.0.0.1:{ports.alertmanager}", timeout=TIMEOUT_S)
        webhook: str | None = f"http://127.0.0.1:{ports.alert_receiver}/alerts"
    else:
        webhook = os.environ.get(WEBHOOK_VAR) or None
    if alertmanager is not None:
        try:
            with alertmanager:
                response = alertmanager.post("api/v2/alerts", json=[alert], timeout=TIMEOUT_S)
            if response.status_code == 200:
                return "alertmanager"
        except (httpx.HTTPError, KubeError):  # KubeError: the API server's credentials, on a cluster
            pass
    if webhook is None:
        return "none"
    payload = {
        "version": "4",
        "status": "firing",
        "receiver": "direct",
        "groupLabels": {"alertname": name},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "alerts": [{**alert, "status": "firing"}],
    }
    try:
        response = httpx.post(webhook, json=payload, timeout=TIMEOUT_S)
        if response.status_code < 300:
            return "webhook"
    except httpx.HTTPError:
        pass
    return "none"
