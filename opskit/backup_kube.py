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
- The restore drill's reference (`backup(checksums=True)`, what `invoke db.backup` does): once the Backup
  completed, a Job in the data namespace creates a named restore point as the first statement of a
  repeatable read transaction and counts every table in that snapshot with opskit.pgtools' queries; the
  figures go into the export's manifest.
- `drill`: the newest backup with recorded figures recovered into a scratch `Cluster` up to its restore
  point, counted the same way, compared table by table; the scratch is always deleted; the RTO is audited.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
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

from psycopg import sql

from opskit import backup_crypto, kuberollout, pgtools
from opskit.analysis import PrometheusProvider, ProviderError
from opskit.backup_storage import MANIFEST, Storage
from opskit.errors import BadInput, OperationFailed
from opskit.kube import KubeClient, KubeConflict, KubeError, KubeNotFound, object_path
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
# The restore drill's scratch Cluster and the checksum Jobs have fixed names: the drill's RBAC can then name
# them (get/delete narrowed by resourceNames, never the live Cluster), and a second drill running at the same
# time is refused by the API server (409) instead of sharing a scratch.
DRILL_CLUSTER = f"{POSTGRES_CLUSTER}-drill"
CHECKSUM_JOBS = {
    POSTGRES_CLUSTER: f"{POSTGRES_CLUSTER}-checksums",
    DRILL_CLUSTER: f"{DRILL_CLUSTER}-checksums",
}
HEALTHY = "Cluster in healthy state"  # CloudNativePG's status.phase of a cluster that serves
JOB_TTL_S = 600  # a finished checksum Job the tooling could not delete is removed by Kubernetes after this
CHECKSUM_GUC = "maximus.checksums"


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
    checksums: str | None = None
    restore_point: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BackupIncomplete(OperationFailed):
    """The database backup completed and is kept, but something made with it is missing; `report` says."""

    def __init__(self, message: str, report: KubeBackupReport) -> None:
        super().__init__(message)
        self.report = report


class OffsetsNotExported(BackupIncomplete):
    """The consumer-group offsets were not exported."""


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


class ChecksumsNotRecorded(BackupIncomplete):
    """The consistency point and checksums were not recorded: the restore drill cannot use the backup."""


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
    checksums: bool = False,
) -> KubeBackupReport:
    """Create an on-demand CloudNativePG Backup and wait for it; export the Kafka topic declarations and
    the consumer groups' offsets (read first). OffsetsNotExported when the offsets could not be read.

    `checksums`: once the backup completed, record a consistency point for the restore drill (a named
    restore point and every table's row count and checksum in the same snapshot, see `record_consistency`)
    in the export's manifest; ChecksumsNotRecorded (the backup is kept) when that fails.
    """
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
    consistency: dict[str, Any] | None = None
    if checksums:
        try:
            consistency = record_consistency(
                env, client, name, timeout_s=timeout_s, poll_s=poll_s, sleep=sleep, clock=clock
            )
        except OperationFailed as exc:
            consistency = {"status": "unavailable", "reason": str(exc)}
    export = (
        _export_kafka(
            env,
            storage,
            name,
            topics=topics,
            offsets=offsets,
            unavailable=unavailable,
            consistency=consistency,
        )
        if storage is not None
        else None
    )
    recorded = consistency is not None and consistency["status"] == "recorded"
    checksum_summary: str | None = None
    if consistency is not None:
        checksum_summary = (
            f"recorded: {len(consistency['tables'])} tables, "
            f"{sum(int(t['rows']) for t in consistency['tables'].values())} rows at restore point "
            f"{consistency['restore_point']}"
            if recorded
            else f"unavailable ({consistency['reason']})"
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
        checksums=checksum_summary,
        restore_point=str(consistency["restore_point"]) if consistency is not None and recorded else None,
    )
    log.write(
        env.name,
        "db.backup",
        result="ok",
        backup=name,
        kafka_topics=len(topics),
        kafka_export=export,
        consumer_offsets=summary,
        **({"checksums": checksum_summary} if checksum_summary is not None else {}),
    )
    not_recorded = (
        f"; its consistency point and checksums for the restore drill were NOT recorded either: "
        f"{consistency['reason']}"
        if consistency is not None and not recorded
        else ""
    )
    if offsets is None:
        raise OffsetsNotExported(
            f"the database backup {name} completed and is kept"
            + (f" (Kafka topic export {export})" if export else "")
            + f", but the Kafka consumer-group offsets were NOT exported: {unavailable}. "
            f"Make Prometheus answer (`kubectl -n {kuberollout.observability_namespace(env)} get pods`) and "
            f"run `invoke db.backup --env {env.name}` again, or record them by hand now with "
            "`kafka-consumer-groups.sh --describe --all-groups`" + not_recorded,
            report,
        )
    if consistency is not None and not recorded:
        raise ChecksumsNotRecorded(
            f"the database backup {name} completed and is kept"
            + (f" (export {export})" if export else "")
            + f", but its consistency point and checksums were NOT recorded, so the restore drill cannot "
            f"use it: {consistency['reason']}. Fix that and run `invoke db.backup --env {env.name}` again "
            "(runbooks/restore.md)",
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
    consistency: dict[str, Any] | None = None,
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
    if consistency is not None:  # the restore drill's reference: restore point and per-table checksums
        manifest["consistency"] = consistency
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
    recovery: dict[str, Any] = {"source": "origin"}
    if target_time is not None:
        recovery["recoveryTarget"] = {"targetTime": target_time, "backupID": found["status"].get("backupId")}
    else:
        recovery["backup"] = {"name": backup_name}
        recovery.pop("source")
    body = _recovery_cluster(live, cluster, namespace, recovery, {"maximus.io/restored-from": backup_name})
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


def _recovery_cluster(
    live: dict[str, Any], cluster: str, namespace: str, recovery: dict[str, Any], labels: dict[str, str]
) -> dict[str, Any]:
    """A new Cluster like the live one, bootstrapped by `recovery` from the live one's object store; it does
    not archive into that store (no `backup` section)."""
    spec = dict(live.get("spec") or {})
    store = dict((spec.get("backup") or {}).get("barmanObjectStore") or {})
    if not store:
        raise OperationFailed(f"Cluster {POSTGRES_CLUSTER} has no barmanObjectStore; nothing to recover from")
    recovery = dict(recovery)
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
    return {
        "apiVersion": CNPG_API,
        "kind": "Cluster",
        "metadata": {
            "name": cluster,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "maximus-ops", **labels},
        },
        "spec": new_spec,
    }


