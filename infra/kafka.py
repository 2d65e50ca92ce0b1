"""Kafka: the Strimzi operator (pinned chart) and a KRaft `Kafka` with one `KafkaNodePool` of combined
controller+broker nodes, plus a `KafkaTopic` per topic the environment model declares. The brokers export
JMX metrics through Strimzi's Prometheus JMX exporter (rules in a ConfigMap) and the Kafka exporter
exports consumer lag; a PodMonitor each lets Prometheus scrape them (port 9404, `tcp-prometheus`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s
import yaml

from infra.alerts import Alert, Example, Group
from infra.common import (
    KAFKA_CLUSTER,
    Component,
    Platform,
    chart_values_resources,
    resources,
)
from opskit.model import Resources

STRIMZI_API = "kafka.strimzi.io/v1beta2"
PLAIN_PORT = 9092
TLS_PORT = 9093
OPERATOR_SIZE = Resources(cpu_request="200m", memory_request="384Mi", cpu_limit="1", memory_limit="512Mi")
EXPORTER_SIZE = Resources(cpu_request="50m", memory_request="64Mi", cpu_limit="500m", memory_limit="256Mi")
METRICS_CONFIG = f"{KAFKA_CLUSTER}-metrics"
METRICS_KEY = "kafka-metrics-config.yml"


@dataclass(frozen=True)
class JmxRule:
    """One rule of the Prometheus JMX exporter: `pattern` is a regular expression over the MBean as the
    exporter spells it (`domain<key=value, ...><>attribute`), matched whole; `name` and the label values may
    use its groups as `$1`, `$2`. With `lowercaseOutputName` the name is lowercased after substitution."""

    pattern: str
    name: str
    type: str = "GAUGE"
    labels: Mapping[str, str] = field(default_factory=dict)

    def document(self) -> dict[str, object]:
        rule: dict[str, object] = {"pattern": self.pattern, "name": self.name, "type": self.type}
        if self.labels:
            rule["labels"] = dict(self.labels)
        return rule


# Only the MBeans the alerts and the Kafka dashboard read. The per-topic throughput counters
# (kafka_server_brokertopicmetrics_{messagesin,bytesin,bytesout}_total{topic=...}) take the topic from the
# MBean; the broker-wide BrokerTopicMetrics MBeans (no `topic` key) are left out on purpose, so a
# `sum by (topic)` never shows an unlabelled total beside the topics.
JMX_RULES = (
    JmxRule(
        "kafka.server<type=ReplicaManager, name=UnderReplicatedPartitions><>Value",
        "kafka_server_replicamanager_underreplicatedpartitions",
    ),
    JmxRule(
        "kafka.controller<type=KafkaController, name=OfflinePartitionsCount><>Value",
        "kafka_controller_kafkacontroller_offlinepartitionscount",
    ),
    JmxRule(
        r"kafka.server<type=(BrokerTopicMetrics), name=(MessagesIn|BytesIn|BytesOut)PerSec, "
        r"topic=(.+)><>Count",
        "kafka_server_$1_$2_total",
        "COUNTER",
        {"topic": "$3"},
    ),
)


def jmx_exporter_config() -> str:
    """The Prometheus JMX exporter's configuration: only the MBeans the alerts and dashboard need."""
    rules = [rule.document() for rule in JMX_RULES]
    return yaml.safe_dump({"lowercaseOutputName": True, "rules": rules}, sort_keys=False)


