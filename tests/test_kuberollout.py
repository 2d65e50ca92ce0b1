"""Status and rollback of a Kubernetes environment through the real `HttpKubeClient`, against the fake
Kubernetes API of test_kube_routers (an `httpx.MockTransport`), seeded with the staging render: the
VirtualService and both color Deployments, plus the Deployment status a cluster would report."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from infra import app as infra_app
from infra import common
from opskit import kuberollout
from opskit.deploy import RollbackReport
from opskit.errors import BadInput, OperationFailed
from opskit.kube import HttpKubeClient, KubeConfigError
from opskit.model import Environment, Replicas, load_environment
from opskit.routers.istio import ACTIVE_COLOR_ANNOTATION
from tests.test_kube_routers import SERVER, TOKEN, VS_PATH, FakeKubeApi, switched, weights_of

DEPLOY = "/apis/apps/v1/namespaces/maximus-staging/deployments"
BLUE, GREEN = f"{DEPLOY}/hitl-blue", f"{DEPLOY}/hitl-green"
PREVIOUS = "0.9.0"


class FakeTime:
    """A clock that moves only when slept on; `on_sleep` runs at every sleep (the cluster moving on)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], None] = lambda: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.on_sleep()


def set_version(deployment: dict[str, Any], version: str) -> None:
    template = deployment["spec"]["template"]
    template["metadata"]["labels"][infra_app.VERSION_LABEL] = version
    template["spec"]["containers"][0]["env"][0] = {"name": "MAXIMUS_VERSION", "value": version}


def set_ready(deployment: dict[str, Any], ready: int, replicas: int | None = None) -> None:
    if replicas is not None:
        deployment["spec"]["replicas"] = replicas
    want = deployment["spec"]["replicas"]
    deployment["status"] = {
        "observedGeneration": 1,
        "replicas": want,
        "updatedReplicas": want,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }


@pytest.fixture
def api(staging_objects: dict[str, dict[str, Any]]) -> FakeKubeApi:
    """blue active (1.0.0, 1 ready), green the previous release (0.9.0), warm (1 ready)."""
    fake = FakeKubeApi()
    assert fake.seed(staging_objects["virtualservice-hitl"]) == VS_PATH
    blue = copy.deepcopy(staging_objects["deployment-hitl-blue"])
    green = copy.deepcopy(staging_objects["deployment-hitl-green"])
    set_ready(blue, 1)
    set_version(green, PREVIOUS)
    set_ready(green, 1)
    assert fake.seed(blue) == BLUE
    assert fake.seed(green) == GREEN
    return fake


@pytest.fixture
def client(api: FakeKubeApi) -> Iterator[HttpKubeClient]:
    with HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(api.handle)) as http:
        yield http