# --- consistency point and checksums, in the cluster ---------------------------------------------------


def _template(query: sql.Composable) -> str:
    """A checksum query of opskit.pgtools as a `format()` template: the table as `%I.%I`."""
    return query.format(sql.SQL("%I.%I")).as_string() if isinstance(query, sql.SQL) else query.as_string()


def checksum_sql(*, restore_point: str | None, methods: dict[str, str] | None) -> str:
    """The psql script of the checksum Job: every user table's row count and checksum with the queries and
    method choice of opskit.pgtools (the same figures a single-machine backup records), in ONE repeatable
    read transaction, printed as one JSON line.

    With `restore_point`: the transaction's first statement creates that named restore point, so the
    snapshot the tables are counted in is taken just before the restore point's WAL record; after COMMIT,
    pg_switch_wal() closes the WAL segment so it is archived. `methods` (table -> "record" | "text", from the
    backup's record) makes the counts comparable; without it each table's method is chosen as pgtools does.
    Session settings that shape a row's text form are fixed, so "text" checksums do not depend on the role's
    or database's defaults.
    """
    literal = sql.Literal
    queries = {method: _template(query) for method, query in pgtools.CHECKSUM_QUERIES.items()}
    tables_query = pgtools.TABLES_QUERY % (pgtools.FIRST_USER_OID,)
    body = f"""
DECLARE
  methods jsonb := {literal(json.dumps(methods)).as_string() if methods is not None else "NULL"}::jsonb;
  queries jsonb := {literal(json.dumps(queries)).as_string()}::jsonb;
  probe text := {literal(_template(pgtools.PROBE_QUERY)).as_string()};
  found jsonb := '{{}}'::jsonb;
  s text; t text; blocks bigint; built_in boolean; m text; n bigint; c text;
BEGIN
  FOR s, t, blocks, built_in IN EXECUTE {literal(tables_query).as_string()} LOOP
    IF methods IS NOT NULL THEN
      m := coalesce(methods ->> (s || '.' || t), 'text');
    ELSIF built_in THEN
      BEGIN
        EXECUTE format(probe, s, t);
        m := 'record';
      EXCEPTION WHEN undefined_function THEN
        m := 'text';
      END;
    ELSE
      m := 'text';
    END IF;
    IF NOT queries ? m THEN
      RAISE EXCEPTION 'table %.%: checksum method % is not known here', s, t, m;
    END IF;
    EXECUTE format(queries ->> m, s, t) INTO n, c;
    found := found
      || jsonb_build_object(s || '.' || t, jsonb_build_object('rows', n, 'checksum', c, 'method', m));
  END LOOP;
  PERFORM set_config('{CHECKSUM_GUC}', found::text, true);
END"""
    lines = [
        "SET TimeZone TO 'UTC';",
        "SET DateStyle TO 'ISO, YMD';",
        "SET IntervalStyle TO 'postgres';",
        "SET extra_float_digits TO 1;",
        "SET bytea_output TO 'hex';",
        "BEGIN ISOLATION LEVEL REPEATABLE READ;",
    ]
    if restore_point is not None:
        lines.append(
            f"SELECT pg_create_restore_point({literal(restore_point).as_string()}) AS lsn, "
            "pg_current_snapshot() AS snapshot \\gset"
        )
    else:
        lines.append("SELECT '' AS lsn, pg_current_snapshot() AS snapshot \\gset")  # psql unsets NULLs
    lines += [
        f"DO $maximus${body}\n$maximus$;",
        f"SELECT current_setting('{CHECKSUM_GUC}') AS tables \\gset",
        "COMMIT;",
        "SELECT pg_switch_wal() AS switched \\gset"
        if restore_point is not None
        else "SELECT '' AS switched \\gset",
        "SELECT json_build_object('lsn', NULLIF(:'lsn', ''), 'snapshot', :'snapshot', "
        "'switched', NULLIF(:'switched', ''), 'tables', :'tables'::json);",
    ]
    return "\n".join(lines) + "\n"


