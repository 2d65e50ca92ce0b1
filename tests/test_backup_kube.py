"""Backups of a Kubernetes environment through the real `HttpKubeClient`, against a fake Kubernetes API at
the HTTP boundary (an `httpx.MockTransport`): the CloudNativePG Backup, the Strimzi topic export, the
consumer-group offsets read from the cluster's Prometheus through the API server's service proxy, and the
restore into a new Cluster."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from opskit import backup, backup_crypto, backup_kube, backup_storage, kube, kuberollout, model
from opskit.errors import BadInput, OperationFailed

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
