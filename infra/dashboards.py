"""Grafana dashboards as code, built with grafana-foundation-sdk and delivered by the stacks as ConfigMaps
(Grafana's sidecar loads every ConfigMap labelled `grafana_dashboard`).

    dashboards(env) -> {key: JSON}    service overview, SLO and error budget, deployments, PostgreSQL,
                                      Redis, Kafka

Every query reads a metric the service exposes (`maximus_<service>_*`), a recording rule generated in
infra/slo.py, or an exporter metric the component's alerts use too (`EXPORTER_METRICS`); tests hold every
query to that.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from infra import slo
from opskit.grafana import DEPLOY_TAG, ROLLBACK_TAG, env_tag
from opskit.model import Environment

# Written by the backup tooling (opskit/backup.py), with the labels service and environment.
TOOLING_METRICS = frozenset(
    {
        "maximus_backup_last_success_timestamp_seconds",
        "maximus_backup_drill_last_success_timestamp_seconds",
        "maximus_backup_drill_last_failure_timestamp_seconds",
        "maximus_backup_drill_rto_seconds",
    }
)
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")
GRAFANA = DataSourceRef(type_val="datasource", uid="grafana")
TAGS = ["maximus"]
EXPORTER_METRICS = frozenset(
    {
        "up",
        "cnpg_backends_total",
        "cnpg_pg_settings_setting",
        "cnpg_pg_replication_lag",
        "cnpg_pg_database_size_bytes",
        "cnpg_pg_stat_database_xact_commit",
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
        "redis_connected_clients",
        "redis_rejected_connections_total",
        "redis_rdb_last_bgsave_status",
        "redis_keyspace_hits_total",
        "redis_keyspace_misses_total",
        "redis_commands_processed_total",
        "kafka_server_replicamanager_underreplicatedpartitions",
        "kafka_controller_kafkacontroller_offlinepartitionscount",
        "kafka_consumergroup_lag",
        "kafka_server_brokertopicmetrics_messagesin_total",
        "kafka_server_brokertopicmetrics_bytesin_total",
        "kafka_server_brokertopicmetrics_bytesout_total",
        "kube_deployment_status_condition",
        "kong_http_requests_total",
        "haproxy_frontend_http_responses_total",
        "istio_requests_total",
        "pilot_total_xds_rejects",
    }
)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    queries: Sequence[Query]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12


def _panel(spec: PanelSpec) -> timeseries.Panel | stat.Panel:
    panel: timeseries.Panel | stat.Panel = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
    panel.title(spec.title).datasource(PROMETHEUS).unit(spec.unit).span(spec.width).height(8)
    for index, query in enumerate(spec.queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index))
        if query.legend:
            target.legend_format(query.legend)
        panel.with_target(target)
    return panel


def build(
    uid: str, title: str, panels: Sequence[PanelSpec], annotations: Sequence[gdash.AnnotationQuery] = ()
) -> str:
    """One dashboard's JSON model."""
    board = (
        gdash.Dashboard(title)
        .uid(uid)
        .tags(TAGS)
        .timezone("utc")
        .refresh("30s")
        .time("now-6h", "now")
        .readonly()
    )
    for annotation in annotations:
        board.annotation(annotation)
    for spec in panels:
        board.with_panel(_panel(spec))
    return json.dumps(board.build(), cls=JSONEncoder, indent=2, sort_keys=True)


def service_overview(service: str) -> str:
    m = f"maximus_{service}"
    users = f'route!~"{slo.NOT_USER_ROUTES}"'
    rate = f"sum by (color) (rate({m}_http_requests_total{{{users}}}[5m]))"
    errors = f'sum by (color) (rate({m}_http_requests_total{{{users}, status=~"5.."}}[5m])) / {rate}'
    buckets = f"sum by (color, le) (rate({m}_http_request_duration_seconds_bucket{{{users}}}[5m]))"
    return build(
        f"maximus-{service}-overview",
        f"MAXIMUS / {service} / Service overview",
        [
            PanelSpec(
                "Targets up per color",
                [Query(f'sum by (color) (up{{service="{service}"}})', "{{color}}")],
                kind="stat",
                width=8,
            ),
            PanelSpec("Success rate (5m)", [Query(f"1 - ({errors})", "{{color}}")], "percentunit", "stat", 8),
            PanelSpec(
                "Decisions per minute",
                [Query(f"sum by (decision) (rate({m}_decisions_total[5m])) * 60", "{{decision}}")],
                kind="stat",
                width=8,
            ),
            PanelSpec("Requests per second per color", [Query(rate, "{{color}}")], "reqps"),
            PanelSpec("5xx ratio per color", [Query(errors, "{{color}}")], "percentunit"),
            PanelSpec(
                "Duration per color (p50, p95, p99)",
                [
                    Query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)} {{{{color}}}}")
                    for q in (0.5, 0.95, 0.99)
                ],
                "s",
                width=24,
            ),
        ],
    )


