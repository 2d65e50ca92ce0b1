"""The platform's rules as pulumi-policy objects: `pulumi preview --policy-pack policy/` enforces them on a
real run, and `invoke stack.check` and the tests call the very same objects on the mocked program.

Every rule reads a resource's inputs as the engine sees them (camelCase, numbers possibly floats).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from infra.common import ACTIVE_COLOR_ANNOTATION, COLOR_LABEL, ENV_LABEL

EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_?KEY|CREDENTIALS?)$")
WORKLOADS = {
    "kubernetes:apps/v1:Deployment",
    "kubernetes:apps/v1:StatefulSet",
    "kubernetes:apps/v1:DaemonSet",
    "kubernetes:batch/v1:Job",
    "kubernetes:batch/v1:CronJob",
}
LONG_RUNNING = {
    "kubernetes:apps/v1:Deployment",
    "kubernetes:apps/v1:StatefulSet",
    "kubernetes:apps/v1:DaemonSet",
}
HELM = {"kubernetes:helm.sh/v3:Release", "kubernetes:helm.sh/v4:Chart"}
CNPG_CLUSTER = "kubernetes:postgresql.cnpg.io/v1:Cluster"
KAFKA = "kubernetes:kafka.strimzi.io/v1beta2:Kafka"
KAFKA_POOL = "kubernetes:kafka.strimzi.io/v1beta2:KafkaNodePool"
VIRTUAL_SERVICE = "kubernetes:networking.istio.io/v1:VirtualService"
NAMESPACE = "kubernetes:core/v1:Namespace"
NETWORK_POLICY = "kubernetes:networking.k8s.io/v1:NetworkPolicy"
PDB = "kubernetes:policy/v1:PodDisruptionBudget"
ROLE = "kubernetes:rbac.authorization.k8s.io/v1:Role"
CLUSTER_ROLE = "kubernetes:rbac.authorization.k8s.io/v1:ClusterRole"
TRAFFIC_FIELD = "spec.http[*].route"
DEPLOY_IMAGE_FIELD = "spec.template.spec.containers[0].image"
PRODUCTION_POSTGRES_INSTANCES = 3
PRODUCTION_KAFKA_BROKERS = 3
PDB_EXEMPT_ANNOTATION = "maximus.io/no-disruption-budget"


@dataclass(frozen=True)
class Subject:
    """What a rule sees of one resource."""

    type: str
    name: str
    urn: str
    props: Mapping[str, Any]
    protect: bool = False
    ignore_changes: Sequence[str] = ()


@dataclass(frozen=True)
class Violation:
    policy: str
    subject: str
    message: str


ResourceRule = Callable[[Subject], Iterator[str]]
StackRule = Callable[[Sequence[Subject]], Iterator[tuple[str, str]]]


def number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")


def shown(value: Any) -> Any:
    """A number as people write it (the engine sends whole numbers as floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _meta(props: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = props.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def environment_of(props: Mapping[str, Any]) -> str | None:
    labels = _meta(props).get("labels") or {}
    value = labels.get(ENV_LABEL) if isinstance(labels, Mapping) else None
    return str(value) if value is not None else None


def pod_spec(subject: Subject) -> Mapping[str, Any]:
    spec = subject.props.get("spec") or {}
    if subject.type == "kubernetes:batch/v1:CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template") or {}
    result = template.get("spec") or {}
    return result if isinstance(result, Mapping) else {}


def containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


# --- resource rules ------------------------------------------------------------------------------------


def chart_pinned(subject: Subject) -> Iterator[str]:
    if subject.type not in HELM:
        return
    version = str(subject.props.get("version") or "")
    if not EXACT_VERSION.fullmatch(version):
        yield f"chart {subject.props.get('chart')} has version {version!r}; accepted: an exact version X.Y.Z"
    repo = str((subject.props.get("repositoryOpts") or {}).get("repo") or "")
    if not repo.startswith("https://"):
        yield f"chart {subject.props.get('chart')} comes from {repo!r}; accepted: an https:// repository"


def containers_bounded(subject: Subject) -> Iterator[str]:
    if subject.type not in WORKLOADS:
        return
    for container in containers(pod_spec(subject)):
        name = container.get("name")
        res = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not (res.get(kind) or {}).get(resource):
                    yield f"container {name}: no {kind}.{resource}"
        image = str(container.get("image") or "")
        if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            yield f"container {name}: image {image!r} has no exact tag or digest"
    if subject.type in LONG_RUNNING:
        for container in pod_spec(subject).get("containers") or []:
            for probe in ("readinessProbe", "livenessProbe"):
                if not container.get(probe):
                    yield f"container {container.get('name')}: no {probe}"


def restricted(subject: Subject) -> Iterator[str]:
    if subject.type not in WORKLOADS:
        return
    pod = pod_spec(subject)
    pod_context = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            yield f"pod uses {host}"
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume.get('name')} is a hostPath"
    for container in containers(pod):
        name = container.get("name")
        context = container.get("securityContext") or {}
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            yield f"container {name}: runAsNonRoot is not set"
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"container {name}: seccompProfile is {seccomp!r}; accepted: RuntimeDefault"
        if context.get("allowPrivilegeEscalation") is not False:
            yield f"container {name}: allowPrivilegeEscalation is not false"
        if context.get("readOnlyRootFilesystem") is not True:
            yield f"container {name}: readOnlyRootFilesystem is not true"
        if context.get("privileged"):
            yield f"container {name}: privileged"
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"container {name}: capabilities.drop does not include ALL"
        if capabilities.get("add"):
            yield f"container {name}: adds capabilities {capabilities.get('add')}"


