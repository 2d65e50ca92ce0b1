"""Mesh: Istio base, CNI and istiod (pinned charts); STRICT mTLS mesh-wide; a default-deny
AuthorizationPolicy with explicit allows; the service's DestinationRule (blue and green subsets, outlier
detection, connection-pool limits) and VirtualService (weights, retries, timeout).

Traffic belongs to the deploy tooling: `invoke deploy` and `invoke rollback` patch the VirtualService's
route weights and its active-color annotation. Pulumi creates them once and ignores later changes to
exactly those fields (`ignore_changes`), so a later `pulumi up` never flips traffic back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi

from infra.alerts import Alert, Example, Group
from infra.common import (
    ACTIVE_COLOR_ANNOTATION,
    COLOR_LABEL,
    CONSUMER_HEADER,
    DEPLOY_CONSUMER,
    JAEGER_COLLECTOR,
    TRAFFIC_OWNER_ANNOTATION,
    Component,
    Platform,
    chart_values_resources,
    service_host,
)
from opskit.model import COLORS, Color, Resources

SECURITY_API = "security.istio.io/v1"
NETWORKING_API = "networking.istio.io/v1"
RETRY_ATTEMPTS = 3
PER_TRY_TIMEOUT = "2s"
ROUTE_TIMEOUT = "10s"
RETRY_ON = "5xx,reset,connect-failure,refused-stream,gateway-error"
WEBSOCKET_PATH = "/hitl/ws"
PREVIEW_HEADER = "x-maximus-color"  # the same header as opskit.routers.istio.PREVIEW_HEADER
# The fields `invoke deploy` / `invoke rollback` own; Pulumi leaves them as the tooling set them.
TRAFFIC_FIELDS = ("spec.http[*].route", f'metadata.annotations["{ACTIVE_COLOR_ANNOTATION}"]')
ISTIOD_SIZE = Resources(cpu_request="200m", memory_request="512Mi", cpu_limit="1", memory_limit="2Gi")


@dataclass(frozen=True)
class MeshArgs:
    platform: Platform
    service_name: str
    service_port: int
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def route(host: str, port: int, active: Color) -> list[dict[str, Any]]:
    """All traffic to the active color, none to the other."""
    return [
        {
            "destination": {"host": host, "subset": color, "port": {"number": port}},
            "weight": 100 if color == active else 0,
        }
        for color in COLORS
    ]


class Mesh(Component):
    def __init__(self, name: str, args: MeshArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Mesh", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces
        charts = env.platform.charts
        base = self.helm_release(
            "istio-base", "istio-base", charts.istio_base, ns.mesh, {"defaultRevision": "default"}
        )
        cni = self.helm_release(
            "istio-cni", "istio-cni", charts.istio_cni, ns.mesh, {"profile": "default"}, depends_on=[base]
        )
        istiod = self.helm_release(
            "istiod",
            "istiod",
            charts.istiod,
            ns.mesh,
            {
                "pilot": {
                    "cni": {"enabled": True},
                    "resources": chart_values_resources(ISTIOD_SIZE),
                    "autoscaleMin": 2 if env.name == "production" else 1,
                    # Native sidecars: Jobs complete, and the proxy starts before and stops after the app.
                    "env": {"ENABLE_NATIVE_SIDECARS": "true"},
                },
                "global": {"proxy": {"holdApplicationUntilProxyStarts": True}},
                "meshConfig": {
                    "accessLogFile": "/dev/stdout",
                    "enableTracing": True,
                    "extensionProviders": [
                        {
                            "name": "maximus-jaeger",
                            "opentelemetry": {
                                "service": service_host(JAEGER_COLLECTOR, ns.observability),
                                "port": 4317,
                            },
                        }
                    ],
                    "defaultProviders": {"tracing": ["maximus-jaeger"]},
                },
            },
            depends_on=[base, cni],
        )
        self.ready: list[pulumi.Resource] = [istiod]
        self.custom(
            "peer-authentication",
            SECURITY_API,
            "PeerAuthentication",
            self.meta("default", ns.mesh),
            {"mtls": {"mode": "STRICT"}},
            depends_on=[istiod],
        )
        # An ALLOW policy without rules in the root namespace matches nothing: everything is denied
        # unless a policy below allows it.
        self.custom(
            "deny-all",
            SECURITY_API,
            "AuthorizationPolicy",
            self.meta("default-deny", ns.mesh),
            {},
            depends_on=[istiod],
        )
        app = args.service_name
        self.custom(
            "allow-app",
            SECURITY_API,
            "AuthorizationPolicy",
            self.meta(f"allow-{app}", ns.app),
            {
                "selector": {"matchLabels": {"app.kubernetes.io/name": app}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"namespaces": [ns.gateway]}}],
                        "to": [{"operation": {"ports": [str(args.service_port)]}}],
                    },
                    {
                        "from": [{"source": {"namespaces": [ns.observability]}}],
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/metrics"]}}],
                    },
                ],
            },
            depends_on=[istiod],
        )
        self.custom(
            "allow-gateway",
            SECURITY_API,
            "AuthorizationPolicy",
            self.meta("allow-gateway", ns.gateway),
            {
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"namespaces": [ns.gateway, ns.observability]}}]}],
            },
            depends_on=[istiod],
        )
        host = service_host(app, ns.app)
        self.destination_rule = self.custom(
            "destination-rule",
            NETWORKING_API,
            "DestinationRule",
            self.meta(app, ns.app),
            {
                "host": host,
                "trafficPolicy": {
                    "tls": {"mode": "ISTIO_MUTUAL"},
                    "connectionPool": {
                        "tcp": {"maxConnections": 200, "connectTimeout": "3s"},
                        "http": {
                            "http1MaxPendingRequests": 100,
                            "http2MaxRequests": 1000,
                            "maxRequestsPerConnection": 100,
                            "maxRetries": 3,
                            "idleTimeout": "60s",
                        },
                    },
                    "outlierDetection": {
                        "consecutive5xxErrors": 5,
                        "interval": "10s",
                        "baseEjectionTime": "30s",
                        "maxEjectionPercent": 50,
                    },
                },
                "subsets": [{"name": color, "labels": {COLOR_LABEL: color}} for color in COLORS],
            },
            depends_on=[istiod],
        )
        active = env.platform.initial_color
        routes = route(host, args.service_port, active)
        self.virtual_service = self.custom(
            "virtual-service",
            NETWORKING_API,
            "VirtualService",
            self.meta(
                app,
                ns.app,
                annotations={
                    ACTIVE_COLOR_ANNOTATION: active,
                    TRAFFIC_OWNER_ANNOTATION: "invoke deploy / invoke rollback; Pulumi ignores the weights",
                },
            ),
            {
                "hosts": [host],
                "http": [
                    # The pre-promotion analysis reaches the idle color through these; never switched.
                    *(
                        {
                            "name": f"preview-{color}",
                            "match": [
                                {
                                    "headers": {
                                        PREVIEW_HEADER: {"exact": color},
                                        CONSUMER_HEADER: {"exact": DEPLOY_CONSUMER},
                                    }
                                }
                            ],
                            "route": [
                                {
                                    "destination": {
                                        "host": host,
                                        "subset": color,
                                        "port": {"number": args.service_port},
                                    }
                                }
                            ],
                            "timeout": ROUTE_TIMEOUT,
                        }
                        for color in COLORS
                    ),
                    {
                        # WebSocket clients hold their connection: no route timeout, no retries.
                        "name": "websocket",
                        "match": [{"uri": {"prefix": WEBSOCKET_PATH}}],
                        "route": routes,
                        "timeout": "0s",
                    },
                    {
                        "name": "primary",
                        "route": routes,
                        "timeout": ROUTE_TIMEOUT,
                        "retries": {
                            "attempts": RETRY_ATTEMPTS,
                            "perTryTimeout": PER_TRY_TIMEOUT,
                            "retryOn": RETRY_ON,
                        },
                    },
                ],
            },
            depends_on=[istiod, self.destination_rule],
            ignore_changes=TRAFFIC_FIELDS,
        )
        self.active_color_location = {
            "virtualService": f"{ns.app}/{app}",
            "annotation": ACTIVE_COLOR_ANNOTATION,
            "weights": "spec.http[*].route[*].weight",
            "initialColor": active,
        }
        self.register_outputs({"activeColor": self.active_color_location})


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------


def alerts() -> Group:
    """Istio: server-side 5xx ratio per destination service, and configuration the sidecars reject."""
    requests = 'istio_requests_total{reporter="destination"'
    by = "destination_service_namespace, destination_service_name"
    return Group(
        "mesh",
        [
            Alert(
                name="IstioHighErrorRatio",
                expr=(
                    f'sum by ({by}) (rate({requests}, response_code=~"5.."}}[5m]))\n'
                    f"/ sum by ({by}) (rate({requests}}}[5m])) > 0.05"
                ),
                for_="5m",
                severity="warning",
                summary="more than 5% of mesh requests to {{ $labels.destination_service_name }} fail",
                description=(
                    "Sidecars of {{ $labels.destination_service_namespace }}/"
                    "{{ $labels.destination_service_name }} answered more than 5% of requests with a 5xx "
                    "for 5 minutes (after retries)."
                ),
                example=Example(
                    {
                        'istio_requests_total{reporter="destination", destination_service_namespace="app", '
                        'destination_service_name="hitl", response_code="200"}': "0+900x20",
                        'istio_requests_total{reporter="destination", destination_service_namespace="app", '
                        'destination_service_name="hitl", response_code="503"}': "0+100x20",
                    },
                    "10m",
                    {"destination_service_namespace": "app", "destination_service_name": "hitl"},
                ),
            ),
            Alert(
                name="IstioConfigRejected",
                expr="sum by (type) (increase(pilot_total_xds_rejects[10m])) > 0",
                for_="10m",
                severity="warning",
                summary="sidecars reject istiod's {{ $labels.type }} configuration",
                description=(
                    "Proxies rejected configuration of type {{ $labels.type }} pushed by istiod for 10 "
                    "minutes: they keep stale routes, so a traffic switch may not take effect."
                ),
            ),
        ],
    )
