"""Baseline: the namespaces (Pod Security `restricted`, Istio injection), default-deny network policies
with the allows each component needs, and least-privilege RBAC for admin, operator, readonly and the
deploy tooling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.common import (
    KUBE_DNS,
    POSTGRES_CLUSTER,
    Component,
    Platform,
    bodies,
    body,
    from_namespace,
    tcp,
)
from infra.monitoring import RELEASE as MONITORING_RELEASE

POD_SECURITY_VERSION = "v1.31"
ROLES = ("admin", "operator", "readonly")
DEPLOY_ACCOUNT = "maximus-deploy"
ANYWHERE = {"ipBlock": {"cidr": "0.0.0.0/0"}}
API_SERVER_PORTS = (443, 6443)
ISTIOD_PORTS = (15010, 15012, 15014, 15017)
# CloudNativePG 9443; the Prometheus operator 10250; Kong's ingress controller 8080.
WEBHOOK_PORTS = {"data": (9443,), "observability": (10250,), "gateway": (8080,)}


@dataclass(frozen=True)
class BaselineArgs:
    platform: Platform
    app_port: int
    service_name: str
    after: Sequence[pulumi.Resource] = field(default_factory=tuple)


def _namespace_labels(platform: Platform, namespace: str) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations of one namespace: what Pod Security enforces and whether Istio injects."""
    ns = platform.namespaces
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": POD_SECURITY_VERSION,
        "pod-security.kubernetes.io/audit": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }
    annotations: dict[str, str] = {}
    if namespace in (ns.app, ns.gateway):
        labels["istio-injection"] = "enabled"
    elif namespace == ns.data:
        labels["istio-injection"] = "disabled"
        annotations["maximus.io/istio-injection-reason"] = (
            "PostgreSQL, Redis and Kafka speak their own TLS and replication protocols; operator-to-instance "
            "traffic and operator Jobs break behind sidecars. Clients in the mesh reach them directly."
        )
    elif namespace == ns.observability:
        annotations["maximus.io/istio-injection-reason"] = (
            "injection per pod: only Prometheus carries an outbound-only sidecar, for the certificates "
            "it scrapes meshed workloads with under STRICT mTLS"
        )
    elif namespace == ns.mesh:
        labels["pod-security.kubernetes.io/enforce"] = "privileged"
        annotations["maximus.io/pod-security-reason"] = (
            "the istio-cni node agent installs the CNI plugin on every node (hostPath, privileged); it is "
            "what lets every other namespace run `restricted` without NET_ADMIN init containers"
        )
    return labels, annotations


