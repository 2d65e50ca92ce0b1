"""Monitoring: kube-prometheus-stack (pinned) with Prometheus retention from the model, Alertmanager
(routes from infra/routing.py: critical pages through PagerDuty, the rest go to Slack, keys from Pulumi
secrets), Grafana (admin password from a Pulumi secret, the dashboards of infra/dashboards.py from
ConfigMaps carrying the sidecar label), and one PrometheusRule holding every rule group: those generated
from the model and the components (`rule_sets`) and those written by hand beside a component
(`infra/**/*.rules.yml`), all held to the same checks (infra/alerts.py).

The `rules/` directory beside this module holds the generated groups as files for the single-machine
environment's Prometheus (`python -m infra.observability --write`); the playbook loads them and the
hand-written files alike, so a single machine evaluates exactly what a cluster does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra import app, gateway, kafka, mesh, postgres, redis, routing, slo
from infra.alerts import Alert, Example, Group, check_unique, load_rule_file
from infra.common import (
    JAEGER_QUERY,
    NONROOT_UID,
    Component,
    Platform,
    chart_values_resources,
    pod_security,
)
from infra.dashboards import dashboards
from opskit.model import Environment, Resources

RULES_DIR = Path(__file__).resolve().parent / "rules"
RELEASE = "maximus-monitoring"
DASHBOARD_LABEL = "grafana_dashboard"
GRAFANA_ADMIN_SECRET = "maximus-grafana-admin"  # noqa: S105 - a Secret's name
RECEIVERS_SECRET = "maximus-alertmanager-receivers"  # noqa: S105 - a Secret's name
PROMETHEUS_SIZE = Resources(cpu_request="500m", memory_request="2Gi", cpu_limit="2", memory_limit="4Gi")
SMALL = Resources()
# Prometheus scrapes meshed pods with the workload certificates an outbound-only sidecar writes.
ISTIO_CERTS_ANNOTATIONS = {
    "traffic.sidecar.istio.io/includeInboundPorts": "",
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
    "proxy.istio.io/config": json.dumps({"proxyMetadata": {"OUTPUT_CERTS": "/etc/istio-output-certs"}}),
    "sidecar.istio.io/userVolumeMount": json.dumps(
        [{"name": "istio-certs", "mountPath": "/etc/istio-output-certs"}]
    ),
}


@dataclass(frozen=True)
class MonitoringArgs:
    platform: Platform
    grafana_admin_password: pulumi.Output[str]
    slack_webhook_url: pulumi.Output[str]
    pagerduty_routing_key: pulumi.Output[str]
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def rule_sets(env: Environment) -> dict[str, list[Group]]:
    """Rule file stem -> its groups: every component's alerts (declared beside it), the service's SLOs."""
    name = env.service.name
    sets = {
        "platform": [platform_alerts([name])],
        name: [app.alerts(name)],
        f"{name}-slo": slo.rule_groups(env.service),
        "postgres": [postgres.alerts(name)],
        "redis": [redis.alerts()],
        "kafka": [kafka.alerts()],
        "gateway": [gateway.alerts()],
        "mesh": [mesh.alerts()],
    }
    check_unique(g for groups in sets.values() for g in groups)
    return sets


def hand_written_rule_files() -> list[Path]:
    """Rule files written by hand beside a component (`infra/**/*.rules.yml` outside `rules/`)."""
    infra = RULES_DIR.parent.parent
    return sorted(p for p in infra.rglob("*.rules.y*ml") if RULES_DIR not in p.parents)


def all_rule_groups(env: Environment) -> list[Group]:
    """Every group any Prometheus of the environment loads: generated ones, then hand-written ones."""
    groups = [g for groups in rule_sets(env).values() for g in groups]
    groups += [g for path in hand_written_rule_files() for g in load_rule_file(path)]
    check_unique(groups)
    return groups


def prometheus_rule_groups(env: Environment) -> list[dict[str, Any]]:
    """The PrometheusRule's `spec.groups`: the same groups the single machine's Prometheus loads."""
    return [g.document() for g in all_rule_groups(env) if g.prometheus_rules()]


class Monitoring(Component):
    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Monitoring", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces.observability
        settings = env.platform.monitoring
        admin = k8s.core.v1.Secret(
            self.rname("grafana-admin"),
            metadata=self.meta(GRAFANA_ADMIN_SECRET, ns),
            type="Opaque",
            string_data={"admin-user": "admin", "admin-password": args.grafana_admin_password},
            opts=self.opts(),
        )
        receivers = k8s.core.v1.Secret(
            self.rname("alertmanager-receivers"),
            metadata=self.meta(RECEIVERS_SECRET, ns),
            type="Opaque",
            string_data={
                "slack-webhook-url": args.slack_webhook_url,
                "pagerduty-routing-key": args.pagerduty_routing_key,
            },
            opts=self.opts(),
        )
        secrets_dir = f"/etc/alertmanager/secrets/{RECEIVERS_SECRET}"
        values: dict[str, Any] = {
            "fullnameOverride": RELEASE,
            "nodeExporter": {"enabled": False},  # host namespaces and hostPath: not `restricted`
            "kubeStateMetrics": {"enabled": True},
            "prometheusOperator": {
                "resources": chart_values_resources(SMALL),
                "admissionWebhooks": {"patch": {"securityContext": pod_security(NONROOT_UID)}},
            },
            "prometheus": {
                "prometheusSpec": {
                    "retention": f"{settings.retention_days}d",
                    "replicas": 1,
                    "resources": chart_values_resources(PROMETHEUS_SIZE),
                    "serviceMonitorSelectorNilUsesHelmValues": False,
                    "podMonitorSelectorNilUsesHelmValues": False,
                    "ruleSelectorNilUsesHelmValues": False,
                    "externalLabels": {"environment": env.name},
                    "storageSpec": {
                        "volumeClaimTemplate": {
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": f"{settings.storage_gi}Gi"}},
                            }
                        }
                    },
                    "podMetadata": {
                        "labels": {"sidecar.istio.io/inject": "true"},
                        "annotations": ISTIO_CERTS_ANNOTATIONS,
                    },
                    "volumes": [{"name": "istio-certs", "emptyDir": {"medium": "Memory"}}],
                    "volumeMounts": [{"name": "istio-certs", "mountPath": "/etc/prom-certs/"}],
                    "securityContext": pod_security(NONROOT_UID),
                }
            },
            "alertmanager": {
                "alertmanagerSpec": {
                    "replicas": settings.alertmanager_replicas,
                    "secrets": [RECEIVERS_SECRET],
                    "resources": chart_values_resources(SMALL),
                    "securityContext": pod_security(NONROOT_UID),
                },
                "config": routing.config("kubernetes", secrets_dir),
            },
            "grafana": {
                "admin": {
                    "existingSecret": GRAFANA_ADMIN_SECRET,
                    "userKey": "admin-user",
                    "passwordKey": "admin-password",
                },
                "initChownData": {"enabled": False},
                "resources": chart_values_resources(SMALL),
                "sidecar": {
                    "dashboards": {
                        "enabled": True,
                        "label": DASHBOARD_LABEL,
                        "labelValue": "1",
                        "searchNamespace": ns,
                    }
                },
                "additionalDataSources": [
                    {
                        "name": "Jaeger",
                        "type": "jaeger",
                        "uid": "jaeger",
                        "url": f"http://{JAEGER_QUERY}.{ns}.svc.cluster.local:16686",
                    }
                ],
            },
        }
        release = self.helm_release(
            "stack",
            RELEASE,
            env.platform.charts.kube_prometheus_stack,
            ns,
            values,
            depends_on=[admin, receivers],
        )
        for key, document in dashboards(env).items():
            k8s.core.v1.ConfigMap(
                self.rname(f"dashboard-{key}"),
                metadata=self.meta(f"maximus-dashboard-{key}", ns, labels={DASHBOARD_LABEL: "1"}),
                data={f"{key}.json": document},
                opts=self.opts(),
            )
        self.custom(
            "rules",
            "monitoring.coreos.com/v1",
            "PrometheusRule",
            self.meta(f"maximus-{env.service.name}", ns),
            {"groups": prometheus_rule_groups(env)},
            depends_on=[release],
        )
        self.grafana_url = f"http://{RELEASE}-grafana.{ns}.svc.cluster.local"
        self.prometheus_url = f"http://{RELEASE}-prometheus.{ns}.svc.cluster.local:9090"
        self.register_outputs({"grafana": self.grafana_url, "prometheus": self.prometheus_url})


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------


def platform_alerts(services: Sequence[str]) -> Group:
    """Every scrape target, and the Watchdog: always firing, so a silent Alertmanager is itself news."""
    own = "|".join(services)
    return Group(
        "platform",
        [
            Alert(
                name="TargetDown",
                expr=f'up{{service!~"{own}"}} == 0',
                for_="5m",
                severity="warning",
                summary="{{ $labels.job }} target {{ $labels.instance }} is down",
                description=(
                    "Prometheus has not been able to scrape {{ $labels.instance }} of job {{ $labels.job }} "
                    "for 5 minutes: its alerts and dashboards are blind."
                ),
                example=Example(
                    {
                        'up{job="haproxy", instance="i:2"}': "1 0x10",
                        f'up{{job="w", service="{services[0]}"}}': "0x10",
                    },
                    "8m",
                    {"job": "haproxy", "instance": "i:2"},
                ),
            ),
            Alert(
                name="Watchdog",
                expr="vector(1)",
                severity="none",
                summary="the alerting pipeline works",
                description=(
                    "Always firing, routed to the null receiver. If it stops reaching Alertmanager, "
                    "Prometheus or its link to Alertmanager is broken."
                ),
                example=Example({}, "1m", silent_at_start=False),
            ),
        ],
    )
