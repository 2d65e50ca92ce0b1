"""Redis: a StatefulSet of the official image at an exact tag, AOF (and RDB) on a persistent volume,
the password from a Pulumi secret mounted as a file, a Service, and a PodDisruptionBudget in production;
a redis_exporter sidecar (the metrics the alerts below read), its PodMonitor and the NetworkPolicy that
lets Prometheus reach it.

Why no operator: one primary with AOF is what the platform runs (a cache with durable AOF, no Sentinel
or Cluster mode); an operator would add CRDs, its own images and an upgrade path for no feature used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

from infra.alerts import Alert, Example, Group
from infra.common import (
    NONROOT_UID,
    REDIS_NAME,
    Component,
    Platform,
    body,
    checkov_skips,
    container_security,
    from_namespace,
    pod_security,
    resources,
    selector,
    tcp,
)
from opskit.model import Resources

PORT = 6379
AUTH_SECRET = "maximus-redis-auth"  # noqa: S105 - a Secret's name
CONFIG = """\
# Rendered by infra/redis.py: AOF every second plus RDB snapshots, data under /data.
dir /data
appendonly yes
appendfsync everysec
aof-use-rdb-preamble yes
save 3600 1 300 100 60 10000
protected-mode yes
port 6379
include /etc/redis/secret/auth.conf
"""
# redis_exporter: an exact release. Its --redis.password-file (REDIS_PASSWORD_FILE) is not a plain
# password: it is JSON mapping each Redis URI to its password, looked up by the address scraped (a plain
# file fails to parse and the exporter exits). The Secret carries that map for REDIS_ADDR, next to the
# plain password Redis and the probes read.
EXPORTER_IMAGE = "oliver006/redis_exporter:v1.62.0"
EXPORTER_PORT = 9121
EXPORTER_REDIS_ADDR = f"redis://127.0.0.1:{PORT}"
EXPORTER_AUTH_FILE = "exporter-auth.json"
EXPORTER_SIZE = Resources(cpu_request="50m", memory_request="32Mi", cpu_limit="200m", memory_limit="64Mi")
PING = 'REDISCLI_AUTH="$(cat /etc/redis/secret/password)" redis-cli -h 127.0.0.1 ping | grep -q PONG'


def exporter_password_map(password: str) -> str:
    """redis_exporter's password file: the Redis URI it scrapes -> the password, as JSON."""
    return json.dumps({EXPORTER_REDIS_ADDR: password})


@dataclass(frozen=True)
class RedisArgs:
    platform: Platform
    password: pulumi.Output[str]
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


