"""PostgreSQL: the CloudNativePG operator and one `Cluster` with WAL archiving and scheduled base backups
to object storage, scraped by Prometheus through a PodMonitor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

from infra.alerts import Alert, Example, Group, seconds
from infra.common import (
    POSTGRES_CLUSTER,
    Component,
    Platform,
    chart_values_resources,
    container_security,
    resources,
)
from opskit.model import Resources

CNPG_API = "postgresql.cnpg.io/v1"
DATABASE = "hitl"
OWNER = "hitl"
IMAGE_REPOSITORY = "ghcr.io/cloudnative-pg/postgresql"
APP_CREDENTIALS = "maximus-postgres-app-credentials"
BACKUP_CREDENTIALS = "maximus-postgres-backup-credentials"
OPERATOR_SIZE = Resources()


@dataclass(frozen=True)
class PostgresArgs:
    platform: Platform
    app_password: pulumi.Output[str]
    backup_access_key_id: pulumi.Output[str]
    backup_secret_access_key: pulumi.Output[str]
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def retention_days(platform: Platform) -> int:
    """The longest span the model's backup retention keeps (daily, weekly or monthly copies)."""
    kept = platform.env.backup.retention
    return max(kept.daily, kept.weekly * 7, kept.monthly * 30, 1)


class Postgres(Component):
    """The CloudNativePG operator (pinned chart) and the environment's PostgreSQL cluster."""

    def __init__(self, name: str, args: PostgresArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Postgres", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces.data
        component = env.components["postgres"]
        storage = env.backup.storage
        if storage.kind != "s3" or not storage.bucket:
            raise ValueError("backup.storage: accepted on kubernetes: kind s3 with a bucket")

        operator = self.helm_release(
            "operator",
            "maximus-cnpg",
            env.platform.charts.cloudnative_pg,
            ns,
            {
                "config": {"clusterWide": False},
                "crds": {"create": True},
                "monitoring": {"podMonitorEnabled": False},
                "resources": chart_values_resources(OPERATOR_SIZE),
                "containerSecurityContext": container_security(),
            },
        )
        app_secret = k8s.core.v1.Secret(
            self.rname("app-credentials"),
            metadata=self.meta(APP_CREDENTIALS, ns),
            type="kubernetes.io/basic-auth",
            string_data={"username": OWNER, "password": args.app_password},
            opts=self.opts(),
        )
        backup_secret = k8s.core.v1.Secret(
            self.rname("backup-credentials"),
            metadata=self.meta(BACKUP_CREDENTIALS, ns),
            type="Opaque",
            string_data={
                "ACCESS_KEY_ID": args.backup_access_key_id,
                "ACCESS_SECRET_KEY": args.backup_secret_access_key,
            },
            opts=self.opts(),
        )
        object_store: dict[str, object] = {
            "destinationPath": f"s3://{storage.bucket}/postgres",
            "s3Credentials": {
                "accessKeyId": {"name": BACKUP_CREDENTIALS, "key": "ACCESS_KEY_ID"},
                "secretAccessKey": {"name": BACKUP_CREDENTIALS, "key": "ACCESS_SECRET_KEY"},
            },
            "wal": {"compression": "gzip", "encryption": "AES256", "maxParallel": 2},
            "data": {"compression": "gzip", "encryption": "AES256", "jobs": 2},
        }
        if storage.endpoint:
            object_store["endpointURL"] = storage.endpoint
        ha = component.instances > 1
        spec = {
            "instances": component.instances,
            "imageName": f"{IMAGE_REPOSITORY}:{env.platform.images.postgres}",
            "primaryUpdateStrategy": "unsupervised",
            # A backup's consistency point (a restore point, a WAL switch) and the restore drill's checksums
            # need the superuser; its Secret is for the backup and drill Jobs and admins (access-control.md).
            "enableSuperuserAccess": True,
            "storage": {"size": f"{component.storage_gi}Gi"},
            "walStorage": {"size": f"{max(component.storage_gi // 4, 1)}Gi"},
            "resources": resources(env.platform.sizes.postgres),
            "affinity": {
                "enablePodAntiAffinity": True,
                "topologyKey": "kubernetes.io/hostname",
                "podAntiAffinityType": "required" if ha else "preferred",
            },
            "postgresql": {
                "parameters": {
                    "max_connections": "200",
                    "shared_buffers": "256MB",
                    "log_min_duration_statement": "250",
                }
            },
            "bootstrap": {
                "initdb": {"database": DATABASE, "owner": OWNER, "secret": {"name": APP_CREDENTIALS}}
            },
            "backup": {
                "barmanObjectStore": object_store,
                "retentionPolicy": f"{retention_days(args.platform)}d",
            },
            "monitoring": {"enablePodMonitor": False},
            "inheritedMetadata": {"labels": self.platform.labels("postgres", POSTGRES_CLUSTER)},
        }
        if ha:
            spec["minSyncReplicas"] = 1
            spec["maxSyncReplicas"] = 1
        self.cluster = self.custom(
            "cluster",
            CNPG_API,
            "Cluster",
            self.meta(POSTGRES_CLUSTER, ns),
            spec,
            depends_on=[operator, app_secret, backup_secret],
            protect=True,
        )
        self.custom(
            "scheduled-backup",
            CNPG_API,
            "ScheduledBackup",
            self.meta(f"{POSTGRES_CLUSTER}-daily", ns),
            {
                # CloudNativePG's schedule has a leading seconds field.
                "schedule": f"0 {env.backup.schedule}",
                "backupOwnerReference": "self",
                "cluster": {"name": POSTGRES_CLUSTER},
                "method": "barmanObjectStore",
                "immediate": True,
            },
            depends_on=[self.cluster],
        )
        self.custom(
            "podmonitor",
            "monitoring.coreos.com/v1",
            "PodMonitor",
            self.meta(POSTGRES_CLUSTER, ns),
            {
                "selector": {"matchLabels": {"cnpg.io/cluster": POSTGRES_CLUSTER}},
                "podMetricsEndpoints": [{"port": "metrics", "interval": "30s"}],
            },
            depends_on=[self.cluster],
        )
        self.read_write_host = f"{POSTGRES_CLUSTER}-rw.{ns}.svc.cluster.local"
        self.register_outputs({"readWriteHost": self.read_write_host})


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------

BACKUP_MAX_AGE = "26h"  # a daily backup, plus two hours of slack
# Written by the backup tooling (opskit/backup.py) with the labels service and environment; its restore
# drill alerts live beside it in infra/backup.rules.yml.
BACKUP_METRIC = "maximus_backup_last_success_timestamp_seconds"


def alerts(service: str) -> Group:
    """PostgreSQL: CloudNativePG's exporter, plus the backup tooling's last-success timestamp."""
    backup = BACKUP_METRIC
    return Group(
        "postgres",
        [
            Alert(
                name="PostgresReplicationLag",
                expr="max by (namespace, pod) (cnpg_pg_replication_lag) > 30",
                for_="5m",
                severity="warning",
                summary="PostgreSQL replica {{ $labels.pod }} is more than 30 s behind its primary",
                description=(
                    "Streaming replication of {{ $labels.namespace }}/{{ $labels.pod }} lags by more than "
                    "30 seconds for 5 minutes: a failover now would lose those writes."
                ),
                example=Example(
                    {'cnpg_pg_replication_lag{namespace="data", pod="pg-2"}': "0 0 90x20"},
                    "10m",
                    {"namespace": "data", "pod": "pg-2"},
                ),
            ),
            Alert(
                name="PostgresConnectionsNearMax",
                expr=(
                    "sum by (namespace, pod) (cnpg_backends_total)\n/ max by (namespace, pod) "
                    '(cnpg_pg_settings_setting{name="max_connections"}) > 0.8'
                ),
                for_="5m",
                severity="warning",
                summary="PostgreSQL {{ $labels.pod }} uses more than 80% of max_connections",
                description=(
                    "{{ $labels.namespace }}/{{ $labels.pod }} has more than 80% of its max_connections in "
                    "use for 5 minutes; new connections will soon be refused."
                ),
                example=Example(
                    {
                        'cnpg_backends_total{namespace="data", pod="pg-1", datname="hitl"}': "10 90x20",
                        'cnpg_pg_settings_setting{namespace="data", pod="pg-1", name="max_connections"}': (
                            "100x21"
                        ),
                    },
                    "10m",
                    {"namespace": "data", "pod": "pg-1"},
                ),
            ),
            Alert(
                name="PostgresBackupTooOld",
                expr=(
                    f'time() - max by (service, environment) ({backup}{{service="{service}"}}) '
                    f"> {seconds(BACKUP_MAX_AGE)}"
                ),
                severity="warning",
                summary=f"the last successful PostgreSQL backup of {service} is older than {BACKUP_MAX_AGE}",
                description=(
                    f"No backup of {{{{ $labels.service }}}} in {{{{ $labels.environment }}}} succeeded in "
                    f"{BACKUP_MAX_AGE} (the schedule is daily): a restore now would lose more than a day."
                ),
                example=Example(
                    # a backup that succeeded 25h50m before the test began: too old from minute 10
                    {
                        f'{backup}{{service="{service}", environment="test"}}': (
                            f"{600 - seconds(BACKUP_MAX_AGE)}x20"
                        )
                    },
                    "15m",
                    {"service": service, "environment": "test"},
                ),
            ),
        ],
    )
