"""The application: blue and green Deployments of the service (image from the model, built and pushed with
pulumi-docker where the model says so), a Service per color and a stable one, per-color HPA and PDB,
probes, requests and limits, topology spread, the restricted securityContext, and a ServiceMonitor.

The deploy tooling owns each color's image and version (`invoke deploy` sets them on the idle color) and
the HPA owns replicas: Pulumi ignores later changes to those fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_docker as docker
import pulumi_kubernetes as k8s

from infra.alerts import Alert, Example, Group
from infra.common import (
    COLOR_LABEL,
    NAME_LABEL,
    NONROOT_UID,
    POSTGRES_CLUSTER,
    REDIS_NAME,
    Component,
    Platform,
    body,
    checkov_skips,
    container_security,
    istio_scrape_tls,
    pod_security,
    resources,
    selector,
    service_host,
)
from opskit.model import COLORS, Color

VERSION_LABEL = "maximus.io/version"
SECRETS_DIR = "/var/run/secrets/maximus"
APP_DB_SECRET = "maximus-app-postgres"  # noqa: S105 - a Secret's name
APP_REDIS_SECRET = "maximus-app-redis"  # noqa: S105 - a Secret's name
# What `invoke deploy` changes on a color and the HPA changes on its own: Pulumi leaves them alone.
DEPLOY_FIELDS = (
    "spec.replicas",
    "spec.template.spec.containers[0].image",
    "spec.template.spec.containers[0].env[0].value",
    f'spec.template.metadata.labels["{VERSION_LABEL}"]',
)


@dataclass(frozen=True)
class AppArgs:
    platform: Platform
    postgres_password: pulumi.Output[str]
    redis_password: pulumi.Output[str]
    otlp_endpoint: str
    registry_password: pulumi.Output[str] | None = None
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


class App(Component):
    def __init__(self, name: str, args: AppArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("App", name, args.platform, args.after, opts)
        env = args.platform.env
        ns = args.platform.namespaces
        service = env.service
        self.service_name = service.name
        image, pinned = self._image(args)
        db_secret = k8s.core.v1.Secret(
            self.rname("postgres-credentials"),
            metadata=self.meta(APP_DB_SECRET, ns.app),
            type="Opaque",
            string_data={"password": args.postgres_password},
            opts=self.opts(),
        )
        redis_secret = k8s.core.v1.Secret(
            self.rname("redis-credentials"),
            metadata=self.meta(APP_REDIS_SECRET, ns.app),
            type="Opaque",
            string_data={"password": args.redis_password},
            opts=self.opts(),
        )
        account = k8s.core.v1.ServiceAccount(
            self.rname("service-account"),
            metadata=self.meta(service.name, ns.app),
            automount_service_account_token=False,
            opts=self.opts(),
        )
        self.deployments: dict[Color, k8s.apps.v1.Deployment] = {}
        for color in COLORS:
            self.deployments[color] = self._color(
                args, color, image, pinned, [db_secret, redis_secret, account]
            )
        port = service.port
        self._service(service.name, selector("app", service.name), port, stable=True)
        for color in COLORS:
            self._service(
                f"{service.name}-{color}", selector("app", service.name, **{COLOR_LABEL: color}), port
            )
        self.custom(
            "service-monitor",
            "monitoring.coreos.com/v1",
            "ServiceMonitor",
            self.meta(service.name, ns.app),
            {
                "selector": {"matchLabels": {**selector("app", service.name), "maximus.io/stable": "true"}},
                "namespaceSelector": {"matchNames": [ns.app]},
                "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s", **istio_scrape_tls()}],
            },
        )
        self.url = f"http://{service_host(service.name, ns.app)}:{port}"
        self.register_outputs({"url": self.url})

    def meta(
        self,
        name: str,
        namespace: str | None,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        """Metadata of the service's objects: named after the service, not the component."""
        return super().meta(
            name, namespace, labels={NAME_LABEL: self.service_name, **(labels or {})}, annotations=annotations
        )

    def _image(self, args: AppArgs) -> tuple[pulumi.Input[str], bool]:
        """The image reference of a new color and whether it is pinned by digest."""
        env = args.platform.env
        reference = f"{env.service.image}:{env.service.version}"
        build = env.platform.build
        if build is None:
            return reference, False
        if args.registry_password is None:
            raise ValueError("platform.build needs the registry password")
        built = docker.Image(
            self.rname("image"),
            image_name=reference,
            build=docker.DockerBuildArgs(
                context=build.context, dockerfile=build.dockerfile, platform="linux/amd64"
            ),
            registry=docker.RegistryArgs(
                server=build.registry, username=build.username, password=args.registry_password
            ),
            opts=self.opts(),
        )
        return built.repo_digest, True

    def _color(
        self,
        args: AppArgs,
        color: Color,
        image: pulumi.Input[str],
        pinned: bool,
        after: Sequence[pulumi.Resource],
    ) -> k8s.apps.v1.Deployment:
        env = args.platform.env
        ns = args.platform.namespaces
        service = env.service
        name = f"{service.name}-{color}"
        match = selector("app", service.name, **{COLOR_LABEL: color})
        pod_labels = self.platform.labels(
            "app", service.name, **{COLOR_LABEL: color, VERSION_LABEL: service.version}
        )
        container: dict[str, Any] = {
            "name": service.name,
            "image": image,
            "imagePullPolicy": "Always",
            "ports": [{"name": "http", "containerPort": service.port, "protocol": "TCP"}],
            "env": [
                {"name": "MAXIMUS_VERSION", "value": service.version},  # index 0: owned by `invoke deploy`
                {"name": "MAXIMUS_SERVICE", "value": service.name},
                {"name": "MAXIMUS_ENVIRONMENT", "value": env.name},
                {"name": "MAXIMUS_COLOR", "value": color},
                {
                    "name": "MAXIMUS_DATABASE_URL",
                    "value": f"postgresql://hitl@{POSTGRES_CLUSTER}-rw.{ns.data}.svc.cluster.local:5432/hitl",
                },
                {"name": "MAXIMUS_DATABASE_PASSWORD_FILE", "value": f"{SECRETS_DIR}/postgres/password"},
                {"name": "MAXIMUS_REDIS_URL", "value": f"redis://{service_host(REDIS_NAME, ns.data)}:6379/0"},
                {"name": "MAXIMUS_REDIS_PASSWORD_FILE", "value": f"{SECRETS_DIR}/redis/password"},
                {"name": "OTEL_SERVICE_NAME", "value": service.name},
                {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": args.otlp_endpoint},
                {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
                {"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(env.platform.tracing.sampling_rate)},
            ],
            "resources": resources(env.platform.sizes.app),
            "securityContext": container_security(),
            "startupProbe": {
                "httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 5,
                "failureThreshold": max(int(env.deploy.ready_deadline_s // 5), 1),
            },
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "http"},
                "periodSeconds": 5,
                "timeoutSeconds": 2,
                "failureThreshold": 2,
            },
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 10,
                "timeoutSeconds": 2,
                "failureThreshold": 3,
            },
            # Endpoints drop the pod before it stops accepting; in-flight requests finish within the grace.
            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
            "volumeMounts": [
                {"name": "postgres-credentials", "mountPath": f"{SECRETS_DIR}/postgres", "readOnly": True},
                {"name": "redis-credentials", "mountPath": f"{SECRETS_DIR}/redis", "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            ],
        }
        spread = [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": match},
            }
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
        ]
        skips = (
            []
            if pinned
            else [("CKV_K8S_43", "tag pinned per release; `invoke deploy` sets each color's image")]
        )
        deployment = k8s.apps.v1.Deployment(
            self.rname(f"deployment-{color}"),
            metadata=self.meta(
                name,
                ns.app,
                labels={COLOR_LABEL: color},
                annotations=checkov_skips(*skips) if skips else None,
            ),
            spec=body(
                {
                    "replicas": service.replicas.min,
                    "revisionHistoryLimit": 5,
                    "selector": {"matchLabels": match},
                    "strategy": {
                        "type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                    },
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": {
                            "serviceAccountName": service.name,
                            "automountServiceAccountToken": False,
                            "securityContext": pod_security(NONROOT_UID),
                            "terminationGracePeriodSeconds": service.graceful_shutdown_s,
                            "topologySpreadConstraints": spread,
                            "containers": [container],
                            "volumes": [
                                {
                                    "name": "postgres-credentials",
                                    "secret": {"secretName": APP_DB_SECRET, "defaultMode": 0o440},
                                },
                                {
                                    "name": "redis-credentials",
                                    "secret": {"secretName": APP_REDIS_SECRET, "defaultMode": 0o440},
                                },
                                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                            ],
                        },
                    },
                }
            ),
            opts=self.opts(depends_on=after, ignore_changes=DEPLOY_FIELDS),
        )
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            self.rname(f"hpa-{color}"),
            metadata=self.meta(name, ns.app, labels={COLOR_LABEL: color}),
            spec=body(
                {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": service.replicas.min,
                    "maxReplicas": service.replicas.max,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": resource,
                                "target": {"type": "Utilization", "averageUtilization": target},
                            },
                        }
                        for resource, target in (
                            ("cpu", service.autoscaling.cpu_percent),
                            ("memory", service.autoscaling.memory_percent),
                        )
                    ],
                }
            ),
            opts=self.opts(depends_on=[deployment]),
        )
        k8s.policy.v1.PodDisruptionBudget(
            self.rname(f"pdb-{color}"),
            metadata=self.meta(name, ns.app, labels={COLOR_LABEL: color}),
            spec=body({"maxUnavailable": 1, "selector": {"matchLabels": match}}),
            opts=self.opts(),
        )
        return deployment

    def _service(self, name: str, match: dict[str, str], port: int, *, stable: bool = False) -> None:
        annotations = (
            # Kong sends to the Service, not the pod IPs: the sidecar applies the VirtualService's weights.
            {"ingress.kubernetes.io/service-upstream": "true"} if stable else None
        )
        k8s.core.v1.Service(
            self.rname(f"service-{name}"),
            metadata=self.meta(
                name,
                self.platform.namespaces.app,
                labels={NAME_LABEL: self.service_name, "maximus.io/stable": str(stable).lower()},
                annotations=annotations,
            ),
            spec=body(
                {
                    "selector": match,
                    "ports": [
                        {
                            "name": "http",
                            "port": port,
                            "targetPort": "http",
                            "protocol": "TCP",
                            "appProtocol": "http",
                        }
                    ],
                }
            ),
            opts=self.opts(),
        )


