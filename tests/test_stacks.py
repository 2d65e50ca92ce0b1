"""The stack program under Pulumi mocks (no CLI, no cluster): the resource graph and what matters in it."""

from __future__ import annotations

import json
import re
import runpy
from collections.abc import Iterator
from typing import Any

import pulumi
import pytest

import infra.dashboards
from infra import policies
from infra import secrets as stack_secrets
from opskit import kuberollout, model, stack
from opskit.errors import BadInput

ROOT = model.ROOT


@pytest.fixture(scope="module")
def runs() -> dict[str, stack.StackRun]:
    return {name: stack.run_stack(name) for name in stack.STACKS}


def objects(run: stack.StackRun, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in run.objects() if o["kind"] == kind}


def one(run: stack.StackRun, kind: str, name: str) -> dict[str, Any]:
    return objects(run, kind)[name]


def release(run: stack.StackRun, name: str) -> dict[str, Any]:
    return next(r.props for r in run.helm_releases() if r.props["name"] == name)


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def config_with(stack_name: str, **changes: Any) -> tuple[dict[str, str], list[str]]:
    """The stack's config with keys replaced (None removes a key); the environment given as a dict."""
    config, secret_keys = stack.stack_config(stack_name)
    for key, value in changes.items():
        full = f"maximus:{key}"
        if value is None:
            config.pop(full, None)
            secret_keys = [k for k in secret_keys if k != full]
        else:
            config[full] = value if isinstance(value, str) else json.dumps(value)
    return config, secret_keys


def environment(stack_name: str) -> dict[str, Any]:
    config, _ = stack.stack_config(stack_name)
    data: dict[str, Any] = json.loads(config[model.PULUMI_CONFIG_KEY])
    return data