def slo_dashboard(env: Environment) -> str:
    s = env.service
    ratio = slo.RATIO
    budget = {name: round(1 - slo.objective(name, s), 10) for name in ("availability", "latency")}
    burn = [
        Query(f'{ratio}{w}{{service="{s.name}", slo="{name}"}} / {budget[name]:g}', f"{name} {w}")
        for name in ("availability", "latency")
        for w in (slo.scaled(3600, s.slo.window_days), slo.scaled(6 * 3600, s.slo.window_days))
    ]
    return build(
        f"maximus-{s.name}-slo",
        f"MAXIMUS / {s.name} / SLO and error budget",
        [
            PanelSpec(
                f"Error budget left ({s.slo.window_days} days)",
                [Query(f'{slo.BUDGET}{{service="{s.name}"}}', "{{slo}}")],
                "percentunit",
                "stat",
                12,
            ),
            PanelSpec(
                "Objectives",
                [Query(f'{slo.OBJECTIVE}{{service="{s.name}"}}', "{{slo}}")],
                "percentunit",
                "stat",
                12,
            ),
            PanelSpec("Burn rate (1 = spending exactly the budget)", burn, width=24),
            PanelSpec(
                "Error ratio, 5m and 1h, per SLO",
                [
                    Query(f'{ratio}{w}{{service="{s.name}"}}', f"{{{{slo}}}} {w}")
                    for w in (slo.scaled(300, s.slo.window_days), slo.scaled(3600, s.slo.window_days))
                ],
                "percentunit",
                width=24,
            ),
        ],
    )


def deployments(service: str, environment: str) -> str:
    """Deploy and rollback markers come from the audit log, posted to Grafana's own annotations by
    `opskit.grafana` (tagged with the environment); the version-change query on Prometheus stays beside
    them, so a release that started without the tooling (or before the annotations were synced) still
    shows."""
    m = f"maximus_{service}"
    version_appears = (
        f"count by (color, version) ({m}_build_info)\n"
        f"unless count by (color, version) ({m}_build_info offset 1m)"
    )
    annotations = [
        gdash.AnnotationQuery()
        .name("deploys")
        .datasource(GRAFANA)
        .enable(True)
        .icon_color("blue")
        .type("tags")
        .target(
            gdash.AnnotationTarget()
            .type("tags")
            .tags([DEPLOY_TAG, env_tag(environment)])
            .match_any(False)
            .limit(100)
        ),
        gdash.AnnotationQuery()
        .name("rollbacks")
        .datasource(GRAFANA)
        .enable(True)
        .icon_color("red")
        .type("tags")
        .target(
            gdash.AnnotationTarget()
            .type("tags")
            .tags([ROLLBACK_TAG, env_tag(environment)])
            .match_any(False)
            .limit(100)
        ),
        gdash.AnnotationQuery()
        .name("a version starts")
        .datasource(PROMETHEUS)
        .enable(True)
        .icon_color("green")
        .expr(version_appears),
    ]
    users = f'route!~"{slo.NOT_USER_ROUTES}"'
    rate = f"sum by (color) (rate({m}_http_requests_total{{{users}}}[1m]))"
    return build(
        f"maximus-{service}-deployments",
        f"MAXIMUS / {service} / Deployments",
        [
            PanelSpec(
                "Version per color",
                [Query(f"max by (color, version) ({m}_build_info)", "{{color}} {{version}}")],
                kind="stat",
                width=24,
            ),
            PanelSpec("Requests per second per color", [Query(rate, "{{color}}")], "reqps"),
            PanelSpec(
                "5xx ratio per color",
                [
                    Query(
                        f'sum by (color) (rate({m}_http_requests_total{{{users}, status=~"5.."}}[1m]))'
                        f" / {rate}",
                        "{{color}}",
                    )
                ],
                "percentunit",
            ),
            PanelSpec(
                "Rollouts stuck (Kubernetes)",
                [
                    Query(
                        'max by (deployment) (kube_deployment_status_condition{condition="Progressing", '
                        'status="false"})',
                        "{{deployment}}",
                    )
                ],
                width=24,
            ),
        ],
        annotations,
    )


