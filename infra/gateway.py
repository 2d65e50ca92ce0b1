"""Gateway: Kong (pinned chart, DB-less, TLS only) as the ingress, one Ingress per route of the model with
its per-IP rate limit, a per-consumer limit and key-auth (or JWT) on authenticated routes, and TLS from a
cert-manager Certificate or a Secret provided out of band."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.alerts import Alert, Example, Group
from infra.common import (
    CONSUMER_HEADER,
    DEPLOY_CONSUMER,
    KONG_RELEASE,
    Component,
    KubernetesObject,
    Platform,
    body,
    chart_values_resources,
    container_security,
)
from infra.mesh import PREVIEW_HEADER
from opskit.model import Resources, RouteLimit

KONG_API = "configuration.konghq.com/v1"
INGRESS_CLASS = "kong"
CONSUMER = "maximus-client"
API_KEY_SECRET = "maximus-gateway-api-key"  # noqa: S105 - a Secret's name
DEPLOY_API_KEY_SECRET = "maximus-gateway-deploy-api-key"  # noqa: S105  # pragma: allowlist secret - a name
# Who a request claims to be, or which color it asks for, means something only after authentication.
IDENTITY_HEADERS = (CONSUMER_HEADER, "x-consumer-id", PREVIEW_HEADER)
API_KEY_HEADER = "X-API-Key"
PROXY_SIZE = Resources(cpu_request="250m", memory_request="256Mi", cpu_limit="1", memory_limit="1Gi")


@dataclass(frozen=True)
class GatewayArgs:
    platform: Platform
    service_name: str
    service_port: int
    api_key: pulumi.Output[str]
    deploy_api_key: pulumi.Output[str]
    tls: tuple[pulumi.Output[str], pulumi.Output[str]] | None = None
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def route_slug(route: RouteLimit) -> str:
    return route.path.strip("/").replace("/", "-") or "root"


class Gateway(Component):
    def __init__(self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Gateway", name, args.platform, args.after, opts)
        env = args.platform.env
        settings = env.platform.gateway
        ns = args.platform.namespaces
        production = env.name == "production"
        values: dict[str, Any] = {
            "image": {"repository": "kong", "tag": env.platform.images.kong},
            "env": {"database": "off", "proxy_access_log": "/dev/stdout", "ssl_protocols": "TLSv1.3"},
            "replicaCount": settings.proxy_replicas,
            "resources": chart_values_resources(PROXY_SIZE),
            # The image's user is a name; Pod Security needs the number to prove it is not root.
            "containerSecurityContext": {**container_security(), "runAsUser": 1000, "runAsGroup": 1000},
            "ingressController": {
                "enabled": True,
                "ingressClass": INGRESS_CLASS,
                "resources": chart_values_resources(Resources()),
            },
            # TLS only: no plain-HTTP listener to fall back to.
            "proxy": {
                "type": "LoadBalancer",
                "http": {"enabled": False},
                "tls": {"enabled": True, "servicePort": 443, "containerPort": 8443},
            },
            "podDisruptionBudget": {"enabled": production, "maxUnavailable": 1},
            # Clients reach Kong directly (TLS ends here); Kong reaches the service via its sidecar (mTLS).
            "podAnnotations": {"traffic.sidecar.istio.io/includeInboundPorts": ""},
        }
        release = self.helm_release("kong", KONG_RELEASE, env.platform.charts.kong, ns.gateway, values)

        app_ns = ns.app
        plugins = [
            self._plugin(
                "consumer-limit",
                name="maximus-limit-per-consumer",
                namespace=app_ns,
                plugin="rate-limiting",
                config={
                    "minute": settings.per_consumer_per_minute,
                    "limit_by": "consumer",
                    "policy": "local",
                },
                release=release,
            )
        ]
        auth_config: dict[str, Any] = (
            {"key_names": [API_KEY_HEADER], "hide_credentials": True}
            if settings.auth == "key-auth"
            else {"claims_to_verify": ["exp"], "header_names": ["authorization"]}
        )
        plugins.append(
            self._plugin(
                "auth",
                name=f"maximus-{settings.auth}",
                namespace=app_ns,
                plugin=settings.auth,
                config=auth_config,
                release=release,
            )
        )
        # The clients' consumer, and the deploy tooling's own: only it reaches an idle color (mesh.py).
        for prefix, consumer, secret_name, key in (
            ("", CONSUMER, API_KEY_SECRET, args.api_key),
            ("deploy-", DEPLOY_CONSUMER, DEPLOY_API_KEY_SECRET, args.deploy_api_key),
        ):
            credential = k8s.core.v1.Secret(
                self.rname(f"{prefix}api-key"),
                metadata=self.meta(secret_name, app_ns, labels={"konghq.com/credential": settings.auth}),
                type="Opaque",
                # key-auth: the API key sent in X-API-Key; jwt: the HS256 secret tokens are signed with.
                string_data=(
                    {"key": key}
                    if settings.auth == "key-auth"
                    else {"key": consumer, "algorithm": "HS256", "secret": key}
                ),
                opts=self.opts(),
            )
            KubernetesObject(
                self.rname(f"{prefix}consumer"),
                KONG_API,
                "KongConsumer",
                metadata=self.meta(
                    consumer, app_ns, annotations={"kubernetes.io/ingress.class": INGRESS_CLASS}
                ),
                fields={"username": consumer, "credentials": [secret_name]},
                opts=self.opts(depends_on=[release, credential]),
            )
        plugins.append(
            self._plugin(
                "strip-identity",
                name="maximus-strip-identity",
                namespace=app_ns,
                plugin="request-transformer",
                config={"remove": {"headers": list(IDENTITY_HEADERS)}},
                release=release,
            )
        )
        if settings.cluster_issuer is None:
            if args.tls is None:
                raise ValueError("platform.gateway: without cluster_issuer the certificate comes from config")
            certificate, key = args.tls
            k8s.core.v1.Secret(
                self.rname("tls"),
                metadata=self.meta(settings.tls_certificate, app_ns),
                type="kubernetes.io/tls",
                string_data={"tls.crt": certificate, "tls.key": key},
                opts=self.opts(),
            )
        else:
            self.custom(
                "certificate",
                "cert-manager.io/v1",
                "Certificate",
                self.meta(settings.tls_certificate, app_ns),
                {
                    "secretName": settings.tls_certificate,
                    "dnsNames": [settings.host],
                    "issuerRef": {"kind": "ClusterIssuer", "name": settings.cluster_issuer},
                    "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                },
            )
        for route in settings.routes:
            slug = route_slug(route)
            ip_limit = self._plugin(
                f"ip-limit-{slug}",
                name=f"maximus-limit-ip-{slug}",
                namespace=app_ns,
                plugin="rate-limiting",
                config={"minute": route.per_minute, "limit_by": "ip", "policy": "local"},
                release=release,
            )
            names = [f"maximus-limit-ip-{slug}"]
            if route.auth:
                names += ["maximus-limit-per-consumer", f"maximus-{settings.auth}"]
            else:
                names += ["maximus-strip-identity"]
            k8s.networking.v1.Ingress(
                self.rname(f"ingress-{slug}"),
                metadata=self.meta(
                    f"{args.service_name}-{slug}",
                    app_ns,
                    annotations={
                        "konghq.com/plugins": ",".join(names),
                        "konghq.com/protocols": "https",
                        "konghq.com/preserve-host": "false",
                        "konghq.com/strip-path": "false",
                    },
                ),
                spec=body(
                    {
                        "ingressClassName": INGRESS_CLASS,
                        "tls": [{"hosts": [settings.host], "secretName": settings.tls_certificate}],
                        "rules": [
                            {
                                "host": settings.host,
                                "http": {
                                    "paths": [
                                        {
                                            "path": route.path,
                                            "pathType": "Prefix",
                                            "backend": {
                                                "service": {
                                                    "name": args.service_name,
                                                    "port": {"number": args.service_port},
                                                }
                                            },
                                        }
                                    ]
                                },
                            }
                        ],
                    }
                ),
                opts=self.opts(depends_on=[release, ip_limit, *plugins]),
            )
        self.url = f"https://{settings.host}"
        self.register_outputs({"url": self.url})

    def _plugin(
        self,
        suffix: str,
        *,
        name: str,
        namespace: str,
        plugin: str,
        config: dict[str, Any],
        release: pulumi.Resource,
    ) -> KubernetesObject:
        # KongPlugin carries `plugin` and `config` beside `metadata` (no `spec`).
        return KubernetesObject(
            self.rname(f"plugin-{suffix}"),
            KONG_API,
            "KongPlugin",
            metadata=self.meta(name, namespace, annotations={"kubernetes.io/ingress.class": INGRESS_CLASS}),
            fields={"plugin": plugin, "config": config},
            opts=self.opts(depends_on=[release]),
        )


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------

ERROR_RATIO_MAX = 0.05


def alerts() -> Group:
    """The edge: Kong on Kubernetes, HAProxy on a single machine; 5xx above 5% for 5 minutes pages."""
    haproxy = "haproxy_frontend_http_responses_total"
    return Group(
        "gateway",
        [
            Alert(
                name="KongHighErrorRatio",
                expr=(
                    'sum by (service) (rate(kong_http_requests_total{code=~"5.."}[5m]))\n'
                    f"/ sum by (service) (rate(kong_http_requests_total[5m])) > {ERROR_RATIO_MAX}"
                ),
                for_="5m",
                severity="critical",
                summary="more than 5% of Kong's answers for {{ $labels.service }} are 5xx",
                description=(
                    "Kong answered more than 5% of the requests to {{ $labels.service }} with a 5xx for "
                    "5 minutes, whether the upstream failed or Kong itself did."
                ),
                example=Example(
                    {
                        'kong_http_requests_total{service="hitl", route="r", code="200"}': "0+900x20",
                        'kong_http_requests_total{service="hitl", route="r", code="503"}': "0+100x20",
                    },
                    "10m",
                    {"service": "hitl"},
                ),
            ),
            Alert(
                name="HAProxyHighErrorRatio",
                expr=(
                    f'sum by (proxy) (rate({haproxy}{{proxy="edge", code="5xx"}}[5m]))\n'
                    f'/ sum by (proxy) (rate({haproxy}{{proxy="edge"}}[5m])) > {ERROR_RATIO_MAX}'
                ),
                for_="5m",
                severity="critical",
                summary="more than 5% of the edge's answers are 5xx",
                description=(
                    "HAProxy's frontend {{ $labels.proxy }} answered more than 5% of requests with a 5xx for "
                    "5 minutes: users see errors, from the active color or from HAProxy itself."
                ),
                example=Example(
                    {
                        f'{haproxy}{{proxy="edge", code="2xx"}}': "0+900x20",
                        f'{haproxy}{{proxy="edge", code="5xx"}}': "0+100x20",
                        f'{haproxy}{{proxy="stats", code="2xx"}}': "0+10x20",
                    },
                    "10m",
                    {"proxy": "edge"},
                ),
            ),
        ],
    )