def secrets_by_reference(subject: Subject) -> Iterator[str]:
    if subject.type not in WORKLOADS:
        return
    for container in containers(pod_spec(subject)):
        for variable in container.get("env") or []:
            name = str(variable.get("name") or "")
            if SECRET_NAME.search(name) and "value" in variable:
                yield f"container {container.get('name')}: {name} is a literal; accepted: a Secret file"


def postgres_ha(subject: Subject) -> Iterator[str]:
    if subject.type != CNPG_CLUSTER:
        return
    spec = subject.props.get("spec") or {}
    if not subject.protect:
        yield "the PostgreSQL Cluster is not protected; accepted: protect=True"
    if not ((spec.get("backup") or {}).get("barmanObjectStore") or {}).get("destinationPath"):
        yield "no WAL archive / base backup destination"
    if environment_of(subject.props) == "production":
        instances = number(spec.get("instances"))
        if not instances >= PRODUCTION_POSTGRES_INSTANCES:
            yield f"production PostgreSQL instances: {shown(spec.get('instances'))}; accepted: 3 or more"
        if (spec.get("affinity") or {}).get("podAntiAffinityType") != "required":
            yield "production PostgreSQL instances may share a node; accepted: podAntiAffinityType required"


def kafka_replication(subject: Subject) -> Iterator[str]:
    if environment_of(subject.props) != "production":
        return
    spec = subject.props.get("spec") or {}
    if subject.type == KAFKA_POOL and not number(spec.get("replicas")) >= PRODUCTION_KAFKA_BROKERS:
        yield f"production Kafka brokers: {shown(spec.get('replicas'))}; accepted: 3 or more"
    if subject.type == KAFKA:
        config = (spec.get("kafka") or {}).get("config") or {}
        if number(config.get("default.replication.factor")) != 3:
            yield "production default.replication.factor is not 3"
        if number(config.get("min.insync.replicas")) != 2:
            yield "production min.insync.replicas is not 2"


def traffic_owned_by_deploy_tooling(subject: Subject) -> Iterator[str]:
    if subject.type == VIRTUAL_SERVICE:
        if TRAFFIC_FIELD not in subject.ignore_changes:
            yield f"route weights would be reset by `pulumi up`; accepted: ignore_changes {TRAFFIC_FIELD}"
        if not (_meta(subject.props).get("annotations") or {}).get(ACTIVE_COLOR_ANNOTATION):
            yield f"no {ACTIVE_COLOR_ANNOTATION} annotation"
        for route in (subject.props.get("spec") or {}).get("http") or []:
            if route.get("name") != "primary":
                continue
            retries = route.get("retries") or {}
            if number(retries.get("attempts")) != 3 or retries.get("perTryTimeout") != "2s":
                yield "primary route: accepted retries: 3 attempts, 2s per try"
            if route.get("timeout") != "10s":
                yield "primary route: accepted timeout: 10s"
    colored = COLOR_LABEL in (_meta(subject.props).get("labels") or {})
    if (
        subject.type == "kubernetes:apps/v1:Deployment"
        and colored
        and DEPLOY_IMAGE_FIELD not in subject.ignore_changes
    ):
        yield f"`pulumi up` would reset the color's image; accepted: ignore_changes {DEPLOY_IMAGE_FIELD}"


