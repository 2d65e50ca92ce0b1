"""Building blocks every platform component shares: names, labels, namespaces, security contexts.

Kubernetes bodies are written as camelCase dictionaries, exactly as they appear in a manifest: the
SDK passes dictionaries through untranslated, so what the component declares is what the cluster gets
(and what `invoke stack.render` writes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes import _utilities as k8s_utilities

from opskit.model import Chart, Environment, Resources

PART_OF = "maximus"
ENV_LABEL = "maximus.io/environment"
COMPONENT_LABEL = "app.kubernetes.io/component"
NAME_LABEL = "app.kubernetes.io/name"
COLOR_LABEL = "maximus.io/color"
ACTIVE_COLOR_ANNOTATION = "maximus.io/active-color"
# The deploy tooling's own gateway consumer: Kong names the authenticated consumer to the upstream in
# CONSUMER_HEADER (set, or cleared, by its auth plugin), so the mesh's preview routes answer only it.
DEPLOY_CONSUMER = "maximus-deploy"
CONSUMER_HEADER = "x-consumer-username"
TRAFFIC_OWNER_ANNOTATION = "maximus.io/traffic-owner"
NONROOT_UID = 10001
MESH_NAMESPACE = "istio-system"
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}  # fmt: skip


def body(value: Mapping[str, Any]) -> Any:
    """A camelCase Kubernetes body handed to the SDK as is.

    Typed `Any`: the SDK's TypedDicts spell keys in snake_case, the cluster (and this code) in camelCase.
    """
    return dict(value)


def bodies(values: Sequence[Mapping[str, Any]]) -> Any:
    """A list of camelCase Kubernetes bodies (rules, subjects), handed to the SDK as is."""
    return [dict(v) for v in values]


@dataclass(frozen=True)
class Namespaces:
    """The namespaces of one environment: the application's and one per platform tier."""

    app: str
    data: str
    observability: str
    gateway: str
    mesh: str = MESH_NAMESPACE

    @classmethod
    def of(cls, env: Environment) -> Namespaces:
        if env.namespace is None:
            raise ValueError(f"environment {env.name} has no namespace")
        base = env.namespace
        return cls(
            app=base, data=f"{base}-data", observability=f"{base}-observability", gateway=f"{base}-gateway"
        )

    def platform(self) -> list[str]:
        """The namespaces this stack creates (the mesh namespace too: it is cluster-wide but ours)."""
        return [self.app, self.data, self.observability, self.gateway, self.mesh]


@dataclass(frozen=True)
class Platform:
    """What every component gets: the validated model and its namespaces."""

    env: Environment
    namespaces: Namespaces

    def labels(self, component: str, name: str | None = None, **extra: str) -> dict[str, str]:
        labels = {
            NAME_LABEL: name or component,
            COMPONENT_LABEL: component,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": "pulumi",
            ENV_LABEL: self.env.name,
        }
        labels.update(extra)
        return labels

    def metadata(
        self,
        name: str,
        namespace: str | None,
        component: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        meta: dict[str, Any] = {"name": name, "labels": {**self.labels(component), **(labels or {})}}
        if namespace is not None:
            meta["namespace"] = namespace
        if annotations:
            meta["annotations"] = dict(annotations)
        return meta


def selector(component: str, name: str, **extra: str) -> dict[str, str]:
    return {NAME_LABEL: name, COMPONENT_LABEL: component, **extra}


def checkov_skips(*skips: tuple[str, str]) -> dict[str, str]:
    """checkov's skip annotations, each with its reason (`checkov.io/skipN: CHECK=reason`)."""
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(skips, start=1)}


def pod_security(uid: int = NONROOT_UID) -> dict[str, Any]:
    """Pod-level securityContext of the Pod Security Standard `restricted` (non-root, RuntimeDefault)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    """Container-level securityContext: read-only root, no privilege escalation, every capability dropped."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(size: Resources) -> dict[str, Any]:
    return {
        "requests": {"cpu": size.cpu_request, "memory": size.memory_request},
        "limits": {"cpu": size.cpu_limit, "memory": size.memory_limit},
    }


def chart_values_resources(size: Resources) -> dict[str, Any]:
    """The same requests and limits, for a Helm chart's values."""
    return resources(size)


def child(
    parent: pulumi.Resource,
    *,
    depends_on: Sequence[pulumi.Resource] = (),
    protect: bool = False,
    ignore_changes: Sequence[str] = (),
) -> pulumi.ResourceOptions:
    """Options of a component's child: parented to the component, with its explicit dependencies."""
    return pulumi.ResourceOptions(
        parent=parent,
        depends_on=list(depends_on),
        protect=protect,
        ignore_changes=list(ignore_changes) or None,
    )


