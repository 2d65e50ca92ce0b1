"""Backups of a Kubernetes environment, through the one Kubernetes interface (opskit.kube.KubeClient).

The stacks declare the CloudNativePG `Cluster` with WAL archiving and a daily `ScheduledBackup` to object
storage (infra/postgres.py): point-in-time recovery comes from those. Here:
- `backup`: an on-demand CloudNativePG `Backup` of the cluster, waited for until `completed` (or
  `failed`), plus an export of the Kafka topic declarations (Strimzi `KafkaTopic` objects: names,
  partitions, replicas, configs) and of the consumer groups' committed offsets, sealed with the backup key
  and kept beside it in the model's storage.
- The offsets come from the cluster's Prometheus (kafka-exporter's `kafka_consumergroup_current_offset`,
  through the API server's service proxy) and are read BEFORE the database backup starts: restored with
  the database, consumers re-read what they had read after that moment (duplicates, which idempotent
  consumers absorb) instead of skipping what the database never saw (loss). When they cannot be read,
  the database backup is still made and kept, the export says `unavailable (why)`, and `backup` raises
  `OffsetsNotExported` (exit 1) naming what was made and what to do.
- `restore`: a NEW `Cluster` bootstrapped by recovery from the object store (optionally to a point in
  time), never the running one changed in place; switching the application to it is a reviewed change of
  the stack.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opskit import backup_crypto, kuberollout
from opskit.analysis import PrometheusProvider, ProviderError
from opskit.backup_storage import MANIFEST, Storage
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
OFFSETS_METRIC = "kafka_consumergroup_current_offset"
EXPORTER_METRIC = "kafka_brokers"  # every kafka-exporter scrape has it, with or without consumer groups
OFFSETS_FILE = "kafka/consumer-offsets.json"
GROUP_FILE = re.compile(r"[^A-Za-z0-9._-]")
SEALED = backup_crypto.SUFFIX["zstd"]


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
    consumer_groups: int = 0
    offsets_read_at: str | None = None
    offsets_restore: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class OffsetsNotExported(OperationFailed):
    """The database backup completed and is kept, but the consumer-group offsets were not exported."""

    def __init__(self, message: str, report: KubeBackupReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ConsumerOffsets:
    """Committed offsets per consumer group, as Prometheus had them when they were read."""

    read_at: str
    source: str
    query: str
    sampled_at: str | None
    groups: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def partitions(self) -> int:
        return sum(len(rows) for rows in self.groups.values())


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


def offsets_query(env: Environment) -> str:
    namespace = data_namespace(env)
    return f'max by (consumergroup, topic, partition) ({OFFSETS_METRIC}{{namespace="{namespace}"}})'


def consumer_offsets(
    env: Environment,
    provider: PrometheusProvider,
    *,
    now: Callable[[], datetime] | None = None,
) -> ConsumerOffsets:
    """The committed offset of every consumer group on every partition (ProviderError when Prometheus
    cannot answer or kafka-exporter is not scraped)."""
    read_at = (now or (lambda: datetime.now(UTC)))().isoformat(timespec="seconds")
    query = offsets_query(env)
    data = provider.query_data(query)
    samples = _vector(data, provider.describe())
    found = ConsumerOffsets(read_at=read_at, source=provider.describe(), query=query, sampled_at=None)
    if not samples:
        exporter = _vector(
            provider.query_data(f'{EXPORTER_METRIC}{{namespace="{data_namespace(env)}"}}'),
            provider.describe(),
        )
        if not exporter:
            raise ProviderError(
                f"{provider.describe()} has no {EXPORTER_METRIC} series in {data_namespace(env)}: "
                "kafka-exporter is not running or not scraped"
            )
        return found
    stamps = []
    for labels, stamp, value in samples:
        group, topic, partition = labels.get("consumergroup"), labels.get("topic"), labels.get("partition")
        if not group or not topic or partition is None or not str(partition).isdigit():
            raise ProviderError(
                f"{provider.describe()}: a {OFFSETS_METRIC} series without its labels: {labels}"
            )
        if math.isnan(value) or value < 0:  # no committed offset on that partition
            found.skipped.append(f"{group} {topic}/{partition}: no committed offset")
            continue
        stamps.append(stamp)
        found.groups.setdefault(str(group), []).append(
            {"topic": str(topic), "partition": int(partition), "offset": int(value)}
        )
    for rows in found.groups.values():
        rows.sort(key=lambda r: (r["topic"], r["partition"]))
    found.groups = dict(sorted(found.groups.items()))
    if stamps:
        found.sampled_at = datetime.fromtimestamp(min(stamps), UTC).isoformat(timespec="seconds")
    return found


def _vector(data: Any, source: str) -> list[tuple[dict[str, str], float, float]]:
    try:
        if data.get("resultType") != "vector":
            raise ProviderError(f"{source}: expected a vector, got {data.get('resultType')!r}")
        return [
            (dict(item.get("metric") or {}), float(item["value"][0]), float(item["value"][1]))
            for item in data.get("result") or []
        ]
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        raise ProviderError(f"{source}: unreadable answer ({type(exc).__name__}: {exc})") from None


def group_file(group: str) -> str:
    """A file name for a consumer group's CSV: its name when that is safe, else a cleaned one with a hash."""
    cleaned = GROUP_FILE.sub("_", group)[:100]
    if cleaned != group or cleaned.startswith("."):
        cleaned = f"{cleaned.lstrip('.')}-{hashlib.sha256(group.encode()).hexdigest()[:8]}"
    return f"kafka/offsets/{cleaned}.csv"


