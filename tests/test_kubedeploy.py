"""`invoke deploy`, `health` and `rollback` on a Kubernetes environment, through the real `HttpKubeClient`
against the fake Kubernetes API of test_kube_routers (an `httpx.MockTransport`) seeded with the staging
render. Behind the fake API server stand what a cluster runs: a controller that rolls a Deployment out
when the clock moves, Prometheus and Alertmanager behind the service proxy, and the gateway."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra import common, mesh, monitoring
from opskit import deploy, health, kubedeploy, kuberollout
from opskit.backup_storage import LocalDirStorage
from opskit.errors import BadInput, LockHeld, OperationFailed
from opskit.kube import HttpKubeClient
from opskit.model import COLORS, Environment, load_environment
from opskit.routers import RouterError, istio
from tests.test_kube_routers import NAMESPACE, SERVER, TOKEN, VS_PATH, FakeKubeApi, weights_of
from tests.test_kuberollout import FakeTime, set_ready, set_version

DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
RECORD = f"/api/v1/namespaces/{NAMESPACE}/configmaps/hitl-deploy"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/hitl-deploy-lock"
PROMETHEUS = f"{NAMESPACE}-observability/maximus-monitoring-prometheus:9090"
ALERTMANAGER = f"{NAMESPACE}-observability/maximus-monitoring-alertmanager:9093"
EDGE = "https://hitl.staging.maximus.example.com"
KEY = "test-gateway-key"  # pragma: allowlist secret - a fake API key
# A Wednesday inside staging's deployment window (governance/policy.yaml).
NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


class Cluster:
    """What stands behind the API server. Deployments roll out (every replica ready, unless its version
    never gets ready) each time the clock moves; the gateway and Prometheus answer for the version each
    color runs, with that version's error ratio."""

    def __init__(self, api: FakeKubeApi) -> None:
        self.api = api
        self.time = FakeTime()
        self.time.on_sleep = self.reconcile
        self.error_ratio: dict[str, float] = {}
        self.never_ready: set[str] = set()
        self.edge_answers: Counter[str] = Counter()
        self.alerts: list[dict[str, Any]] = []
        self.queries: list[str] = []
        api.services[PROMETHEUS] = self.prometheus
        api.services[ALERTMANAGER] = self.alertmanager

    def deployment(self, color: str) -> dict[str, Any]:
        return self.api.objects[f"{DEPLOYMENTS}/hitl-{color}"]

    def version(self, color: str) -> str | None:
        return kuberollout.deployment_version(self.deployment(color))

    def replicas(self, color: str) -> int:
        return int(self.deployment(color)["spec"]["replicas"])

    def active(self) -> str | None:
        weights = weights_of(self.api.objects[VS_PATH])[0]
        return next((c for c, w in weights.items() if w == 100), None)

    def reconcile(self) -> None:
        for color in COLORS:
            deployment = self.deployment(color)
            replicas = self.replicas(color)
            ready = 0 if self.version(color) in self.never_ready else replicas
            status = {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
            }
            if deployment.get("status") != status:
                self.api.write(f"{DEPLOYMENTS}/hitl-{color}", lambda d, s=status: d.update(status=s))

    def failing(self, color: str, number: int) -> bool:
        """Every request whose share of the version's error ratio crosses a whole number fails."""
        ratio = self.error_ratio.get(self.version(color) or "", 0.0)
        return int(number * ratio) != int((number - 1) * ratio)

    def edge(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("x-api-key") != KEY:
            return httpx.Response(401, json={"message": "No API key found in request"})
        color = request.headers.get(istio.PREVIEW_HEADER) or self.active()
        if color is None or kuberollout.ready_replicas(self.deployment(color)) == 0:
            return httpx.Response(503, text="no healthy upstream")
        self.edge_answers[color] += 1
        code = 500 if self.failing(color, self.edge_answers[color]) else 200
        headers = {"X-App-Color": color, "X-App-Version": self.version(color) or ""}
        return httpx.Response(code, headers=headers, json={})

    def prometheus(self, request: httpx.Request, path: str) -> httpx.Response:
        if path == "/-/ready":
            return httpx.Response(200, text="Prometheus Server is Ready.")
        query = request.url.params["query"]
        self.queries.append(query)
        color = re.search(r'color="(\w+)"', query)
        if color is None:  # kafka-exporter's series, which a backup reads
            series: list[dict[str, Any]] = []
            if query.startswith("kafka_brokers"):
                series = [{"metric": {"namespace": f"{NAMESPACE}-data"}, "value": [self.time.now, "1"]}]
            elif "kafka_consumergroup_current_offset" in query:
                labels = {
                    "consumergroup": "hitl-decisions",
                    "topic": "maximus.hitl.decisions",
                    "partition": "0",
                }
                series = [{"metric": labels, "value": [self.time.now, "42"]}]
            return httpx.Response(
                200, json={"status": "success", "data": {"resultType": "vector", "result": series}}
            )
        if "histogram_quantile" in query:
            value = 42.0
        else:
            value = self.error_ratio.get(self.version(color.group(1)) or "", 0.0)
        result = [{"metric": {}, "value": [self.time.now, str(value)]}]
        return httpx.Response(
            200, json={"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    def alertmanager(self, request: httpx.Request, path: str) -> httpx.Response:
        if path == "/-/ready":
            return httpx.Response(200, text="OK")
        self.alerts.extend(json.loads(request.content))
        return httpx.Response(200, json={})

    def alert_names(self) -> list[str]:
        return [a["labels"]["alertname"] for a in self.alerts]


@pytest.fixture
def api(staging_objects: dict[str, dict[str, Any]]) -> FakeKubeApi:
    """blue serves 1.0.0; green ran 0.9.0 and is scaled to zero."""
    fake = FakeKubeApi()
    fake.seed(staging_objects["virtualservice-hitl"])
    blue = copy.deepcopy(staging_objects["deployment-hitl-blue"])
    green = copy.deepcopy(staging_objects["deployment-hitl-green"])
    set_version(blue, "1.0.0")
    set_ready(blue, 1, replicas=1)
    set_version(green, "0.9.0")
    set_ready(green, 0, replicas=0)
    for deployment in (blue, green):
        deployment["metadata"]["generation"] = 1
        fake.seed(deployment)
    return fake


@pytest.fixture
def cluster(api: FakeKubeApi) -> Cluster:
    return Cluster(api)


@pytest.fixture
def client(api: FakeKubeApi) -> Iterator[HttpKubeClient]:
    with HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(api.handle)) as http:
        yield http


@pytest.fixture
def env() -> Environment:
    return load_environment("staging")


@pytest.fixture
def target(env: Environment, client: HttpKubeClient, cluster: Cluster) -> kubedeploy.ClusterTarget:
    return kubedeploy.ClusterTarget(
        env,
        client,
        edge_transport=httpx.MockTransport(cluster.edge),
        sleep=cluster.time.sleep,
        clock=cluster.time.clock,
    )


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The audit store in the test's directory, the gateway key set, the clock inside a window."""
    store = tmp_path / "store" / "audit.jsonl"
    monkeypatch.setenv("MAXIMUS_AUDIT_STORE", str(store))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv(kubedeploy.GATEWAY_KEY_VAR, KEY)
    monkeypatch.setattr(deploy, "_now", lambda: NOW)
    return store


def run_deploy(env: Environment, target: kubedeploy.ClusterTarget, version: str, **kwargs: Any) -> Any:
    return deploy.deploy(env, version, target=target, **kwargs)


def killed_after(step: str, target: kubedeploy.ClusterTarget, version: str = "1.1.0") -> None:
    """Run a deploy that dies right after persisting `step`, before the step takes effect: as after kill -9,
    but for the Lease (given back here; see the kill -9 test)."""
    advance = deploy.Deployment.advance

    def die_after(self: deploy.Deployment, name: str, detail: str = "") -> None:
        advance(self, name, detail)
        if name == step:
            raise SystemExit(137)

    deploy.Deployment.advance = die_after  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            run_deploy(target.env, target, version)
    finally:
        deploy.Deployment.advance = advance  # type: ignore[method-assign]


def record(api: FakeKubeApi) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(api.objects[RECORD]["data"]["record"])
    return result


def audited(store: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_text().splitlines()]


# --- the stack and the tooling agree -----------------------------------------------------------------------


def test_names_match_the_stack() -> None:
    assert istio.PREVIEW_HEADER == mesh.PREVIEW_HEADER
    assert f"{monitoring.RELEASE}-prometheus" == kuberollout.PROMETHEUS_SERVICE
    assert f"{monitoring.RELEASE}-alertmanager" == kuberollout.ALERTMANAGER_SERVICE


def test_preview_routes_send_the_header_to_its_color_and_are_never_switched(
    api: FakeKubeApi, target: kubedeploy.ClusterTarget
) -> None:
    previews = [r for r in api.objects[VS_PATH]["spec"]["http"] if r["name"].startswith("preview-")]
    assert [(r["match"][0]["headers"][istio.PREVIEW_HEADER]["exact"], r["route"][0]["destination"]["subset"])
            for r in previews] == [("blue", "blue"), ("green", "green")]  # fmt: skip
    # Only the deploy tooling's own gateway consumer: any other client's header is ignored.
    assert {r["match"][0]["headers"][common.CONSUMER_HEADER]["exact"] for r in previews} == {
        common.DEPLOY_CONSUMER
    }
    target.router.switch("green")
    after = [r for r in api.objects[VS_PATH]["spec"]["http"] if r["name"].startswith("preview-")]
    assert after == previews


# --- deploy ------------------------------------------------------------------------------------------------


def test_good_release_rolls_out_on_the_idle_color_and_takes_traffic(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi, isolated: Path
) -> None:
    report = run_deploy(env, target, "1.1.0")
    assert (report.outcome, report.from_color, report.to_color) == ("done", "blue", "green"), report.reason
    green = cluster.deployment("green")
    container = green["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{env.service.image}:1.1.0"
    assert container["env"][0] == {"name": "MAXIMUS_VERSION", "value": "1.1.0"}
    assert cluster.version("green") == "1.1.0"
    assert cluster.replicas("green") == env.service.replicas.min
    # The smoke reached green alone through the gateway's preview route (blue: the preflight's health check).
    assert cluster.edge_answers == Counter({"green": deploy.SMOKE_REQUESTS, "blue": 1})
    assert cluster.active() == "green"
    assert api.objects[VS_PATH]["metadata"]["annotations"][istio.ACTIVE_COLOR_ANNOTATION] == "green"
    # Post-promotion analysis read the cluster Prometheus through the proxy, over the model's window.
    rounds = int(env.deploy.analysis.window_s / env.deploy.analysis.interval_s)
    assert len(cluster.queries) == 2 * rounds
    assert all('color="green"' in q for q in cluster.queries)
    # The previous release stays warm; the record says so and where the deploy ended.
    assert cluster.replicas("blue") == 1 and cluster.version("blue") == "1.0.0"
    saved = record(api)
    assert saved["deploy"]["state"] == "done" and saved["deploy"]["step"] == "done"
    assert saved["previous"]["color"] == "blue" and saved["previous"]["warm_until"]
    steps = [r["step"] for r in audited(isolated) if r["operation"] == "deploy.step"]
    assert steps == [step for step in deploy.STEPS if step != "backup"]
    assert "holderIdentity" not in api.objects[LEASE]["spec"]  # the lock was given back


def test_bad_release_is_rolled_back_automatically_and_notified(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    cluster.error_ratio["1.1.0"] = 0.3
    report = run_deploy(env, target, "1.1.0")
    # 30% errors is caught by the smoke, before any user sees the release
    assert report.outcome == "aborted" and "pre-promotion" in report.reason
    assert cluster.active() == "blue"
    assert cluster.replicas("green") == 0
    assert not any(op.get("path", "").startswith("/spec/http") for *_, ops in api.patches() for op in ops
                   if isinstance(op, dict))  # fmt: skip


def test_release_failing_after_the_switch_is_rolled_back_at_once(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi, isolated: Path
) -> None:
    original = cluster.failing
    cluster.failing = lambda color, number: False  # type: ignore[method-assign]  # healthy on the smoke
    cluster.error_ratio["1.1.0"] = 0.3  # and failing in Prometheus once users arrive
    report = run_deploy(env, target, "1.1.0")
    cluster.failing = original  # type: ignore[method-assign]
    assert report.outcome == "rolled-back", report.reason
    assert cluster.active() == "blue"
    assert cluster.replicas("green") == 0
    assert "MaximusRollback" in cluster.alert_names()
    assert record(api)["deploy"]["state"] == "rolled-back"
    rollbacks = [r for r in audited(isolated) if r["operation"] == "rollback"]
    assert rollbacks and rollbacks[-1]["automatic"] is True


def test_prometheus_unreachable_after_the_switch_holds_never_passes(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    def away_after_switch(_api: FakeKubeApi, path: str) -> None:
        if path == VS_PATH:
            api.services.pop(PROMETHEUS, None)  # the API server then answers 503 for it

    api.before_patch = away_after_switch
    report = run_deploy(env, target, "1.1.0")
    assert report.outcome == "held", report.reason
    assert "error" in json.dumps(report.analyses[-1]) and report.analyses[-1]["outcome"] == "hold"
    assert cluster.active() == "green"  # held where it is: the tool does not guess
    assert "MaximusDeployHeld" in cluster.alert_names()
    status = kuberollout.status(env, target.client)
    assert status["deploy"]["state"] == "held" and status["deploy"]["step"] == "analysis-post"
    # Prometheus back: --resume analyses again and finishes.
    api.services[PROMETHEUS] = cluster.prometheus
    api.before_patch = None
    resumed = deploy.deploy(env, None, resume=True, target=target)
    assert resumed.outcome == "done", resumed.reason
    assert cluster.active() == "green"


def test_a_release_that_never_gets_ready_is_aborted_by_the_deadline(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster
) -> None:
    cluster.never_ready.add("1.1.0")
    report = run_deploy(env, target, "1.1.0")
    assert report.outcome == "aborted"
    assert f"not ready within {env.deploy.ready_deadline_s:g} s" in report.reason
    assert cluster.active() == "blue" and cluster.replicas("green") == 0
    assert cluster.edge_answers == Counter({"blue": 1})  # the preflight's check; green never smoked


def test_a_refused_gateway_key_is_never_a_measurement(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kubedeploy.GATEWAY_KEY_VAR, "wrong")
    with pytest.raises(OperationFailed, match=r"preflight: staging is not healthy \(edge\)"):
        run_deploy(env, target, "1.1.0")
    smoke = target.smoke("green", lambda _m: None)
    assert smoke.outcome == "abort"
    assert {m.verdict for m in smoke.measurements} == {"error"}
    assert "HTTP 401: the gateway refused the request" in smoke.measurements[0].detail
    monkeypatch.delenv(kubedeploy.GATEWAY_KEY_VAR)
    smoke = target.smoke("green", lambda _m: None)
    assert {m.verdict for m in smoke.measurements} == {"error"}
    assert f"${kubedeploy.GATEWAY_KEY_VAR} is not set" in smoke.measurements[0].detail
    assert cluster.active() == "blue" and cluster.edge_answers["green"] == 0


@pytest.mark.parametrize("step", ["start-color", "wait-ready", "analysis-pre", "switch", "analysis-post"])
@pytest.mark.parametrize("finish", ["resume", "abort"])
def test_killed_at_each_step_resume_and_abort_end_consistent(
    target: kubedeploy.ClusterTarget, cluster: Cluster, step: str, finish: str
) -> None:
    env = target.env
    killed_after(step, target)
    status = kuberollout.status(env, target.client)
    assert status["deploy"]["state"] == "in-progress" and status["deploy"]["step"] == step
    assert cluster.active() in COLORS  # never split
    report = deploy.deploy(env, None, resume=finish == "resume", abort=finish == "abort", target=target)
    if finish == "resume":
        assert report.outcome == "done", report.reason
        assert cluster.active() == "green" and cluster.version("green") == "1.1.0"
        assert cluster.replicas("blue") == 1
    else:
        assert report.outcome == "aborted"
        assert cluster.active() == "blue" and cluster.replicas("green") == 0
    cluster.reconcile()
    assert kuberollout.status(env, target.client)["deploy"]["state"] == "idle"


def test_bad_input_changes_nothing(
    env: Environment, target: kubedeploy.ClusterTarget, api: FakeKubeApi
) -> None:
    before = copy.deepcopy(api.objects)
    with pytest.raises(BadInput, match="--inject: fault injection is accepted on local environments only"):
        run_deploy(env, target, "1.1.0", inject="error-rate=0.3")
    with pytest.raises(BadInput, match=r"--version: '1\.1' does not match the version pattern"):
        run_deploy(env, target, "1.1")
    with pytest.raises(BadInput, match=r"--version: 9\.9\.9 is not a release of hitl"):
        run_deploy(env, target, "9.9.9")
    assert api.objects == before


def test_dry_run_plans_from_the_cluster_and_changes_nothing(
    env: Environment, target: kubedeploy.ClusterTarget, api: FakeKubeApi
) -> None:
    before = copy.deepcopy(api.objects)
    report = run_deploy(env, target, "1.1.0", dry_run=True)
    assert (report.outcome, report.from_color, report.to_color) == ("planned", "blue", "green")
    assert api.objects == before


# --- the lock ----------------------------------------------------------------------------------------------


def lease(holder: str, renewed: datetime) -> dict[str, Any]:
    stamp = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "hitl-deploy-lock",
            "namespace": NAMESPACE,
            "annotations": {kubedeploy.OPERATION_ANNOTATION: "deploy"},
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 60,
            "acquireTime": stamp,
            "renewTime": stamp,
        },
    }


def test_a_running_deploy_holds_the_lease_exit_3_naming_it(
    env: Environment, target: kubedeploy.ClusterTarget, api: FakeKubeApi
) -> None:
    api.seed(lease("ci-runner-7:4242", datetime.now(UTC)))
    before = copy.deepcopy(api.objects)
    with pytest.raises(LockHeld, match=r"locked by deploy \(ci-runner-7:4242, since ") as caught:
        run_deploy(env, target, "1.1.0")
    assert caught.value.exit_code == 3
    with pytest.raises(LockHeld):
        kubedeploy.rollback(env, reason="drill", target=target)
    assert api.objects == before


def test_a_lease_nobody_renews_is_stale_and_broken_only_when_asked(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    api.seed(lease("ci-runner-7:4242", datetime(2026, 11, 1, tzinfo=UTC)))
    with pytest.raises(LockHeld, match=r"no longer renews it: a stale lock.*--break-stale-lock"):
        run_deploy(env, target, "1.1.0")
    assert cluster.active() == "blue"
    report = run_deploy(env, target, "1.1.0", break_stale_lock=True)
    assert report.outcome == "done", report.reason


# --- rollback and health -----------------------------------------------------------------------------------


def test_rollback_after_a_deploy_is_one_switch_and_closes_the_record(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    assert run_deploy(env, target, "1.1.0").outcome == "done"
    patches = len(api.patches())
    report = kubedeploy.rollback(env, reason="drill", target=target)
    assert (report.path, report.to_color, report.version, report.verified) == (
        "switch",
        "blue",
        "1.0.0",
        True,
    )
    assert cluster.active() == "blue"
    assert report.notified == "alertmanager" and "MaximusRollback" in cluster.alert_names()
    saved = record(api)
    assert saved["history"][-1]["operation"] == "rollback to 1.0.0"
    # one switch of the VirtualService, the Lease taken and given back, the record: nothing redeployed
    changed = {path for _, path, *_ in api.patches()[patches:]}
    assert changed == {VS_PATH, LEASE, RECORD}


def test_breaking_migration_backs_up_first_and_marks_rollback_needs_restore(
    target: kubedeploy.ClusterTarget, cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, api = target.env, cluster.api
    monkeypatch.setenv("MAXIMUS_BACKUP_KEY", "11" * 32)
    target.storage = LocalDirStorage(tmp_path / "backups")
    backups = "/apis/postgresql.cnpg.io/v1/namespaces/maximus-staging-data/backups"

    def complete_backups() -> None:
        cluster.reconcile()
        for path in [p for p in api.objects if p.startswith(backups + "/")]:
            api.write(path, lambda b: b.update(status={"phase": "completed"}))

    cluster.time.on_sleep = complete_backups
    report = run_deploy(env, target, "2.0.0", risk="high")
    assert report.outcome == "done", report.reason
    made = [p for p in api.objects if p.startswith(backups + "/")]
    assert len(made) == 1
    assert api.objects[VS_PATH]["metadata"]["annotations"][kuberollout.NEEDS_RESTORE_ANNOTATION] == "true"
    with pytest.raises(BadInput, match="needs the database as it was"):
        kubedeploy.rollback(env, reason="drill", target=target)
    assert cluster.active() == "green"


def test_cluster_health_checks_each_part_and_fails_closed(
    env: Environment, client: HttpKubeClient, cluster: Cluster, api: FakeKubeApi
) -> None:
    transport = httpx.MockTransport(cluster.edge)
    report = health.check_environment(env, client=client, edge_transport=transport)
    assert report.healthy, report.as_dict()
    assert {c.name for c in report.checks} == {
        "routing",
        "prometheus",
        "alertmanager",
        "edge",
        "workload-blue",
    }
    api.services.pop(PROMETHEUS)
    report = health.check_environment(env, client=client, edge_transport=transport)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert list(failed) == ["prometheus"] and "503" in failed["prometheus"]
    assert not report.healthy


def test_preflight_refuses_an_unhealthy_cluster_and_changes_nothing(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    api.services.pop(PROMETHEUS)
    with pytest.raises(OperationFailed, match=r"preflight: staging is not healthy \(prometheus\)"):
        run_deploy(env, target, "1.1.0")
    assert cluster.version("green") == "0.9.0" and cluster.replicas("green") == 0
    assert cluster.active() == "blue"


def test_previous_color_is_scaled_down_after_its_rollback_window_and_rollback_then_redeploys(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_deploy(env, target, "1.1.0").outcome == "done"
    early = deploy.scale_down(env, target=target)
    assert not early.done and "still warm" in early.reason
    assert cluster.replicas("blue") == 1
    later = NOW + timedelta(seconds=env.deploy.rollback_window_s + 60)
    monkeypatch.setattr(deploy, "_now", lambda: later)
    assert "planned" in deploy.scale_down(env, target=target, dry_run=True).reason
    assert cluster.replicas("blue") == 1
    done = deploy.scale_down(env, target=target)
    assert (done.done, done.color, done.version) == (True, "blue", "1.0.0")
    assert cluster.replicas("blue") == 0 and cluster.active() == "green"
    assert not deploy.scale_down(env, target=target).done  # idempotent
    cluster.reconcile()
    report = kubedeploy.rollback(env, reason="drill", target=target)
    assert (report.path, report.to_color, report.version) == ("redeploy", "blue", "1.0.0")
    assert cluster.active() == "blue" and cluster.replicas("blue") == env.service.replicas.min


def test_rollback_refuses_while_a_deploy_stopped_before_its_switch(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster
) -> None:
    """The other color runs the new, unproven release: going there would be a promotion, not a rollback."""
    killed_after("analysis-pre", target)
    with pytest.raises(OperationFailed, match=r"before its switch: traffic is still on blue.*--abort"):
        kubedeploy.rollback(env, reason="drill", target=target)
    assert cluster.active() == "blue"


def test_smoke_answered_by_another_color_is_not_a_measurement(
    target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    """Preview routes missing (the gateway ignores the header): blue answers for green; never a pass."""
    original = cluster.edge

    def header_ignored(request: httpx.Request) -> httpx.Response:
        del request.headers[istio.PREVIEW_HEADER]
        return original(request)

    target.edge_transport = httpx.MockTransport(header_ignored)
    api.write(f"{DEPLOYMENTS}/hitl-green", lambda d: d["spec"].update(replicas=1))
    cluster.reconcile()
    smoke = target.smoke("green", lambda _m: None)
    assert smoke.outcome == "abort"
    assert {m.verdict for m in smoke.measurements} == {"error"}
    assert "did not come from the release" in smoke.measurements[0].detail


def test_a_lease_lost_to_someone_else_stops_the_deploy_before_its_next_step(
    env: Environment, target: kubedeploy.ClusterTarget, cluster: Cluster, api: FakeKubeApi
) -> None:
    with target.lock("deploy", False) as held:
        api.write(LEASE, lambda lease: lease["spec"].update(holderIdentity="someone-else:1"))
        kubedeploy.renew(target.client, LEASE, held)  # the renewal finds the Lease taken
        assert held.lost.is_set()
        with pytest.raises(LockHeld, match="lost its lock"):
            target.write_state(target.read_state())


def test_a_shifted_preview_route_is_refused_not_switched(
    target: kubedeploy.ClusterTarget, api: FakeKubeApi
) -> None:
    """After an update that moved routes around, a preview route carrying weights is refused: no switch."""

    def shifted(vs: dict[str, Any]) -> None:
        vs["spec"]["http"][0]["route"] = copy.deepcopy(vs["spec"]["http"][3]["route"])

    api.write(VS_PATH, shifted)
    with pytest.raises(RouterError, match=r"\(preview-blue\) routes to subsets \['blue', 'green'\]"):
        target.router.switch("green")


def test_after_kill_9_the_lease_is_stale_and_resume_needs_break_stale_lock(
    target: kubedeploy.ClusterTarget, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 gives nothing back: the Lease still names the dead process on this host."""
    env, api = target.env, cluster.api
    release = kubedeploy._release
    monkeypatch.setattr(kubedeploy, "_release", lambda *_args: None)  # a killed process gives nothing back
    killed_after("switch", target)
    monkeypatch.setattr(kubedeploy, "_release", release)
    finished = subprocess.Popen(["true"])
    finished.wait()
    gone = f"{socket.gethostname()}:{finished.pid}"
    api.write(LEASE, lambda lease: lease["spec"].update(holderIdentity=gone))
    assert kuberollout.status(env, target.client)["deploy"]["step"] == "switch"
    with pytest.raises(LockHeld, match="a stale lock"):
        deploy.deploy(env, None, resume=True, target=target)
    report = deploy.deploy(env, None, resume=True, break_stale_lock=True, target=target)
    assert report.outcome == "done", report.reason
    assert cluster.active() == "green"