class Component(pulumi.ComponentResource):
    """A platform component: its children are parented to it and their Pulumi names carry its prefix."""

    def __init__(
        self,
        kind: str,
        name: str,
        platform: Platform,
        after: Sequence[pulumi.Resource],
        opts: pulumi.ResourceOptions | None,
    ) -> None:
        super().__init__(f"maximus:infra:{kind}", name, None, opts)
        self.prefix = name
        self.platform = platform
        self._after = list(after)

    def rname(self, suffix: str) -> str:
        """The Pulumi name of a child: the component's name, then the child's."""
        return f"{self.prefix}-{suffix}"

    def opts(
        self,
        *,
        depends_on: Sequence[pulumi.Resource] = (),
        protect: bool = False,
        ignore_changes: Sequence[str] = (),
    ) -> pulumi.ResourceOptions:
        return child(
            self, depends_on=[*self._after, *depends_on], protect=protect, ignore_changes=ignore_changes
        )

    def meta(
        self,
        name: str,
        namespace: str | None,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        return self.platform.metadata(name, namespace, self.prefix, labels=labels, annotations=annotations)

    def helm_release(
        self,
        suffix: str,
        release: str,
        chart: Chart,
        namespace: str,
        values: Mapping[str, Any],
        *,
        depends_on: Sequence[pulumi.Resource] = (),
    ) -> k8s.helm.v3.Release:
        """A Helm release at the model's exact chart version; atomic, so a failed upgrade rolls back."""
        return k8s.helm.v3.Release(
            self.rname(suffix),
            k8s.helm.v3.ReleaseArgs(
                name=release,
                chart=chart.chart,
                version=chart.version,
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repo),
                namespace=namespace,
                create_namespace=False,
                atomic=True,
                timeout=600,
                values=dict(values),
            ),
            opts=self.opts(depends_on=depends_on),
        )

    def custom(
        self,
        suffix: str,
        api_version: str,
        kind: str,
        metadata: Any,
        spec: Mapping[str, Any],
        *,
        depends_on: Sequence[pulumi.Resource] = (),
        protect: bool = False,
        ignore_changes: Sequence[str] = (),
    ) -> k8s.apiextensions.CustomResource:
        """An object of an operator's or the mesh's CRD."""
        return k8s.apiextensions.CustomResource(
            self.rname(suffix),
            api_version=api_version,
            kind=kind,
            metadata=metadata,
            spec=dict(spec),
            opts=self.opts(depends_on=depends_on, protect=protect, ignore_changes=ignore_changes),
        )


def from_namespace(namespace: str, pod_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    if pod_labels:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def istio_scrape_tls() -> dict[str, Any]:
    """How Prometheus scrapes a meshed pod under STRICT mTLS: with the workload certificates its own
    (outbound-only) sidecar writes to /etc/prom-certs (see the monitoring component)."""
    return {
        "scheme": "https",
        "tlsConfig": {
            "caFile": "/etc/prom-certs/root-cert.pem",
            "certFile": "/etc/prom-certs/cert-chain.pem",
            "keyFile": "/etc/prom-certs/key.pem",
            "insecureSkipVerify": True,
        },
    }


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


# Names other components refer to (one place, so a rename cannot split them).
POSTGRES_CLUSTER = "maximus-postgres"
REDIS_NAME = "maximus-redis"
KAFKA_CLUSTER = "maximus-kafka"
JAEGER_COLLECTOR = "maximus-jaeger-collector"
JAEGER_QUERY = "maximus-jaeger-query"
KONG_RELEASE = "maximus-kong"


class KubernetesObject(pulumi.CustomResource):
    """A Kubernetes object whose fields sit beside `metadata` rather than under `spec` (KongPlugin,
    KongConsumer): declared through the provider's generic path, as `CustomResource` does for `spec`."""

    def __init__(
        self,
        resource_name: str,
        api_version: str,
        kind: str,
        *,
        metadata: Any,
        fields: Mapping[str, Any],
        opts: pulumi.ResourceOptions,
    ) -> None:
        props = {"apiVersion": api_version, "kind": kind, "metadata": metadata, **fields}
        defaults = k8s_utilities.get_resource_opts_defaults()
        super().__init__(
            f"kubernetes:{api_version}:{kind}",
            resource_name,
            props,
            pulumi.ResourceOptions.merge(defaults, opts),
        )
