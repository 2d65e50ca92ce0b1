"""Backups of a Kubernetes environment, through the one Kubernetes interface (opskit.kube.KubeClient).

The stacks declare the CloudNativePG `Cluster` with WAL archiving and a daily `ScheduledBackup` to object
storage (infra/postgres.py): point-in-time recovery comes from those. Here:
- `backup`: an on-demand CloudNativePG `Backup` of the cluster, waited for until `completed` (or
  `failed`), plus an export of the Kafka topic declarations (Strimzi `KafkaTopic` objects: names,
  partitions, replicas, configs) sealed with the backup key and kept beside it in the model's storage.
- `restore`: a NEW `Cluster` bootstrapped by recovery from the object store (optionally to a point in
  time), never the running one changed in place; switching the application to it is a reviewed change of
  the stack.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from opskit import backup_crypto, kuberollout
from opskit.backup_storage import Storage
from opskit.errors import BadInput, OperationFailed
from opskit.kube import KubeClient, KubeNotFound, object_path
from opskit.model import Environment

CNPG_API = "postgresql.cnpg.io/v1"
STRIMZI_API = "kafka.strimzi.io/v1beta2"
POSTGRES_CLUSTER = "maximus-postgres"  # as infra/common.py names it
KAFKA_CLUSTER = "maximus-kafka"
BACKUP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TARGET_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:?\d{2}|Z)$")
DEFAULT_TIMEOUT_S = 3600.0
POLL_S = 5.0
CONSUMER_OFFSETS = "not exported: consumer-group offsets need the Kafka admin API, not the Kubernetes one"


@dataclass
class KubeBackupReport:
    name: str
    environment: str
    namespace: str
    phase: str
    started_at: str | None
    stopped_at: str | None
    backup_id: str | None
    destination: str | None
    seconds: float
    kafka_topics: int
    kafka_export: str | None
    consumer_offsets: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KubeRestoreReport:
    cluster: str
    environment: str
    namespace: str
    source_backup: str
    target_time: str | None
    next_step: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_namespace(env: Environment) -> str:
    if env.kind != "kubernetes" or env.namespace is None:
        raise BadInput(f"--env: {env.name} is not a Kubernetes environment")
    return f"{env.namespace}-data"


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def kafka_topics(env: Environment, client: KubeClient) -> list[dict[str, Any]]:
    """The Strimzi KafkaTopic declarations of the environment's Kafka cluster, as restorable specs."""
    listing = client.get(object_path(STRIMZI_API, "kafkatopics", data_namespace(env)))
    topics = []
    for item in listing.get("items", []):
        labels = item.get("metadata", {}).get("labels") or {}
        if labels.get("strimzi.io/cluster") not in (None, KAFKA_CLUSTER):
            continue
        spec = item.get("spec") or {}
        topics.append(
            {
                "name": item["metadata"]["name"],
                "topicName": spec.get("topicName", item["metadata"]["name"]),
                "partitions": spec.get("partitions"),
                "replicas": spec.get("replicas"),
                "config": spec.get("config") or {},
                "ready": any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (item.get("status") or {}).get("conditions", [])
                ),
            }
        )
    return sorted(topics, key=lambda t: str(t["topicName"]))


def backup(
    env: Environment,
    client: KubeClient,
    *,
    storage: Storage | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_phase: Callable[[str], None] | None = None,
) -> KubeBackupReport:
    """Create an on-demand CloudNativePG Backup and wait for it; export the Kafka topic declarations."""
    namespace = data_namespace(env)
    name = f"{POSTGRES_CLUSTER}-ondemand-{_stamp()}"
    log = kuberollout.audit_log(env)
    started = clock()
    topics = kafka_topics(env, client)
    body = {
        "apiVersion": CNPG_API,
        "kind": "Backup",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "maximus-ops", "maximus.io/environment": env.name},
        },
        "spec": {"cluster": {"name": POSTGRES_CLUSTER}, "method": "barmanObjectStore"},
    }
    client.create(object_path(CNPG_API, "backups", namespace), body)
    phase = ""
    status: dict[str, Any] = {}
    while True:
        current = client.get(object_path(CNPG_API, "backups", namespace, name))
        status = current.get("status") or {}
        if (status.get("phase") or "pending") != phase:
            phase = str(status.get("phase") or "pending")
            if on_phase is not None:
                on_phase(phase)
        if phase == "completed":
            break
        if phase == "failed":
            reason = status.get("error") or "no reason given"
            log.write(env.name, "db.backup", result="failed", backup=name, reason=reason)
            raise OperationFailed(
                f"CloudNativePG backup {name} failed: {reason}; "
                f"`kubectl -n {namespace} describe backup {name}` and the operator's log say more"
            )
        if clock() - started > timeout_s:
            raise OperationFailed(
                f"CloudNativePG backup {name} is still {phase} after {timeout_s:.0f} s; it was left running: "
                f"`kubectl -n {namespace} get backup {name} -w`"
            )
        sleep(poll_s)
    export = _export_topics(env, storage, name, topics) if storage is not None else None
    report = KubeBackupReport(
        name=name,
        environment=env.name,
        namespace=namespace,
        phase=phase,
        started_at=status.get("startedAt"),
        stopped_at=status.get("stoppedAt"),
        backup_id=status.get("backupId"),
        destination=status.get("destinationPath"),
        seconds=round(clock() - started, 3),
        kafka_topics=len(topics),
        kafka_export=export,
        consumer_offsets=CONSUMER_OFFSETS,
    )
    log.write(env.name, "db.backup", result="ok", backup=name, kafka_topics=len(topics))
    return report