class Baseline(Component):
    """Namespaces, network policies, service accounts and RBAC of one environment."""

    def __init__(self, name: str, args: BaselineArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Baseline", name, args.platform, args.after, opts)
        self.args = args
        ns = args.platform.namespaces
        self.namespaces: dict[str, k8s.core.v1.Namespace] = {}
        for namespace in ns.platform():
            labels, annotations = _namespace_labels(args.platform, namespace)
            self.namespaces[namespace] = k8s.core.v1.Namespace(
                self.rname(f"ns-{namespace}"),
                metadata=self.meta(namespace, None, labels=labels, annotations=annotations),
                opts=self.opts(),
            )
        self.ready: list[pulumi.Resource] = list(self.namespaces.values())
        self._network_policies()
        self._rbac()
        self.register_outputs({"namespaces": list(self.namespaces)})

    # --- network policies -------------------------------------------------------------------------

    def _policy(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        k8s.networking.v1.NetworkPolicy(
            self.rname(f"netpol-{namespace}-{name}"),
            metadata=self.meta(name, namespace),
            spec=body(spec),
            opts=self.opts(depends_on=[self.namespaces[namespace]]),
        )

    def _network_policies(self) -> None:
        ns = self.platform.namespaces
        port = self.args.app_port
        everyone = [from_namespace(n) for n in ns.platform()]
        for namespace in ns.platform():
            self._policy(namespace, "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
            egress: list[dict[str, Any]] = [
                {
                    "to": [KUBE_DNS],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
            ]
            if namespace != ns.mesh:
                egress.append({"to": [from_namespace(ns.mesh)], "ports": tcp(15012, 15010)})
            self._policy(
                namespace,
                "allow-dns-and-mesh",
                {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress},
            )
        same_namespace: dict[str, Any] = {"podSelector": {}}
        # Stateful tiers, the observability stack, the gateway and the mesh talk inside their namespace.
        for namespace in (ns.data, ns.observability, ns.gateway, ns.mesh):
            self._policy(
                namespace,
                "allow-same-namespace",
                {
                    "podSelector": {},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [same_namespace]}],
                    "egress": [{"to": [same_namespace]}],
                },
            )
        # Operators, Prometheus discovery, the ingress controller and istiod read the Kubernetes API.
        for namespace in (ns.data, ns.observability, ns.gateway, ns.mesh):
            self._policy(
                namespace,
                "allow-api-server",
                {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [ANYWHERE], "ports": tcp(*API_SERVER_PORTS)}],
                },
            )
        # Admission webhooks: the API server (outside any namespace) calls the operators' webhooks.
        for namespace, ports in (
            (ns.data, WEBHOOK_PORTS["data"]),
            (ns.observability, WEBHOOK_PORTS["observability"]),
            (ns.gateway, WEBHOOK_PORTS["gateway"]),
        ):
            self._policy(
                namespace,
                "allow-admission-webhooks",
                {
                    "podSelector": {},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [ANYWHERE], "ports": tcp(*ports)}],
                },
            )
        # The deploy tooling reads Prometheus and posts to Alertmanager through the API server's service
        # proxy; the API server is outside any namespace, as for the admission webhooks.
        self._policy(
            ns.observability,
            "allow-api-server-proxy",
            {
                "podSelector": {
                    "matchExpressions": [
                        {
                            "key": "app.kubernetes.io/name",
                            "operator": "In",
                            "values": ["prometheus", "alertmanager"],
                        }
                    ]
                },
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [ANYWHERE], "ports": tcp(9090, 9093)}],
            },
        )
        # Application: from the gateway and Prometheus in; to the data stores and the tracing collector out.
        self._policy(
            ns.app,
            "allow-app",
            {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": self.args.service_name}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [from_namespace(ns.gateway)], "ports": tcp(port)},
                    {"from": [from_namespace(ns.observability)], "ports": tcp(port, 15020, 15090)},
                ],
                "egress": [
                    {"to": [from_namespace(ns.data)], "ports": tcp(5432, 6379, 9092)},
                    {"to": [from_namespace(ns.observability)], "ports": tcp(4317, 4318, 5778)},
                ],
            },
        )
        # Data stores: clients from the application, scrapes from Prometheus, base backups and WAL to S3.
        self._policy(
            ns.data,
            "allow-data",
            {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [from_namespace(ns.app)], "ports": tcp(5432, 6379, 9092)},
                    {"from": [from_namespace(ns.observability)], "ports": tcp(9187, 9404, 8080)},
                ],
                "egress": [
                    {"to": [ANYWHERE], "ports": tcp(443)},
                    {"to": [from_namespace(ns.observability)], "ports": tcp(4317, 4318)},
                ],
            },
        )
        # Observability: spans in from every namespace; scrapes out to every namespace; alerts out (443).
        self._policy(
            ns.observability,
            "allow-observability",
            {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": everyone, "ports": tcp(4317, 4318, 5778)}],
                "egress": [{"to": everyone}, {"to": [ANYWHERE], "ports": tcp(443)}],
            },
        )
        # Gateway: clients from anywhere on the TLS proxy port; out to the application; scraped by Prometheus.
        self._policy(
            ns.gateway,
            "allow-gateway",
            {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {"from": [ANYWHERE], "ports": tcp(8443)},
                    {"from": [from_namespace(ns.observability)], "ports": tcp(8100, 15020, 15090)},
                ],
                "egress": [
                    {"to": [from_namespace(ns.app)], "ports": tcp(port)},
                    {"to": [from_namespace(ns.observability)], "ports": tcp(4317, 4318)},
                ],
            },
        )
        # Mesh: every sidecar reaches istiod; the API server calls its webhook; Prometheus scrapes it.
        self._policy(
            ns.mesh,
            "allow-istiod",
            {
                "podSelector": {"matchLabels": {"app": "istiod"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": everyone, "ports": tcp(*ISTIOD_PORTS)},
                    {"from": [ANYWHERE], "ports": tcp(15017)},
                ],
            },
        )

    # --- RBAC ----------------------------------------------------------------------------------------

    def _rules(self, role: str) -> list[dict[str, Any]]:
        """Least privilege per role; nothing may read Secrets but admin, nobody may edit RBAC."""
        read = ["get", "list", "watch"]
        core = ["pods", "services", "endpoints", "configmaps", "persistentvolumeclaims", "events"]
        apps = ["deployments", "statefulsets", "replicasets"]
        crds: list[tuple[str, list[str]]] = [
            ("postgresql.cnpg.io", ["clusters", "backups", "scheduledbackups"]),
            ("kafka.strimzi.io", ["kafkas", "kafkanodepools", "kafkatopics"]),
            ("networking.istio.io", ["virtualservices", "destinationrules"]),
            ("security.istio.io", ["peerauthentications", "authorizationpolicies"]),
            ("monitoring.coreos.com", ["servicemonitors", "podmonitors", "prometheusrules"]),
            ("configuration.konghq.com", ["kongplugins", "kongconsumers"]),
        ]
        rules: list[dict[str, Any]] = [
            {"apiGroups": [""], "resources": core, "verbs": read},
            {"apiGroups": ["apps"], "resources": apps, "verbs": read},
            {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": read},
            {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": read},
            {
                "apiGroups": ["networking.k8s.io"],
                "resources": ["networkpolicies", "ingresses"],
                "verbs": read,
            },
            *({"apiGroups": [group], "resources": names, "verbs": read} for group, names in crds),
        ]
        if role in ("operator", "admin"):
            rules += [
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
                {
                    "apiGroups": ["apps"],
                    "resources": ["deployments/scale", "statefulsets/scale"],
                    "verbs": ["get", "patch", "update"],
                },
                {"apiGroups": ["postgresql.cnpg.io"], "resources": ["backups"], "verbs": ["create"]},
            ]
        if role == "admin":
            write = ["create", "update", "patch", "delete"]
            rules += [
                {
                    "apiGroups": [""],
                    "resources": ["services", "configmaps", "secrets", "persistentvolumeclaims"],
                    "verbs": [*read, *write],
                },
                {"apiGroups": ["apps"], "resources": apps, "verbs": write},
                {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": write},
                {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": write},
                *({"apiGroups": [group], "resources": names, "verbs": write} for group, names in crds),
            ]
        return rules

    @staticmethod
    def _drill_rules() -> list[dict[str, Any]]:
        """The restore drill and the consistency point of `invoke db.backup` (opskit/backup_kube.py), in the
        data namespace only, for the roles that run them (operator, admin). Least privilege: the live
        Cluster is read, never changed; get and delete are narrowed to the drill's fixed-name scratch Cluster
        and the two fixed-name checksum Jobs; `create` cannot be narrowed to a name (a second drill is
        refused by the name already taken). Listing pods (to find the Job's pod) and reading pods/log
        (the counts) these roles may already. Creating Jobs or Clusters here lets what they start use this
        namespace's Secrets (the checksum Job logs in with the cluster's superuser Secret), though no Secret
        is readable through the API by these roles: keep these rules to the data namespace."""
        scratch = [f"{POSTGRES_CLUSTER}-drill"]
        jobs = [f"{POSTGRES_CLUSTER}-checksums", f"{POSTGRES_CLUSTER}-drill-checksums"]
        return [
            {"apiGroups": ["postgresql.cnpg.io"], "resources": ["clusters"], "verbs": ["create"]},
            {
                "apiGroups": ["postgresql.cnpg.io"],
                "resources": ["clusters"],
                "resourceNames": scratch,
                "verbs": ["get", "delete"],
            },
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]},
            {
                "apiGroups": ["batch"],
                "resources": ["jobs"],
                "resourceNames": jobs,
                "verbs": ["get", "delete"],
            },
        ]

    def _rbac(self) -> None:
        ns = self.platform.namespaces
        for namespace in (ns.app, ns.data, ns.observability, ns.gateway):
            for role in ROLES:
                name = f"maximus-{role}"
                rules = self._rules(role)
                if namespace == ns.data and role in ("operator", "admin"):
                    rules += self._drill_rules()
                k8s.rbac.v1.Role(
                    self.rname(f"role-{namespace}-{role}"),
                    metadata=self.meta(name, namespace),
                    rules=bodies(rules),
                    opts=self.opts(depends_on=[self.namespaces[namespace]]),
                )
                k8s.rbac.v1.RoleBinding(
                    self.rname(f"rolebinding-{namespace}-{role}"),
                    metadata=self.meta(name, namespace),
                    role_ref=body({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}),
                    subjects=bodies(
                        [
                            {
                                "apiGroup": "rbac.authorization.k8s.io",
                                "kind": "Group",
                                "name": f"maximus:{role}",
                            }
                        ]
                    ),
                    opts=self.opts(depends_on=[self.namespaces[namespace]]),
                )
        # The deploy tooling (invoke deploy / rollback): reads what a cutover looks at, patches only the
        # two color Deployments (the idle color's image) and the one VirtualService (weights, active color);
        # keeps its deploy record in one ConfigMap and its lock in one Lease (`create` cannot be narrowed
        # to a name, so the names it may change are listed separately).
        app = self.args.service_name
        k8s.core.v1.ServiceAccount(
            self.rname("deploy-sa"),
            metadata=self.meta(DEPLOY_ACCOUNT, ns.app),
            automount_service_account_token=False,
            opts=self.opts(depends_on=[self.namespaces[ns.app]]),
        )
        deploy_rules = [
            {
                "apiGroups": [""],
                "resources": ["pods", "services", "endpoints"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["apps"],
                "resources": ["deployments", "replicasets"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "resourceNames": [f"{app}-blue", f"{app}-green"],
                "verbs": ["patch"],
            },
            {
                "apiGroups": ["networking.istio.io"],
                "resources": ["virtualservices", "destinationrules"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": ["networking.istio.io"],
                "resources": ["virtualservices"],
                "resourceNames": [app],
                "verbs": ["patch"],
            },
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [f"{app}-deploy"],
                "verbs": ["get", "patch"],
            },
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [f"{app}-deploy-lock"],
                "verbs": ["get", "patch"],
            },
        ]
        k8s.rbac.v1.Role(
            self.rname("deploy-role"),
            metadata=self.meta(DEPLOY_ACCOUNT, ns.app),
            rules=bodies(deploy_rules),
            opts=self.opts(depends_on=[self.namespaces[ns.app]]),
        )
        # Beyond its namespace: the analysis reads Prometheus and notifications reach Alertmanager through
        # the API server's service proxy; a breaking migration takes an on-demand database backup first.
        elsewhere = {
            ns.observability: [
                {
                    "apiGroups": [""],
                    "resources": ["services/proxy"],
                    "resourceNames": [
                        f"{MONITORING_RELEASE}-prometheus:9090",
                        f"{MONITORING_RELEASE}-alertmanager:9093",
                    ],
                    "verbs": ["get", "create"],
                },
            ],
            ns.data: [
                {"apiGroups": ["postgresql.cnpg.io"], "resources": ["backups"], "verbs": ["get", "create"]},
                {"apiGroups": ["kafka.strimzi.io"], "resources": ["kafkatopics"], "verbs": ["get", "list"]},
            ],
        }
        for namespace, rules in {ns.app: deploy_rules, **elsewhere}.items():
            suffix = "" if namespace == ns.app else f"-{namespace}"
            if namespace != ns.app:
                k8s.rbac.v1.Role(
                    self.rname(f"deploy-role{suffix}"),
                    metadata=self.meta(DEPLOY_ACCOUNT, namespace),
                    rules=bodies(rules),
                    opts=self.opts(depends_on=[self.namespaces[namespace]]),
                )
            k8s.rbac.v1.RoleBinding(
                self.rname(f"deploy-rolebinding{suffix}"),
                metadata=self.meta(DEPLOY_ACCOUNT, namespace),
                role_ref=body(
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DEPLOY_ACCOUNT}
                ),
                # The pipeline runs as the account; on-call runs the same `invoke deploy` and `invoke
                # rollback` as operators or admins, with exactly the account's rights.
                subjects=bodies(
                    [
                        {"kind": "ServiceAccount", "name": DEPLOY_ACCOUNT, "namespace": ns.app},
                        *(
                            {
                                "apiGroup": "rbac.authorization.k8s.io",
                                "kind": "Group",
                                "name": f"maximus:{role}",
                            }
                            for role in ("operator", "admin")
                        ),
                    ]
                ),
                opts=self.opts(depends_on=[self.namespaces[namespace]]),
            )
