"""Deploy and rollback records reach Grafana as annotations: once each, only those, shown by the Deployments
dashboard; an unreachable Grafana or a rejected token is an error that says what to do. Grafana cannot run
here: a fake Grafana answers at the HTTP boundary (httpx.MockTransport); the audit log is the real one."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra import dashboards
from opskit import audit, grafana
from opskit.errors import BadInput
from opskit.model import Environment
from tests.conftest import new_environment

TOKEN = "glsa_test-token"
URL = "http://grafana.test"
ANNOTATED = {"deploy.started", "deploy.done", "deploy.held", "deploy.aborted", "rollback"}


class FakeGrafana:
    """Grafana's annotations API as far as the tooling uses it: bearer auth, POST stores, GET filters by
    tags (all of them must match), time range and limit, newest first."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.annotations: list[dict[str, Any]] = []
        self.fail_post: Callable[[dict[str, Any]], bool] = lambda body: False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"message": "invalid API key"})
        if request.url.path != "/api/annotations":
            return httpx.Response(404, json={"message": "not found"})
        if request.method == "POST":
            body = json.loads(request.content)
            assert set(body) == {"time", "timeEnd", "tags", "text"}
            if self.fail_post(body):
                return httpx.Response(500, json={"message": "database is locked"})
            stored = {**body, "id": len(self.annotations) + 1}
            self.annotations.append(stored)
            return httpx.Response(200, json={"id": stored["id"], "message": "Annotation added"})
        params = request.url.params
        tags = set(params.get_list("tags"))
        low, high = int(params.get("from", 0)), int(params.get("to", 2**62))
        found = [a for a in self.annotations if tags <= set(a["tags"]) and low <= a["time"] <= high]
        found.sort(key=lambda a: a["time"], reverse=True)
        return httpx.Response(200, json=found[: int(params.get("limit", 100))])

    def ops(self) -> list[str]:
        return sorted(t for a in self.annotations for t in a["tags"] if t.startswith("op:"))