def namespace_restricted(subject: Subject) -> Iterator[str]:
    if subject.type != NAMESPACE:
        return
    meta = _meta(subject.props)
    labels = meta.get("labels") or {}
    enforce = labels.get("pod-security.kubernetes.io/enforce")
    if enforce != "restricted" and not (meta.get("annotations") or {}).get("maximus.io/pod-security-reason"):
        yield f"namespace enforces Pod Security {enforce!r}; accepted: restricted (or a stated reason)"


def rbac_least_privilege(subject: Subject) -> Iterator[str]:
    if subject.type not in (ROLE, CLUSTER_ROLE):
        return
    name = str(_meta(subject.props).get("name"))
    for rule in subject.props.get("rules") or []:
        if (
            "*" in (rule.get("verbs") or [])
            or "*" in (rule.get("resources") or [])
            or "*" in (rule.get("apiGroups") or [])
        ):
            yield f"role {name}: a wildcard rule"
        if "secrets" in (rule.get("resources") or []) and not name.endswith("-admin"):
            yield f"role {name}: reaches Secrets; accepted: admin only"
        if any(
            r in ("roles", "rolebindings", "clusterroles", "clusterrolebindings")
            for r in rule.get("resources") or []
        ):
            yield f"role {name}: may change RBAC"


# --- stack rules ---------------------------------------------------------------------------------------


def default_deny_everywhere(resources: Sequence[Subject]) -> Iterator[tuple[str, str]]:
    denied: set[str] = set()
    for r in resources:
        if r.type != NETWORK_POLICY:
            continue
        spec = r.props.get("spec") or {}
        selects_all = spec.get("podSelector") in ({}, None)
        both = set(spec.get("policyTypes") or []) == {"Ingress", "Egress"}
        if selects_all and both and not spec.get("ingress") and not spec.get("egress"):
            denied.add(str(_meta(r.props).get("namespace")))
    for r in resources:
        if r.type == NAMESPACE and str(_meta(r.props).get("name")) not in denied:
            yield r.urn, f"namespace {_meta(r.props).get('name')} has no default-deny NetworkPolicy"


