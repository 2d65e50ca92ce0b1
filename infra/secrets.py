"""The stack's secrets: Pulumi config secrets (`pulumi config set --secret maximus:KEY`), never in the model.

Each is read with `Config.get_secret`, so its value stays an encrypted, secret Output from the stack file
to the Kubernetes Secret that carries it; nothing else sees the plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from opskit.errors import BadInput
from opskit.model import Environment

NAMESPACE = "maximus"
SECRET_KEYS: dict[str, str] = {
    "postgresAppPassword": "password of the application's PostgreSQL role",
    "postgresBackupAccessKeyId": "object-storage access key id for PostgreSQL base backups and WAL",
    "postgresBackupSecretAccessKey": "object-storage secret key for PostgreSQL base backups and WAL",
    "redisPassword": "Redis `requirepass`",
    "grafanaAdminPassword": "Grafana's admin password",
    "alertmanagerSlackWebhookUrl": "Slack incoming-webhook URL of #maximus-alerts",
    "alertmanagerPagerdutyRoutingKey": "PagerDuty routing key for critical alerts",
    "gatewayApiKey": "the API key (X-API-Key) of the gateway's first consumer",
    "gatewayDeployApiKey": "the API key of the deploy tooling's own gateway consumer (pre-promotion smoke)",
}
BUILD_SECRET_KEY = "registryPassword"  # noqa: S105 - a config key
TLS_SECRET_KEYS: dict[str, str] = {
    "gatewayTlsCertificate": "the gateway's PEM certificate chain (when no cert-manager issuer is set)",
    "gatewayTlsPrivateKey": "the gateway's PEM private key (when no cert-manager issuer is set)",
}


DESCRIPTIONS = {**SECRET_KEYS, **TLS_SECRET_KEYS}


def required_keys(env: Environment) -> list[str]:
    keys = list(SECRET_KEYS)
    if env.platform.gateway.cluster_issuer is None:
        keys.extend(TLS_SECRET_KEYS)
    if env.platform.build is not None:
        keys.append(BUILD_SECRET_KEY)
    return keys


@dataclass(frozen=True)
class StackSecrets:
    postgres_app_password: pulumi.Output[str]
    postgres_backup_access_key_id: pulumi.Output[str]
    postgres_backup_secret_access_key: pulumi.Output[str]
    redis_password: pulumi.Output[str]
    grafana_admin_password: pulumi.Output[str]
    alertmanager_slack_webhook_url: pulumi.Output[str]
    alertmanager_pagerduty_routing_key: pulumi.Output[str]
    gateway_api_key: pulumi.Output[str]
    gateway_deploy_api_key: pulumi.Output[str]
    registry_password: pulumi.Output[str] | None
    gateway_tls: tuple[pulumi.Output[str], pulumi.Output[str]] | None


def load_secrets(env: Environment) -> StackSecrets:
    """Every secret the stack needs, as secret Outputs; the first missing one stops with its key."""
    config = pulumi.Config(NAMESPACE)
    values: dict[str, pulumi.Output[str]] = {}
    for key in required_keys(env):
        value = config.get_secret(key)
        if value is None:
            raise BadInput(
                f"config {NAMESPACE}:{key}: missing secret ({DESCRIPTIONS.get(key, 'registry password')}); "
                f"set it with `pulumi config set --secret {NAMESPACE}:{key}` on stack {env.name}"
            )
        values[key] = value
    return StackSecrets(
        postgres_app_password=values["postgresAppPassword"],
        postgres_backup_access_key_id=values["postgresBackupAccessKeyId"],
        postgres_backup_secret_access_key=values["postgresBackupSecretAccessKey"],
        redis_password=values["redisPassword"],
        grafana_admin_password=values["grafanaAdminPassword"],
        alertmanager_slack_webhook_url=values["alertmanagerSlackWebhookUrl"],
        alertmanager_pagerduty_routing_key=values["alertmanagerPagerdutyRoutingKey"],
        gateway_api_key=values["gatewayApiKey"],
        gateway_deploy_api_key=values["gatewayDeployApiKey"],
        registry_password=values.get(BUILD_SECRET_KEY),
        gateway_tls=(
            (values["gatewayTlsCertificate"], values["gatewayTlsPrivateKey"])
            if "gatewayTlsCertificate" in values
            else None
        ),
    )