@pytest.fixture
def env(environments_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Environment:
    monkeypatch.delenv("MAXIMUS_AUDIT_STORE", raising=False)
    environment = new_environment(environments_dir)
    log = audit.for_environment(environment)
    name = environment.name
    log.write(name, "deploy.started", deploy="d-1", version="1.2.0", ticket="CHG-1", migration="compatible")
    log.write(name, "deploy.step", deploy="d-1", step="preflight", version="1.2.0", color="green", detail="")
    log.write(name, "deploy.step", deploy="d-1", step="switch", version="1.2.0", color="green", detail="")
    log.write(name, "deploy.step", deploy="d-1", step="done", version="1.2.0", color="green", detail="")
    log.write(name, "db.backup", result="ok", backup="b-1")
    log.write(name, "deploy.started", deploy="d-2", version="1.3.0", ticket="CHG-2", migration="compatible")
    log.write(name, "deploy.held", deploy="d-2", reason="Prometheus unreachable")
    log.write(name, "deploy.resumed", deploy="d-2", step="analysis-post")
    log.write(name, "deploy.aborted", deploy="d-2", reason="aborted by request")
    log.write(name, "rollback.start", automatic=False, reason="p95 doubled", to="blue", version="1.1.0")
    log.write(
        name, "rollback", automatic=False, reason="p95 doubled", to="blue", version="1.1.0", path="switch"
    )
    return environment


def client(fake: FakeGrafana, token: str = TOKEN) -> grafana.GrafanaAnnotations:
    return grafana.GrafanaAnnotations(URL, token, transport=httpx.MockTransport(fake))


def records(env: Environment) -> list[dict[str, Any]]:
    return list(audit.for_environment(env).records())


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_sync_posts_each_deploy_and_rollback_record_once(env: Environment) -> None:
    fake = FakeGrafana()
    first = grafana.sync(env, client(fake), records(env))
    assert (first.posted, first.skipped, first.failed, first.ok) == (6, 0, 0, True)
    assert fake.ops() == sorted(
        [
            *["op:deploy.started", "op:deploy.done"],
            *["op:deploy.started", "op:deploy.held", "op:deploy.aborted"],
            "op:rollback",
        ]
    )
    second = grafana.sync(env, client(fake), records(env))
    assert (second.posted, second.skipped, second.failed, second.ok) == (0, 6, 0, True)
    assert len(fake.annotations) == 6


def test_an_annotation_says_what_happened_when_and_carries_its_audit_record(env: Environment) -> None:
    fake = FakeGrafana()
    grafana.sync(env, client(fake), records(env))
    (rollback_record,) = [r for r in records(env) if r["operation"] == "rollback"]
    (rollback,) = [a for a in fake.annotations if "op:rollback" in a["tags"]]
    assert "1.1.0" in rollback["text"] and "p95 doubled" in rollback["text"] and "switch" in rollback["text"]
    assert set(rollback["tags"]) >= {
        grafana.ROLLBACK_TAG,
        f"env:{env.name}",
        f"audit:{rollback_record['hash'][:16]}",
        "version:1.1.0",
    }
    assert rollback["time"] == rollback["timeEnd"]
    assert abs(rollback["time"] / 1000 - _epoch(rollback_record["at"])) < 0.002
    (held,) = [a for a in fake.annotations if "op:deploy.held" in a["tags"]]
    assert "d-2" in held["text"] and "Prometheus unreachable" in held["text"]
    assert grafana.DEPLOY_TAG in held["tags"]


def _epoch(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


def test_records_of_other_operations_and_other_steps_are_not_annotated(env: Environment) -> None:
    for record in records(env):
        annotation = grafana.annotation_for(record)
        kind = "deploy.done" if record.get("step") == "done" else record["operation"]
        assert (annotation is not None) == (kind in ANNOTATED), record["operation"]
    unchained = {"operation": "rollback", "environment": env.name, "at": "2026-11-30T07:00:00+00:00"}
    assert grafana.annotation_for(unchained) is None


def test_a_record_of_another_environment_is_left_out(env: Environment) -> None:
    fake = FakeGrafana()
    foreign = {**records(env)[-1], "environment": "production", "hash": "f" * 64}
    report = grafana.sync(env, client(fake), [*records(env), foreign])
    assert report.posted == 6
    assert all(f"env:{env.name}" in a["tags"] for a in fake.annotations)


def test_the_deployments_dashboard_shows_what_sync_posts(env: Environment) -> None:
    fake = FakeGrafana()
    grafana.sync(env, client(fake), records(env))
    board = json.loads(dashboards.deployments(env.service.name, env.name))
    queries = {
        a["name"]: set(a["target"]["tags"])
        for a in board["annotations"]["list"]
        if a.get("datasource", {}).get("uid") == "grafana" and a.get("target", {}).get("type") == "tags"
    }
    assert set(queries) >= {"deploys", "rollbacks"}
    for annotation in fake.annotations:
        shown_by = {name for name, tags in queries.items() if tags <= set(annotation["tags"])}
        expected = "rollbacks" if "op:rollback" in annotation["tags"] else "deploys"
        assert shown_by == {expected}, annotation["tags"]
    other = json.loads(dashboards.deployments(env.service.name, "elsewhere"))
    assert all(
        f"env:{env.name}" not in a.get("target", {}).get("tags", []) for a in other["annotations"]["list"]
    )


def test_grafana_unreachable_is_an_error_saying_what_to_do(
    env: Environment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(grafana.URL_VAR, closed_port_url())
    monkeypatch.setenv(grafana.TOKEN_VAR, TOKEN)
    with pytest.raises(grafana.GrafanaUnreachable) as caught:
        grafana.annotate_command(env.name, json_output=True)
    message = str(caught.value)
    assert (
        "did not answer" in message and grafana.URL_VAR in message and "run the same command again" in message
    )
    assert caught.value.exit_code == 1
    assert capsys.readouterr().out == ""


def test_grafana_going_away_midway_counts_the_rest_as_failed_and_a_rerun_completes(env: Environment) -> None:
    fake = FakeGrafana()
    calls = {"posts": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            calls["posts"] += 1
            if calls["posts"] > 2:
                raise httpx.ConnectError("connection refused", request=request)
        return fake(request)

    report = grafana.sync(
        env, grafana.GrafanaAnnotations(URL, TOKEN, transport=httpx.MockTransport(flaky)), records(env)
    )
    assert (report.posted, report.failed, report.ok) == (2, 4, False)
    assert grafana.URL_VAR in report.errors[0]
    again = grafana.sync(env, client(fake), records(env))
    assert (again.posted, again.skipped, again.ok) == (4, 2, True)
    assert len(fake.annotations) == 6


def test_a_rejected_post_is_reported_and_the_command_exits_1(
    env: Environment, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeGrafana()
    fake.fail_post = lambda body: "op:deploy.held" in body["tags"]
    code = grafana.annotate_command(env.name, json_output=True, annotations=client(fake))
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (report["posted"], report["failed"], report["ok"]) == (5, 1, False)
    assert "500" in report["errors"][0] and "database is locked" in report["errors"][0]
    fake.fail_post = lambda body: False
    assert grafana.annotate_command(env.name, json_output=True, annotations=client(fake)) == 0
    assert json.loads(capsys.readouterr().out)["posted"] == 1


def test_a_rejected_token_names_the_token_variable(env: Environment) -> None:
    with pytest.raises(grafana.GrafanaAuthError, match=rf"rejected the token \(401\).*{grafana.TOKEN_VAR}"):
        grafana.annotate_command(env.name, json_output=False, annotations=client(FakeGrafana(), "expired"))


def test_the_command_prints_a_table_for_people(env: Environment, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeGrafana()
    assert grafana.annotate_command(env.name, json_output=False, annotations=client(fake)) == 0
    out = capsys.readouterr().out
    assert f"Grafana has every deploy and rollback of {env.name}" in out
    assert grafana.annotate_command(env.name, json_output=False, annotations=client(fake)) == 0
    assert len(fake.annotations) == 6


def test_missing_configuration_is_bad_input_naming_the_variable() -> None:
    with pytest.raises(BadInput, match=grafana.URL_VAR):
        grafana.GrafanaAnnotations.from_environ({grafana.TOKEN_VAR: TOKEN})
    with pytest.raises(BadInput, match=grafana.TOKEN_VAR):
        grafana.GrafanaAnnotations.from_environ({grafana.URL_VAR: URL})
    with pytest.raises(BadInput, match=grafana.URL_VAR):
        grafana.GrafanaAnnotations.from_environ({grafana.URL_VAR: "grafana:3000", grafana.TOKEN_VAR: TOKEN})


def test_a_tampered_audit_log_is_not_annotated(env: Environment) -> None:
    store = Path(env.state_path) / "audit" / "audit.jsonl"
    lines = store.read_text().splitlines()
    lines[0] = lines[0].replace("1.2.0", "9.9.9")
    store.write_text("\n".join(lines) + "\n")
    fake = FakeGrafana()
    with pytest.raises(Exception, match="record 1 is bad"):
        grafana.annotate_command(env.name, json_output=True, annotations=client(fake))
    assert fake.annotations == []