class Redis(Component):
    def __init__(self, name: str, args: RedisArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Redis", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces.data
        ns_observability = args.platform.namespaces.observability
        component = env.components["redis"]
        labels = selector("redis", REDIS_NAME)
        config = k8s.core.v1.ConfigMap(
            self.rname("config"),
            metadata=self.meta(f"{REDIS_NAME}-config", ns),
            data={"redis.conf": CONFIG},
            opts=self.opts(),
        )
        auth = k8s.core.v1.Secret(
            self.rname("auth"),
            metadata=self.meta(AUTH_SECRET, ns),
            type="Opaque",
            string_data={
                "password": args.password,
                "auth.conf": args.password.apply(lambda p: f"requirepass {p}\n"),
                EXPORTER_AUTH_FILE: args.password.apply(exporter_password_map),
            },
            opts=self.opts(),
        )
        probe_exec = {"exec": {"command": ["sh", "-c", PING]}}
        container = {
            "name": "redis",
            "image": f"redis:{env.platform.images.redis}",
            "imagePullPolicy": "Always",
            "command": ["redis-server", "/etc/redis/redis.conf"],
            "ports": [{"name": "tcp-redis", "containerPort": PORT, "protocol": "TCP"}],
            "resources": resources(env.platform.sizes.redis),
            "securityContext": container_security(),
            "readinessProbe": {**probe_exec, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
            "livenessProbe": {
                "tcpSocket": {"port": PORT},
                "initialDelaySeconds": 10,
                "periodSeconds": 15,
                "timeoutSeconds": 3,
                "failureThreshold": 4,
            },
            "startupProbe": {**probe_exec, "periodSeconds": 5, "failureThreshold": 60},
            "volumeMounts": [
                {"name": "data", "mountPath": "/data"},
                {
                    "name": "config",
                    "mountPath": "/etc/redis/redis.conf",
                    "subPath": "redis.conf",
                    "readOnly": True,
                },
                {"name": "auth", "mountPath": "/etc/redis/secret", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            ],
        }
        # redis_exporter beside Redis: same pod (so `pod` names the Redis instance), same Secret.
        exporter_health = {"httpGet": {"path": "/health", "port": "metrics"}, "timeoutSeconds": 3}
        exporter = {
            "name": "redis-exporter",
            "image": EXPORTER_IMAGE,
            "imagePullPolicy": "Always",
            "env": [
                {"name": "REDIS_ADDR", "value": EXPORTER_REDIS_ADDR},
                {"name": "REDIS_PASSWORD_FILE", "value": f"/etc/redis/secret/{EXPORTER_AUTH_FILE}"},
                {"name": "REDIS_EXPORTER_WEB_LISTEN_ADDRESS", "value": f":{EXPORTER_PORT}"},
            ],
            "ports": [{"name": "metrics", "containerPort": EXPORTER_PORT, "protocol": "TCP"}],
            "resources": resources(EXPORTER_SIZE),
            "securityContext": container_security(),
            "readinessProbe": {**exporter_health, "periodSeconds": 10, "failureThreshold": 3},
            "livenessProbe": {
                **exporter_health,
                "initialDelaySeconds": 10,
                "periodSeconds": 20,
                "failureThreshold": 3,
            },
            "volumeMounts": [{"name": "auth", "mountPath": "/etc/redis/secret", "readOnly": True}],
        }
        pod_labels = {**self.platform.labels("redis", REDIS_NAME)}
        self.statefulset = k8s.apps.v1.StatefulSet(
            self.rname("statefulset"),
            metadata=self.meta(
                REDIS_NAME,
                ns,
                annotations=checkov_skips(
                    (
                        "CKV_K8S_43",
                        "the official image is pinned to an exact release tag from the environment model, "
                        "redis_exporter to an exact release",
                    ),
                ),
            ),
            spec=body(
                {
                    "serviceName": REDIS_NAME,
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "podManagementPolicy": "OrderedReady",
                    "updateStrategy": {"type": "RollingUpdate"},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": {
                            "automountServiceAccountToken": False,
                            "securityContext": {
                                **pod_security(NONROOT_UID),
                                "fsGroupChangePolicy": "OnRootMismatch",
                            },
                            "terminationGracePeriodSeconds": 30,
                            "containers": [container, exporter],
                            "volumes": [
                                {"name": "config", "configMap": {"name": f"{REDIS_NAME}-config"}},
                                {"name": "auth", "secret": {"secretName": AUTH_SECRET, "defaultMode": 0o440}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                            ],
                        },
                    },
                    "volumeClaimTemplates": [
                        {
                            "metadata": {"name": "data", "labels": labels},
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": f"{component.storage_gi}Gi"}},
                            },
                        }
                    ],
                }
            ),
            opts=self.opts(depends_on=[config, auth]),
        )
        k8s.core.v1.Service(
            self.rname("service"),
            metadata=self.meta(REDIS_NAME, ns),
            spec=body(
                {
                    "selector": labels,
                    "ports": [
                        {"name": "tcp-redis", "port": PORT, "targetPort": "tcp-redis", "protocol": "TCP"}
                    ],
                }
            ),
            opts=self.opts(),
        )
        if env.name == "production":
            # One primary: a voluntary eviction (node drain) waits until someone moves Redis on purpose.
            k8s.policy.v1.PodDisruptionBudget(
                self.rname("pdb"),
                metadata=self.meta(REDIS_NAME, ns),
                spec=body({"minAvailable": 1, "selector": {"matchLabels": labels}}),
                opts=self.opts(),
            )
        self.host = f"{REDIS_NAME}.{ns}.svc.cluster.local"
        self.custom(
            "podmonitor",
            "monitoring.coreos.com/v1",
            "PodMonitor",
            self.meta(REDIS_NAME, ns),
            {
                "selector": {"matchLabels": labels},
                "podMetricsEndpoints": [{"port": "metrics", "interval": "30s"}],
            },
            depends_on=[self.statefulset],
        )
        # The baseline's default-deny: Prometheus (observability namespace) in on the exporter's port.
        k8s.networking.v1.NetworkPolicy(
            self.rname("netpol-metrics"),
            metadata=self.meta(f"allow-{REDIS_NAME}-metrics", ns),
            spec=body(
                {
                    "podSelector": {"matchLabels": labels},
                    "policyTypes": ["Ingress"],
                    "ingress": [
                        {
                            "from": [from_namespace(ns_observability)],
                            "ports": tcp(EXPORTER_PORT),
                        }
                    ],
                }
            ),
            opts=self.opts(),
        )
        self.register_outputs({"host": self.host})


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------


def alerts() -> Group:
    """Redis, from redis_exporter's metrics."""
    return Group(
        "redis",
        [
            Alert(
                name="RedisMemoryHigh",
                expr=(
                    "max by (namespace, pod) (redis_memory_used_bytes)\n"
                    "/ max by (namespace, pod) (redis_memory_max_bytes > 0) > 0.9"
                ),
                for_="5m",
                severity="warning",
                summary="Redis {{ $labels.pod }} uses more than 90% of its maxmemory",
                description=(
                    "{{ $labels.namespace }}/{{ $labels.pod }} is above 90% of maxmemory for 5 minutes: "
                    "keys are being evicted or writes will be refused."
                ),
                example=Example(
                    {
                        'redis_memory_used_bytes{namespace="data", pod="redis-0"}': "100 950x20",
                        'redis_memory_max_bytes{namespace="data", pod="redis-0"}': "1000x21",
                    },
                    "10m",
                    {"namespace": "data", "pod": "redis-0"},
                ),
            ),
            Alert(
                name="RedisRejectedConnections",
                expr="sum by (namespace, pod) (increase(redis_rejected_connections_total[5m])) > 0",
                severity="warning",
                summary="Redis {{ $labels.pod }} rejected client connections",
                description=(
                    "{{ $labels.namespace }}/{{ $labels.pod }} refused connections in the last 5 minutes "
                    "(maxclients reached): the service sees cache errors."
                ),
                example=Example(
                    {'redis_rejected_connections_total{namespace="data", pod="redis-0"}': "0 0 0 5 10 15"},
                    "5m",
                    {"namespace": "data", "pod": "redis-0"},
                ),
            ),
            Alert(
                name="RedisLastSaveFailed",
                expr="max by (namespace, pod) (redis_rdb_last_bgsave_status == 0)",
                for_="1m",
                severity="warning",
                summary="Redis {{ $labels.pod }}: the last RDB save failed",
                description=(
                    "The last background save of {{ $labels.namespace }}/{{ $labels.pod }} failed: a restart "
                    "would lose the data since the previous good snapshot, and Redis may refuse writes."
                ),
                example=Example(
                    {'redis_rdb_last_bgsave_status{namespace="data", pod="redis-0"}': "1 0x10"},
                    "5m",
                    {"namespace": "data", "pod": "redis-0"},
                ),
            ),
        ],
    )