@dataclass(frozen=True)
class KafkaArgs:
    platform: Platform
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def replication(brokers: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas for a cluster of `brokers` (3 and 2 from three up)."""
    factor = min(brokers, 3)
    return factor, 2 if factor >= 3 else 1


class Kafka(Component):
    def __init__(self, name: str, args: KafkaArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Kafka", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces.data
        component = env.components["kafka"]
        brokers = component.instances
        factor, min_isr = replication(brokers)
        version = env.platform.images.kafka
        operator = self.helm_release(
            "operator",
            "maximus-strimzi",
            env.platform.charts.strimzi,
            ns,
            {
                "watchNamespaces": [],
                "watchAnyNamespace": False,
                "resources": chart_values_resources(OPERATOR_SIZE),
                "fullReconciliationIntervalMs": 120000,
                # Every pod Strimzi creates meets Pod Security `restricted` (the namespace enforces it).
                "extraEnvs": [{"name": "STRIMZI_POD_SECURITY_PROVIDER_CLASS", "value": "restricted"}],
            },
        )
        cluster_label = {"strimzi.io/cluster": KAFKA_CLUSTER}
        metrics_config = k8s.core.v1.ConfigMap(
            self.rname("metrics-config"),
            metadata=self.meta(METRICS_CONFIG, ns),
            data={METRICS_KEY: jmx_exporter_config()},
            opts=self.opts(),
        )
        pool_template: dict[str, object] = {}
        if brokers > 1:
            pool_template = {
                "pod": {
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "labelSelector": {
                                        "matchLabels": {**cluster_label, "strimzi.io/kind": "Kafka"}
                                    },
                                    "topologyKey": "kubernetes.io/hostname",
                                }
                            ]
                        }
                    }
                }
            }
        self.node_pool = self.custom(
            "nodepool",
            STRIMZI_API,
            "KafkaNodePool",
            self.meta("broker", ns, labels=cluster_label),
            {
                "replicas": brokers,
                "roles": ["controller", "broker"],
                "storage": {
                    "type": "jbod",
                    "volumes": [
                        {
                            "id": 0,
                            "type": "persistent-claim",
                            "size": f"{component.storage_gi}Gi",
                            "deleteClaim": False,
                            "kraftMetadata": "shared",
                        }
                    ],
                },
                "resources": resources(env.platform.sizes.kafka),
                **({"template": pool_template} if pool_template else {}),
            },
            depends_on=[operator],
        )
        self.kafka = self.custom(
            "cluster",
            STRIMZI_API,
            "Kafka",
            self.meta(
                KAFKA_CLUSTER,
                ns,
                annotations={"strimzi.io/node-pools": "enabled", "strimzi.io/kraft": "enabled"},
            ),
            {
                "kafka": {
                    "version": version,
                    "metadataVersion": f"{'.'.join(version.split('.')[:2])}-IV0",
                    "listeners": [
                        {"name": "plain", "port": PLAIN_PORT, "type": "internal", "tls": False},
                        {"name": "tls", "port": TLS_PORT, "type": "internal", "tls": True},
                    ],
                    "config": {
                        "default.replication.factor": factor,
                        "min.insync.replicas": min_isr,
                        "offsets.topic.replication.factor": factor,
                        "transaction.state.log.replication.factor": factor,
                        "transaction.state.log.min.isr": min_isr,
                        "auto.create.topics.enable": False,
                    },
                    "metricsConfig": {
                        "type": "jmxPrometheusExporter",
                        "valueFrom": {"configMapKeyRef": {"name": METRICS_CONFIG, "key": METRICS_KEY}},
                    },
                },
                "entityOperator": {
                    "topicOperator": {"resources": resources(OPERATOR_SIZE)},
                    "userOperator": {"resources": resources(OPERATOR_SIZE)},
                },
                # Consumer lag per group and partition (kafka_consumergroup_lag).
                "kafkaExporter": {
                    "topicRegex": ".*",
                    "groupRegex": ".*",
                    "resources": resources(EXPORTER_SIZE),
                },
            },
            depends_on=[operator, self.node_pool, metrics_config],
        )
        # Strimzi's pods carry strimzi.io/kind and strimzi.io/name; both expose `tcp-prometheus` (9404).
        for suffix, strimzi_name in (
            ("podmonitor-brokers", f"{KAFKA_CLUSTER}-kafka"),
            ("podmonitor-exporter", f"{KAFKA_CLUSTER}-kafka-exporter"),
        ):
            self.custom(
                suffix,
                "monitoring.coreos.com/v1",
                "PodMonitor",
                self.meta(strimzi_name, ns),
                {
                    "selector": {
                        "matchLabels": {
                            **cluster_label,
                            "strimzi.io/kind": "Kafka",
                            "strimzi.io/name": strimzi_name,
                        }
                    },
                    "podMetricsEndpoints": [{"port": "tcp-prometheus", "interval": "30s"}],
                },
                depends_on=[self.kafka],
            )
        for topic in env.platform.kafka.topics:
            self.custom(
                f"topic-{topic.name}",
                STRIMZI_API,
                "KafkaTopic",
                self.meta(topic.name.replace(".", "-"), ns, labels=cluster_label),
                {
                    "topicName": topic.name,
                    "partitions": topic.partitions,
                    "replicas": factor,
                    "config": {
                        "retention.ms": topic.retention_hours * 3_600_000,
                        "min.insync.replicas": min_isr,
                        "cleanup.policy": "delete",
                    },
                },
                depends_on=[self.kafka],
            )
        self.bootstrap = f"{KAFKA_CLUSTER}-kafka-bootstrap.{ns}.svc.cluster.local:{PLAIN_PORT}"
        self.register_outputs({"bootstrap": self.bootstrap})


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------

CONSUMER_LAG_MAX = 1000


def alerts() -> Group:
    """Kafka, from the Strimzi brokers' JMX exporter and the Kafka exporter (consumer lag)."""
    return Group(
        "kafka",
        [
            Alert(
                name="KafkaUnderReplicatedPartitions",
                expr="sum by (namespace) (kafka_server_replicamanager_underreplicatedpartitions) > 0",
                for_="10m",
                severity="warning",
                summary="Kafka in {{ $labels.namespace }} has under-replicated partitions",
                description=(
                    "Some partitions in {{ $labels.namespace }} have fewer in-sync replicas than configured "
                    "for 10 minutes: one more broker lost could make them unavailable."
                ),
                example=Example(
                    {
                        "kafka_server_replicamanager_underreplicatedpartitions"
                        '{namespace="data", pod="k-0"}': "0 3x20"
                    },
                    "15m",
                    {"namespace": "data"},
                ),
            ),
            Alert(
                name="KafkaOfflinePartitions",
                expr="sum by (namespace) (kafka_controller_kafkacontroller_offlinepartitionscount) > 0",
                for_="1m",
                severity="critical",
                summary="Kafka in {{ $labels.namespace }} has offline partitions",
                description=(
                    "Partitions in {{ $labels.namespace }} have no leader: producers and consumers of "
                    "those partitions fail now."
                ),
                example=Example(
                    {
                        "kafka_controller_kafkacontroller_offlinepartitionscount"
                        '{namespace="data", pod="k-0"}': "0 2x10"
                    },
                    "5m",
                    {"namespace": "data"},
                ),
            ),
            Alert(
                name="KafkaConsumerLagHigh",
                expr=(
                    f"sum by (namespace, consumergroup, topic) (kafka_consumergroup_lag) > {CONSUMER_LAG_MAX}"
                ),
                for_="15m",
                severity="warning",
                summary="consumer group {{ $labels.consumergroup }} lags on {{ $labels.topic }}",
                description=(
                    f"{{{{ $labels.consumergroup }}}} is more than {CONSUMER_LAG_MAX} messages behind on "
                    "{{ $labels.topic }} for 15 minutes: events reach the services late."
                ),
                example=Example(
                    {
                        'kafka_consumergroup_lag{namespace="data", consumergroup="hitl", topic="t", '
                        'partition="0"}': "0 5000x30"
                    },
                    "20m",
                    {"namespace": "data", "consumergroup": "hitl", "topic": "t"},
                ),
            ),
        ],
    )