def _job_body(
    namespace: str, job: str, cluster: str, *, live: dict[str, Any], script: str, timeout_s: float
) -> dict[str, Any]:
    """A one-pod Job running `script` with psql against `cluster`'s primary, as its superuser (the Secret
    CloudNativePG keeps when `enableSuperuserAccess` is on), under Pod Security `restricted`."""
    spec = live.get("spec") or {}
    image = spec.get("imageName")
    if not image:
        raise OperationFailed(f"Cluster {POSTGRES_CLUSTER} names no spec.imageName to run psql from")
    database = ((spec.get("bootstrap") or {}).get("initdb") or {}).get("database") or "app"
    labels = {"app.kubernetes.io/managed-by": "maximus-ops", "app.kubernetes.io/name": job}
    secret = f"{cluster}-superuser"
    env = [
        {"name": "PGHOST", "value": f"{cluster}-rw"},
        {"name": "PGPORT", "value": "5432"},
        {"name": "PGDATABASE", "value": database},
        {"name": "PGSSLMODE", "value": "require"},
        {"name": "PGCONNECT_TIMEOUT", "value": "10"},
        {"name": "PGAPPNAME", "value": "maximus-ops checksums"},
        {"name": "PGUSER", "valueFrom": {"secretKeyRef": {"name": secret, "key": "username"}}},
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
        {"name": "MAXIMUS_SQL", "value": script},
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": max(int(timeout_s), 60),
            "ttlSecondsAfterFinished": JOB_TTL_S,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "psql",
                            "image": image,
                            "command": [
                                "sh",
                                "-c",
                                'printf "%s\\n" "$MAXIMUS_SQL" | psql -X -q -A -t -v ON_ERROR_STOP=1',
                            ],
                            "env": env,
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "64Mi"},
                                "limits": {"cpu": "500m", "memory": "256Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


def _job_pod_log(client: KubeClient, namespace: str, job: str) -> tuple[str, str]:
    """The name and log of the Job's pod (the newest, when there are several)."""
    pods = client.get(f"{object_path('v1', 'pods', namespace)}?labelSelector=job-name%3D{job}")
    items = sorted(
        pods.get("items") or [],
        key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""),
    )
    if not items:
        raise OperationFailed(
            f"Job {job} has no pod to read a log from (`kubectl -n {namespace} describe job {job}`)"
        )
    pod = str(items[-1]["metadata"]["name"])
    return pod, client.get_text(f"{object_path('v1', 'pods', namespace, pod)}/log")


