"""Backups of a Kubernetes environment through the real `HttpKubeClient`, against a fake Kubernetes API at
the HTTP boundary (an `httpx.MockTransport`): the CloudNativePG Backup, the Strimzi topic export, the
consumer-group offsets read from the cluster's Prometheus through the API server's service proxy, and the
restore into a new Cluster."""

from __future__ import annotations

import copy
import functools
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from opskit import backup, backup_crypto, backup_kube, backup_storage, kube, kuberollout, model, pgtools
from opskit.errors import BadInput, OperationFailed
from tests.test_kube_routers import TOKEN, FakeKubeApi
from tests.test_kuberollout import FakeTime

HEX_KEY = bytes(range(32)).hex()
PROMETHEUS = "/api/v1/namespaces/maximus-staging-observability/services/maximus-monitoring-prometheus:9090"
QUERY_PATH = f"{PROMETHEUS}/proxy/api/v1/query"
SAMPLED = 1_767_236_400.123  # 2026-01-01T03:00:00Z


class FakeApi:
    """Enough of the Kubernetes API for CloudNativePG Backups, Clusters and Strimzi KafkaTopics, and what
    answers behind the service proxy of the cluster's Prometheus (`prometheus`: query -> response)."""

    def __init__(self, backup_phases: list[str], prometheus: Callable[[str], httpx.Response] | None = None):
        self.objects: dict[str, dict[str, Any]] = {}
        self.phases = backup_phases
        self.created: list[dict[str, Any]] = []
        self.prometheus = prometheus
        self.requests: list[tuple[str, str, str | None]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        query = parse_qs(request.url.query.decode()).get("query", [None])[0]
        self.requests.append((request.method, path, query))
        if path.startswith(f"{PROMETHEUS}/proxy/"):
            if self.prometheus is None or path != QUERY_PATH or query is None:
                return httpx.Response(503, text="no endpoints available for service")
            return self.prometheus(query)
        if request.method == "POST":
            body = json.loads(request.content)
            self.created.append(body)
            self.objects[f"{path}/{body['metadata']['name']}"] = body
            return httpx.Response(201, json=body)
        if path.endswith("/kafkatopics"):
            items = [o for p, o in self.objects.items() if "/kafkatopics/" in p]
            return httpx.Response(200, json={"items": items})
        if path in self.objects:
            obj = self.objects[path]
            if obj.get("kind") == "Backup" and self.phases:
                obj["status"] = {
                    "phase": self.phases.pop(0),
                    "backupId": "20260101T030000",
                    "error": "disk full",
                }
            return httpx.Response(200, json=obj)
        return httpx.Response(404, json={"kind": "Status", "message": "not found", "reason": "NotFound"})


def vector(*series: tuple[dict[str, str], str]) -> httpx.Response:
    """A Prometheus instant-query answer (a vector), as the HTTP API gives it."""
    result = [{"metric": labels, "value": [SAMPLED, value]} for labels, value in series]
    return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})


def offset(group: str, topic: str, partition: int, value: str) -> tuple[dict[str, str], str]:
    return {"consumergroup": group, "topic": topic, "partition": str(partition)}, value


OFFSETS = [
    offset("hitl-decisions", "maximus.hitl.patches", 1, "1200"),
    offset("hitl-decisions", "maximus.hitl.patches", 0, "1187"),
    offset("hitl-decisions", "maximus.hitl.patches", 2, "-1"),  # nothing committed there yet
    offset("audit/exporter v2", "maximus.hitl.audit", 0, "42"),
]


def answering(
    offsets: list[tuple[dict[str, str], str]], brokers: bool = True
) -> Callable[[str], httpx.Response]:
    def answer(query: str) -> httpx.Response:
        if query.startswith("max by (consumergroup, topic, partition) (kafka_consumergroup_current_offset"):
            assert 'namespace="maximus-staging-data"' in query
            return vector(*offsets)
        if query.startswith("kafka_brokers{"):
            return vector(({"namespace": "maximus-staging-data"}, "3")) if brokers else vector()
        return httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "unknown"})

    return answer


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> model.Environment:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MAXIMUS_BACKUP_KEY", HEX_KEY)
    monkeypatch.delenv("MAXIMUS_AUDIT_STORE", raising=False)
    return model.load_environment("staging")


