"""Alertmanager's configuration, from one routing definition for every environment.

Severity decides the receiver (see infra/alerts.py):
  critical  PagerDuty (a page), and Slack #maximus-alerts so the channel sees it too
  warning   Slack #maximus-alerts (a ticket)
  info      Slack #maximus-alerts
  none      the null receiver (the Watchdog heartbeat: its absence, not its presence, is news)
Alerts are grouped per alert, service and environment; a critical alert mutes the warning (and info) of
the same alert, service and environment, so a steep SLO burn pages once instead of paging and ticketing.

On Kubernetes the receivers read the PagerDuty routing key and the Slack webhook URL from files mounted
from a Secret (their values are Pulumi config secrets). On a single machine there are no keys: every
receiver is a webhook to the local alert receiver, on a path naming the receiver it stands in for
(`/alerts/pagerduty`, `/alerts/slack`), and alerts no route takes go to `/alerts`.
"""

from __future__ import annotations

from typing import Any, Literal

from infra.alerts import SEVERITIES, dump_yaml

Target = Literal["local", "kubernetes"]
SLACK_CHANNEL = "#maximus-alerts"
GROUP_BY = ["alertname", "service", "environment"]
NULL, PAGERDUTY, SLACK, LOCAL = "null", "pagerduty", "slack", "local"
# severity -> receivers, in order (every one of them gets the alert)
ROUTES: dict[str, tuple[str, ...]] = {
    "critical": (PAGERDUTY, SLACK),
    "warning": (SLACK,),
    "info": (SLACK,),
    "none": (NULL,),
}
LOCAL_RECEIVER_URL = "http://127.0.0.1:{{ maximus_ports.alert_receiver }}/alerts"
TIMING: dict[Target, dict[str, str]] = {
    # a single machine is for drills and tests: notify within seconds
    "local": {"group_wait": "5s", "group_interval": "30s", "repeat_interval": "1h"},
    "kubernetes": {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"},
}
PAGE_REPEAT = "1h"
SLACK_TITLE = "[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }} ({{ .CommonLabels.severity }})"
SLACK_TEXT = (
    "{{ range .Alerts }}*{{ .Annotations.summary }}*\n{{ .Annotations.description }}\n"
    "Runbook: {{ .Annotations.runbook_url }}\n{{ end }}"
)

if set(ROUTES) != set(SEVERITIES):  # pragma: no cover - a programming error, caught at import
    raise RuntimeError("infra.routing.ROUTES must name every severity of infra.alerts.SEVERITIES")


def receivers_of(severity: str) -> tuple[str, ...]:
    """The receivers an alert of `severity` reaches (an unknown severity: the default one)."""
    return ROUTES.get(severity, (SLACK,))


def _receiver(name: str, target: Target, secrets_dir: str | None) -> dict[str, Any]:
    if name == NULL:
        return {"name": NULL}
    if target == "local":
        url = LOCAL_RECEIVER_URL if name == LOCAL else f"{LOCAL_RECEIVER_URL}/{name}"
        return {"name": name, "webhook_configs": [{"url": url, "send_resolved": True}]}
    if name == PAGERDUTY:
        return {
            "name": name,
            "pagerduty_configs": [
                {
                    "routing_key_file": f"{secrets_dir}/pagerduty-routing-key",
                    "send_resolved": True,
                    "description": "{{ .CommonLabels.alertname }}: {{ .CommonAnnotations.summary }}",
                    "details": {"runbook_url": "{{ .CommonAnnotations.runbook_url }}"},
                }
            ],
        }
    return {
        "name": name,
        "slack_configs": [
            {
                "api_url_file": f"{secrets_dir}/slack-webhook-url",
                "channel": SLACK_CHANNEL,
                "send_resolved": True,
                "title": SLACK_TITLE,
                "text": SLACK_TEXT,
            }
        ],
    }


def config(target: Target, secrets_dir: str | None = None) -> dict[str, Any]:
    """Alertmanager's configuration for `target`; Kubernetes needs the directory of the mounted keys."""
    if target == "kubernetes" and not secrets_dir:
        raise ValueError("routing: a Kubernetes Alertmanager needs secrets_dir (where the keys are mounted)")
    routes: list[dict[str, Any]] = [{"receiver": NULL, "matchers": ['alertname="Watchdog"']}]
    for name in (PAGERDUTY, SLACK, NULL):
        severities = [s for s, names in ROUTES.items() if name in names]
        matcher = (
            f'severity="{severities[0]}"' if len(severities) == 1 else f'severity=~"{"|".join(severities)}"'
        )
        route: dict[str, Any] = {"receiver": name, "matchers": [matcher]}
        if name == PAGERDUTY:
            route["repeat_interval"] = PAGE_REPEAT
        if any(names.index(name) < len(names) - 1 for names in ROUTES.values() if name in names):
            route["continue"] = True  # the alert goes on to its next receiver
        routes.append(route)
    used = {r["receiver"] for r in routes}
    default = LOCAL if target == "local" else SLACK
    names = sorted(used | {default})
    return {
        "route": {"receiver": default, "group_by": list(GROUP_BY), **TIMING[target], "routes": routes},
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity=~"warning|info"'],
                "equal": list(GROUP_BY),
            }
        ],
        "receivers": [_receiver(n, target, secrets_dir) for n in names],
    }


def local_template() -> str:
    """playbooks/templates/alertmanager.yml.j2: the local configuration, the port left to the playbook."""
    body = dump_yaml(config("local"))
    return (
        "# {{ ansible_managed }}\n"
        "# Generated from infra/routing.py by `python -m infra.observability --write`; edit that, not this.\n"
        + body
    )
