"""The Kubernetes routers through the real `HttpKubeClient`, against a fake Kubernetes API at the HTTP
boundary (an `httpx.MockTransport`), seeded with the objects the staging stack renders."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from infra import common
from opskit import kube
from opskit.errors import BadInput
from opskit.kube import HttpKubeClient, KubeAuthError, KubeConfigError, KubeNotFound
from opskit.routers import RouterError
from opskit.routers.istio import ACTIVE_COLOR_ANNOTATION, PREVIEW_ROUTE_PREFIX, IstioRouter
from opskit.routers.service import COLOR_LABEL, ServiceSelectorRouter

TOKEN = "fake-token-0123"
SERVER = "https://kube.test:6443"
NAMESPACE = "maximus-staging"
SERVICE = "hitl"
VS_PATH = f"/apis/networking.istio.io/v1/namespaces/{NAMESPACE}/virtualservices/{SERVICE}"
SVC_PATH = f"/api/v1/namespaces/{NAMESPACE}/services/{SERVICE}"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


# --- the fake Kubernetes API ---------------------------------------------------------------------------


class PatchFailed(Exception):
    """A JSON patch op that does not apply (the real API server answers 422)."""


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def resolve(doc: Any, path: str) -> tuple[Any, str]:
    """The container holding the pointer's last token, and that token."""
    tokens = [unescape(t) for t in path.split("/")[1:]]
    if not tokens:
        raise PatchFailed(f"pointer {path!r} names the whole document")
    parent = doc
    for token in tokens[:-1]:
        try:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchFailed(f"doc is missing path: {path}") from exc
    return parent, tokens[-1]


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 on a copy: every op applies, or the document is left as it was."""
    result = copy.deepcopy(doc)
    for op in ops:
        parent, key = resolve(result, op["path"])
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind in ("replace", "remove", "test"):
                if not 0 <= index < len(parent):
                    raise PatchFailed(f"{kind} operation does not apply: doc is missing key: {op['path']}")
                if kind == "replace":
                    parent[index] = op["value"]
                elif kind == "remove":
                    del parent[index]
                elif parent[index] != op["value"]:
                    raise PatchFailed(f"testing value {op['path']} failed: test failed")
            else:
                raise PatchFailed(f"unsupported op {kind}")
        elif isinstance(parent, dict):
            if kind == "add":
                parent[key] = op["value"]
            elif kind in ("replace", "remove", "test") and key not in parent:
                raise PatchFailed(f"{kind} operation does not apply: doc is missing key: {op['path']}")
            elif kind == "replace":
                parent[key] = op["value"]
            elif kind == "remove":
                del parent[key]
            elif kind == "test":
                if parent[key] != op["value"]:
                    raise PatchFailed(f"testing value {op['path']} failed: test failed")
            else:
                raise PatchFailed(f"unsupported op {kind}")
        else:
            raise PatchFailed(f"doc is missing path: {op['path']}")
    return result


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def status(code: int, reason: str, message: str) -> httpx.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
    return httpx.Response(code, json={**body, "code": code})


class FakeKubeApi:
    """Objects by API path; one resourceVersion counter for every write (like etcd); GET, PATCH (merge and
    JSON patch with `test`), POST; injected 401/403/404; a hook run when a PATCH arrives, before it
    applies (a concurrent writer)."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 1000
        self.requests: list[tuple[str, str, str | None, Any]] = []
        self.failures: dict[tuple[str, str], int] = {}
        self.before_patch: Callable[[FakeKubeApi, str], None] | None = None
        # "<namespace>/<service>:<port>" -> what answers behind the API server's service proxy
        self.services: dict[str, Callable[[httpx.Request, str], httpx.Response]] = {}

    def seed(self, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        api_version, plural = obj["apiVersion"], f"{obj['kind'].lower()}s"
        path = kube.object_path(api_version, plural, meta["namespace"], meta["name"])
        self.objects[path] = self._stamp(copy.deepcopy(obj))
        return path

    def write(self, path: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Another writer changes the object: new resourceVersion."""
        obj = copy.deepcopy(self.objects[path])
        change(obj)
        self.objects[path] = self._stamp(obj)

    def fail(self, method: str, path: str, code: int) -> None:
        self.failures[(method, path)] = code

    def patches(self) -> list[tuple[str, str, str | None, Any]]:
        return [r for r in self.requests if r[0] == "PATCH"]

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        return obj

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        content_type = request.headers.get("content-type")
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path, content_type, body))
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        if "/proxy" in path:
            return self._proxy(request, path)
        info = kube.parse_path(path)
        code = self.failures.get((request.method, path))
        if code == 403:
            verb = {"GET": "get", "PATCH": "patch", "POST": "create"}[request.method]
            return status(
                403,
                "Forbidden",
                f'{info.plural} "{info.name}" is forbidden: User "system:serviceaccount:{NAMESPACE}:'
                f'maximus-deploy" cannot {verb} resource "{info.plural}" in the namespace "{info.namespace}"',
            )
        if code is not None:
            return status(code, "Injected", f"injected {code}")
        if request.method == "POST":
            return self._create(path, body)
        if request.method == "GET" and info.name is None:  # a collection: list it
            items = [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == path]
            return httpx.Response(200, json={"kind": "List", "items": items})
        if path not in self.objects:
            return status(404, "NotFound", f'{info.plural} "{info.name}" not found')
        if request.method == "GET":
            return httpx.Response(200, json=self.objects[path])
        if request.method == "PATCH":
            return self._patch(path, content_type, body)
        if request.method == "DELETE":
            return httpx.Response(200, json=self.objects.pop(path))
        return status(405, "MethodNotAllowed", request.method)

    def _proxy(self, request: httpx.Request, path: str) -> httpx.Response:
        """/api/v1/namespaces/<ns>/services/<name>:<port>/proxy/<rest>: the Service answers, or 503 as the
        API server says when nothing backs it."""
        head, _, rest = path.partition("/proxy")
        parts = head.split("/")
        key = f"{parts[4]}/{parts[6]}"
        if (request.method, key) in self.failures:
            code = self.failures[(request.method, key)]
            return status(code, "Injected", f"injected {code}")
        service = self.services.get(key)
        if service is None:
            return status(503, "ServiceUnavailable", f'no endpoints available for service "{parts[6]}"')
        return service(request, rest or "/")

    def _create(self, path: str, body: Any) -> httpx.Response:
        target = f"{path}/{body['metadata']['name']}"
        if target in self.objects:
            return status(409, "AlreadyExists", f'"{body["metadata"]["name"]}" already exists')
        self.objects[target] = self._stamp(copy.deepcopy(body))
        return httpx.Response(201, json=self.objects[target])

    def _patch(self, path: str, content_type: str | None, body: Any) -> httpx.Response:
        if self.before_patch is not None:
            self.before_patch(self, path)
        current = self.objects[path]
        if content_type == MERGE:
            patched = apply_merge_patch(current, body)
        elif content_type == JSON_PATCH:
            try:
                patched = apply_json_patch(current, body)
            except PatchFailed as exc:
                return status(422, "Invalid", str(exc))
        else:
            return status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {content_type}",
            )
        # A changed spec is a new generation, as on the real API server (for objects that track one).
        generation = current.get("metadata", {}).get("generation")
        if generation is not None and patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = generation + 1
        # A resourceVersion in the patched object is a precondition, as on the real API server.
        wanted = patched.get("metadata", {}).get("resourceVersion")
        if wanted != current["metadata"]["resourceVersion"]:
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            )
        self.objects[path] = self._stamp(patched)
        return httpx.Response(200, json=self.objects[path])


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def api(staging_objects: dict[str, dict[str, Any]]) -> FakeKubeApi:
    fake = FakeKubeApi()
    assert fake.seed(staging_objects[f"virtualservice-{SERVICE}"]) == VS_PATH
    assert fake.seed(staging_objects[f"service-{SERVICE}"]) == SVC_PATH
    return fake


@pytest.fixture
def client(api: FakeKubeApi) -> Iterator[HttpKubeClient]:
    with HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(api.handle)) as http:
        yield http


def switched(vs: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes a switch changes: all but the fixed preview routes."""
    return [rule for rule in vs["spec"]["http"] if not rule["name"].startswith(PREVIEW_ROUTE_PREFIX)]


def weights_of(vs: dict[str, Any]) -> list[dict[str, int]]:
    return [{d["destination"]["subset"]: d["weight"] for d in rule["route"]} for rule in switched(vs)]


# --- the Istio router ----------------------------------------------------------------------------------


def test_constants_match_the_stack() -> None:
    assert ACTIVE_COLOR_ANNOTATION == common.ACTIVE_COLOR_ANNOTATION
    assert COLOR_LABEL == common.COLOR_LABEL


def test_istio_reads_what_the_stack_declares(api: FakeKubeApi, client: HttpKubeClient) -> None:
    routing = IstioRouter(client, NAMESPACE, SERVICE).routing()
    assert routing.weights == {"blue": 100, "green": 0}
    assert routing.active == "blue"


def test_istio_switch_blue_to_green_in_one_guarded_patch(api: FakeKubeApi, client: HttpKubeClient) -> None:
    before = copy.deepcopy(api.objects[VS_PATH])
    routing = IstioRouter(client, NAMESPACE, SERVICE).switch("green")
    assert routing.weights == {"green": 100, "blue": 0}
    assert routing.active == "green"
    vs = api.objects[VS_PATH]
    assert weights_of(vs) == [{"blue": 0, "green": 100}, {"blue": 0, "green": 100}]
    assert vs["metadata"]["annotations"][ACTIVE_COLOR_ANNOTATION] == "green"
    # Nothing else changed: hosts, retries, timeouts, the other annotation.
    for rule, old in zip(vs["spec"]["http"], before["spec"]["http"], strict=True):
        assert {k: v for k, v in rule.items() if k != "route"} == {
            k: v for k, v in old.items() if k != "route"
        }
    assert (
        vs["metadata"]["annotations"][common.TRAFFIC_OWNER_ANNOTATION]
        == (before["metadata"]["annotations"][common.TRAFFIC_OWNER_ANNOTATION])
    )
    patches = api.patches()
    assert len(patches) == 1
    _, path, content_type, ops = patches[0]
    assert (path, content_type) == (VS_PATH, JSON_PATCH)
    assert ops[0] == {
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": before["metadata"]["resourceVersion"],
    }
    assert {"op": "add", "path": "/metadata/annotations/maximus.io~1active-color", "value": "green"} in ops
    # Read back after the patch.
    assert [m for m, *_ in api.requests] == ["GET", "PATCH", "GET"]


def test_istio_switch_is_idempotent(api: FakeKubeApi, client: HttpKubeClient) -> None:
    router = IstioRouter(client, NAMESPACE, SERVICE)
    router.switch("green")
    api.requests.clear()
    again = router.switch("green")
    assert again.active == "green"
    assert [m for m, *_ in api.requests] == ["GET"]
    back = router.switch("blue")
    assert back.weights == {"blue": 100, "green": 0}
    assert api.objects[VS_PATH]["metadata"]["annotations"][ACTIVE_COLOR_ANNOTATION] == "blue"


def test_istio_concurrent_writer_makes_it_retry_never_half_apply(
    api: FakeKubeApi, client: HttpKubeClient
) -> None:
    """Between our read and our patch, someone splits the traffic 50/50 and adds an annotation."""
    writes: list[str] = []

    def meddle(fake: FakeKubeApi, path: str) -> None:
        if writes:
            return
        writes.append(path)

        def split(obj: dict[str, Any]) -> None:
            for rule in switched(obj):
                for destination in rule["route"]:
                    destination["weight"] = 50
            obj["metadata"]["annotations"]["example.com/touched-by"] = "someone else"

        fake.write(path, split)

    api.before_patch = meddle
    routing = IstioRouter(client, NAMESPACE, SERVICE).switch("green")
    assert routing.weights == {"green": 100, "blue": 0}
    vs = api.objects[VS_PATH]
    assert weights_of(vs) == [{"blue": 0, "green": 100}, {"blue": 0, "green": 100}]
    assert vs["metadata"]["annotations"]["example.com/touched-by"] == "someone else"  # their change kept
    assert vs["metadata"]["annotations"][ACTIVE_COLOR_ANNOTATION] == "green"
    assert [m for m, *_ in api.requests] == ["GET", "PATCH", "GET", "PATCH", "GET"]
    first, second = api.patches()[0][3], api.patches()[1][3]
    assert first[0]["value"] != second[0]["value"]  # the retry tests the fresh resourceVersion


def test_istio_gives_up_on_a_writer_that_never_stops(api: FakeKubeApi, client: HttpKubeClient) -> None:
    def always(fake: FakeKubeApi, path: str) -> None:
        fake.write(path, lambda obj: obj["metadata"]["annotations"].update({"example.com/n": fake.version}))

    api.before_patch = always
    with pytest.raises(RouterError, match="kept changing") as caught:
        IstioRouter(client, NAMESPACE, SERVICE).switch("green")
    assert caught.value.exit_code == 1
    assert weights_of(api.objects[VS_PATH])[0] == {"blue": 100, "green": 0}  # not half-applied
    assert api.objects[VS_PATH]["metadata"]["annotations"][ACTIVE_COLOR_ANNOTATION] == "blue"
    assert len(api.patches()) == kube.CONFLICT_ATTEMPTS


def test_istio_forbidden_is_one_line_naming_the_resource_and_rbac(
    api: FakeKubeApi, client: HttpKubeClient
) -> None:
    api.fail("PATCH", VS_PATH, 403)
    with pytest.raises(RouterError) as caught:
        IstioRouter(client, NAMESPACE, SERVICE).switch("green")
    message = str(caught.value)
    assert "\n" not in message
    assert "forbidden (403)" in message
    assert f"virtualservices/{SERVICE} in namespace {NAMESPACE}" in message
    assert "RBAC" in message and "'patch' on virtualservices" in message
    assert caught.value.exit_code == 1
    assert weights_of(api.objects[VS_PATH])[0] == {"blue": 100, "green": 0}


def test_unauthorized_names_the_token(api: FakeKubeApi) -> None:
    wrong = HttpKubeClient(SERVER, token="expired", transport=httpx.MockTransport(api.handle))
    with pytest.raises(RouterError, match=r"unauthorized \(401\).*token"):
        IstioRouter(wrong, NAMESPACE, SERVICE).routing()


def test_missing_virtual_service_is_named(client: HttpKubeClient) -> None:
    with pytest.raises(
        RouterError, match=f"not found \\(404\\): virtualservices/other in namespace {NAMESPACE}"
    ):
        IstioRouter(client, NAMESPACE, "other").routing()


def test_unreachable_cluster_refused_connection() -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = HttpKubeClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=2)
    with pytest.raises(RouterError, match="cluster unreachable") as caught:
        IstioRouter(unreachable, NAMESPACE, SERVICE).switch("green")
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 1


def test_unreachable_cluster_timeout() -> None:
    """A server that accepts connections and never answers: the call's timeout ends it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        silent = HttpKubeClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout_s=0.3)
        with pytest.raises(kube.KubeUnreachable, match=r"cluster unreachable: .* within 0.3 s"):
            silent.get(VS_PATH)
    finally:
        for sock in accepted:
            sock.close()
        listener.close()


def test_transport_errors_are_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    client = HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(refuse))
    with pytest.raises(
        kube.KubeUnreachable, match=r"^cluster unreachable: https://kube.test:6443 \(.*not known\)"
    ):
        client.get(VS_PATH)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda vs: switched(vs)[1]["route"].append(
                {"destination": {"host": "x", "subset": "canary"}, "weight": 0}
            ),
            r"spec.http\[3\] \(primary\) routes to subsets \['blue', 'green', 'canary'\]; accepted: exactly",
        ),
        (
            lambda vs: switched(vs)[0]["route"][0].update({"weight": 90}),
            r"spec.http\[2\] \(websocket\) weights add up to 90; accepted: 100",
        ),
        (
            lambda vs: [r.update({"weight": 45}) for rule in switched(vs) for r in rule["route"]],
            r"weights add up to 90",
        ),
        (lambda vs: vs["spec"].update({"tcp": [{"route": []}]}), r"spec.tcp routes"),
        (lambda vs: vs["spec"].update({"http": []}), r"spec.http has no routes"),
    ],
    ids=["third-subset", "sum-90-one-route", "sum-90-all", "tcp-routes", "no-routes"],
)
def test_istio_refuses_what_it_does_not_understand(
    api: FakeKubeApi, client: HttpKubeClient, change: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    api.write(VS_PATH, change)
    before = copy.deepcopy(api.objects[VS_PATH])
    router = IstioRouter(client, NAMESPACE, SERVICE)
    with pytest.raises(RouterError, match=expected):
        router.routing()
    with pytest.raises(RouterError, match=expected):
        router.switch("green")
    assert api.patches() == []
    assert api.objects[VS_PATH] == before


def test_istio_routes_that_disagree_are_reported_and_a_switch_repairs_them(
    api: FakeKubeApi, client: HttpKubeClient
) -> None:
    """Left half-switched by hand or an older tool: routing says so; a switch sets every route."""

    def half(vs: dict[str, Any]) -> None:
        for destination in switched(vs)[0]["route"]:
            destination["weight"] = 100 if destination["destination"]["subset"] == "green" else 0

    api.write(VS_PATH, half)
    router = IstioRouter(client, NAMESPACE, SERVICE)
    with pytest.raises(RouterError, match="routes disagree"):
        router.routing()
    assert router.switch("blue").weights == {"blue": 100, "green": 0}
    assert weights_of(api.objects[VS_PATH]) == [{"blue": 100, "green": 0}] * 2


def test_istio_annotation_alone_is_repaired(api: FakeKubeApi, client: HttpKubeClient) -> None:
    api.write(VS_PATH, lambda vs: vs["metadata"].pop("annotations"))
    IstioRouter(client, NAMESPACE, SERVICE).switch("blue")
    ((_, _, _, ops),) = api.patches()
    assert ops[1:] == [
        {"op": "add", "path": "/metadata/annotations", "value": {ACTIVE_COLOR_ANNOTATION: "blue"}}
    ]
    assert api.objects[VS_PATH]["metadata"]["annotations"] == {ACTIVE_COLOR_ANNOTATION: "blue"}


def test_bad_color_is_bad_input(client: HttpKubeClient, api: FakeKubeApi) -> None:
    with pytest.raises(BadInput, match="accepted: blue, green") as caught:
        IstioRouter(client, NAMESPACE, SERVICE).switch("purple")
    assert caught.value.exit_code == 2
    with pytest.raises(BadInput):
        ServiceSelectorRouter(client, NAMESPACE, SERVICE).switch("red")
    assert api.requests == []


# --- the Service-selector router -------------------------------------------------------------------------


def test_service_selector_of_the_stack_selects_both_colors(api: FakeKubeApi, client: HttpKubeClient) -> None:
    """The stack's stable Service leaves the split to Istio: it does not pin a color."""
    with pytest.raises(RouterError, match=f"has no {COLOR_LABEL}, so it sends to the pods of every color"):
        ServiceSelectorRouter(client, NAMESPACE, SERVICE).routing()


def test_service_selector_router_flips_the_selector(api: FakeKubeApi, client: HttpKubeClient) -> None:
    router = ServiceSelectorRouter(client, NAMESPACE, SERVICE, common.COLOR_LABEL)
    declared = dict(api.objects[SVC_PATH]["spec"]["selector"])
    assert router.switch("blue").weights == {"blue": 100, "green": 0}
    assert api.objects[SVC_PATH]["spec"]["selector"] == {**declared, COLOR_LABEL: "blue"}
    routing = router.switch("green")
    assert routing.weights == {"green": 100, "blue": 0} and routing.active == "green"
    assert api.objects[SVC_PATH]["spec"]["selector"] == {**declared, COLOR_LABEL: "green"}
    assert router.routing().active == "green"
    (_, path, content_type, body) = api.patches()[-1]
    assert (path, content_type) == (SVC_PATH, MERGE)
    assert body["spec"] == {"selector": {COLOR_LABEL: "green"}}
    assert body["metadata"].keys() == {"resourceVersion"}
    api.requests.clear()
    router.switch("green")
    assert [m for m, *_ in api.requests] == ["GET"]  # idempotent: no PATCH


def test_service_selector_concurrent_writer_gets_409_and_retry(
    api: FakeKubeApi, client: HttpKubeClient
) -> None:
    api.write(SVC_PATH, lambda svc: svc["spec"]["selector"].update({COLOR_LABEL: "blue"}))
    seen: list[str] = []

    def meddle(fake: FakeKubeApi, path: str) -> None:
        if not seen:
            seen.append(path)
            fake.write(path, lambda svc: svc["metadata"].setdefault("labels", {}).update({"touched": "yes"}))

    api.before_patch = meddle
    codes: list[int] = []
    original = api.handle

    def recording(request: httpx.Request) -> httpx.Response:
        response = original(request)
        codes.append(response.status_code)
        return response

    client = HttpKubeClient(SERVER, token=TOKEN, transport=httpx.MockTransport(recording))
    assert ServiceSelectorRouter(client, NAMESPACE, SERVICE).switch("green").active == "green"
    assert codes == [200, 409, 200, 200, 200]
    assert api.objects[SVC_PATH]["metadata"]["labels"]["touched"] == "yes"
    assert api.objects[SVC_PATH]["spec"]["selector"][COLOR_LABEL] == "green"


def test_service_selector_forbidden_names_rbac(api: FakeKubeApi, client: HttpKubeClient) -> None:
    api.fail("PATCH", SVC_PATH, 403)
    with pytest.raises(
        RouterError, match=r"forbidden \(403\) to patch services/hitl .*RBAC.*'patch' on services"
    ):
        ServiceSelectorRouter(client, NAMESPACE, SERVICE).switch("green")


def test_service_without_selector_is_refused(api: FakeKubeApi, client: HttpKubeClient) -> None:
    api.write(SVC_PATH, lambda svc: svc["spec"].pop("selector"))
    with pytest.raises(RouterError, match=r"has no spec\.selector"):
        ServiceSelectorRouter(client, NAMESPACE, SERVICE).switch("green")
    assert api.patches() == []


# --- the client itself -----------------------------------------------------------------------------------


def test_create_and_already_exists(api: FakeKubeApi, client: HttpKubeClient) -> None:
    """What on-demand CloudNativePG backups will use."""
    collection = kube.object_path("postgresql.cnpg.io/v1", "backups", "maximus-staging-data")
    backup = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Backup",
        "metadata": {"name": "on-demand-1", "namespace": "maximus-staging-data"},
        "spec": {"cluster": {"name": "maximus-postgres"}, "method": "barmanObjectStore"},
    }
    created = client.create(collection, backup)
    assert created["metadata"]["resourceVersion"]
    assert client.get(f"{collection}/on-demand-1")["spec"] == backup["spec"]
    with pytest.raises(
        kube.KubeConflict, match="backups/on-demand-1 in namespace maximus-staging-data already exists"
    ):
        client.create(collection, backup)
    with pytest.raises(KubeNotFound, match="backups/other"):
        client.get(f"{collection}/other")