# --- alerts (rules beside the component; runbooks in runbooks/alerts/) --------------------------------------


def alerts(service: str) -> Group:
    """The service's colors, and the deploy tooling: a rollout that stopped progressing, and the two alerts
    `invoke deploy` and `invoke rollback` send to Alertmanager themselves (no Prometheus rule)."""
    return Group(
        f"{service}.availability",
        [
            Alert(
                name="ServiceDown",
                expr=f'up{{service="{service}"}} == 0',
                for_="1m",
                severity="critical",
                summary="{{ $labels.service }} {{ $labels.color }} on {{ $labels.instance }} is down",
                description=(
                    "Prometheus has not been able to scrape {{ $labels.instance }} "
                    "(color {{ $labels.color }}) for more than one minute."
                ),
                example=Example(
                    {f'up{{service="{service}", color="blue", instance="i:1", job="workload"}}': "1 1 0x10"},
                    "5m",
                    {"service": service, "color": "blue", "instance": "i:1", "job": "workload"},
                ),
            ),
            Alert(
                name="MaximusDeploymentStuck",
                expr=(
                    "max by (namespace, deployment) (kube_deployment_status_condition"
                    f'{{deployment=~"{service}-(blue|green)", condition="Progressing", status="false"}}) == 1'
                ),
                for_="5m",
                severity="warning",
                summary="the rollout of {{ $labels.deployment }} stopped progressing",
                description=(
                    "{{ $labels.namespace }}/{{ $labels.deployment }} exceeded its progress deadline: its "
                    "new pods do not become ready. The active color still serves; the deploy cannot finish."
                ),
                example=Example(
                    {
                        "kube_deployment_status_condition"
                        f'{{namespace="app", deployment="{service}-green", condition="Progressing", '
                        'status="false"}': "0 1x20"
                    },
                    "10m",
                    {"namespace": "app", "deployment": f"{service}-green"},
                ),
            ),
            Alert(
                name="MaximusRollback",
                expr=None,
                severity="warning",
                summary="a release was rolled back",
                description="Sent by `invoke deploy` (automatic) and `invoke rollback` (by hand), with why.",
            ),
            Alert(
                name="MaximusDeployHeld",
                expr=None,
                severity="warning",
                summary="a deploy is held: its analysis could not decide",
                description="Sent by `invoke deploy` when the post-promotion analysis has no data.",
            ),
        ],
    )