def offsets_csv(rows: list[dict[str, Any]]) -> str:
    """`kafka-consumer-groups.sh --reset-offsets --from-file` input: topic,partition,offset per line."""
    return "".join(f"{r['topic']},{r['partition']},{r['offset']}\n" for r in rows)


def restore_instructions(env: Environment, export_id: str) -> str:
    return (
        f"stop the group's consumers; `invoke db.offsets --env {env.name} --backup {export_id} --out DIR` "
        "writes one CSV per group; then per group `kafka-consumer-groups.sh "
        "--bootstrap-server BROKER --group GROUP --reset-offsets --from-file DIR/GROUP.csv --dry-run`, "
        "and `--execute` once the plan is right (runbooks/restore.md)"
    )


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
    prometheus: PrometheusProvider | None = None,
) -> KubeBackupReport:
    """Create an on-demand CloudNativePG Backup and wait for it; export the Kafka topic declarations and
    the consumer groups' offsets (read first). OffsetsNotExported when the offsets could not be read."""
    namespace = data_namespace(env)
    name = f"{POSTGRES_CLUSTER}-ondemand-{_stamp()}"
    log = kuberollout.audit_log(env)
    started = clock()
    topics = kafka_topics(env, client)
    offsets: ConsumerOffsets | None = None
    unavailable = ""
    provider = prometheus or kuberollout.prometheus(env, client)
    try:
        offsets = consumer_offsets(env, provider)
    except ProviderError as exc:
        unavailable = str(exc)
    finally:
        if prometheus is None:
            provider.client.close()
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
    export = (
        _export_kafka(env, storage, name, topics=topics, offsets=offsets, unavailable=unavailable)
        if storage is not None
        else None
    )
    if offsets is not None:
        summary = (
            f"{'exported' if export else 'read (no storage given)'}: {len(offsets.groups)} groups, "
            f"{offsets.partitions()} partitions, read at {offsets.read_at} (before the database backup)"
        )
    else:
        summary = f"unavailable ({unavailable})"
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
        consumer_offsets=summary,
        consumer_groups=len(offsets.groups) if offsets is not None else 0,
        offsets_read_at=offsets.read_at if offsets is not None else None,
        offsets_restore=restore_instructions(env, export) if offsets is not None and export else None,
    )
    log.write(
        env.name,
        "db.backup",
        result="ok",
        backup=name,
        kafka_topics=len(topics),
        kafka_export=export,
        consumer_offsets=summary,
    )
    if offsets is None:
        raise OffsetsNotExported(
            f"the database backup {name} completed and is kept"
            + (f" (Kafka topic export {export})" if export else "")
            + f", but the Kafka consumer-group offsets were NOT exported: {unavailable}. "
            f"Make Prometheus answer (`kubectl -n {kuberollout.observability_namespace(env)} get pods`) and "
            f"run `invoke db.backup --env {env.name}` again, or record them by hand now with "
            "`kafka-consumer-groups.sh --describe --all-groups`",
            report,
        )
    return report