# --- the graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", stack.STACKS)
def test_every_resource_is_parented_to_a_component_and_prefixed(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    components = {r.urn: r.name for r in run.resources if r.type.startswith("maximus:infra:")}
    assert set(components.values()) == {
        "baseline", "mesh", "postgres", "redis", "kafka", "monitoring", "tracing", "app", "gateway",
    }  # fmt: skip
    for resource in run.resources:
        if resource.type.startswith("maximus:infra:"):
            continue
        assert resource.parent in components, f"{resource.name} is not a component's child"
        assert resource.name.startswith(components[resource.parent] + "-"), resource.name


@pytest.mark.parametrize("name", stack.STACKS)
def test_objects_wait_for_their_namespace_and_custom_objects_for_their_operator(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    namespaces = {r.props["metadata"]["name"]: r.urn for r in run.of_type("kubernetes:core/v1:Namespace")}
    releases = {r.name: r.urn for r in run.helm_releases()}
    operators = {
        "postgresql.cnpg.io": releases["postgres-operator"],
        "kafka.strimzi.io": releases["kafka-operator"],
        "networking.istio.io": releases["mesh-istiod"],
        "security.istio.io": releases["mesh-istiod"],
        "telemetry.istio.io": releases["mesh-istiod"],
        "monitoring.coreos.com": None,  # Prometheus's CRDs: the objects only need to exist once it runs
        "configuration.konghq.com": releases["gateway-kong"],
    }
    direct = {r.urn: set(r.dependencies) for r in run.resources}

    def waits_for(urn: str) -> set[str]:
        seen: set[str] = set()
        todo = list(direct[urn])
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(direct.get(current, ()))
        return seen

    for resource in run.resources:
        manifest = resource.manifest()
        if manifest is None or manifest["kind"] == "Namespace":
            continue
        before = waits_for(resource.urn)
        namespace = manifest["metadata"]["namespace"]
        assert namespaces[namespace] in before, f"{resource.name} does not wait for {namespace}"
        group = manifest["apiVersion"].split("/")[0]
        if operators.get(group):
            assert operators[group] in before, f"{resource.name} does not wait for its operator"


@pytest.mark.parametrize("name", stack.STACKS)
def test_outputs_tell_an_operator_where_things_are(runs: dict[str, stack.StackRun], name: str) -> None:
    outputs = runs[name].outputs
    env = model.load_environment(name)
    assert outputs["namespaces"]["app"] == env.namespace
    assert outputs["endpoints"]["gateway"] == f"https://{env.platform.gateway.host}"
    assert outputs["activeColor"] == {
        "virtualService": f"{env.namespace}/hitl",
        "annotation": "maximus.io/active-color",
        "weights": "spec.http[*].route[*].weight",
        "initialColor": "blue",
    }
    assert set(outputs["endpoints"]) >= {"grafana", "prometheus", "jaegerUi", "postgresReadWrite", "redis"}
    assert runs[name].secret_outputs == []


# --- data stores --------------------------------------------------------------------------------------


def test_production_postgres_has_three_protected_instances_apart(runs: dict[str, stack.StackRun]) -> None:
    cluster = runs["production"].named("postgres-cluster")
    assert cluster.protect
    assert cluster.props["spec"]["instances"] == 3
    assert cluster.props["spec"]["affinity"]["podAntiAffinityType"] == "required"
    staging = runs["staging"].named("postgres-cluster")
    assert staging.protect and staging.props["spec"]["instances"] == 1


@pytest.mark.parametrize("name", stack.STACKS)
def test_postgres_archives_wal_and_backs_up_to_the_models_bucket(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    env = model.load_environment(name)
    run = runs[name]
    store = one(run, "Cluster", "maximus-postgres")["spec"]["backup"]["barmanObjectStore"]
    assert store["destinationPath"] == f"s3://{env.backup.storage.bucket}/postgres"
    assert store["s3Credentials"]["secretAccessKey"]["name"] == "maximus-postgres-backup-credentials"
    backup = one(run, "ScheduledBackup", "maximus-postgres-daily")["spec"]
    assert backup["schedule"] == f"0 {env.backup.schedule}"
    assert backup["cluster"] == {"name": "maximus-postgres"}
    assert "maximus-postgres" in objects(run, "PodMonitor")


@pytest.mark.parametrize("name", stack.STACKS)
def test_redis_runs_the_official_image_with_aof_and_a_secret_password(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    statefulset = one(run, "StatefulSet", "maximus-redis")
    container = next(c for c in containers(statefulset) if c["name"] == "redis")
    assert container["image"] == "redis:7.0.15"
    assert "appendonly yes" in one(run, "ConfigMap", "maximus-redis-config")["data"]["redis.conf"]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert one(run, "Secret", "maximus-redis-auth")["stringData"] == {
        "password": "(secret)",
        "auth.conf": "(secret)",
        "exporter-auth.json": "(secret)",
    }
    assert ("maximus-redis" in objects(run, "PodDisruptionBudget")) == (name == "production")


def test_production_kafka_is_kraft_with_three_replicas(runs: dict[str, stack.StackRun]) -> None:
    run = runs["production"]
    kafka = one(run, "Kafka", "maximus-kafka")
    assert kafka["metadata"]["annotations"] == {
        "strimzi.io/node-pools": "enabled",
        "strimzi.io/kraft": "enabled",
    }
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3 and config["min.insync.replicas"] == 2
    pool = one(run, "KafkaNodePool", "broker")["spec"]
    assert pool["replicas"] == 3 and pool["roles"] == ["controller", "broker"]
    topics = {t["spec"]["topicName"]: t["spec"] for t in objects(run, "KafkaTopic").values()}
    declared = model.load_environment("production").platform.kafka.topics
    assert set(topics) == {t.name for t in declared}
    assert all(t["replicas"] == 3 and t["config"]["min.insync.replicas"] == 2 for t in topics.values())
    assert one(runs["staging"], "KafkaNodePool", "broker")["spec"]["replicas"] == 1


# --- workloads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", stack.STACKS)
def test_every_container_is_bounded_probed_and_restricted(runs: dict[str, stack.StackRun], name: str) -> None:
    workloads = [o for o in runs[name].objects() if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 4
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in containers(workload):
            assert set(container["resources"]["limits"]) == {"cpu", "memory"}
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}
            assert container["readinessProbe"] and container["livenessProbe"]
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_production_app_autoscales_two_to_ten_on_cpu_and_memory(runs: dict[str, stack.StackRun]) -> None:
    for color in ("blue", "green"):
        hpa = one(runs["production"], "HorizontalPodAutoscaler", f"hitl-{color}")["spec"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
        targets = {
            m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["metrics"]
        }
        assert targets == {"cpu": 70, "memory": 80}
        assert one(runs["production"], "PodDisruptionBudget", f"hitl-{color}")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("name", stack.STACKS)
def test_app_has_blue_green_and_stable_services_and_is_scraped(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    services = objects(run, "Service")
    assert services["hitl"]["spec"]["selector"] == {
        "app.kubernetes.io/name": "hitl",
        "app.kubernetes.io/component": "app",
    }
    for color in ("blue", "green"):
        assert services[f"hitl-{color}"]["spec"]["selector"]["maximus.io/color"] == color
        deployment = one(run, "Deployment", f"hitl-{color}")
        (container,) = containers(deployment)
        assert container["image"] == "ghcr.io/maximus/hitl-patch-service:1.0.0"
        assert len(deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]) == 2
    monitor = one(run, "ServiceMonitor", "hitl")["spec"]
    assert monitor["selector"]["matchLabels"]["maximus.io/stable"] == "true"
    assert services["hitl"]["metadata"]["labels"]["maximus.io/stable"] == "true"


# --- gateway, mesh, baseline ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", stack.STACKS)
def test_gateway_limits_each_route_per_ip_and_each_consumer(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    plugins = objects(run, "KongPlugin")
    per_ip = {
        n.removeprefix("maximus-limit-ip-"): p["config"]["minute"] for n, p in plugins.items() if "-ip-" in n
    }
    assert per_ip == {"analyze": 10, "health": 100, "metrics": 60, "hitl": 100}
    assert plugins["maximus-limit-per-consumer"]["config"] == {
        "minute": 100,
        "limit_by": "consumer",
        "policy": "local",
    }
    assert plugins["maximus-key-auth"]["config"]["key_names"] == ["X-API-Key"]
    analyze = one(run, "Ingress", "hitl-analyze")
    assert analyze["metadata"]["annotations"]["konghq.com/plugins"] == (
        "maximus-limit-ip-analyze,maximus-limit-per-consumer,maximus-key-auth"
    )
    health = one(run, "Ingress", "hitl-health")["metadata"]["annotations"]["konghq.com/plugins"]
    # Unauthenticated: no consumer to vouch for a claimed identity or a preview color, so both are dropped.
    assert health == "maximus-limit-ip-health,maximus-strip-identity"
    assert plugins["maximus-strip-identity"]["config"] == {
        "remove": {"headers": ["x-consumer-username", "x-consumer-id", "x-maximus-color"]}
    }
    consumers = {c["username"]: c["credentials"] for c in objects(run, "KongConsumer").values()}
    assert consumers == {
        "maximus-client": ["maximus-gateway-api-key"],
        "maximus-deploy": ["maximus-gateway-deploy-api-key"],
    }
    assert analyze["spec"]["tls"][0]["secretName"] == "maximus-gateway-tls"
    # TLS: production from a cert-manager Certificate, staging from Pulumi config secrets.
    assert ("maximus-gateway-tls" in objects(run, "Certificate")) == (name == "production")
    if name == "staging":
        tls = one(run, "Secret", "maximus-gateway-tls")
        assert tls["type"] == "kubernetes.io/tls" and tls["stringData"] == {
            "tls.crt": "(secret)",
            "tls.key": "(secret)",
        }


@pytest.mark.parametrize("name", stack.STACKS)
def test_mesh_is_strict_deny_by_default_and_routes_with_retries(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    run = runs[name]
    assert one(run, "PeerAuthentication", "default")["spec"] == {"mtls": {"mode": "STRICT"}}
    deny = one(run, "AuthorizationPolicy", "default-deny")
    assert deny["metadata"]["namespace"] == "istio-system" and deny["spec"] == {}
    rule = one(run, "DestinationRule", "hitl")["spec"]
    assert [s["name"] for s in rule["subsets"]] == ["blue", "green"]
    assert rule["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 5
    assert rule["trafficPolicy"]["connectionPool"]["tcp"]["maxConnections"] == 200
    primary = one(run, "VirtualService", "hitl")["spec"]["http"][-1]
    assert primary["retries"]["attempts"] == 3 and primary["retries"]["perTryTimeout"] == "2s"
    assert primary["timeout"] == "10s"
    assert [(r["destination"]["subset"], r["weight"]) for r in primary["route"]] == [
        ("blue", 100),
        ("green", 0),
    ]


@pytest.mark.parametrize("name", stack.STACKS)
def test_pulumi_up_never_takes_traffic_back_from_the_deploy_tooling(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    service = runs[name].named("mesh-virtual-service")
    assert "spec.http[*].route" in service.ignore_changes
    assert 'metadata.annotations["maximus.io/active-color"]' in service.ignore_changes
    for color in ("blue", "green"):
        deployment = runs[name].named(f"app-deployment-{color}")
        assert "spec.template.spec.containers[0].image" in deployment.ignore_changes
        assert "spec.replicas" in deployment.ignore_changes


@pytest.mark.parametrize("name", stack.STACKS)
def test_baseline_namespaces_network_policies_and_rbac(runs: dict[str, stack.StackRun], name: str) -> None:
    run = runs[name]
    env = model.load_environment(name)
    namespaces = objects(run, "Namespace")
    app = namespaces[str(env.namespace)]["metadata"]["labels"]
    assert app["pod-security.kubernetes.io/enforce"] == "restricted" and app["istio-injection"] == "enabled"
    deny = [
        o for o in run.objects() if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "default-deny"
    ]
    assert {o["metadata"]["namespace"] for o in deny} == set(namespaces)
    # The deploy tooling's path to Prometheus and Alertmanager: the API server's proxy, from outside any pod.
    proxy = next(
        o
        for o in run.objects()
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-api-server-proxy"
    )
    assert proxy["metadata"]["namespace"] == f"{env.namespace}-observability"
    assert proxy["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["prometheus", "alertmanager"]
    assert [p["port"] for p in proxy["spec"]["ingress"][0]["ports"]] == [
        kuberollout.PROMETHEUS_PORT,
        kuberollout.ALERTMANAGER_PORT,
    ]
    roles = [o for o in run.objects() if o["kind"] == "Role" and o["metadata"]["namespace"] == env.namespace]
    assert {r["metadata"]["name"] for r in roles} == {
        "maximus-admin", "maximus-operator", "maximus-readonly", "maximus-deploy",
    }  # fmt: skip
    deploy = next(r for r in roles if r["metadata"]["name"] == "maximus-deploy")
    writes = [rule for rule in deploy["rules"] if set(rule["verbs"]) - {"get", "list", "watch"}]
    assert writes == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["hitl-blue", "hitl-green"],
            "verbs": ["patch"],
        },
        {
            "apiGroups": ["networking.istio.io"],
            "resources": ["virtualservices"],
            "resourceNames": ["hitl"],
            "verbs": ["patch"],
        },
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["hitl-deploy"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["hitl-deploy-lock"],
            "verbs": ["get", "patch"],
        },
    ]
    # Elsewhere: Prometheus and Alertmanager through the service proxy, on-demand backups; nothing more.
    deploy_elsewhere = {
        o["metadata"]["namespace"]: o["rules"]
        for o in run.objects()
        if o["kind"] == "Role"
        and o["metadata"]["name"] == "maximus-deploy"
        and o["metadata"]["namespace"] != env.namespace
    }
    assert deploy_elsewhere[f"{env.namespace}-observability"] == [
        {
            "apiGroups": [""],
            "resources": ["services/proxy"],
            "resourceNames": ["maximus-monitoring-prometheus:9090", "maximus-monitoring-alertmanager:9093"],
            "verbs": ["get", "create"],
        }
    ]
    assert sorted(deploy_elsewhere) == sorted([f"{env.namespace}-observability", f"{env.namespace}-data"])
    bound = {
        (o["metadata"]["namespace"], tuple(s["name"] for s in o["subjects"]))
        for o in run.objects()
        if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "maximus-deploy"
    }
    # The pipeline's account, and on-call (operators, admins) running the same deploy and rollback.
    subjects = ("maximus-deploy", "maximus:operator", "maximus:admin")
    assert bound == {(namespace, subjects) for namespace in [env.namespace, *deploy_elsewhere]}
    for role in roles:
        if role["metadata"]["name"] != "maximus-admin":
            assert not any("secrets" in rule["resources"] for rule in role["rules"])
    # The restore drill (operator, admin; data namespace only): the scratch Cluster and the checksum Jobs by
    # name; creating them is the only unnamed write.
    operator = {
        o["metadata"]["namespace"]: o["rules"]
        for o in run.objects()
        if o["kind"] == "Role" and o["metadata"]["name"] == "maximus-operator"
    }
    drill = [r for r in operator[f"{env.namespace}-data"] if r["resources"] in (["jobs"], ["clusters"])]
    assert [r for r in drill if set(r["verbs"]) - {"get", "list", "watch"}] == [
        {"apiGroups": ["postgresql.cnpg.io"], "resources": ["clusters"], "verbs": ["create"]},
        {
            "apiGroups": ["postgresql.cnpg.io"],
            "resources": ["clusters"],
            "resourceNames": ["maximus-postgres-drill"],
            "verbs": ["get", "delete"],
        },
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]},
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "resourceNames": ["maximus-postgres-checksums", "maximus-postgres-drill-checksums"],
            "verbs": ["get", "delete"],
        },
    ]
    assert not any(r["apiGroups"] == ["batch"] for r in operator[str(env.namespace)])


# --- charts, secrets, environments ---------------------------------------------------------------------


@pytest.mark.parametrize("name", stack.STACKS)
def test_every_chart_has_the_models_exact_version(runs: dict[str, stack.StackRun], name: str) -> None:
    env = model.load_environment(name)
    pinned = {
        chart.chart: chart.version
        for chart in (getattr(env.platform.charts, f) for f in model.Charts.model_fields)
    }
    releases = runs[name].helm_releases()
    assert len(releases) == 7
    for resource in releases:
        props = resource.props
        assert re.fullmatch(r"\d+\.\d+\.\d+", props["version"]), props
        assert pinned[props["chart"]] == props["version"]
        assert props["repositoryOpts"]["repo"].startswith("https://")
        assert props["atomic"] is True


@pytest.mark.parametrize("name", stack.STACKS)
def test_chart_values_follow_the_model(runs: dict[str, stack.StackRun], name: str) -> None:
    run = runs[name]
    env = model.load_environment(name)
    values = release(run, "maximus-monitoring")["values"]
    assert values["prometheus"]["prometheusSpec"]["retention"] == f"{env.platform.monitoring.retention_days}d"
    assert values["grafana"]["admin"]["existingSecret"] == "maximus-grafana-admin"
    assert values["grafana"]["sidecar"]["dashboards"]["label"] == "grafana_dashboard"
    dashboards = [
        o
        for o in run.objects()
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert len(dashboards) == len(infra.dashboards.dashboards(env)) == 6
    kong = release(run, "maximus-kong")["values"]
    assert kong["image"] == {"repository": "kong", "tag": "3.8.0"}
    assert kong["proxy"]["http"]["enabled"] is False
    istiod = release(run, "istiod")["values"]
    assert istiod["pilot"]["cni"]["enabled"] is True
    telemetry = one(run, "Telemetry", "mesh-default")["spec"]["tracing"][0]
    assert telemetry["randomSamplingPercentage"] == env.platform.tracing.sampling_rate * 100
    assert (
        f"default_sampling_probability: {env.platform.tracing.sampling_rate}"
        in one(run, "ConfigMap", "maximus-jaeger-config")["data"]["config.yaml"]
    )


def _leaks(run: stack.StackRun) -> Iterator[str]:
    needles = [stack.PLACEHOLDER]
    for resource in run.resources:
        for path in stack.plaintext_leaks(resource.inputs, needles):
            yield f"{resource.name}: {path}"
    for path in stack.plaintext_leaks(run.outputs, needles):
        yield f"output {path}"


@pytest.mark.parametrize("name", stack.STACKS)
def test_no_plaintext_secret_reaches_a_resource_input_or_an_output(
    runs: dict[str, stack.StackRun], name: str
) -> None:
    assert list(_leaks(runs[name])) == []
    carriers = {
        r.name for r in runs[name].resources if any(True for _ in stack.plaintext_leaks(r.inputs, []))
    }
    assert carriers == set()
    carrying = {r.name for r in runs[name].resources if stack.PLACEHOLDER in json.dumps(r.inputs)}
    secrets = {r.name for r in runs[name].of_type("kubernetes:core/v1:Secret")}
    assert carrying == secrets  # only Secrets carry secret values, each marked secret


def test_the_leak_detector_finds_a_plaintext_secret() -> None:
    inputs = {"spec": {"env": [{"name": "X", "value": f"{stack.PLACEHOLDER}-maximus:redisPassword"}]}}
    assert list(stack.plaintext_leaks(inputs, [stack.PLACEHOLDER])) == ["spec.env[0].value"]


# Where production differs from staging, and the model field (or the environment's name) behind it.
EXPECTED_DIFFERENCES = {
    ("Cluster", "maximus-postgres"): {
        ".spec.instances", ".spec.storage.size", ".spec.walStorage.size",  # components.postgres
        # instances > 1:
        ".spec.affinity.podAntiAffinityType", ".spec.minSyncReplicas", ".spec.maxSyncReplicas",
        ".spec.backup.retentionPolicy",  # backup.retention
    },
    ("ConfigMap", "maximus-jaeger-config"): {".data.config.yaml"},  # platform.tracing.sampling_rate
    # the annotations of the environment's own deploys and rollbacks (tag env:<name>)
    ("ConfigMap", "maximus-dashboard-hitl-deployments"): {".data.hitl-deployments.json"},
    ("Telemetry", "mesh-default"): {".spec.tracing[0].randomSamplingPercentage"},  # platform.tracing
    ("StatefulSet", "maximus-redis"): {".spec.volumeClaimTemplates[0].spec.resources.requests.storage"},
    ("KafkaNodePool", "broker"): {".spec.replicas", ".spec.storage.volumes[0].size", ".spec.template"},
    ("Kafka", "maximus-kafka"): {
        ".spec.kafka.config.default.replication.factor", ".spec.kafka.config.min.insync.replicas",
        ".spec.kafka.config.offsets.topic.replication.factor",
        ".spec.kafka.config.transaction.state.log.min.isr",
        ".spec.kafka.config.transaction.state.log.replication.factor",
    },
    **{
        ("KafkaTopic", topic): {".spec.partitions", ".spec.replicas", ".spec.config.retention.ms",
                                ".spec.config.min.insync.replicas"}  # platform.kafka.topics, instances
        for topic in ("maximus-events", "maximus-hitl-decisions", "maximus-hitl-patches")
    },
    **{
        ("Deployment", f"hitl-{color}"): {".spec.replicas", ".spec.template.spec.containers[0].env[11].value"}
        for color in ("blue", "green")
    },
    **{
        ("HorizontalPodAutoscaler", f"hitl-{color}"): {".spec.minReplicas", ".spec.maxReplicas"}
        for color in ("blue", "green")
    },
    ("helm", "maximus-kong"): {".values.replicaCount", ".values.podDisruptionBudget.enabled"},
    ("helm", "istiod"): {".values.pilot.autoscaleMin"},
    ("helm", "maximus-monitoring"): {
        ".values.prometheus.prometheusSpec.retention", ".values.alertmanager.alertmanagerSpec.replicas",
        ".values.prometheus.prometheusSpec.storageSpec.volumeClaimTemplate.spec.resources.requests.storage",
    },
}  # fmt: skip
ONLY_IN_PRODUCTION = {("PodDisruptionBudget", "maximus-redis"), ("Certificate", "maximus-gateway-tls")}
ONLY_IN_STAGING = {("Secret", "maximus-gateway-tls")}  # no cert-manager issuer: the certificate from config


def _neutral(value: Any, env: str) -> Any:
    text = json.dumps(value, sort_keys=True)
    text = (
        text.replace(f"maximus-{env}", "maximus-ENV")
        .replace(f"hitl.{env}.", "hitl.")
        .replace(f'"{env}"', '"ENV"')
    )
    return json.loads(text)


def _differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _differences(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield path


def test_production_differs_from_staging_only_where_the_model_says(runs: dict[str, stack.StackRun]) -> None:
    def keyed(name: str) -> dict[tuple[str, str], Any]:
        found = {(o["kind"], o["metadata"]["name"]): _neutral(o, name) for o in runs[name].objects()}
        found.update({("helm", r.props["name"]): _neutral(r.props, name) for r in runs[name].helm_releases()})
        return {k: v for k, v in found.items() if k[0] != "Namespace"}

    staging, production = keyed("staging"), keyed("production")
    assert set(production) - set(staging) == ONLY_IN_PRODUCTION
    assert set(staging) - set(production) == ONLY_IN_STAGING
    found = {key: set(_differences(staging[key], production[key])) for key in set(staging) & set(production)}
    assert {k: v for k, v in found.items() if v} == EXPECTED_DIFFERENCES


# --- bad input ----------------------------------------------------------------------------------------


def test_a_missing_secret_stops_with_its_key() -> None:
    config, secrets = config_with("staging", redisPassword=None)
    with pytest.raises(BadInput) as caught:
        stack.run_stack("staging", config, secrets)
    message = str(caught.value)
    assert message.startswith("config maximus:redisPassword: missing secret")
    assert "pulumi config set --secret maximus:redisPassword" in message and "\n" not in message


def test_an_unknown_component_stops_with_its_name() -> None:
    env = environment("production")
    env["components"]["memcached"] = {"version": "1.6"}
    with pytest.raises(BadInput) as caught:
        stack.run_stack("production", *config_with("production", environment=env))
    assert str(caught.value).startswith(
        "environment production: components.memcached: 'memcached' is not accepted"
    )


def test_production_replicas_below_the_minimum_stop_with_the_field() -> None:
    env = environment("production")
    env["service"]["replicas"]["min"] = 1
    with pytest.raises(BadInput, match=r"^environment production: service\.replicas\.min: 1 is below"):
        stack.run_stack("production", *config_with("production", environment=env))
    env = environment("production")
    env["components"]["postgres"]["instances"] = 1
    with pytest.raises(
        BadInput, match=r"^environment production: components\.postgres\.instances: 1 is below"
    ):
        stack.run_stack("production", *config_with("production", environment=env))


def test_a_kubernetes_environment_needs_every_component() -> None:
    env = environment("staging")
    del env["components"]["kafka"]
    with pytest.raises(BadInput, match=r"^environment staging: components\.kafka: missing"):
        stack.run_stack("staging", *config_with("staging", environment=env))


def test_an_image_tag_must_be_a_release_of_the_components_version() -> None:
    env = environment("staging")
    env["platform"]["images"] = {"redis": "7.2.4"}
    with pytest.raises(BadInput, match=r"platform\.images\.redis: '7\.2\.4' is not a release of"):
        stack.run_stack("staging", *config_with("staging", environment=env))


def test_an_unknown_stack_lists_the_accepted_ones() -> None:
    with pytest.raises(BadInput, match=r"^--stack: 'prod' is not a stack; accepted: staging, production$"):
        stack.run_stack("prod")


def test_the_thin_main_turns_bad_input_into_one_pulumi_error() -> None:
    config, secrets = config_with("staging", grafanaAdminPassword=None)
    stack.ensure_event_loop()
    pulumi.runtime.settings.ROOT.set(None)
    monitor = stack._RecordingMonitor(stack._Mocks())
    pulumi.runtime.mocks.set_mocks(
        stack._Mocks(), project="maximus", stack="staging", preview=True, monitor=monitor
    )
    pulumi.runtime.set_all_config(config, secrets)
    with pytest.raises(pulumi.RunError, match=r"^error: config maximus:grafanaAdminPassword: missing secret"):
        runpy.run_path(str(ROOT / "stacks" / "__main__.py"), run_name="__main__")


def test_a_built_image_is_pinned_by_digest() -> None:
    env = environment("staging")
    env["platform"]["build"] = {"context": "workload"}
    config, secrets = config_with("staging", environment=env, registryPassword="x")
    secrets.append("maximus:registryPassword")
    run = stack.run_stack("staging", config, secrets)
    (image,) = run.of_type("docker:index/image:Image")
    assert image.props["imageName"] == "ghcr.io/maximus/hitl-patch-service:1.0.0"
    deployment = one(run, "Deployment", "hitl-blue")
    assert "@sha256:" in containers(deployment)[0]["image"]
    assert "checkov.io/skip1" not in deployment["metadata"].get("annotations", {})
    assert policies.evaluate(run) == []
    missing = config_with("staging", environment=env)
    with pytest.raises(BadInput, match=r"^config maximus:registryPassword: missing secret"):
        stack.run_stack("staging", *missing)


def test_the_stack_files_keep_every_secret_encrypted() -> None:
    for name in stack.STACKS:
        text = (ROOT / "stacks" / f"Pulumi.{name}.yaml").read_text()
        _, secrets = stack.stack_config(name)
        required = stack_secrets.required_keys(model.load_environment(name))
        assert sorted(secrets) == sorted(f"maximus:{k}" for k in required)
        for key in secrets:
            assert re.search(rf"^  {re.escape(key)}:\n    secure: v1:", text, re.MULTILINE), key


def test_the_gateway_can_authenticate_with_jwt_instead() -> None:
    env = environment("staging")
    env["platform"]["gateway"]["auth"] = "jwt"
    run = stack.run_stack("staging", *config_with("staging", environment=env))
    plugins = objects(run, "KongPlugin")
    assert plugins["maximus-jwt"]["plugin"] == "jwt" and "maximus-key-auth" not in plugins
    credential = one(run, "Secret", "maximus-gateway-api-key")
    assert credential["metadata"]["labels"]["konghq.com/credential"] == "jwt"
    assert set(credential["stringData"]) == {"key", "algorithm", "secret"}
    analyze = one(run, "Ingress", "hitl-analyze")["metadata"]["annotations"]
    assert "maximus-jwt" in analyze["konghq.com/plugins"]