def test_paths_and_pointers() -> None:
    assert kube.object_path("v1", "services", "ns", "a") == "/api/v1/namespaces/ns/services/a"
    assert kube.object_path("apps/v1", "deployments", "ns") == "/apis/apps/v1/namespaces/ns/deployments"
    info = kube.parse_path("/apis/apps/v1/namespaces/ns/deployments/hitl-blue/scale")
    assert (info.plural, info.name, info.namespace) == ("deployments/scale", "hitl-blue", "ns")
    assert kube.pointer("metadata", "annotations", "a/b~c") == "/metadata/annotations/a~1b~0c"


def make_ca() -> str:
    """A self-signed CA certificate (PEM), made here: no fixture file, no network."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maximus-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "staging",
        "clusters": [
            {"name": "other", "cluster": {"server": "https://wrong.test"}},
            {"name": "maximus-staging", "cluster": cluster or {"server": "https://10.0.0.1:6443/"}},
        ],
        "users": [{"name": "deployer", "user": user}],
        "contexts": [
            {"name": "staging", "context": {"cluster": "maximus-staging", "user": "deployer"}},
            {"name": "prod", "context": {"cluster": "other", "user": "deployer"}},
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_kubeconfig_builds_the_client(tmp_path: Path) -> None:
    ca = make_ca()
    path = kubeconfig(
        tmp_path,
        {"token": "tok-abc"},
        {
            "server": "https://10.0.0.1:6443/",
            "certificate-authority-data": base64.b64encode(ca.encode()).decode(),
        },
    )
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kind": "Service", "metadata": {"resourceVersion": "7"}})

    client = HttpKubeClient.from_kubeconfig(path, transport=httpx.MockTransport(answer))
    assert client.server == "https://10.0.0.1:6443"
    assert client.headers() == {"Authorization": "Bearer tok-abc"}
    assert client.get(SVC_PATH)["metadata"]["resourceVersion"] == "7"
    (request,) = seen
    assert str(request.url) == f"https://10.0.0.1:6443{SVC_PATH}"
    assert request.headers["authorization"] == "Bearer tok-abc"
    assert request.headers["accept"] == "application/json"
    # The CA from the kubeconfig, and only it, is trusted.
    assert not isinstance(client.verify, bool)
    assert [c["subject"] for c in client.verify.get_ca_certs()] == [((("commonName", "maximus-test-ca"),),)]
    other = HttpKubeClient.from_kubeconfig(path, "prod")
    assert other.server == "https://wrong.test"


def test_kubeconfig_file_references_and_token_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(make_ca())
    (tmp_path / "token").write_text("first\n")
    path = kubeconfig(
        tmp_path, {"tokenFile": "token"}, {"server": "https://k.test", "certificate-authority": "ca.pem"}
    )
    client = HttpKubeClient.from_kubeconfig(path)
    assert client.headers() == {"Authorization": "Bearer first"}
    (tmp_path / "token").write_text("rotated\n")  # re-read on each request
    assert client.headers() == {"Authorization": "Bearer rotated"}


def test_kubeconfig_exec_plugin_runs_and_its_token_is_reused_until_it_expires(tmp_path: Path) -> None:
    """A real plugin process, as `aws eks get-token` is: it prints an ExecCredential; kubeconfig `env` and
    KUBERNETES_EXEC_INFO reach it."""
    calls = tmp_path / "calls"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        "calls = open(sys.argv[1], 'a'); calls.write('x'); calls.close()\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['spec']['interactive'] is False\n"
        "expiry = sys.argv[2]\n"
        "status = {'token': 'tok-' + os.environ['CLUSTER_NAME']}\n"
        "if expiry != 'never': status['expirationTimestamp'] = expiry\n"
        "print(json.dumps({'kind': 'ExecCredential', 'apiVersion': info['apiVersion'], 'status': status}))\n"
    )

    def user(expiry: str) -> dict[str, Any]:
        return {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": [str(plugin), str(calls), expiry],
                "env": [{"name": "CLUSTER_NAME", "value": "staging"}],
            }
        }

    client = HttpKubeClient.from_kubeconfig(kubeconfig(tmp_path, user("never")))
    assert client.headers() == {"Authorization": "Bearer tok-staging"}
    assert client.headers() == {"Authorization": "Bearer tok-staging"}
    assert calls.read_text() == "x"  # run once, the token reused
    expired = HttpKubeClient.from_kubeconfig(kubeconfig(tmp_path, user("2020-01-01T00:00:00Z")))
    expired.headers()
    expired.headers()
    assert calls.read_text() == "xxx"  # an expired token is asked for again


def test_kubeconfig_exec_plugin_failure_names_the_plugin(tmp_path: Path) -> None:
    failing = {
        "exec": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('token expired, log in')"]}
    }
    client = HttpKubeClient.from_kubeconfig(kubeconfig(tmp_path, failing))
    with pytest.raises(KubeAuthError, match=r"exec plugin .*python.* failed \(token expired, log in\)"):
        client.headers()


@pytest.mark.parametrize(
    ("user", "cluster", "expected"),
    [
        ({"exec": {"args": ["eks"]}}, None, "exec plugin has no command"),
        ({"auth-provider": {"name": "gcp"}}, None, "auth-provider, which is not supported"),
        ({}, None, "has no token, tokenFile or exec plugin"),
        (
            {"token": "t"},
            {"server": "https://k", "insecure-skip-tls-verify": True},
            "insecure-skip-tls-verify",
        ),
        ({"token": "t"}, {"server": "https://k", "certificate-authority-data": "%%%"}, "not base64 PEM"),
        (
            {"token": "t"},
            {"server": "https://k", "certificate-authority-data": "bm90IGEgY2VydA=="},
            "not a PEM",
        ),
        ({"token": "t"}, {"server": "https://k", "certificate-authority": "missing.pem"}, "no such file"),
        ({"token": "t"}, {"server": "k.example:443"}, "accepted: an https:// URL"),
    ],
)
def test_kubeconfig_refusals(
    tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None, expected: str
) -> None:
    with pytest.raises(KubeConfigError, match=expected) as caught:
        HttpKubeClient.from_kubeconfig(kubeconfig(tmp_path, user, cluster))
    assert caught.value.exit_code == 2
    assert "\n" not in str(caught.value)


def test_kubeconfig_unknown_context_and_missing_file(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, {"token": "t"})
    with pytest.raises(KubeConfigError, match="no context named 'nope'"):
        HttpKubeClient.from_kubeconfig(path, "nope")
    with pytest.raises(KubeConfigError, match="cannot read it"):
        HttpKubeClient.from_kubeconfig(tmp_path / "absent")


def test_in_cluster(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text(make_ca())
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    client = HttpKubeClient.in_cluster(directory=tmp_path, environ=env)
    assert client.server == "https://[fd00::1]:443"
    assert client.headers() == {"Authorization": "Bearer sa-token"}
    with pytest.raises(KubeConfigError, match="not running in a pod"):
        HttpKubeClient.in_cluster(directory=tmp_path, environ={})
    with pytest.raises(KubeConfigError, match="token is missing"):
        HttpKubeClient.in_cluster(directory=tmp_path / "nothing", environ=env)


def test_read_back_failure_says_the_switch_was_applied(api: FakeKubeApi, client: HttpKubeClient) -> None:
    api.before_patch = lambda fake, path: fake.fail("GET", path, 403)
    with pytest.raises(RouterError, match="switched to green but cannot read it back: forbidden"):
        IstioRouter(client, NAMESPACE, SERVICE).switch("green")
    assert weights_of(api.objects[VS_PATH])[1] == {"blue": 0, "green": 100}