def production_disruption_budgets(resources: Sequence[Subject]) -> Iterator[tuple[str, str]]:
    budgets: list[tuple[str, Mapping[str, Any]]] = []
    for r in resources:
        if r.type == PDB:
            selector = ((r.props.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            budgets.append((str(_meta(r.props).get("namespace")), selector))
    for r in resources:
        if r.type not in LONG_RUNNING or environment_of(r.props) != "production":
            continue
        if (_meta(r.props).get("annotations") or {}).get(PDB_EXEMPT_ANNOTATION):
            continue
        namespace = str(_meta(r.props).get("namespace"))
        labels = (((r.props.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
            "labels"
        ) or {}
        if not any(
            ns == namespace and sel and all(labels.get(k) == v for k, v in sel.items()) for ns, sel in budgets
        ):
            yield (
                r.urn,
                f"{_meta(r.props).get('name')}: no PodDisruptionBudget selects its pods in production",
            )


# --- the pulumi-policy objects -------------------------------------------------------------------------


def _resource_policy(name: str, description: str, rule: ResourceRule) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        subject = Subject(
            type=args.resource_type,
            name=args.name,
            urn=args.urn,
            props=args.props,
            protect=bool(args.opts.protect),
            ignore_changes=list(args.opts.ignore_changes or []),
        )
        for message in rule(subject):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=name, description=description, validate=validate, enforcement_level=EnforcementLevel.MANDATORY
    )


def _stack_policy(name: str, description: str, rule: StackRule) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        subjects = [
            Subject(
                type=r.resource_type,
                name=r.name,
                urn=r.urn,
                props=r.props,
                protect=bool(r.opts.protect),
                ignore_changes=list(r.opts.ignore_changes or []),
            )
            for r in args.resources
        ]
        for urn, message in rule(subjects):
            report_violation(message, urn)

    return StackValidationPolicy(
        name=name, description=description, validate=validate, enforcement_level=EnforcementLevel.MANDATORY
    )


RESOURCE_POLICIES: list[ResourceValidationPolicy] = [
    _resource_policy(
        "helm-chart-pinned", "Every Helm chart has an exact version from an https repository.", chart_pinned
    ),
    _resource_policy(
        "containers-bounded",
        "Every container has requests, limits, probes and an exact image.",
        containers_bounded,
    ),
    _resource_policy("restricted-security-context", "Every pod meets Pod Security `restricted`.", restricted),
    _resource_policy(
        "secrets-by-reference", "No secret-looking variable carries a literal value.", secrets_by_reference
    ),
    _resource_policy(
        "postgres-ha-protected", "PostgreSQL is protected, backed up, and HA in production.", postgres_ha
    ),
    _resource_policy("kafka-replication", "Production Kafka: 3 brokers, RF 3, min ISR 2.", kafka_replication),
    _resource_policy(
        "traffic-owned-by-deploy-tooling",
        "Route weights, the active color and color images are left to invoke deploy/rollback.",
        traffic_owned_by_deploy_tooling,
    ),
    _resource_policy(
        "namespace-restricted", "Namespaces enforce Pod Security `restricted`.", namespace_restricted
    ),
    _resource_policy(
        "rbac-least-privilege", "No wildcard, no Secrets but admin, no RBAC edits.", rbac_least_privilege
    ),
]
STACK_POLICIES: list[StackValidationPolicy] = [
    _stack_policy(
        "default-deny-everywhere",
        "Every namespace has a default-deny NetworkPolicy.",
        default_deny_everywhere,
    ),
    _stack_policy(
        "production-disruption-budgets",
        "Every production workload has a PodDisruptionBudget.",
        production_disruption_budgets,
    ),
]


class Declaration(Protocol):
    """What `opskit.stack` records of a declared resource."""

    type: str
    name: str
    urn: str
    parent: str
    protect: bool
    ignore_changes: list[str]

    @property
    def props(self) -> dict[str, Any]: ...


class Run(Protocol):
    resources: list[Any]


def _options(resource: Declaration) -> PolicyResourceOptions:
    return PolicyResourceOptions(
        protect=resource.protect,
        ignore_changes=list(resource.ignore_changes),
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
        additional_secret_outputs=[],
        parent=resource.parent or None,
    )


def evaluate(
    run: Run, policies: Iterable[ResourceValidationPolicy | StackValidationPolicy] | None = None
) -> list[Violation]:
    """Call every policy object on a recorded program run, as the policy engine would."""
    chosen: list[ResourceValidationPolicy | StackValidationPolicy] = (
        list(policies) if policies is not None else [*RESOURCE_POLICIES, *STACK_POLICIES]
    )
    declared: list[Declaration] = list(run.resources)
    violations: list[Violation] = []
    for policy in chosen:
        if isinstance(policy, ResourceValidationPolicy):
            for resource in declared:
                args = ResourceValidationArgs(
                    resource.type, resource.props, resource.urn, resource.name, _options(resource), None
                )

                def report(
                    message: str,
                    urn: str | None = None,
                    _policy: str = policy.name,
                    _subject: str = resource.name,
                ) -> None:
                    violations.append(Violation(_policy, _subject, message))

                policy.validate(args, report)
        else:
            stack_args = StackValidationArgs(
                [
                    PolicyResource(r.type, r.props, r.urn, r.name, _options(r), None, None, [], {})
                    for r in declared
                ]
            )

            def report_stack(message: str, urn: str | None = None, _policy: str = policy.name) -> None:
                violations.append(Violation(_policy, urn or "(stack)", message))

            policy.validate(stack_args, report_stack)
    return violations