def _client(api: FakeApi) -> kube.HttpKubeClient:
    return kube.HttpKubeClient("https://kube.test:6443", token="t", transport=httpx.MockTransport(api.handle))


def _seed_topic(api: FakeApi, staging: model.Environment) -> None:
    ns = backup_kube.data_namespace(staging)
    api.objects[kube.object_path(backup_kube.STRIMZI_API, "kafkatopics", ns, "hitl-patches")] = {
        "apiVersion": backup_kube.STRIMZI_API,
        "kind": "KafkaTopic",
        "metadata": {
            "name": "hitl-patches",
            "namespace": ns,
            "labels": {"strimzi.io/cluster": "maximus-kafka"},
        },
        "spec": {
            "topicName": "maximus.hitl.patches",
            "partitions": 3,
            "replicas": 3,
            "config": {"retention.ms": 259200000},
        },
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_on_demand_backup_waits_for_completion(staging: model.Environment) -> None:
    api = FakeApi(["", "running", "running", "completed"], answering(OFFSETS))
    _seed_topic(api, staging)
    phases: list[str] = []
    sleeps: list[float] = []
    report = backup_kube.backup(staging, _client(api), sleep=sleeps.append, on_phase=phases.append)
    assert report.phase == "completed" and report.kafka_topics == 1
    assert phases == ["pending", "running", "completed"] and len(sleeps) == 3
    created = api.created[0]
    assert created["kind"] == "Backup" and created["spec"] == {
        "cluster": {"name": "maximus-postgres"},
        "method": "barmanObjectStore",
    }
    assert created["metadata"]["namespace"] == "maximus-staging-data"
    topics = backup_kube.kafka_topics(staging, _client(api))
    assert topics[0]["config"] == {"retention.ms": 259200000} and topics[0]["ready"]


def test_offsets_are_exported_beside_the_topics_read_before_the_backup(
    staging: model.Environment, tmp_path: Path
) -> None:
    api = FakeApi(["running", "completed"], answering(OFFSETS))
    _seed_topic(api, staging)
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    report = backup_kube.backup(staging, _client(api), storage=store, sleep=lambda _: None)

    assert report.consumer_offsets.startswith("exported: 2 groups, 3 partitions, read at ")
    assert report.consumer_groups == 2 and report.offsets_read_at
    assert report.offsets_restore is not None and "--reset-offsets --from-file" in report.offsets_restore
    # read through the API server's service proxy, before the Backup was created
    calls = [(method, path) for method, path, _ in api.requests]
    assert calls.index(("GET", QUERY_PATH)) < calls.index(
        ("POST", kube.object_path(backup_kube.CNPG_API, "backups", "maximus-staging-data"))
    )

    assert report.kafka_export is not None
    manifest = store.manifest(report.kafka_export)
    record = manifest["consumer_offsets"]
    assert record["status"] == "exported" and record["groups"] == 2 and record["partitions"] == 3
    assert record["read_at"] == report.offsets_read_at and record["sampled_at"] == "2026-01-01T03:00:00+00:00"
    assert set(manifest["files"]) == {
        "kafka/topics.json.zst.enc",
        "kafka/consumer-offsets.json.zst.enc",
        *record["files"].values(),
    }
    checked = backup.verify(staging, report.kafka_export, storage=store)
    assert checked.ok, checked.problems
    assert any("offsets of 2 consumer groups" in check for check in checked.checks)

    out = tmp_path / "offsets"
    written = backup_kube.write_offsets(staging, store, report.kafka_export, out)
    by_name = {path.name: path.read_text() for path in written}
    assert by_name["hitl-decisions.csv"] == "maximus.hitl.patches,0,1187\nmaximus.hitl.patches,1,1200\n"
    odd = backup_kube.group_file("audit/exporter v2").removeprefix("kafka/offsets/")
    assert odd.startswith("audit_exporter_v2-") and by_name[odd] == "maximus.hitl.audit,0,42\n"
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(by_name)

    with (tmp_path / "backups" / report.kafka_export / "kafka" / "consumer-offsets.json.zst.enc").open(
        "rb"
    ) as f:
        sealed = f.read()
    document = json.loads(_unseal(sealed))
    assert document["read_before_backup"] is True and document["cnpg_backup"] == report.name
    assert document["skipped"] == ["hitl-decisions maximus.hitl.patches/2: no committed offset"]
    assert document["groups"]["audit/exporter v2"] == [
        {"topic": "maximus.hitl.audit", "partition": 0, "offset": 42}
    ]
    assert document["query"] == backup_kube.offsets_query(staging)


def _unseal(sealed: bytes) -> bytes:
    out = io.BytesIO()
    key = backup_crypto.parse_key(HEX_KEY, "test")
    backup_crypto.unseal(io.BytesIO(sealed), out, key, "zstd", "offsets")
    return out.getvalue()


def test_prometheus_unreachable_keeps_the_backup_and_says_offsets_were_not_exported(
    staging: model.Environment, tmp_path: Path
) -> None:
    api = FakeApi(["completed"], prometheus=None)  # the proxy answers 503: no Prometheus endpoints
    _seed_topic(api, staging)
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    with pytest.raises(backup_kube.OffsetsNotExported) as caught:
        backup_kube.backup(staging, _client(api), storage=store, sleep=lambda _: None)
    error = caught.value
    assert isinstance(error, OperationFailed) and error.exit_code == 1
    message = str(error)
    assert "the database backup maximus-postgres-ondemand-" in message and "completed and is kept" in message
    assert "consumer-group offsets were NOT exported" in message and "HTTP 503" in message
    assert "invoke db.backup --env staging" in message
    report = error.report
    assert report.phase == "completed" and report.consumer_offsets.startswith("unavailable (")
    assert report.consumer_groups == 0 and report.offsets_restore is None
    assert [b["kind"] for b in api.created] == ["Backup"]  # the database backup was made all the same

    assert report.kafka_export is not None
    manifest = store.manifest(report.kafka_export)
    assert manifest["consumer_offsets"]["status"] == "unavailable"
    assert "HTTP 503" in manifest["consumer_offsets"]["reason"]
    assert set(manifest["files"]) == {"kafka/topics.json.zst.enc"}
    checked = backup.verify(staging, report.kafka_export, storage=store)
    assert checked.ok and any(c.startswith("consumer offsets: unavailable (") for c in checked.checks)
    with pytest.raises(BadInput, match="holds no consumer offsets"):
        backup_kube.write_offsets(staging, store, report.kafka_export, tmp_path / "out")

    audit = kuberollout.state_home(staging) / "audit" / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    last = records[-1]
    assert last["operation"] == "db.backup" and last["result"] == "ok"
    assert last["consumer_offsets"].startswith("unavailable (")


def test_no_exporter_series_is_not_taken_for_no_consumer_groups(staging: model.Environment) -> None:
    with pytest.raises(backup_kube.OffsetsNotExported, match="kafka-exporter is not running or not scraped"):
        backup_kube.backup(staging, _client(FakeApi(["completed"], answering([], brokers=False))))
    report = backup_kube.backup(staging, _client(FakeApi(["completed"], answering([], brokers=True))))
    assert report.consumer_offsets.startswith("read (no storage given): 0 groups, 0 partitions")


def test_group_file_names_and_csv() -> None:
    assert backup_kube.group_file("hitl-decisions") == "kafka/offsets/hitl-decisions.csv"
    a, b = backup_kube.group_file("a/b"), backup_kube.group_file("a:b")
    assert a != b and "/" not in a.removeprefix("kafka/offsets/")
    assert not backup_kube.group_file("..").removeprefix("kafka/offsets/").startswith(".")
    rows = [{"topic": "t", "partition": 0, "offset": 5}, {"topic": "t", "partition": 1, "offset": 7}]
    assert backup_kube.offsets_csv(rows) == "t,0,5\nt,1,7\n"


def test_backup_failure_and_timeout_are_named(staging: model.Environment) -> None:
    with pytest.raises(OperationFailed, match="failed: disk full"):
        backup_kube.backup(
            staging, _client(FakeApi(["running", "failed"], answering(OFFSETS))), sleep=lambda _: None
        )
    ticks = iter(range(0, 10_000, 100))
    with pytest.raises(OperationFailed, match="still running after 300 s; it was left running"):
        backup_kube.backup(
            staging,
            _client(FakeApi(["running"] * 100, answering(OFFSETS))),
            timeout_s=300,
            sleep=lambda _: None,
            clock=lambda: float(next(ticks)),
        )


def test_restore_bootstraps_a_new_cluster(staging: model.Environment) -> None:
    api = FakeApi([])
    ns = backup_kube.data_namespace(staging)
    store = {"destinationPath": "s3://maximus-staging-backups/postgres", "s3Credentials": {}}
    api.objects[kube.object_path(backup_kube.CNPG_API, "clusters", ns, "maximus-postgres")] = {
        "kind": "Cluster",
        "metadata": {"name": "maximus-postgres"},
        "spec": {
            "instances": 2,
            "bootstrap": {"initdb": {"database": "hitl", "owner": "hitl", "secret": {"name": "app"}}},
            "backup": {"barmanObjectStore": store, "retentionPolicy": "30d"},
            "storage": {"size": "10Gi"},
        },
    }
    api.objects[kube.object_path(backup_kube.CNPG_API, "backups", ns, "nightly")] = {
        "kind": "Backup",
        "metadata": {"name": "nightly"},
        "status": {"phase": "completed", "backupId": "20260101T030000"},
    }
    report = backup_kube.restore(staging, _client(api), backup_name="nightly", into="maximus-postgres-r1")
    created = api.created[-1]
    assert created["metadata"]["name"] == report.cluster == "maximus-postgres-r1"
    spec = created["spec"]
    assert spec["bootstrap"] == {
        "recovery": {
            "backup": {"name": "nightly"},
            "database": "hitl",
            "owner": "hitl",
            "secret": {"name": "app"},
        }
    }
    assert "backup" not in spec and spec["instances"] == 2
    assert spec["externalClusters"][0]["barmanObjectStore"]["serverName"] == "maximus-postgres"
    pitr = backup_kube.restore(
        staging, _client(api), backup_name="nightly", target_time="2026-01-01T04:00:00Z"
    )
    assert (
        api.created[-1]["spec"]["bootstrap"]["recovery"]["recoveryTarget"]["targetTime"] == pitr.target_time
    )
    for kwargs, message in (
        ({"backup_name": "nightly", "into": "maximus-postgres"}, "never restored in place"),
        ({"backup_name": "../x"}, "not a Backup name"),
        ({"backup_name": "missing"}, "no Backup missing"),
        ({"backup_name": "nightly", "target_time": "yesterday"}, "--target-time"),
    ):
        with pytest.raises(BadInput, match=message):
            backup_kube.restore(staging, _client(api), **kwargs)


# --- the consistency point and the restore drill ----------------------------------------------------------
# The fake Kubernetes API of test_kube_routers, with what the drill needs from the cluster's controllers:
# a Backup completes, a Job runs one pod whose log answers, the scratch Cluster becomes healthy, each when
# the clock moves (FakeTime of test_kuberollout: the drill sleeps, the cluster moves on).

DATA = "maximus-staging-data"
IMAGE = "ghcr.io/cloudnative-pg/postgresql:15.8"
RECORDED = {
    "public.patches": {"rows": 25000, "checksum": "-5426326679895224062", "method": "record"},
    "public.decisions": {"rows": 3, "checksum": "1112571341831941321", "method": "text"},
}


class ClusterApi(FakeKubeApi):
    """FakeKubeApi plus pod logs and label-selected pod lists, and `tick`, the controllers' next step."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, str] = {}
        self.healthy = True
        self.job_fails = False
        self.restored: dict[str, Any] = copy.deepcopy(RECORDED)
        self.scripts: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/log"):
            pod = path.split("/")[-2]
            if pod not in self.logs:
                return httpx.Response(404, json={"kind": "Status", "message": f'pods "{pod}" not found'})
            return httpx.Response(200, text=self.logs[pod], headers={"content-type": "text/plain"})
        selector = parse_qs(request.url.query.decode()).get("labelSelector", [None])[0]
        if request.method == "GET" and path.endswith("/pods") and selector is not None:
            key, _, value = selector.partition("=")
            items = [
                o
                for p, o in self.objects.items()
                if p.rsplit("/", 1)[0] == path and o["metadata"].get("labels", {}).get(key) == value
            ]
            return httpx.Response(200, json={"kind": "PodList", "items": items})
        return super().handle(request)

    def of_kind(self, plural: str) -> dict[str, dict[str, Any]]:
        return {p: o for p, o in self.objects.items() if f"/{plural}/" in p and p.count("/") > 5}

    def tick(self) -> None:
        for backup_object in self.of_kind("backups").values():
            backup_object.setdefault("status", {"phase": "completed", "backupId": "20260101T030000"})
        for job in self.of_kind("jobs").values():
            if "status" in job:
                continue
            name = job["metadata"]["name"]
            pod = f"{name}-x7k2p"
            self.seed(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": pod, "namespace": DATA, "labels": {"job-name": name}},
                }
            )
            script = job["spec"]["template"]["spec"]["containers"][0]["env"][-1]["value"]
            self.scripts.append(script)
            if self.job_fails:
                self.logs[pod] = 'psql: error: connection to server failed: FATAL: role "x" does not exist\n'
                job["status"] = {"failed": 1}
                continue
            if "pg_create_restore_point" in script:
                answer = {
                    "lsn": "0/3000060",
                    "snapshot": "725:725:",
                    "switched": "0/3000078",
                    "tables": RECORDED,
                }
            else:
                answer = {"lsn": None, "snapshot": "731:731:", "switched": None, "tables": self.restored}
            self.logs[pod] = json.dumps(answer) + "\n"
            job["status"] = {"succeeded": 1}
        for path, cluster in self.of_kind("clusters").items():
            if path.endswith(f"/{backup_kube.DRILL_CLUSTER}"):
                phase = backup_kube.HEALTHY if self.healthy else "Waiting for the instances to become active"
                cluster["status"] = {"phase": phase, "readyInstances": 1}


@pytest.fixture
def cluster_api(staging: model.Environment, monkeypatch: pytest.MonkeyPatch) -> ClusterApi:
    stamps = iter(range(20260101030000, 20260101040000))
    monkeypatch.setattr(backup_kube, "_stamp", lambda: str(next(stamps)))  # several backups a second
    api = ClusterApi()
    api.seed(
        {
            "apiVersion": backup_kube.CNPG_API,
            "kind": "Cluster",
            "metadata": {"name": "maximus-postgres", "namespace": DATA},
            "spec": {
                "instances": 3,
                "imageName": IMAGE,
                "enableSuperuserAccess": True,
                "minSyncReplicas": 1,
                "maxSyncReplicas": 1,
                "bootstrap": {
                    "initdb": {"database": "hitl", "owner": "hitl", "secret": {"name": "hitl-app"}}
                },
                "backup": {"barmanObjectStore": {"destinationPath": "s3://b/postgres"}},
                "storage": {"size": "20Gi"},
            },
        }
    )
    prometheus = f"{kuberollout.observability_namespace(staging)}/maximus-monitoring-prometheus:9090"
    answer = answering(OFFSETS)
    api.services[prometheus] = lambda request, _: answer(parse_qs(request.url.query.decode())["query"][0])
    return api


def _cluster_client(api: ClusterApi) -> kube.HttpKubeClient:
    return kube.HttpKubeClient(
        "https://kube.test:6443", token=TOKEN, transport=httpx.MockTransport(api.handle)
    )


def _timed(api: ClusterApi) -> FakeTime:
    clock = FakeTime()
    clock.on_sleep = api.tick
    return clock


def _backup(
    staging: model.Environment, api: ClusterApi, store: backup_storage.Storage, *, checksums: bool = True
) -> backup_kube.KubeBackupReport:
    clock = _timed(api)
    return backup_kube.backup(
        staging,
        _cluster_client(api),
        storage=store,
        checksums=checksums,
        sleep=clock.sleep,
        clock=clock.clock,
    )


def _drill(
    staging: model.Environment, api: ClusterApi, store: backup_storage.Storage, timeout_s: float = 3600
) -> tuple[backup_kube.KubeDrillReport, FakeTime]:
    clock = _timed(api)
    report = backup_kube.drill(
        staging,
        _cluster_client(api),
        storage=store,
        timeout_s=timeout_s,
        sleep=clock.sleep,
        clock=clock.clock,
    )
    return report, clock


def _audit(staging: model.Environment, operation: str) -> list[dict[str, Any]]:
    return [r for r in kuberollout.audit_log(staging).records() if r.get("operation") == operation]


def _scratch_path() -> str:
    return kube.object_path(backup_kube.CNPG_API, "clusters", DATA, backup_kube.DRILL_CLUSTER)


def test_backup_records_a_restore_point_and_the_checksums_in_its_export(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    report = _backup(staging, cluster_api, store)
    assert report.restore_point == report.name
    assert report.checksums == f"recorded: 2 tables, 25003 rows at restore point {report.name}"
    assert report.kafka_export is not None
    consistency = store.manifest(report.kafka_export)["consistency"]
    assert consistency["status"] == "recorded" and consistency["restore_point"] == report.name
    assert consistency["tables"] == RECORDED and consistency["lsn"] == "0/3000060"
    assert backup.verify(staging, report.kafka_export, storage=store).ok  # the manifest's MAC covers it
    # the Job: the stack's PostgreSQL image, the superuser's Secret, restricted pod security, then deleted
    job = next(
        body for method, _, _, body in cluster_api.requests if method == "POST" and body["kind"] == "Job"
    )
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (
        container["image"] == IMAGE and pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["PGHOST"]["value"] == "maximus-postgres-rw" and env["PGDATABASE"]["value"] == "hitl"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "maximus-postgres-superuser",
        "key": "password",
    }
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert not container["securityContext"]["allowPrivilegeEscalation"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    script = env["MAXIMUS_SQL"]["value"]
    order = [
        "BEGIN ISOLATION LEVEL REPEATABLE READ;",
        f"SELECT pg_create_restore_point('{report.name}')",
        "hash_record_extended",
        "COMMIT;",
        "SELECT pg_switch_wal()",
    ]
    assert [script.index(part) for part in order] == sorted(script.index(part) for part in order)
    # the restore point is the transaction's first statement: it takes the snapshot
    first = script.split("BEGIN ISOLATION LEVEL REPEATABLE READ;\n", 1)[1].splitlines()[0]
    assert first.startswith("SELECT pg_create_restore_point(")
    job_path = kube.object_path("batch/v1", "jobs", DATA, backup_kube.CHECKSUM_JOBS["maximus-postgres"])
    assert ("DELETE", job_path) in [(m, p) for m, p, _, _ in cluster_api.requests]
    assert job_path not in cluster_api.objects
    assert _audit(staging, "db.backup")[-1]["checksums"] == report.checksums


def test_a_backup_whose_checksums_cannot_be_recorded_is_kept_and_says_so(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    cluster_api.job_fails = True
    with pytest.raises(backup_kube.ChecksumsNotRecorded, match=r"role .x. does not exist") as failed:
        _backup(staging, cluster_api, store)
    export = failed.value.report.kafka_export
    assert export is not None and failed.value.report.phase == "completed"
    assert store.manifest(export)["consistency"]["status"] == "unavailable"
    path = kube.object_path(backup_kube.CNPG_API, "clusters", DATA, "maximus-postgres")
    cluster_api.job_fails = False
    cluster_api.objects[path]["spec"]["enableSuperuserAccess"] = False
    with pytest.raises(backup_kube.ChecksumsNotRecorded, match="enableSuperuserAccess off"):
        _backup(staging, cluster_api, store)


def test_drill_recovers_to_the_restore_point_compares_and_deletes_the_scratch(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    made = _backup(staging, cluster_api, store)
    started = len(cluster_api.requests)
    report, clock = _drill(staging, cluster_api, store)

    assert report.ok and report.id == made.name and report.export == made.kafka_export
    assert report.tables == 2 and report.rows == 25003 and report.mismatches == []
    assert report.restore_point == made.name and report.scratch_deleted
    assert report.rto_seconds == clock.now - 1000.0 > 0
    created = next(
        body
        for method, _, _, body in cluster_api.requests[started:]
        if method == "POST" and body["kind"] == "Cluster"
    )
    assert created["metadata"]["name"] == backup_kube.DRILL_CLUSTER
    spec = created["spec"]
    assert spec["bootstrap"]["recovery"]["recoveryTarget"] == {
        "targetName": made.name,
        "backupID": "20260101T030000",
    }
    assert (
        spec["bootstrap"]["recovery"]["source"] == "origin"
        and spec["bootstrap"]["recovery"]["database"] == "hitl"
    )
    assert spec["instances"] == 1 and spec["enableSuperuserAccess"] is True
    assert "backup" not in spec and "minSyncReplicas" not in spec  # it archives nowhere, waits for no replica
    # the scratch was counted with the methods recorded at backup time, then deleted
    assert '"public.patches": "record"' in cluster_api.scripts[-1]
    assert "pg_create_restore_point" not in cluster_api.scripts[-1]
    assert _scratch_path() not in cluster_api.objects
    assert ("DELETE", _scratch_path()) in [(m, p) for m, p, _, _ in cluster_api.requests]
    record = _audit(staging, "drill")[-1]
    assert record["result"] == "ok" and record["rto_seconds"] == report.rto_seconds
    assert record["restore_point"] == made.name


def test_a_differing_table_fails_the_drill_naming_it_and_the_scratch_is_deleted(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    _backup(staging, cluster_api, store)
    cluster_api.restored["public.patches"]["checksum"] = "17"
    with pytest.raises(
        OperationFailed, match=r"table public\.patches: rows 25000 \(recorded 25000\), checksum differs"
    ) as failed:
        _drill(staging, cluster_api, store)
    assert "scratch Cluster maximus-postgres-drill was deleted" in str(failed.value)
    assert _scratch_path() not in cluster_api.objects
    record = _audit(staging, "drill")[-1]
    assert record["result"] == "failed" and record["mismatches"][0].startswith("public.patches")
    # a table the backup did not have is a difference too
    cluster_api.restored = {
        **copy.deepcopy(RECORDED),
        "public.extra": {"rows": 1, "checksum": "1", "method": "text"},
    }
    with pytest.raises(OperationFailed, match=r"public\.extra: not in the backup"):
        _drill(staging, cluster_api, store)


def test_a_scratch_cluster_that_never_becomes_healthy_times_out_and_is_deleted(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    _backup(staging, cluster_api, store)
    cluster_api.healthy = False
    with pytest.raises(OperationFailed, match=r"not healthy after 600 s.*was deleted"):
        _drill(staging, cluster_api, store, timeout_s=600)
    assert _scratch_path() not in cluster_api.objects
    assert _audit(staging, "drill")[-1]["scratch_deleted"] is True
    # a scratch that cannot be deleted is named, with the command to delete it
    cluster_api.fail("DELETE", _scratch_path(), 500)
    with pytest.raises(
        OperationFailed, match=r"was NOT deleted .*kubectl -n maximus-staging-data delete cluster"
    ):
        _drill(staging, cluster_api, store, timeout_s=600)
    cluster_api.failures.clear()
    with pytest.raises(OperationFailed, match="exists already: another drill is running"):
        _drill(staging, cluster_api, store, timeout_s=600)


def test_backups_without_checksums_are_skipped_for_an_older_one_and_none_is_a_clear_error(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "none")
    _backup(staging, cluster_api, store, checksums=False)
    with pytest.raises(
        OperationFailed,
        match=r"no backup with recorded checksums to drill .*made without them.*invoke db\.backup",
    ):
        _drill(staging, cluster_api, store)
    assert not any(body and body.get("kind") == "Cluster" for _, _, _, body in cluster_api.requests)

    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    older = _backup(staging, cluster_api, store)
    newer = _backup(staging, cluster_api, store, checksums=False)
    report, _ = _drill(staging, cluster_api, store)
    assert report.id == older.name and report.ok
    assert report.skipped == [
        f"{newer.kafka_export} ({newer.name}): no recorded checksums (made without them)"
    ]


def test_get_text_reads_plain_text_and_maps_errors(cluster_api: ClusterApi) -> None:
    client = _cluster_client(cluster_api)
    cluster_api.logs["p1"] = "line one\n{}\n"
    assert client.get_text(f"/api/v1/namespaces/{DATA}/pods/p1/log") == "line one\n{}\n"
    with pytest.raises(kube.KubeNotFound, match="pods/log"):
        client.get_text(f"/api/v1/namespaces/{DATA}/pods/gone/log")


def test_the_checksum_script_gives_pgtools_figures_on_a_real_postgresql(local_env: model.Environment) -> None:
    """The Job's psql script, run by the real psql against the real PostgreSQL: the same per-table figures
    and methods as opskit.pgtools, a restore point, and the methods honoured when given."""
    database = "drill_script_check"
    with pgtools.connect(local_env, "postgres") as admin:
        pgtools.drop_database(admin, database)
        admin.execute(f"CREATE DATABASE {database}")
    try:
        with pgtools.connect(local_env, database) as conn:
            conn.execute(
                "CREATE TABLE a (id int PRIMARY KEY, v text, j json);"
                "INSERT INTO a SELECT g, 'x' || g, '{}' FROM generate_series(1, 500) g;"
                "CREATE TABLE b (id bigint, at timestamptz DEFAULT '2026-01-01 03:00+00', n numeric);"
                "INSERT INTO b (id, n) SELECT g, g / 7.0 FROM generate_series(1, 40) g;"
            )
            expected = pgtools.table_checksums(conn)

        def run(script: str) -> dict[str, Any]:
            done = subprocess.run(
                ["sh", "-c", 'printf "%s\\n" "$MAXIMUS_SQL" | psql -X -q -A -t -v ON_ERROR_STOP=1'],
                env={
                    **pgtools.tool_env(local_env),
                    "PGHOST": "127.0.0.1",
                    "PGPORT": str(local_env.local_ports.postgres),
                    "PGUSER": "postgres",
                    "PGDATABASE": database,
                    "MAXIMUS_SQL": script,
                },
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert len(done.stdout.splitlines()) == 1  # one JSON line, nothing else
            return backup_kube.parse_checksums(done.stdout, "script")

        recorded = run(backup_kube.checksum_sql(restore_point="drill-script-check", methods=None))
        assert recorded["tables"] == expected
        assert {t["method"] for t in expected.values()} == {"record", "text"}  # json has no hash: text
        assert recorded["lsn"] and recorded["switched"] and recorded["snapshot"]
        forced = {table: "text" for table in expected}
        restored = run(backup_kube.checksum_sql(restore_point=None, methods=forced))
        assert restored["lsn"] is None and {t["method"] for t in restored["tables"].values()} == {"text"}
        assert (
            backup_kube.compare_tables(recorded["tables"], restored["tables"]) != []
        )  # other method, other sum
    finally:
        with pgtools.connect(local_env, "postgres") as admin:
            pgtools.drop_database(admin, database)


def test_invoke_drill_on_kubernetes_dispatches_and_records_the_metric(
    staging: model.Environment, cluster_api: ClusterApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = backup_storage.LocalDirStorage(tmp_path / "backups")
    clock = _timed(cluster_api)
    monkeypatch.setattr(backup, "_kube_client", lambda env: _cluster_client(cluster_api))
    for name in ("backup", "drill"):
        monkeypatch.setattr(
            backup_kube,
            name,
            functools.partial(getattr(backup_kube, name), sleep=clock.sleep, clock=clock.clock),
        )
    made = backup.backup(staging, storage=store)
    assert isinstance(made, backup_kube.KubeBackupReport) and made.restore_point == made.name
    report = backup.drill(staging, storage=store)
    assert isinstance(report, backup_kube.KubeDrillReport) and report.ok and report.metrics_file
    assert "maximus_backup_drill_rto_seconds{" in Path(report.metrics_file).read_text()
    cluster_api.restored = {}
    with pytest.raises(OperationFailed, match="missing after restore"):
        backup.drill(staging, storage=store)
    assert "maximus_backup_drill_last_failure_timestamp_seconds" in Path(report.metrics_file).read_text()
