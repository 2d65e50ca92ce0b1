"""Monitoring: kube-prometheus-stack (pinned) with Prometheus retention from the model, Alertmanager
(critical alerts page, the rest go to Slack), Grafana (admin password from a Pulumi secret, dashboards
from ConfigMaps carrying the sidecar label), and the service's alert rules as a PrometheusRule.

The `rules/` directory beside this module holds the single-machine environment's Prometheus rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.common import (
    JAEGER_QUERY,
    NONROOT_UID,
    Component,
    Platform,
    chart_values_resources,
    pod_security,
)
from opskit.model import Resources

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


def _panel(index: int, title: str, expr: str, unit: str = "short") -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr}],
    }


def dashboard(uid: str, title: str, panels: Sequence[tuple[str, str, str]]) -> str:
    """A Grafana dashboard (JSON model) of time series panels, two per row."""
    document = {
        "uid": uid,
        "title": title,
        "tags": ["maximus"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": []},
        "panels": [_panel(i, t, e, u) for i, (t, e, u) in enumerate(panels)],
    }
    return json.dumps(document, indent=2, sort_keys=True)


def dashboards(service: str) -> dict[str, str]:
    m = f"maximus_{service}"
    rate = f"sum by (color) (rate({m}_http_requests_total[5m]))"
    errors = (
        f'sum(rate({m}_http_requests_total{{status=~"5.."}}[5m])) / sum(rate({m}_http_requests_total[5m]))'
    )
    p = f"histogram_quantile({{q}}, sum by (le) (rate({m}_http_request_duration_seconds_bucket[5m])))"
    return {
        "service-health": dashboard(
            "maximus-service-health",
            "MAXIMUS / Service health",
            [
                ("Uptime (targets up)", f'sum(up{{service="{service}"}})', "short"),
                ("Success rate", f"1 - ({errors})", "percentunit"),
                ("P95 latency", p.format(q="0.95"), "s"),
                ("Error rate", errors, "percentunit"),
            ],
        ),
        "performance": dashboard(
            "maximus-performance",
            "MAXIMUS / Performance",
            [
                ("P50", p.format(q="0.5"), "s"),
                ("P90", p.format(q="0.9"), "s"),
                ("P95", p.format(q="0.95"), "s"),
                ("P99", p.format(q="0.99"), "s"),
                ("Requests per second by color", rate, "reqps"),
                ("Database connections", "sum(cnpg_backends_total)", "short"),
            ],
        ),
        "hitl-decisions": dashboard(
            "maximus-hitl-decisions",
            "MAXIMUS / HITL decisions",
            [
                ("Decisions per minute", f"sum by (decision) (rate({m}_decisions_total[5m])) * 60", "short"),
                ("API error rate", errors, "percentunit"),
                ("Request rate", rate, "reqps"),
                ("P95 latency", p.format(q="0.95"), "s"),
            ],
        ),
    }


def alert_rules(service: str, namespace: str) -> list[dict[str, Any]]:
    """The team's alerts: high error rate, high latency, service down; runbooks beside them."""
    m = f"maximus_{service}"
    selector = f'namespace="{namespace}"'
    return [
        {
            "name": f"{service}.availability",
            "rules": [
                {
                    "alert": "ServiceDown",
                    "expr": f'up{{{selector}, service=~"{service}.*"}} == 0',
                    "for": "1m",
                    "labels": {"severity": "critical"},
                    "annotations": {
                        "summary": "{{ $labels.pod }} has not answered a scrape for a minute",
                        "runbook_url": "runbooks/alerts/ServiceDown.md",
                    },
                },
                {
                    "alert": "HighErrorRate",
                    "expr": (
                        f'sum(rate({m}_http_requests_total{{{selector}, status=~"5.."}}[5m])) '
                        f"/ sum(rate({m}_http_requests_total{{{selector}}}[5m])) > 0.05"
                    ),
                    "for": "5m",
                    "labels": {"severity": "critical"},
                    "annotations": {
                        "summary": "more than 5% of requests answer 5xx",
                        "runbook_url": "runbooks/alerts/HighErrorRate.md",
                    },
                },
                {
                    "alert": "HighLatency",
                    "expr": (
                        f"histogram_quantile(0.95, sum by (le) "
                        f"(rate({m}_http_request_duration_seconds_bucket{{{selector}}}[5m]))) > 0.3"
                    ),
                    "for": "5m",
                    "labels": {"severity": "warning"},
                    "annotations": {
                        "summary": "P95 latency above 300 ms",
                        "runbook_url": "runbooks/alerts/HighLatency.md",
                    },
                },
            ],
        }
    ]


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
                "config": {
                    "route": {
                        "receiver": "slack",
                        "group_by": ["alertname", "namespace"],
                        "routes": [
                            {"receiver": "pagerduty", "matchers": ['severity="critical"'], "continue": True}
                        ],
                    },
                    "receivers": [
                        {
                            "name": "slack",
                            "slack_configs": [
                                {
                                    "api_url_file": f"{secrets_dir}/slack-webhook-url",
                                    "channel": "#maximus-alerts",
                                }
                            ],
                        },
                        {
                            "name": "pagerduty",
                            "pagerduty_configs": [
                                {"routing_key_file": f"{secrets_dir}/pagerduty-routing-key"}
                            ],
                        },
                    ],
                },
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
        for key, document in dashboards(env.service.name).items():
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
            {"groups": alert_rules(env.service.name, args.platform.namespaces.app)},
            depends_on=[release],
        )
        self.grafana_url = f"http://{RELEASE}-grafana.{ns}.svc.cluster.local"
        self.prometheus_url = f"http://{RELEASE}-prometheus.{ns}.svc.cluster.local:9090"
        self.register_outputs({"grafana": self.grafana_url, "prometheus": self.prometheus_url})
