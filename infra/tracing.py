"""Tracing: Jaeger v2 (the OpenTelemetry Collector based binary) receiving OTLP, serving the UI and the
remote-sampling endpoint, with the sampling rate of the environment model; the mesh's Telemetry sends
sidecar spans to it at the same rate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from infra.common import (
    JAEGER_COLLECTOR,
    JAEGER_QUERY,
    NONROOT_UID,
    Component,
    Platform,
    body,
    checkov_skips,
    container_security,
    pod_security,
    resources,
    selector,
    service_host,
)

NAME = "maximus-jaeger"
MESH_PROVIDER = "maximus-jaeger"
HEALTH_PORT = 13133
PORTS = {"grpc-otlp": 4317, "http-otlp": 4318, "http-sampling": 5778, "http-query": 16686}


@dataclass(frozen=True)
class TracingArgs:
    platform: Platform
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)
    mesh_ready: Sequence[pulumi.Resource] = field(default_factory=tuple)


def jaeger_config(sampling_rate: float, max_traces: int) -> str:
    config: dict[str, Any] = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "remote_sampling", "healthcheckv2"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {"logs": {"level": "info"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"0.0.0.0:{HEALTH_PORT}"}},
            "jaeger_storage": {"backends": {"traces": {"memory": {"max_traces": max_traces}}}},
            "jaeger_query": {"trace_storage": "traces", "ui": {}},
            "remote_sampling": {
                "file": {"default_sampling_probability": sampling_rate, "reload_interval": "1m"},
                "http": {"endpoint": f"0.0.0.0:{PORTS['http-sampling']}"},
            },
        },
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"0.0.0.0:{PORTS['grpc-otlp']}"},
                    "http": {"endpoint": f"0.0.0.0:{PORTS['http-otlp']}"},
                }
            }
        },
        "processors": {"batch": {}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "traces"}},
    }
    return yaml.safe_dump(config, sort_keys=True)


class Tracing(Component):
    def __init__(self, name: str, args: TracingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Tracing", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces.observability
        settings = env.platform.tracing
        labels = selector("tracing", NAME)
        config = k8s.core.v1.ConfigMap(
            self.rname("config"),
            metadata=self.meta(f"{NAME}-config", ns),
            data={"config.yaml": jaeger_config(settings.sampling_rate, settings.max_traces)},
            opts=self.opts(),
        )
        health = {"httpGet": {"path": "/status", "port": HEALTH_PORT}}
        container = {
            "name": "jaeger",
            "image": f"jaegertracing/jaeger:{env.platform.images.jaeger}",
            "imagePullPolicy": "Always",
            "args": ["--config", "/etc/jaeger/config.yaml"],
            "ports": [
                *(
                    {"name": port_name, "containerPort": port, "protocol": "TCP"}
                    for port_name, port in PORTS.items()
                ),
                {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            ],
            "resources": resources(env.platform.sizes.jaeger),
            "securityContext": container_security(),
            "readinessProbe": {**health, "periodSeconds": 10},
            "livenessProbe": {
                **health,
                "initialDelaySeconds": 10,
                "periodSeconds": 20,
                "failureThreshold": 3,
            },
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/jaeger", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            ],
        }
        k8s.apps.v1.Deployment(
            self.rname("deployment"),
            metadata=self.meta(
                NAME,
                ns,
                annotations={
                    **checkov_skips(
                        (
                            "CKV_K8S_43",
                            "the image is pinned to an exact release tag from the environment model",
                        ),
                    ),
                    "maximus.io/no-disruption-budget": (
                        "one replica by design (in-memory trace store); a drain loses recent traces only"
                    ),
                },
            ),
            spec=body(
                {
                    # The in-memory store cannot be shared: one replica, replaced (not surged) on change.
                    "replicas": 1,
                    "strategy": {"type": "Recreate"},
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": self.platform.labels("tracing", NAME)},
                        "spec": {
                            "automountServiceAccountToken": False,
                            "securityContext": pod_security(NONROOT_UID),
                            "containers": [container],
                            "volumes": [
                                {"name": "config", "configMap": {"name": f"{NAME}-config"}},
                                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                            ],
                        },
                    },
                }
            ),
            opts=self.opts(depends_on=[config]),
        )
        for service_name, ports in (
            (JAEGER_COLLECTOR, ("grpc-otlp", "http-otlp", "http-sampling")),
            (JAEGER_QUERY, ("http-query",)),
        ):
            k8s.core.v1.Service(
                self.rname(f"service-{service_name}"),
                metadata=self.meta(service_name, ns),
                spec=body(
                    {
                        "selector": labels,
                        "ports": [
                            {"name": p, "port": PORTS[p], "targetPort": p, "protocol": "TCP"} for p in ports
                        ],
                    }
                ),
                opts=self.opts(),
            )
        # Sidecar spans: the mesh's default tracing provider at the environment's sampling rate.
        self.custom(
            "mesh-telemetry",
            "telemetry.istio.io/v1",
            "Telemetry",
            self.meta("mesh-default", args.platform.namespaces.mesh),
            {
                "tracing": [
                    {
                        "providers": [{"name": MESH_PROVIDER}],
                        "randomSamplingPercentage": round(settings.sampling_rate * 100, 4),
                    }
                ]
            },
            depends_on=list(args.mesh_ready),
        )
        self.otlp_endpoint = f"http://{service_host(JAEGER_COLLECTOR, ns)}:{PORTS['http-otlp']}"
        self.ui = f"http://{service_host(JAEGER_QUERY, ns)}:{PORTS['http-query']}"
        self.register_outputs({"otlpEndpoint": self.otlp_endpoint, "ui": self.ui})
