"""The stack program: environment model -> components -> outputs. `stacks/__main__.py` only calls `main`.

The model comes from the stack's config (`maximus:environment`), the secrets from Pulumi config secrets;
anything missing or invalid stops before a single resource is declared, with one line naming the key.
"""

from __future__ import annotations

from typing import Any

import pulumi

from infra.app import App, AppArgs
from infra.baseline import DEPLOY_ACCOUNT, Baseline, BaselineArgs
from infra.common import Namespaces, Platform
from infra.gateway import Gateway, GatewayArgs
from infra.kafka import Kafka, KafkaArgs
from infra.mesh import Mesh, MeshArgs
from infra.monitoring import Monitoring, MonitoringArgs
from infra.postgres import Postgres, PostgresArgs
from infra.redis import Redis, RedisArgs
from infra.secrets import load_secrets
from infra.tracing import Tracing, TracingArgs
from opskit.errors import BadInput
from opskit.model import PULUMI_CONFIG_KEY, Environment, parse_environment


def load_stack_environment(stack: str) -> Environment:
    """The stack's environment model, validated; BadInput names the first bad field."""
    namespace, key = PULUMI_CONFIG_KEY.split(":", 1)
    raw = pulumi.Config(namespace).get_object(key)
    if not isinstance(raw, dict):
        raise BadInput(f"config {PULUMI_CONFIG_KEY}: missing; accepted: the environment model as a mapping")
    env = parse_environment(stack, raw)
    if env.kind != "kubernetes":
        raise BadInput(
            f"environment {stack}: kind: {env.kind!r} is not accepted by a stack; accepted: 'kubernetes'"
        )
    if env.backup.storage.kind != "s3" or not env.backup.storage.bucket:
        raise BadInput(f"environment {stack}: backup.storage: accepted on a stack: kind s3 with a bucket")
    return env


def main() -> dict[str, Any]:
    """Declare every component of the stack and export what an operator needs."""
    env = load_stack_environment(pulumi.get_stack())
    secrets = load_secrets(env)
    platform = Platform(env=env, namespaces=Namespaces.of(env))
    service = env.service
    baseline = Baseline(
        "baseline", BaselineArgs(platform=platform, app_port=service.port, service_name=service.name)
    )
    ready = baseline.ready
    mesh = Mesh(
        "mesh", MeshArgs(platform=platform, service_name=service.name, service_port=service.port, after=ready)
    )
    meshed = [*ready, *mesh.ready]  # sidecars are injected by istiod's webhook: it must run first
    postgres = Postgres(
        "postgres",
        PostgresArgs(
            platform=platform,
            app_password=secrets.postgres_app_password,
            backup_access_key_id=secrets.postgres_backup_access_key_id,
            backup_secret_access_key=secrets.postgres_backup_secret_access_key,
            after=ready,
        ),
    )
    redis = Redis("redis", RedisArgs(platform=platform, password=secrets.redis_password, after=ready))
    kafka = Kafka("kafka", KafkaArgs(platform=platform, after=ready))
    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(
            platform=platform,
            grafana_admin_password=secrets.grafana_admin_password,
            slack_webhook_url=secrets.alertmanager_slack_webhook_url,
            pagerduty_routing_key=secrets.alertmanager_pagerduty_routing_key,
            after=meshed,
        ),
    )
    tracing = Tracing("tracing", TracingArgs(platform=platform, after=ready, mesh_ready=mesh.ready))
    app = App(
        "app",
        AppArgs(
            platform=platform,
            postgres_password=secrets.postgres_app_password,
            redis_password=secrets.redis_password,
            otlp_endpoint=tracing.otlp_endpoint,
            registry_password=secrets.registry_password,
            after=meshed,
        ),
    )
    gateway = Gateway(
        "gateway",
        GatewayArgs(
            platform=platform,
            service_name=service.name,
            service_port=service.port,
            api_key=secrets.gateway_api_key,
            deploy_api_key=secrets.gateway_deploy_api_key,
            tls=secrets.gateway_tls,
            after=meshed,
        ),
    )
    ns = platform.namespaces
    outputs: dict[str, Any] = {
        "environment": env.name,
        "namespaces": {
            "app": ns.app,
            "data": ns.data,
            "observability": ns.observability,
            "gateway": ns.gateway,
            "mesh": ns.mesh,
        },
        "endpoints": {
            "gateway": gateway.url,
            "service": app.url,
            "grafana": monitoring.grafana_url,
            "prometheus": monitoring.prometheus_url,
            "jaegerUi": tracing.ui,
            "otlp": tracing.otlp_endpoint,
            "postgresReadWrite": postgres.read_write_host,
            "redis": redis.host,
            "kafkaBootstrap": kafka.bootstrap,
        },
        "activeColor": mesh.active_color_location,
        "deployServiceAccount": f"{ns.app}/{DEPLOY_ACCOUNT}",
        "charts": {
            name: f"{chart.chart}@{chart.version}"
            for name, chart in (
                (field, getattr(env.platform.charts, field))
                for field in type(env.platform.charts).model_fields
            )
        },
    }
    for name, value in outputs.items():
        pulumi.export(name, value)
    return outputs