@pytest.fixture
def env() -> Environment:
    return load_environment("staging")


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The audit store (and this machine's state) in the test's own directory, for every test here."""
    path = tmp_path / "store" / "audit.jsonl"
    monkeypatch.setenv("MAXIMUS_AUDIT_STORE", str(path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return path


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def do_rollback(
    env: Environment, client: HttpKubeClient, fake_time: FakeTime, **kwargs: Any
) -> RollbackReport:
    return kuberollout.rollback(
        env,
        client,
        reason=kwargs.pop("reason", "drill"),
        sleep=fake_time.sleep,
        clock=fake_time.clock,
        **kwargs,
    )


# --- rollback ----------------------------------------------------------------------------------------------


def test_constants_match_the_stack() -> None:
    assert kuberollout.VERSION_LABEL == infra_app.VERSION_LABEL
    assert ACTIVE_COLOR_ANNOTATION == common.ACTIVE_COLOR_ANNOTATION


def test_warm_rollback_is_one_patch_of_the_virtual_service(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    deployments_before = {p: copy.deepcopy(api.objects[p]) for p in (BLUE, GREEN)}
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 100, "green": 0}] * 2
    report = do_rollback(env, client, fake_time, reason="error budget burning")
    assert (report.from_color, report.to_color, report.version, report.path) == (
        "blue",
        "green",
        "0.9.0",
        "switch",
    )
    assert report.verified is True
    assert report.notified == "none"  # no Alertmanager URL for clusters in the model yet
    assert report.reason == "error budget burning"
    assert report.as_dict()["to"] == "green"
    ((method, path, content_type, ops),) = api.patches()
    assert (method, path, content_type) == ("PATCH", VS_PATH, "application/json-patch+json")
    assert ops[0]["op"] == "test"
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 0, "green": 100}] * 2
    assert api.objects[VS_PATH]["metadata"]["annotations"][ACTIVE_COLOR_ANNOTATION] == "green"
    assert {p: api.objects[p] for p in (BLUE, GREEN)} == deployments_before  # no redeploy, no scaling
    assert fake_time.sleeps == []
    # The audit record landed in the store and the chain verifies.
    lines = records(store)
    assert [r["operation"] for r in lines] == ["rollback.start", "rollback"]
    done = lines[-1]
    assert done["environment"] == "staging"
    assert (done["from"], done["to"], done["version"], done["from_version"]) == (
        "blue",
        "green",
        "0.9.0",
        "1.0.0",
    )
    assert (done["path"], done["verified"], done["reason"]) == ("switch", True, "error budget burning")
    assert kuberollout.audit_log(env).verify().ok
    assert not kuberollout.audit_log(env).spool.exists()


def test_rollback_twice_goes_back_and_forth(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    assert do_rollback(env, client, fake_time).to_color == "green"
    back = do_rollback(env, client, fake_time)
    assert (back.from_color, back.to_color, back.version) == ("green", "blue", "1.0.0")
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 100, "green": 0}] * 2
    assert kuberollout.audit_log(env).verify().records == 4


def test_cold_rollback_scales_up_waits_until_ready_then_switches(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    env = env.model_copy(
        update={"service": env.service.model_copy(update={"replicas": Replicas(min=2, max=3)})}
    )
    api.write(GREEN, lambda d: set_ready(d, 0, replicas=0))
    seen_while_waiting: list[list[dict[str, int]]] = []

    def cluster_moves_on() -> None:
        """The ReplicaSet controller brings one more pod to ready per poll."""
        seen_while_waiting.append(weights_of(api.objects[VS_PATH])[0:1])
        ready = api.objects[GREEN]["status"]["readyReplicas"]
        api.write(GREEN, lambda d: set_ready(d, ready + 1))

    fake_time.on_sleep = cluster_moves_on
    report = do_rollback(env, client, fake_time)
    assert (report.path, report.to_color, report.version, report.verified) == (
        "redeploy",
        "green",
        "0.9.0",
        True,
    )
    assert report.seconds == pytest.approx(2.0)
    # Traffic stayed on blue while green came up: 0 ready, then 1 ready, then 2 ready -> switch.
    assert fake_time.sleeps == [1.0, 1.0]
    assert seen_while_waiting == [[{"blue": 100, "green": 0}]] * 2
    scale, switch = api.patches()
    assert scale[1] == GREEN
    assert scale[3][0]["op"] == "test"
    assert scale[3][1:] == [{"op": "add", "path": "/spec/replicas", "value": 2}]
    assert switch[1] == VS_PATH
    assert api.objects[GREEN]["spec"]["replicas"] == 2
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 0, "green": 100}] * 2
    assert records(store)[-1]["path"] == "redeploy"


def test_cold_color_that_never_gets_ready_leaves_traffic_where_it_was(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.write(GREEN, lambda d: set_ready(d, 0, replicas=0))
    vs_before = copy.deepcopy(api.objects[VS_PATH])
    with pytest.raises(
        OperationFailed, match=r"hitl-green was not ready within 300 s \(0/1 replicas ready\)"
    ) as caught:
        do_rollback(env, client, fake_time)
    message = str(caught.value)
    assert (
        message.endswith("; traffic is on blue")
        and "kubectl -n maximus-staging describe deployment" in message
    )
    assert "\n" not in message and caught.value.exit_code == 1
    assert api.objects[VS_PATH] == vs_before
    assert len(fake_time.sleeps) == 300
    assert api.objects[GREEN]["spec"]["replicas"] == 1  # left scaled up: a second run carries on from there
    assert [r["operation"] for r in records(store)] == ["rollback.start", "rollback.failed"]
    # Run again once the pods are ready: no second scale-up, just the switch.
    api.write(GREEN, lambda d: set_ready(d, 1))
    api.requests.clear()
    report = do_rollback(env, client, fake_time)
    assert report.path == "switch"
    assert [p[1] for p in api.patches()] == [VS_PATH]


def test_traffic_moved_by_someone_else_during_the_wait_is_not_overridden(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.write(GREEN, lambda d: set_ready(d, 0, replicas=0))

    def someone_switches() -> None:
        api.write(GREEN, lambda d: set_ready(d, 1))
        api.write(
            VS_PATH,
            lambda vs: [r.update({"weight": 50}) for rule in switched(vs) for r in rule["route"]],
        )

    fake_time.on_sleep = someone_switches
    with pytest.raises(
        OperationFailed,
        match=r"traffic moved from blue to a split \{'blue': 50, 'green': 50\} by another hand; nothing",
    ):
        do_rollback(env, client, fake_time)
    assert [p[1] for p in api.patches()] == [GREEN]  # the scale-up, no switch
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 50, "green": 50}] * 2


def test_stuck_rollout_fails_early(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    def stuck(d: dict[str, Any]) -> None:
        set_ready(d, 0, replicas=1)
        d["status"]["conditions"] = [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "hitl-green-5d9f" has timed out progressing.',
            }
        ]

    api.write(GREEN, stuck)
    expected = r"hitl-green cannot get ready \(0/1 replicas ready: .*has timed out progressing"
    with pytest.raises(OperationFailed, match=expected):
        do_rollback(env, client, fake_time)
    assert fake_time.sleeps == []
    assert api.patches() == []  # already asked for 1 replica: nothing to scale


def test_needs_restore_refuses_without_force(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.write(VS_PATH, lambda vs: vs["metadata"]["annotations"].update({"maximus.io/needs-restore": "true"}))
    before = copy.deepcopy(api.objects)
    with pytest.raises(BadInput, match="breaking migration") as caught:
        do_rollback(env, client, fake_time)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "invoke db.restore --env staging" in message and "--force" in message and "\n" not in message
    assert api.patches() == [] and api.objects == before
    assert not store.exists()
    report = do_rollback(env, client, fake_time, force=True)
    assert report.to_color == "green" and report.verified
    annotations = api.objects[VS_PATH]["metadata"]["annotations"]
    assert "maximus.io/needs-restore" not in annotations
    assert annotations[ACTIVE_COLOR_ANNOTATION] == "green"
    last = records(store)[-1]
    assert last["forced"] is True and last["needs_restore_cleared"] is True


def test_forbidden_names_rbac_and_changes_nothing(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.fail("PATCH", VS_PATH, 403)
    before = copy.deepcopy(api.objects)
    with pytest.raises(OperationFailed, match=r"forbidden \(403\) to patch virtualservices/hitl") as caught:
        do_rollback(env, client, fake_time)
    message = str(caught.value)
    assert "RBAC" in message and "\n" not in message and caught.value.exit_code == 1
    assert message.endswith("; traffic is on blue")
    assert api.objects == before
    failed = records(store)[-1]
    assert failed["operation"] == "rollback.failed" and "RBAC" in failed["error"]
    assert failed["traffic"] == "traffic is on blue"


def test_switched_but_not_read_back_says_so(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.before_patch = lambda fake, path: fake.fail("GET", path, 403)
    with pytest.raises(OperationFailed, match="switched to green but cannot read it back") as caught:
        do_rollback(env, client, fake_time)
    assert "where traffic is now could not be read: `invoke status`" in str(caught.value)
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 0, "green": 100}] * 2


def test_forbidden_read_names_rbac(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.fail("GET", GREEN, 403)
    with pytest.raises(
        OperationFailed, match=r"forbidden \(403\) to get deployments/hitl-green.*RBAC.*nothing"
    ):
        do_rollback(env, client, fake_time)
    assert api.patches() == []


def test_unreachable_cluster(env: Environment, store: Path, fake_time: FakeTime) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client = HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(refuse))
    with pytest.raises(OperationFailed, match="cluster unreachable") as caught:
        do_rollback(env, client, fake_time)
    assert caught.value.exit_code == 1 and "nothing was changed" in str(caught.value)
    with pytest.raises(OperationFailed, match="cluster unreachable"):
        kuberollout.status(env, client)
    assert not store.exists()


def test_wrong_cluster_says_to_set_the_context(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    del api.objects[VS_PATH]
    with pytest.raises(OperationFailed, match=r"is this the staging cluster.*MAXIMUS_KUBE_CONTEXT"):
        do_rollback(env, client, fake_time)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda fake: fake.objects.pop(GREEN), "Deployment hitl-green does not exist"),
        (
            lambda fake: fake.write(
                GREEN,
                lambda d: (
                    d["spec"]["template"]["metadata"]["labels"].pop(infra_app.VERSION_LABEL),
                    d["spec"]["template"]["spec"]["containers"][0].pop("env"),
                ),
            ),
            "Deployment hitl-green has no maximus.io/version label",
        ),
    ],
    ids=["missing", "no-version"],
)
@pytest.mark.usefixtures("store")
def test_nothing_to_roll_back_to(
    api: FakeKubeApi,
    client: HttpKubeClient,
    env: Environment,
    change: Callable[[FakeKubeApi], Any],
    expected: str,
) -> None:
    change(api)
    with pytest.raises(OperationFailed, match=f"nothing to roll back to: {expected}") as caught:
        do_rollback(env, client, FakeTime())
    assert caught.value.exit_code == 1
    assert api.patches() == []


def test_split_traffic_is_not_guessed(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    api.write(VS_PATH, lambda vs: [r.update({"weight": 50}) for rule in switched(vs) for r in rule["route"]])
    with pytest.raises(OperationFailed, match="traffic is split"):
        do_rollback(env, client, fake_time)
    assert api.patches() == []


def test_local_environment_is_refused(client: HttpKubeClient, fake_time: FakeTime) -> None:
    with pytest.raises(BadInput, match="accepted: a kubernetes environment"):
        do_rollback(load_environment("local"), client, fake_time)


# --- status ------------------------------------------------------------------------------------------------


def test_status_reports_active_previous_and_versions(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path
) -> None:
    report = kuberollout.status(env, client)
    assert report["environment"] == "staging" and report["kind"] == "kubernetes"
    assert report["active"] == {"color": "blue", "version": "1.0.0"}
    assert report["previous"] == {
        "color": "green",
        "version": "0.9.0",
        "warm": True,
        "ready_replicas": 1,
        "needs_restore": False,
    }
    assert report["running"] is True
    assert report["routing"] == {"blue": 100, "green": 0}
    assert report["deploy"]["state"] == "idle"
    assert report["edge"] == "https://hitl.staging.maximus.example.com"
    assert [(c["name"], c["state"], c["ready"], c["desired"]) for c in report["components"]] == [
        ("hitl-blue", "RUNNING", 1, 1),
        ("hitl-green", "RUNNING", 1, 1),
    ]
    assert report["components"][0]["endpoint"] == "http://hitl-blue.maximus-staging.svc.cluster.local:8000"
    assert report["last_operations"] == []
    json.dumps(report)  # --json


def test_status_after_a_rollback_and_with_a_cold_previous(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment, store: Path, fake_time: FakeTime
) -> None:
    do_rollback(env, client, fake_time, reason="bad release")
    api.write(BLUE, lambda d: set_ready(d, 0, replicas=0))
    report = kuberollout.status(env, client)
    assert report["active"] == {"color": "green", "version": "0.9.0"}
    assert report["previous"]["color"] == "blue" and report["previous"]["warm"] is False
    assert report["components"][0]["state"] == "SCALED-DOWN"
    ((operation,),) = [report["last_operations"]]
    assert (operation["operation"], operation["result"], operation["reason"]) == (
        "rollback to 0.9.0",
        "done",
        "bad release",
    )


def test_status_reports_routes_edited_by_hand(
    api: FakeKubeApi, client: HttpKubeClient, env: Environment
) -> None:
    def half(vs: dict[str, Any]) -> None:
        for destination in switched(vs)[0]["route"]:
            destination["weight"] = 100 if destination["destination"]["subset"] == "green" else 0

    api.write(VS_PATH, half)
    report = kuberollout.status(env, client)
    assert report["deploy"]["state"] == "routing-inconsistent"
    assert "routes disagree" in report["deploy"]["problem"]
    assert report["active"]["color"] == "blue"  # from the annotation
    assert report["routing"] is None


# --- the client --------------------------------------------------------------------------------------------


def test_client_for_without_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: Environment
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(
        OperationFailed, match=r"cannot reach the cluster of staging: no kubeconfig at .*set KUBECONFIG"
    ) as caught:
        kuberollout.client_for(env)
    assert caught.value.exit_code == 1


def test_client_for_uses_the_context_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: Environment
) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "staging",
        "clusters": [
            {"name": "staging", "cluster": {"server": "https://staging.test:6443"}},
            {"name": "production", "cluster": {"server": "https://production.test:6443"}},
        ],
        "users": [{"name": "deployer", "user": {"token": "t"}}],
        "contexts": [
            {"name": "staging", "context": {"cluster": "staging", "user": "deployer"}},
            {"name": "production", "context": {"cluster": "production", "user": "deployer"}},
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("MAXIMUS_KUBE_CONTEXT", raising=False)
    client = kuberollout.client_for(env)
    assert isinstance(client, HttpKubeClient) and client.server == "https://staging.test:6443"
    monkeypatch.setenv("MAXIMUS_KUBE_CONTEXT", "production")
    client = kuberollout.client_for(env)
    assert isinstance(client, HttpKubeClient) and client.server == "https://production.test:6443"
    monkeypatch.setenv("MAXIMUS_KUBE_CONTEXT", "nope")
    with pytest.raises(KubeConfigError, match=r"no context named 'nope'.*set MAXIMUS_KUBE_CONTEXT") as caught:
        kuberollout.client_for(env)
    assert caught.value.exit_code == 2


def test_audit_log_defaults_to_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: Environment
) -> None:
    monkeypatch.delenv("MAXIMUS_AUDIT_STORE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    log = kuberollout.audit_log(env)
    assert isinstance(log.sink, kuberollout.audit.FileSink)
    assert log.sink.path == tmp_path / "maximus-ops" / "staging" / "audit" / "audit.jsonl"
    assert log.spool == tmp_path / "maximus-ops" / "staging" / "audit" / "spool.jsonl"