def _export_topics(env: Environment, storage: Storage, name: str, topics: list[dict[str, Any]]) -> str:
    """The topic declarations, sealed with the backup key, published as a backup of their own."""
    key = backup_crypto.load_key(env)
    export_id = "b-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    staged = storage.staging(export_id)
    document = json.dumps({"cnpg_backup": name, "kafka_topics": topics}, indent=2, sort_keys=True).encode()
    target = staged / "kafka" / "topics.json.zst.enc"
    target.parent.mkdir(parents=True)
    with target.open("wb") as out:
        size, digest = backup_crypto.seal(io.BytesIO(document), out, key, "zstd")
    manifest = {
        "format": 1,
        "id": export_id,
        "environment": env.name,
        "method": "cloudnative-pg",
        "cnpg_backup": name,
        "compression": "zstd",
        "encryption": "AES-256-GCM",
        "key_id": key.id,
        "files": {"kafka/topics.json.zst.enc": {"size": size, "sha256": digest}},
        "size": size,
        "verified": True,
    }
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    storage.publish(export_id, staged)
    return export_id


def restore(
    env: Environment,
    client: KubeClient,
    *,
    backup_name: str,
    into: str | None = None,
    target_time: str | None = None,
) -> KubeRestoreReport:
    """Bootstrap a new Cluster from the object store (the backup `backup_name`, or a point in time)."""
    namespace = data_namespace(env)
    if not BACKUP_NAME.fullmatch(backup_name):
        raise BadInput(
            f"--backup: {backup_name!r} is not a Backup name; accepted: one from `kubectl get backups`"
        )
    cluster = into or f"{POSTGRES_CLUSTER}-restore-{_stamp()}"
    if not BACKUP_NAME.fullmatch(cluster) or cluster == POSTGRES_CLUSTER:
        raise BadInput(
            f"--into: {cluster!r} is not accepted; accepted: a new Cluster name (the running one is never "
            "restored in place)"
        )
    if target_time is not None and not TARGET_TIME.fullmatch(target_time):
        raise BadInput(
            f"--target-time: {target_time!r}; accepted: an RFC 3339 time such as 2026-01-01T03:00:00Z"
        )
    try:
        found = client.get(object_path(CNPG_API, "backups", namespace, backup_name))
    except KubeNotFound:
        raise BadInput(f"--backup: no Backup {backup_name} in namespace {namespace}") from None
    if (found.get("status") or {}).get("phase") != "completed":
        raise BadInput(f"--backup: Backup {backup_name} is not completed; accepted: a completed backup")
    live = client.get(object_path(CNPG_API, "clusters", namespace, POSTGRES_CLUSTER))
    spec = dict(live.get("spec") or {})
    store = dict((spec.get("backup") or {}).get("barmanObjectStore") or {})
    if not store:
        raise OperationFailed(f"Cluster {POSTGRES_CLUSTER} has no barmanObjectStore; nothing to recover from")
    recovery: dict[str, Any] = {"source": "origin"}
    if target_time is not None:
        recovery["recoveryTarget"] = {"targetTime": target_time, "backupID": found["status"].get("backupId")}
    else:
        recovery["backup"] = {"name": backup_name}
        recovery.pop("source")
    bootstrap_db = (spec.get("bootstrap") or {}).get("initdb") or {}
    if bootstrap_db.get("database"):
        recovery["database"] = bootstrap_db["database"]
        recovery["owner"] = bootstrap_db.get("owner", bootstrap_db["database"])
        if bootstrap_db.get("secret"):
            recovery["secret"] = bootstrap_db["secret"]
    new_spec = {k: v for k, v in spec.items() if k not in ("bootstrap", "backup", "externalClusters")}
    new_spec["bootstrap"] = {"recovery": recovery}
    new_spec["externalClusters"] = [
        {"name": "origin", "barmanObjectStore": {**store, "serverName": POSTGRES_CLUSTER}}
    ]
    body = {
        "apiVersion": CNPG_API,
        "kind": "Cluster",
        "metadata": {
            "name": cluster,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "maximus-ops",
                "maximus.io/restored-from": backup_name,
            },
        },
        "spec": new_spec,
    }
    client.create(object_path(CNPG_API, "clusters", namespace), body)
    kuberollout.audit_log(env).write(
        env.name, "db.restore", result="ok", backup=backup_name, into=cluster, target_time=target_time
    )
    return KubeRestoreReport(
        cluster=cluster,
        environment=env.name,
        namespace=namespace,
        source_backup=backup_name,
        target_time=target_time,
        next_step=(
            f"wait for `kubectl -n {namespace} get cluster {cluster}` to report a healthy state, check it, "
            "then point the application at it through a reviewed stack change (runbooks/restore.md)"
        ),
    )
