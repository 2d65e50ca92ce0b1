"""The exporters behind the Kafka alerts, under Pulumi mocks: the Kafka CR enables the JMX exporter (rules
producing exactly the names the alerts read) and the Kafka exporter, and a PodMonitor selects each. For
Redis: the alerts read only metrics redis_exporter exports."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from infra import dashboards, kafka, redis
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
    # The password comes from a file of the Secret Redis reads, never as a literal nor an env variable.
    # redis_exporter reads REDIS_PASSWORD_FILE as JSON {redis URI: password}, looked up by REDIS_ADDR.
    env = {e["name"]: e for e in container["env"]}
    assert "REDIS_PASSWORD" not in env
    assert env["REDIS_ADDR"]["value"] == f"redis://127.0.0.1:{redis.PORT}"
    (auth,) = [v for v in pod["volumes"] if "secret" in v]
    assert auth["secret"]["secretName"] == redis.AUTH_SECRET
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == auth["name"]]
    assert mount["readOnly"] is True
    password_file = PurePosixPath(env["REDIS_PASSWORD_FILE"]["value"])
    assert password_file.parent == PurePosixPath(mount["mountPath"])
    secret = objects(run, "Secret")[redis.AUTH_SECRET]
    assert password_file.name in secret["stringData"]
    assert password_file.name != "password", "a plain password file makes redis_exporter exit"
    assert json.loads(redis.exporter_password_map('p"w:@/x')) == {env["REDIS_ADDR"]["value"]: 'p"w:@/x'}


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


def jmx_rules(run: stack.StackRun) -> tuple[list[dict[str, Any]], bool]:
    """The JMX exporter's rules as the broker pods get them (the ConfigMap the Kafka CR points at), and
    whether names are lowercased."""
    metrics = objects(run, "Kafka")[kafka.KAFKA_CLUSTER]["spec"]["kafka"]["metricsConfig"]
    ref = metrics["valueFrom"]["configMapKeyRef"]
    config = yaml.safe_load(objects(run, "ConfigMap")[ref["name"]]["data"][ref["key"]])
    return config["rules"], bool(config.get("lowercaseOutputName"))


def jmx_sample(rules: list[dict[str, Any]], lowercase: bool, mbean: str) -> tuple[str, dict[str, str]] | None:
    """What the JMX exporter makes of one MBean: the first rule whose pattern matches the whole MBean
    string gives the name and labels, `$n` standing for the pattern's groups; None when no rule matches."""
    for rule in rules:
        match = re.fullmatch(rule["pattern"], mbean)
        if match is None:
            continue

        def fill(template: str, match: re.Match[str] = match) -> str:
            return re.sub(r"\$(\d+)", lambda ref: match.group(int(ref.group(1))), template)

        name = fill(rule["name"])
        name = re.sub(r"[^a-zA-Z0-9:_]", "_", name.lower() if lowercase else name)
        return name, {fill(k): fill(v) for k, v in rule.get("labels", {}).items()}
    return None


def broker_mbeans(topics: list[str]) -> list[str]:
    """MBeans a KRaft broker exposes, spelled as the JMX exporter sees them: the ones the rules are for and
    neighbours that must not be confused with them."""
    beans = [
        "kafka.server<type=ReplicaManager, name=UnderReplicatedPartitions><>Value",
        "kafka.server<type=ReplicaManager, name=PartitionCount><>Value",
        "kafka.controller<type=KafkaController, name=OfflinePartitionsCount><>Value",
        "kafka.controller<type=KafkaController, name=ActiveControllerCount><>Value",
        "kafka.network<type=RequestMetrics, name=RequestsPerSec, request=Produce, version=9><>Count",
    ]
    for counter in ("MessagesInPerSec", "BytesInPerSec", "BytesOutPerSec", "TotalProduceRequestsPerSec"):
        beans.append(f"kafka.server<type=BrokerTopicMetrics, name={counter}><>Count")
        for topic in topics:
            beans.append(f"kafka.server<type=BrokerTopicMetrics, name={counter}, topic={topic}><>Count")
            beans.append(
                f"kafka.server<type=BrokerTopicMetrics, name={counter}, topic={topic}><>OneMinuteRate"
            )
    return beans


def kafka_metrics_read() -> set[str]:
    """The kafka_ metric names the Kafka alerts and the Kafka dashboard read."""
    board = json.loads(dashboards.kafka())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    return alert_metrics(kafka.alerts()) | {n for expr in exprs for n in PROMQL_NAME.findall(expr)}


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
    used = alert_metrics(kafka.alerts())
    assert used - KAFKA_EXPORTER_METRICS, "the Kafka alerts read no JMX metric"


@pytest.mark.parametrize("name", stack.STACKS)
def test_every_kafka_metric_the_dashboard_and_alerts_read_is_produced_from_a_broker_mbean(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    """The JMX exporter's rules, applied to MBean names as a broker spells them, produce every metric the
    Kafka dashboard and alerts read (beside the Kafka exporter's consumer-group metrics), and nothing else;
    throughput is per topic, labelled with the topic, and the broker-wide totals stay out."""
    run = runs[name]
    rules, lowercase = jmx_rules(run)
    topics = sorted(o["spec"]["topicName"] for o in objects(run, "KafkaTopic").values())
    assert topics
    exported: dict[str, list[dict[str, str]]] = {}
    for mbean in broker_mbeans(topics):
        produced = jmx_sample(rules, lowercase, mbean)
        if produced is not None:
            exported.setdefault(produced[0], []).append(produced[1])
    read = kafka_metrics_read()
    assert {
        "kafka_server_brokertopicmetrics_messagesin_total",
        "kafka_server_brokertopicmetrics_bytesin_total",
    } <= read
    missing = read - KAFKA_EXPORTER_METRICS - set(exported)
    assert not missing, f"no JMX rule produces {sorted(missing)}"
    assert set(exported) <= read, f"rules export what nothing reads: {sorted(set(exported) - read)}"
    for metric in ("messagesin", "bytesin", "bytesout"):
        series = exported[f"kafka_server_brokertopicmetrics_{metric}_total"]
        assert sorted(labels["topic"] for labels in series) == topics, metric
        assert all(set(labels) == {"topic"} for labels in series), metric
    assert (
        jmx_sample(rules, lowercase, "kafka.server<type=BrokerTopicMetrics, name=BytesInPerSec><>Count")
        is None
    )
    counters = {r["name"]: r["type"] for r in rules if r["name"].endswith("_total")}
    assert counters and set(counters.values()) == {"COUNTER"}


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