def parse_checksums(log: str, where: str) -> dict[str, Any]:
    """The checksum Job's JSON line from its log: lsn, snapshot, switched and the tables."""
    for line in reversed(log.splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
                tables = data["tables"]
                if not isinstance(tables, dict):
                    raise TypeError("tables is not an object")
                for table, row in tables.items():
                    tables[table] = {
                        "rows": int(row["rows"]),
                        "checksum": str(row["checksum"]),
                        "method": str(row["method"]),
                    }
            except (ValueError, KeyError, TypeError) as exc:
                raise OperationFailed(f"{where}: its output is not the expected JSON ({exc})") from None
            return dict(data)
    last = (log.strip().splitlines() or ["an empty log"])[-1]
    raise OperationFailed(f"{where}: no JSON line in its log (last line: {last[:200]})")


def run_checksums(
    env: Environment,
    client: KubeClient,
    cluster: str,
    *,
    live: dict[str, Any],
    restore_point: str | None = None,
    methods: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Run the checksum Job against `cluster` and return what it printed; the Job is deleted after."""
    namespace = data_namespace(env)
    job = CHECKSUM_JOBS[cluster]
    where = f"checksum Job {job} (cluster {cluster})"
    script = checksum_sql(restore_point=restore_point, methods=methods)
    body = _job_body(namespace, job, cluster, live=live, script=script, timeout_s=timeout_s)
    jobs = object_path("batch/v1", "jobs", namespace)
    try:
        client.create(jobs, body)
    except KubeConflict:
        raise OperationFailed(
            f"{where}: a Job {job} exists already (another backup or drill is running, or one was "
            f"interrupted; Kubernetes removes a finished one {JOB_TTL_S} s after it ends): "
            f"`kubectl -n {namespace} delete job {job}` once nothing uses it"
        ) from None
    started = clock()
    try:
        while True:
            status = client.get(f"{jobs}/{job}").get("status") or {}
            conditions = {
                c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
            }
            if int(status.get("succeeded") or 0) >= 1 or "Complete" in conditions:
                _, log = _job_pod_log(client, namespace, job)
                return parse_checksums(log, where)
            if int(status.get("failed") or 0) >= 1 or "Failed" in conditions:
                try:
                    _, log = _job_pod_log(client, namespace, job)
                    tail = " | ".join(log.strip().splitlines()[-3:]) or "an empty log"
                except OperationFailed as exc:
                    tail = str(exc)
                reason = (conditions.get("Failed") or {}).get("message") or "the pod failed"
                raise OperationFailed(f"{where} failed ({reason}): {tail[:500]}")
            if clock() - started > timeout_s:
                raise OperationFailed(f"{where} did not finish within {timeout_s:.0f} s")
            sleep(poll_s)
    finally:
        # A Job not deleted here: a finished one goes after its TTL, a running one at its deadline first.
        with contextlib.suppress(KubeError):
            client.delete(f"{jobs}/{job}?propagationPolicy=Background")


def record_consistency(
    env: Environment,
    client: KubeClient,
    backup_name: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """After the CloudNativePG Backup `backup_name` completed: a restore point named after it, and every
    table's row count and checksum in the snapshot taken with it (the drill recovers to that restore point
    and must find exactly these figures)."""
    namespace = data_namespace(env)
    live = client.get(object_path(CNPG_API, "clusters", namespace, POSTGRES_CLUSTER))
    if not (live.get("spec") or {}).get("enableSuperuserAccess"):
        raise OperationFailed(
            f"Cluster {POSTGRES_CLUSTER} has enableSuperuserAccess off: pg_create_restore_point and "
            "pg_switch_wal need the superuser, whose Secret CloudNativePG keeps only when it is on"
        )
    found = run_checksums(
        env,
        client,
        POSTGRES_CLUSTER,
        live=live,
        restore_point=backup_name,
        timeout_s=timeout_s,
        poll_s=poll_s,
        sleep=sleep,
        clock=clock,
    )
    if not found.get("lsn"):
        raise OperationFailed(f"checksum Job of {backup_name}: no restore point LSN in its output")
    return {
        "status": "recorded",
        "restore_point": backup_name,
        "lsn": found["lsn"],
        "snapshot": found.get("snapshot"),
        "switched_wal_at": found.get("switched"),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tables": found["tables"],
    }


# --- the restore drill -------------------------------------------------------------------------------------


@dataclass
class DrillOutcome:
    """What every restore drill reports, wherever it ran."""

    id: str  # the backup drilled
    environment: str
    ok: bool
    rto_seconds: float
    tables: int
    rows: int
    mismatches: list[str]
    redis: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KubeDrillReport(DrillOutcome):
    """A drill of a CloudNativePG Backup: its restore point, the scratch Cluster and its deletion."""

    export: str
    restore_point: str
    cluster: str
    namespace: str
    scratch_deleted: bool
    skipped: list[str] = field(default_factory=list)
    metrics_file: str | None = None


def compare_tables(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Table by table, in name order: what differs between the recorded figures and the restored ones."""
    mismatches = []
    for table in sorted(set(expected) | set(found)):
        want, got = expected.get(table), found.get(table)
        if want is None or got is None:
            mismatches.append(f"{table}: {'missing after restore' if got is None else 'not in the backup'}")
        elif (int(want["rows"]), str(want["checksum"])) != (got["rows"], got["checksum"]):
            mismatches.append(
                f"{table}: rows {got['rows']} (recorded {want['rows']}), checksum "
                f"{'equal' if str(want['checksum']) == got['checksum'] else 'differs'}"
            )
    return mismatches


def _drillable(
    env: Environment, client: KubeClient, storage: Storage
) -> tuple[str, dict[str, Any], dict[str, Any], list[str]]:
    """The newest export whose consistency point was recorded and whose CloudNativePG Backup is completed:
    (export id, its manifest, the Backup, what was skipped on the way and why)."""
    namespace = data_namespace(env)
    key = backup_crypto.load_key(env)
    skipped: list[str] = []
    for export_id in reversed(storage.ids()):
        manifest = storage.manifest(export_id)
        name = str(manifest.get("cnpg_backup") or "?")
        if manifest.get("method") != "cloudnative-pg":
            skipped.append(f"{export_id}: not a CloudNativePG backup")
            continue
        if manifest.get("key_id") != key.id:
            skipped.append(f"{export_id} ({name}): sealed with key id {manifest.get('key_id')}, not {key.id}")
            continue
        if not hmac.compare_digest(str(manifest.get("mac")), backup_crypto.manifest_mac(manifest, key)):
            raise OperationFailed(f"backup {export_id}: {MANIFEST} fails its authentication (changed)")
        consistency = manifest.get("consistency") or {}
        if consistency.get("status") != "recorded":
            why = consistency.get("reason") or "made without them"
            skipped.append(f"{export_id} ({name}): no recorded checksums ({why})")
            continue
        try:
            found = client.get(object_path(CNPG_API, "backups", namespace, name))
        except KubeNotFound:
            skipped.append(f"{export_id} ({name}): the Backup object is gone")
            continue
        status = found.get("status") or {}
        if status.get("phase") != "completed" or not status.get("backupId"):
            skipped.append(f"{export_id} ({name}): the Backup is {status.get('phase') or 'pending'}")
            continue
        return export_id, manifest, found, skipped
    raise OperationFailed(
        f"environment {env.name} has no backup with recorded checksums to drill"
        + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
        + f"; run `invoke db.backup --env {env.name}`, which records them"
    )


def _wait_healthy(
    client: KubeClient,
    path: str,
    *,
    timeout_s: float,
    started: float,
    poll_s: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    on_phase: Callable[[str], None] | None,
) -> None:
    phase = ""
    while True:
        status = client.get(path).get("status") or {}
        if str(status.get("phase") or "pending") != phase:
            phase = str(status.get("phase") or "pending")
            if on_phase is not None:
                on_phase(phase)
        if phase == HEALTHY and int(status.get("readyInstances") or 0) >= 1:
            return
        if clock() - started > timeout_s:
            raise OperationFailed(
                f"scratch Cluster {DRILL_CLUSTER} is not healthy after {timeout_s:.0f} s "
                f"(last phase: {phase}); the restore would miss the RTO target"
            )
        sleep(poll_s)


def drill(
    env: Environment,
    client: KubeClient,
    *,
    storage: Storage,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_phase: Callable[[str], None] | None = None,
) -> KubeDrillReport:
    """The restore drill on Kubernetes: the newest backup with a recorded consistency point is recovered
    into the scratch Cluster up to its restore point, counted by the checksum Job and compared table by
    table with the figures recorded at backup time; the scratch Cluster is deleted whatever happens. The
    RTO is the time from its creation until the comparison passed. A difference, a timeout or an error is
    OperationFailed naming it (and whether the scratch Cluster was deleted)."""
    namespace = data_namespace(env)
    log = kuberollout.audit_log(env)
    export_id, manifest, found, skipped = _drillable(env, client, storage)
    consistency = manifest["consistency"]
    backup_name = str(manifest["cnpg_backup"])
    restore_point = str(consistency["restore_point"])
    expected: dict[str, Any] = consistency["tables"]
    live = client.get(object_path(CNPG_API, "clusters", namespace, POSTGRES_CLUSTER))
    recovery = {
        "source": "origin",
        "recoveryTarget": {"targetName": restore_point, "backupID": found["status"]["backupId"]},
    }
    body = _recovery_cluster(
        live,
        DRILL_CLUSTER,
        namespace,
        recovery,
        {"maximus.io/restored-from": backup_name, "maximus.io/drill": "true"},
    )
    spec = body["spec"]
    # One instance is enough to count; the superuser's Secret is what the checksum Job logs in with.
    spec["instances"] = 1
    spec["enableSuperuserAccess"] = True
    for key in ("minSyncReplicas", "maxSyncReplicas"):
        spec.pop(key, None)
    clusters = object_path(CNPG_API, "clusters", namespace)
    try:
        client.create(clusters, body)
    except KubeConflict:
        raise OperationFailed(
            f"a scratch Cluster {DRILL_CLUSTER} exists already: another drill is running, or an earlier "
            f"one could not delete it; once no drill runs: "
            f"`kubectl -n {namespace} delete cluster {DRILL_CLUSTER}`"
        ) from None
    started = clock()
    failure: str | None = None
    mismatches: list[str] = []
    restored: dict[str, Any] = {}
    rto = 0.0
    deleted = False
    try:
        try:
            _wait_healthy(
                client,
                f"{clusters}/{DRILL_CLUSTER}",
                timeout_s=timeout_s,
                started=started,
                poll_s=poll_s,
                sleep=sleep,
                clock=clock,
                on_phase=on_phase,
            )
            remaining = max(timeout_s - (clock() - started), poll_s)
            restored = run_checksums(
                env,
                client,
                DRILL_CLUSTER,
                live=body,
                methods={table: str(row.get("method", "text")) for table, row in expected.items()},
                timeout_s=remaining,
                poll_s=poll_s,
                sleep=sleep,
                clock=clock,
            )["tables"]
            mismatches = compare_tables(expected, restored)
            rto = round(clock() - started, 3)
            if not mismatches and rto > timeout_s:
                failure = f"restored and identical, but in {rto:.0f} s, over the {timeout_s:.0f} s target"
        except OperationFailed as exc:
            failure = str(exc)
    finally:  # whatever happened, even an interruption
        try:
            client.delete(f"{clusters}/{DRILL_CLUSTER}")
            deleted = True
            cleanup = f"the scratch Cluster {DRILL_CLUSTER} was deleted"
        except KubeError as exc:
            cleanup = (
                f"the scratch Cluster {DRILL_CLUSTER} was NOT deleted ({exc}): "
                f"`kubectl -n {namespace} delete cluster {DRILL_CLUSTER}`"
            )
    if mismatches:
        failure = f"table {mismatches[0]} ({len(mismatches)} tables differ)"
    if failure is not None:
        log.write(
            env.name,
            "drill",
            result="failed",
            backup=backup_name,
            export=export_id,
            restore_point=restore_point,
            reason=failure,
            mismatches=mismatches,
            scratch_deleted=deleted,
        )
        raise OperationFailed(
            f"restore drill of {backup_name} (restore point {restore_point}) FAILED: {failure}; {cleanup}. "
            "See runbooks/restore.md"
        )
    report = KubeDrillReport(
        id=backup_name,
        environment=env.name,
        ok=deleted,
        rto_seconds=rto,
        tables=len(restored),
        rows=sum(int(t["rows"]) for t in restored.values()),
        mismatches=[] if deleted else [cleanup],
        redis="not part of the drill on Kubernetes",
        export=export_id,
        restore_point=restore_point,
        cluster=DRILL_CLUSTER,
        namespace=namespace,
        scratch_deleted=deleted,
        skipped=skipped,
    )
    details = {k: v for k, v in report.as_dict().items() if k not in ("environment", "ok", "metrics_file")}
    log.write(env.name, "drill", result="ok" if deleted else "failed", **details)
    if not deleted:
        raise OperationFailed(f"restore drill of {backup_name}: restored and identical, but {cleanup}")
    return report