def _seal_into(staged: Path, name: str, content: bytes, key: backup_crypto.BackupKey) -> dict[str, Any]:
    target = staged / f"{name}{SEALED}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        size, digest = backup_crypto.seal(io.BytesIO(content), out, key, "zstd")
        out.flush()
        os.fsync(out.fileno())
    return {"size": size, "sha256": digest}


def _export_kafka(
    env: Environment,
    storage: Storage,
    name: str,
    *,
    topics: list[dict[str, Any]],
    offsets: ConsumerOffsets | None,
    unavailable: str,
) -> str:
    """The topic declarations and the consumer offsets, sealed with the backup key, published as a backup
    of their own: `kafka/topics.json`, `kafka/consumer-offsets.json` and one `kafka/offsets/<group>.csv`
    per group."""
    key = backup_crypto.load_key(env)
    export_id = "b-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    staged = storage.staging(export_id)
    files: dict[str, dict[str, Any]] = {}
    document = json.dumps({"cnpg_backup": name, "kafka_topics": topics}, indent=2, sort_keys=True).encode()
    files[f"kafka/topics.json{SEALED}"] = _seal_into(staged, "kafka/topics.json", document, key)
    record: dict[str, Any]
    if offsets is None:
        record = {"status": "unavailable", "reason": unavailable}
    else:
        group_files = {group: group_file(group) for group in offsets.groups}
        record = {
            "status": "exported",
            "read_at": offsets.read_at,
            "sampled_at": offsets.sampled_at,
            "source": offsets.source,
            "groups": len(offsets.groups),
            "partitions": offsets.partitions(),
            "files": {group: f"{path}{SEALED}" for group, path in group_files.items()},
        }
        body = {
            "cnpg_backup": name,
            "read_before_backup": True,
            **{k: v for k, v in asdict(offsets).items()},
            "files": group_files,
            "restore": restore_instructions(env, export_id),
        }
        files[f"{OFFSETS_FILE}{SEALED}"] = _seal_into(
            staged, OFFSETS_FILE, json.dumps(body, indent=2, sort_keys=True).encode(), key
        )
        for group, rows in offsets.groups.items():
            files[f"{group_files[group]}{SEALED}"] = _seal_into(
                staged, group_files[group], offsets_csv(rows).encode(), key
            )
    manifest = {
        "format": 1,
        "id": export_id,
        "environment": env.name,
        "method": "cloudnative-pg",
        "cnpg_backup": name,
        "compression": "zstd",
        "encryption": "AES-256-GCM",
        "key_id": key.id,
        "files": files,
        "size": sum(f["size"] for f in files.values()),
        "consumer_offsets": record,
        "verified": True,
    }
    manifest["mac"] = backup_crypto.manifest_mac(manifest, key)
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    storage.publish(export_id, staged)
    return export_id


def write_offsets(env: Environment, storage: Storage, export_id: str, out: Path) -> list[Path]:
    """Decrypt an export's per-group offset CSVs into `out` (mode 0600 files); the paths written."""
    key = backup_crypto.load_key(env)
    manifest = storage.manifest(export_id)
    record = manifest.get("consumer_offsets") or {}
    if record.get("status") != "exported":
        why = record.get("reason", "made before they were exported")
        raise BadInput(f"--backup: {export_id} holds no consumer offsets ({why})")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    scratch = out / ".fetched"
    for group, name in sorted(record["files"].items()):
        stored = storage.fetch(export_id, name, scratch)
        if _file_sha256(stored) != manifest["files"][name]["sha256"]:
            raise OperationFailed(f"backup {export_id}: {name} fails its sha256 (changed or damaged)")
        target = out / Path(name.removesuffix(SEALED)).name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with stored.open("rb") as source, os.fdopen(fd, "wb") as sink:
            backup_crypto.unseal(source, sink, key, "zstd", f"{export_id}/{name} ({group})")
        written.append(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
