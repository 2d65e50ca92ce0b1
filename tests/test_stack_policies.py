"""The policy pack's rules, called directly as pulumi-policy objects: both stacks pass, broken inputs fail."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from infra import policies
from opskit import stack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs() -> dict[str, stack.StackRun]:
    return {name: stack.run_stack(name) for name in stack.STACKS}


def by_name(name: str) -> ResourceValidationPolicy | StackValidationPolicy:
    for policy in [*policies.RESOURCE_POLICIES, *policies.STACK_POLICIES]:
        if policy.name == name:
            return policy
    raise KeyError(name)


def options(*, protect: bool = False, ignore_changes: list[str] | None = None) -> PolicyResourceOptions:
    return PolicyResourceOptions(
        protect, ignore_changes or [], None, [], PolicyCustomTimeouts(0, 0, 0), [], None
    )


def violations(policy_name: str, resource: stack.Declared, **changes: Any) -> list[str]:
    """Run one resource policy on `resource` (props deep-copied, options overridable); the messages."""
    policy = by_name(policy_name)
    assert isinstance(policy, ResourceValidationPolicy)
    props = copy.deepcopy(resource.props)
    for pointer, value in changes.get("props", {}).items():  # JSON-pointer-like paths, "~1" for "/"
        target: Any = props
        keys: list[Any] = [k.replace("~1", "/") for k in pointer.split("/")]
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = int(keys[-1]) if isinstance(target, list) else keys[-1]
        if value is None:
            del target[last]
        else:
            target[last] = value
    args = ResourceValidationArgs(
        resource.type,
        props,
        resource.urn,
        resource.name,
        options(
            protect=changes.get("protect", resource.protect),
            ignore_changes=changes.get("ignore_changes", resource.ignore_changes),
        ),
        None,
    )
    found: list[str] = []
    policy.validate(args, lambda message, urn=None: found.append(message))
    return found


@pytest.mark.parametrize("name", stack.STACKS)
def test_both_stacks_pass_every_policy(runs: dict[str, stack.StackRun], name: str) -> None:
    assert policies.evaluate(runs[name]) == []


def test_the_pack_holds_every_rule_and_is_mandatory() -> None:
    names = [p.name for p in [*policies.RESOURCE_POLICIES, *policies.STACK_POLICIES]]
    assert len(names) == len(set(names)) == 11
    assert all(
        p.enforcement_level is not None and p.enforcement_level.value == "mandatory"
        for p in [by_name(n) for n in names]
    )
    pack = (ROOT / "policy" / "__main__.py").read_text()
    assert "RESOURCE_POLICIES" in pack and "STACK_POLICIES" in pack
    assert "runtime:" in (ROOT / "policy" / "PulumiPolicy.yaml").read_text()


def test_a_chart_without_an_exact_version_is_refused(runs: dict[str, stack.StackRun]) -> None:
    release = runs["staging"].named("postgres-operator")
    assert violations("helm-chart-pinned", release) == []
    found = violations("helm-chart-pinned", release, props={"version": "^0.22"})
    assert found == ["chart cloudnative-pg has version '^0.22'; accepted: an exact version X.Y.Z"]


def test_production_postgres_needs_three_protected_instances(runs: dict[str, stack.StackRun]) -> None:
    cluster = runs["production"].named("postgres-cluster")
    assert violations("postgres-ha-protected", cluster) == []
    assert violations("postgres-ha-protected", cluster, protect=False) == [
        "the PostgreSQL Cluster is not protected; accepted: protect=True"
    ]
    assert violations("postgres-ha-protected", cluster, props={"spec/instances": 1.0}) == [
        "production PostgreSQL instances: 1; accepted: 3 or more"
    ]


def test_a_container_without_limits_or_probes_is_refused(runs: dict[str, stack.StackRun]) -> None:
    deployment = runs["staging"].named("app-deployment-blue")
    container = "spec/template/spec/containers/0"
    found = violations(
        "containers-bounded",
        deployment,
        props={f"{container}/resources/limits": {"cpu": "1"}, f"{container}/livenessProbe": None},
    )
    assert found == ["container hitl: no limits.memory", "container hitl: no livenessProbe"]
    found = violations(
        "containers-bounded", deployment, props={f"{container}/image": "ghcr.io/maximus/x:latest"}
    )
    assert found == ["container hitl: image 'ghcr.io/maximus/x:latest' has no exact tag or digest"]


def test_a_container_outside_restricted_is_refused(runs: dict[str, stack.StackRun]) -> None:
    redis = runs["staging"].named("redis-statefulset")
    context = "spec/template/spec/containers/0/securityContext"
    found = violations(
        "restricted-security-context",
        redis,
        props={f"{context}/readOnlyRootFilesystem": False, f"{context}/capabilities": {"add": ["NET_ADMIN"]}},
    )
    assert found == [
        "container redis: readOnlyRootFilesystem is not true",
        "container redis: capabilities.drop does not include ALL",
        "container redis: adds capabilities ['NET_ADMIN']",
    ]


def test_a_password_in_a_literal_variable_is_refused(runs: dict[str, stack.StackRun]) -> None:
    deployment = runs["staging"].named("app-deployment-green")
    found = violations(
        "secrets-by-reference",
        deployment,
        props={"spec/template/spec/containers/0/env/1": {"name": "REDIS_PASSWORD", "value": "hunter2"}},
    )
    assert found == ["container hitl: REDIS_PASSWORD is a literal; accepted: a Secret file"]


def test_traffic_fields_must_stay_with_the_deploy_tooling(runs: dict[str, stack.StackRun]) -> None:
    service = runs["production"].named("mesh-virtual-service")
    assert violations("traffic-owned-by-deploy-tooling", service) == []
    found = violations("traffic-owned-by-deploy-tooling", service, ignore_changes=[])
    assert found == [
        "route weights would be reset by `pulumi up`; accepted: ignore_changes spec.http[*].route"
    ]
    found = violations("traffic-owned-by-deploy-tooling", service, props={"spec/http/3/timeout": "30s"})
    assert found == ["primary route: accepted timeout: 10s"]
    deployment = runs["production"].named("app-deployment-blue")
    found = violations("traffic-owned-by-deploy-tooling", deployment, ignore_changes=["spec.replicas"])
    assert found == [
        "`pulumi up` would reset the color's image; "
        "accepted: ignore_changes spec.template.spec.containers[0].image"
    ]


def test_production_kafka_replication_is_enforced(runs: dict[str, stack.StackRun]) -> None:
    kafka = runs["production"].named("kafka-cluster")
    assert violations("kafka-replication", kafka) == []
    found = violations("kafka-replication", kafka, props={"spec/kafka/config/min.insync.replicas": 1})
    assert found == ["production min.insync.replicas is not 2"]


def test_rbac_wildcards_and_secret_readers_are_refused(runs: dict[str, stack.StackRun]) -> None:
    role = runs["staging"].named("baseline-deploy-role")
    found = violations(
        "rbac-least-privilege",
        role,
        props={"rules/0": {"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}},
    )
    assert found == [
        "role maximus-deploy: a wildcard rule",
        "role maximus-deploy: reaches Secrets; accepted: admin only",
    ]


def test_a_namespace_without_restricted_pod_security_is_refused(runs: dict[str, stack.StackRun]) -> None:
    namespace = runs["staging"].named("baseline-ns-maximus-staging")
    found = violations(
        "namespace-restricted",
        namespace,
        props={"metadata/labels/pod-security.kubernetes.io~1enforce": "baseline"},
    )
    assert found == ["namespace enforces Pod Security 'baseline'; accepted: restricted (or a stated reason)"]


def _stack_violations(policy_name: str, resources: list[stack.Declared]) -> list[tuple[str | None, str]]:
    policy = by_name(policy_name)
    assert isinstance(policy, StackValidationPolicy)
    args = StackValidationArgs(
        [
            PolicyResource(r.type, r.props, r.urn, r.name, options(protect=r.protect), None, None, [], {})
            for r in resources
        ]
    )
    found: list[tuple[str | None, str]] = []
    policy.validate(args, lambda message, urn=None: found.append((urn, message)))
    return found


def test_a_namespace_without_default_deny_is_refused(runs: dict[str, stack.StackRun]) -> None:
    resources = runs["staging"].resources
    assert _stack_violations("default-deny-everywhere", resources) == []
    without = [r for r in resources if r.name != "baseline-netpol-maximus-staging-data-default-deny"]
    found = _stack_violations("default-deny-everywhere", without)
    assert [message for _, message in found] == [
        "namespace maximus-staging-data has no default-deny NetworkPolicy"
    ]


def test_a_production_workload_without_a_disruption_budget_is_refused(
    runs: dict[str, stack.StackRun],
) -> None:
    resources = runs["production"].resources
    assert _stack_violations("production-disruption-budgets", resources) == []
    without = [r for r in resources if r.name != "redis-pdb"]
    found = _stack_violations("production-disruption-budgets", without)
    assert [message for _, message in found] == [
        "maximus-redis: no PodDisruptionBudget selects its pods in production"
    ]