def postgres(service: str) -> str:
    own = f'{{service="{service}"}}'
    return build(
        "maximus-postgres",
        "MAXIMUS / PostgreSQL",
        [
            PanelSpec(
                "Last backup, age",
                [Query(f"time() - max(maximus_backup_last_success_timestamp_seconds{own})")],
                "s",
                "stat",
                8,
            ),
            PanelSpec(
                "Last restore drill, age",
                [Query(f"time() - max(maximus_backup_drill_last_success_timestamp_seconds{own})")],
                "s",
                "stat",
                8,
            ),
            PanelSpec(
                "Last restore drill, measured RTO",
                [Query(f"max(maximus_backup_drill_rto_seconds{own})")],
                "s",
                "stat",
                8,
            ),
            PanelSpec(
                "Connections used of max_connections",
                [
                    Query(
                        "sum by (pod) (cnpg_backends_total) / max by (pod) "
                        '(cnpg_pg_settings_setting{name="max_connections"})',
                        "{{pod}}",
                    )
                ],
                "percentunit",
            ),
            PanelSpec("Replication lag", [Query("max by (pod) (cnpg_pg_replication_lag)", "{{pod}}")], "s"),
            PanelSpec(
                "Commits per second",
                [Query("sum by (datname) (rate(cnpg_pg_stat_database_xact_commit[5m]))", "{{datname}}")],
                "ops",
            ),
            PanelSpec(
                "Database size",
                [Query("max by (datname) (cnpg_pg_database_size_bytes)", "{{datname}}")],
                "bytes",
            ),
        ],
    )


def redis() -> str:
    hits, misses = "rate(redis_keyspace_hits_total[5m])", "rate(redis_keyspace_misses_total[5m])"
    return build(
        "maximus-redis",
        "MAXIMUS / Redis",
        [
            PanelSpec(
                "Last RDB save ok", [Query("min(redis_rdb_last_bgsave_status)")], kind="stat", width=12
            ),
            PanelSpec(
                "Cache hit ratio",
                [Query(f"sum({hits}) / (sum({hits}) + sum({misses}))")],
                "percentunit",
                "stat",
                12,
            ),
            PanelSpec(
                "Memory used of maxmemory",
                [
                    Query(
                        "max by (pod) (redis_memory_used_bytes) / max by (pod) (redis_memory_max_bytes > 0)",
                        "{{pod}}",
                    )
                ],
                "percentunit",
            ),
            PanelSpec(
                "Clients",
                [
                    Query("sum by (pod) (redis_connected_clients)", "connected {{pod}}"),
                    Query("sum by (pod) (rate(redis_rejected_connections_total[5m]))", "rejected/s {{pod}}"),
                ],
            ),
            PanelSpec(
                "Commands per second",
                [Query("sum by (pod) (rate(redis_commands_processed_total[5m]))", "{{pod}}")],
                "ops",
                width=24,
            ),
        ],
    )


def kafka() -> str:
    return build(
        "maximus-kafka",
        "MAXIMUS / Kafka",
        [
            PanelSpec(
                "Under-replicated partitions",
                [Query("sum(kafka_server_replicamanager_underreplicatedpartitions)")],
                kind="stat",
                width=12,
            ),
            PanelSpec(
                "Offline partitions",
                [Query("sum(kafka_controller_kafkacontroller_offlinepartitionscount)")],
                kind="stat",
                width=12,
            ),
            PanelSpec(
                "Consumer lag per group and topic",
                [
                    Query(
                        "sum by (consumergroup, topic) (kafka_consumergroup_lag)",
                        "{{consumergroup}} {{topic}}",
                    )
                ],
                width=24,
            ),
            PanelSpec(
                "Messages in per second per topic",
                [
                    Query(
                        "sum by (topic) (rate(kafka_server_brokertopicmetrics_messagesin_total[5m]))",
                        "{{topic}}",
                    )
                ],
                "ops",
            ),
            PanelSpec(
                "Bytes in per second per topic",
                [
                    Query(
                        "sum by (topic) (rate(kafka_server_brokertopicmetrics_bytesin_total[5m]))",
                        "{{topic}}",
                    )
                ],
                "Bps",
            ),
            PanelSpec(
                "Bytes out per second per topic",
                [
                    Query(
                        "sum by (topic) (rate(kafka_server_brokertopicmetrics_bytesout_total[5m]))",
                        "{{topic}}",
                    )
                ],
                "Bps",
                width=24,
            ),
        ],
    )


def dashboards(env: Environment) -> dict[str, str]:
    """Key (the ConfigMap's and file's name) -> dashboard JSON."""
    name = env.service.name
    return {
        f"{name}-overview": service_overview(name),
        f"{name}-slo": slo_dashboard(env),
        f"{name}-deployments": deployments(name, env.name),
        "postgres": postgres(name),
        "redis": redis(),
        "kafka": kafka(),
    }
