"""The exporters behind the Kafka alerts, under Pulumi mocks: the Kafka CR enables the JMX exporter (rules
producing exactly the names the alerts read) and the Kafka exporter, and a PodMonitor selects each. For
Redis: the alerts read only metrics redis_exporter exports."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from infra import kafka, redis
from infra.common import container_security
from opskit import stack

# What redis_exporter exports (and the Redis alerts may read): names from its INFO mapping.
REDIS_EXPORTER_METRICS = {
    "redis_up",
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_connected_clients",
    "redis_rejected_connections_total",
    "redis_rdb_last_bgsave_status",
    "redis_keyspace_hits_total",
    "redis_keyspace_misses_total",
    "redis_commands_processed_total",
}
# What Strimzi's Kafka exporter exports for consumer groups.
KAFKA_EXPORTER_METRICS = {"kafka_consumergroup_lag", "kafka_consumergroup_current_offset"}
PROMQL_NAME = re.compile(r"\b(?:redis|kafka)_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def runs() -> dict[str, stack.StackRun]:
    return {name: stack.run_stack(name) for name in stack.STACKS}


def objects(run: stack.StackRun, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in run.objects() if o["kind"] == kind}


def alert_metrics(group: Any) -> set[str]:
    """The redis_/kafka_ metric names the group's alert expressions read."""
    return {name for alert in group.rules if alert.expr for name in PROMQL_NAME.findall(alert.expr)}


def selects(monitor: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = monitor["spec"]["selector"]["matchLabels"]
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


@pytest.mark.parametrize("name", stack.STACKS)
def test_redis_exporter_sidecar_is_pinned_bounded_probed_and_restricted(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    pod = objects(run, "StatefulSet")[redis.REDIS_NAME]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["image"].startswith("oliver006/redis_exporter:")]
    assert re.fullmatch(r"oliver006/redis_exporter:v\d+\.\d+\.\d+", container["image"])
    assert container["ports"] == [{"name": "metrics", "containerPort": 9121, "protocol": "TCP"}]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] and limits["memory"] and requests["cpu"] and requests["memory"]
    assert container["readinessProbe"] and container["livenessProbe"]
    assert container["securityContext"] == container_security()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # The password comes from the Secret file Redis reads, never as a literal.
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD_FILE"]["value"] == "/etc/redis/secret/password"
    assert "REDIS_PASSWORD" not in env
    (auth,) = [v for v in pod["volumes"] if "secret" in v]
    assert auth["secret"]["secretName"] == redis.AUTH_SECRET
    assert env["REDIS_ADDR"]["value"] == f"redis://127.0.0.1:{redis.PORT}"
    assert {"name": "auth", "mountPath": "/etc/redis/secret", "readOnly": True} in container["volumeMounts"]


@pytest.mark.parametrize("name", stack.STACKS)
def test_a_pod_monitor_scrapes_the_redis_exporter_and_prometheus_may_reach_it(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    statefulset = objects(run, "StatefulSet")[redis.REDIS_NAME]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    monitors = [m for m in objects(run, "PodMonitor").values() if selects(m, labels)]
    assert len(monitors) == 1
    (endpoint,) = monitors[0]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    namespace = statefulset["metadata"]["namespace"]
    observability = f"{namespace.removesuffix('-data')}-observability"
    allowed = [
        rule
        for policy in objects(run, "NetworkPolicy").values()
        if policy["metadata"]["namespace"] == namespace
        and all(labels.get(k) == v for k, v in policy["spec"]["podSelector"].get("matchLabels", {}).items())
        for rule in policy["spec"].get("ingress", [])
        if {"protocol": "TCP", "port": 9121} in rule.get("ports", [])
        and any(
            peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            == observability
            for peer in rule.get("from", [])
        )
    ]
    assert allowed


def test_the_redis_alerts_read_only_what_redis_exporter_exports() -> None:
    used = alert_metrics(redis.alerts())
    assert used == {"redis_memory_used_bytes", "redis_memory_max_bytes", "redis_rejected_connections_total",
                    "redis_rdb_last_bgsave_status"}  # fmt: skip
    assert used <= REDIS_EXPORTER_METRICS


@pytest.mark.parametrize("name", stack.STACKS)
def test_kafka_exports_jmx_metrics_and_consumer_lag(runs: dict[str, stack.StackRun], name: str) -> None:
    run = runs[name]
    spec = objects(run, "Kafka")[kafka.KAFKA_CLUSTER]["spec"]
    assert spec["kafkaExporter"]["topicRegex"] == ".*" and spec["kafkaExporter"]["groupRegex"] == ".*"
    assert spec["kafkaExporter"]["resources"]["limits"]["memory"]
    metrics = spec["kafka"]["metricsConfig"]
    assert metrics["type"] == "jmxPrometheusExporter"
    ref = metrics["valueFrom"]["configMapKeyRef"]
    config_map = objects(run, "ConfigMap")[ref["name"]]
    assert (
        config_map["metadata"]["namespace"]
        == objects(run, "Kafka")[kafka.KAFKA_CLUSTER]["metadata"]["namespace"]
    )
    rules = yaml.safe_load(config_map["data"][ref["key"]])["rules"]
    produced = {rule["name"] for rule in rules}
    used = alert_metrics(kafka.alerts())
    assert produced == used - KAFKA_EXPORTER_METRICS
    assert used - produced <= KAFKA_EXPORTER_METRICS
    patterns = {rule["pattern"] for rule in rules}
    assert "kafka.server<type=ReplicaManager, name=UnderReplicatedPartitions><>Value" in patterns
    assert "kafka.controller<type=KafkaController, name=OfflinePartitionsCount><>Value" in patterns


@pytest.mark.parametrize("name", stack.STACKS)
def test_pod_monitors_select_the_kafka_brokers_and_the_kafka_exporter(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    cluster = kafka.KAFKA_CLUSTER
    for strimzi_name in (f"{cluster}-kafka", f"{cluster}-kafka-exporter"):
        pod_labels = {
            "strimzi.io/cluster": cluster,
            "strimzi.io/kind": "Kafka",
            "strimzi.io/name": strimzi_name,
        }
        monitors = [m for m in objects(run, "PodMonitor").values() if selects(m, pod_labels)]
        assert len(monitors) == 1, strimzi_name
        assert [e["port"] for e in monitors[0]["spec"]["podMetricsEndpoints"]] == ["tcp-prometheus"]
    namespace = objects(run, "Kafka")[cluster]["metadata"]["namespace"]
    observability = f"{namespace.removesuffix('-data')}-observability"
    scrape_allowed = [
        rule
        for policy in objects(run, "NetworkPolicy").values()
        if policy["metadata"]["namespace"] == namespace and not policy["spec"]["podSelector"]
        for rule in policy["spec"].get("ingress", [])
        if {"protocol": "TCP", "port": 9404} in rule.get("ports", [])
        and any(
            peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            == observability
            for peer in rule.get("from", [])
        )
    ]
    assert scrape_allowed, "Prometheus cannot reach tcp-prometheus (9404) in the data namespace"
