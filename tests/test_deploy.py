"""Blue-green deploys and rollbacks on a real single-machine environment (HAProxy, workloads, Prometheus).

One environment for the module, on its own ports, started once; every test leaves it consistent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from opskit import audit, deploy, envstate, localenv, lock
from opskit.model import Environment
from opskit.traffic import SteadyLoad
from tests.conftest import new_environment
from tests.deploy_support import (
    FAST_DEPLOY,
    RELEASES,
    LoadProcess,
    active_version,
    alert_names,
    alerts_received,
    assert_consistent,
    edge_answer,
    edge_url,
    invoke,
    next_release,
    probing,
    running_workloads,
    start_invoke,
    wait_until,
)

pytestmark = pytest.mark.localenv


@pytest.fixture(scope="module")
def env(environments_dir: Path) -> Iterator[Environment]:
    environment = new_environment(environments_dir, deploy=FAST_DEPLOY)
    localenv.up(environment)
    yield environment
    localenv.down(environment, purge=True)


def snapshot(env: Environment) -> dict[str, object]:
    """Everything a refused command must leave as it was."""

    def read(path: Path) -> bytes | None:
        return path.read_bytes() if path.exists() else None

    return {
        "state": read(envstate.state_path(env)),
        "audit": read(env.state_path / "audit" / "audit.jsonl"),
        "spool": read(env.state_path / "audit" / "spool.jsonl"),
        "lock": read(lock.lock_path(env)),
        "routing": localenv.router(env).routing().active,
        "edge": edge_answer(env),
        "programs": sorted(localenv.process_status(env)),
    }


# --- bad input --------------------------------------------------------------------------------------------

BAD_INPUT = {
    "unknown environment": (
        ["--env", "no-such-env", "--version", "1.1.0"],
        "unknown environment 'no-such-env'",
    ),
    "unknown version": (["--version", "9.9.9"], "9.9.9 is not a release of hitl"),
    "version pattern": (["--version", "v1"], "'v1' does not match the version pattern"),
    "unknown inject key": (["--version", "1.1.0", "--inject", "colour=red"], "unknown key 'colour'"),
    "inject out of range": (["--version", "1.1.0", "--inject", "error-rate=2"], "--inject: error-rate="),
    "inject not a number": (["--version", "1.1.0", "--inject", "latency-ms=slow"], "--inject: latency-ms="),
    # --inject is for single-machine environments; production's policy requires a change ticket.
    "inject on staging": (
        ["--env", "staging", "--version", "1.1.0", "--inject", "crash"],
        "--inject: fault injection is accepted on local environments only, not on staging",
    ),
    "production without ticket": (
        ["--env", "production", "--version", "1.1.0"],
        "--ticket: required for a change to production",
    ),
    "no version": ([], "--version: required"),
    "resume with nothing interrupted": (["--resume"], "no deploy of"),
    "resume and abort": (["--resume", "--abort"], "choose one"),
}


def test_bad_input_exits_2_and_changes_nothing(env: Environment) -> None:
    before = snapshot(env)
    running = {}
    for case, (args, _) in BAD_INPUT.items():
        full = args if "--env" in args else ["--env", env.name, *args]
        running[case] = start_invoke("deploy", *full)
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=60)
        expected = BAD_INPUT[case][1]
        assert process.returncode == 2, (case, stdout, stderr)
        assert expected in stderr, (case, stderr)
        assert len(stderr.strip().splitlines()) == 1, (case, stderr)  # one line naming the field
    assert snapshot(env) == before


# --- ten cutovers, ten rollbacks, under load ------------------------------------------------------------


def test_cutovers_and_rollbacks_under_load_lose_no_request(env: Environment) -> None:
    """3 full deploys and 17 rollbacks (each one a switch) at 200 requests/s: not one request fails.

    A prober sends one request at a time (fresh connection each) next to the load: every request it
    started after a switch returned was answered by the color and version that switch chose.
    """
    switches: list[tuple[float, float, str, str]] = []  # (called, returned, color, version)
    kinds: list[str] = []
    with LoadProcess(edge_url(env), rps=200) as load, probing(env, interval_s=0.02) as prober:
        for version, rollbacks in zip(RELEASES, (6, 6, 5), strict=True):
            called = time.monotonic()
            report = deploy.deploy(env, version)
            assert report.outcome == "done", report.reason
            assert [s["step"] for s in report.steps][-3:] == ["switch", "analysis-post", "done"]
            switches.append((called, time.monotonic(), report.to_color, version))
            kinds.append("deploy")
            time.sleep(0.3)
            for _ in range(rollbacks):
                called = time.monotonic()
                back = deploy.rollback(env, reason="test: cutover under load")
                assert back.path == "switch" and back.verified, back.as_dict()
                switches.append((called, time.monotonic(), back.to_color, back.version))
                kinds.append("rollback")
                time.sleep(0.5)
        ended = time.monotonic()
    assert kinds.count("rollback") >= 10 and len(switches) >= 20
    assert load.report["failed"] == 0, load.report
    # Offered: 200/s. The generator shares two cores with three deploys (Ansible, pg, Prometheus) and
    # with whatever else runs; below this floor the machine, not the edge, is what is measured.
    assert load.report["requests_per_second"] >= 120, load.report
    assert set(load.report["versions"]) >= {"1.0.0", *RELEASES}, load.report
    assert all(p.ok for p in prober.probes)
    observed = 0
    for number, (_, returned, color, version) in enumerate(switches):
        until = switches[number + 1][0] if number + 1 < len(switches) else ended
        after = prober.between(returned, until)
        observed += bool(after)
        seen = {(p.color, p.version) for p in after} or {(color, version)}
        assert seen == {(color, version)}, f"switch {number} ({kinds[number]}) to {color} {version}: {seen}"
    # a starved machine may leave a 0.5 s window without a complete probe; most must have some
    assert observed >= 0.8 * len(switches), (observed, len(switches))
    state = assert_consistent(env)
    assert state.colors[state.active]["version"] == switches[-1][3]


# --- bad releases -----------------------------------------------------------------------------------------


def test_release_with_errors_never_keeps_traffic(env: Environment) -> None:
    """error-rate=0.3: the smoke of the idle color catches it (aborted, traffic never moved) or, if the
    smoke got lucky, post-promotion analysis rolls it back; the edge serves the previous release after."""
    before = assert_consistent(env)
    previous = before.colors[before.active]["version"]
    version = next_release(env)
    with SteadyLoad(edge_url(env), rps=200) as load:
        report = deploy.deploy(env, version, inject="error-rate=0.3")
    steps = [s["step"] for s in report.steps]
    assert report.outcome in ("aborted", "rolled-back"), report.as_dict()
    if report.outcome == "aborted":
        assert "switch" not in steps
        assert "smoke_error_ratio" in report.reason
        assert set(load.report.colors) == {before.active}, load.report.as_dict()
        assert load.report.failed == 0
    else:
        assert "switch" in steps and "post-promotion" in report.reason
    state = assert_consistent(env)
    assert state.active == before.active and active_version(env) == previous
    assert edge_answer(env) == (previous, before.active)


def test_release_that_crashes_is_aborted_before_any_switch(env: Environment) -> None:
    """(A release that never gets ready: the long-running deploy of the lock test below is one.)"""
    before = assert_consistent(env)
    with SteadyLoad(edge_url(env), rps=50) as load:
        report = deploy.deploy(env, next_release(env), inject="crash")
    assert report.outcome == "aborted", report.as_dict()
    assert "was not ready within" in report.reason
    # "crashed at start" once supervisord gives up on it (FATAL); before that /readyz refuses connections
    assert "crashed at start" in report.reason or "ConnectError" in report.reason, report.reason
    assert "switch" not in [s["step"] for s in report.steps]
    assert load.report.failed == 0 and set(load.report.colors) == {before.active}
    state = assert_consistent(env)
    assert state.active == before.active and report.to_color not in state.colors


# --- the lock ---------------------------------------------------------------------------------------------


def test_second_operation_while_a_deploy_runs_exits_3_naming_the_holder(env: Environment) -> None:
    """The deploy that holds the lock is of a release that never gets ready: aborted before any switch."""
    before = assert_consistent(env)
    first = start_invoke(
        "deploy", "--env", env.name, "--version", next_release(env), "--inject", "never-ready", "--json"
    )
    try:
        assert wait_until(lambda: lock.lock_path(env).exists(), timeout=30)
        second = invoke("deploy", "--env", env.name, "--version", "1.2.0")
        assert second.returncode == 3, second.stderr
        assert f"locked by deploy (pid {first.pid} on {socket.gethostname()}" in second.stderr
        other = invoke("rollback", "--env", env.name)
        assert other.returncode == 3 and f"pid {first.pid}" in other.stderr
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 1, stdout + stderr
    report = json.loads(stdout)
    assert report["outcome"] == "aborted" and "was not ready within" in report["reason"], report
    assert "MAXIMUS_FAULT_NEVER_READY" in report["reason"]
    assert "switch" not in [s["step"] for s in report["steps"]]
    state = assert_consistent(env)
    assert state.active == before.active
    assert not lock.lock_path(env).exists()


def test_stale_lock_is_reported_and_broken_only_when_asked(env: Environment) -> None:
    before = assert_consistent(env)
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = datetime.now(UTC)
    lock.lock_path(env).write_text(
        json.dumps(
            {
                "operation": "deploy",
                "pid": dead.pid,
                "host": socket.gethostname(),
                "since": now.isoformat(timespec="seconds"),
                "since_epoch": now.timestamp(),
            }
        )
    )
    try:
        refused = invoke("rollback", "--env", env.name)
        assert refused.returncode == 3, refused.stderr
        assert "stale lock" in refused.stderr and f"pid {dead.pid}" in refused.stderr
        assert "--break-stale-lock" in refused.stderr
        also = invoke("deploy", "--env", env.name, "--version", "1.2.0")
        assert also.returncode == 3 and "stale lock" in also.stderr
        assert envstate.read_state(env).active == before.active
        broken = invoke("rollback", "--env", env.name, "--break-stale-lock", "--reason", "test: stale lock")
        assert broken.returncode == 0, broken.stdout + broken.stderr
        assert not lock.lock_path(env).exists()
        assert assert_consistent(env).active != before.active
    finally:
        lock.lock_path(env).unlink(missing_ok=True)
    back = invoke("rollback", "--env", env.name)
    assert back.returncode == 0, back.stderr
    assert assert_consistent(env).active == before.active


# --- Prometheus away during post-promotion analysis -------------------------------------------------------


def deploy_until_held(env: Environment, version: str) -> deploy.DeployReport:
    """Deploy `version`; stop Prometheus as soon as post-promotion analysis starts: the deploy holds."""
    result: list[deploy.DeployReport] = []
    runner = threading.Thread(target=lambda: result.append(deploy.deploy(env, version)), daemon=True)
    runner.start()
    assert wait_until(lambda: envstate.read_state(env).deploy.get("step") == "analysis-post", timeout=60)
    localenv.supervisorctl(env, "stop", "prometheus")
    runner.join(timeout=60)
    assert result, "the deploy did not return"
    return result[0]


def prometheus_back(env: Environment) -> None:
    localenv.supervisorctl(env, "start", "prometheus", check=False)
    url = localenv.endpoints(env)["prometheus"] + "/-/ready"

    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(ready, timeout=60, interval=0.5)


def test_prometheus_outage_holds_the_deploy_then_resume_and_abort(env: Environment) -> None:
    before = assert_consistent(env)
    first, second = next_release(env), None
    try:
        with SteadyLoad(edge_url(env), rps=200):  # the traffic the analysis measures
            held = deploy_until_held(env, first)
            assert held.outcome == "held", held.as_dict()
            assert "cannot measure" in held.reason
            assert held.analyses[-1]["outcome"] == "hold"
            assert "done" not in [s["step"] for s in held.steps]
            status = json.loads(invoke("status", "--env", env.name, "--json").stdout)
            assert status["deploy"]["state"] == "held" and status["deploy"]["step"] == "analysis-post"
            # held: traffic stays on the new color, nothing rolled back automatically
            assert edge_answer(env) == (first, held.to_color)
            assert assert_consistent(env).active == held.to_color
            prometheus_back(env)
            time.sleep(5)  # a scrape of the new color since Prometheus came back
            resumed = deploy.deploy(env, None, resume=True)
            assert resumed.outcome == "done", resumed.as_dict()
            assert resumed.analyses[-1]["outcome"] == "pass"
            assert edge_answer(env) == (first, held.to_color)

            second = next_release(env)
            held = deploy_until_held(env, second)
            assert held.outcome == "held", held.as_dict()
            assert edge_answer(env) == (second, held.to_color)
            aborted = deploy.deploy(env, None, abort=True)
            assert aborted.outcome == "aborted"
            assert edge_answer(env) == (first, aborted.from_color)
    finally:
        prometheus_back(env)
    state = assert_consistent(env)
    assert state.active != before.active and active_version(env) == first
    assert state.deploy["state"] == "aborted"
    assert "MaximusDeployHeld" in alert_names(env) or wait_until(
        lambda: "MaximusDeployHeld" in alert_names(env), timeout=15, interval=0.5
    )


# --- a breaking migration -------------------------------------------------------------------------------


def test_breaking_release_takes_a_verified_backup_and_rollback_needs_force(env: Environment) -> None:
    before = assert_consistent(env)
    previous = before.colors[before.active]["version"]
    with SteadyLoad(edge_url(env), rps=200):  # the traffic the analysis measures
        report = deploy.deploy(env, "2.0.0")
    assert report.outcome == "done", report.as_dict()
    steps = [s["step"] for s in report.steps]
    assert steps.index("backup") < steps.index("start-color") < steps.index("switch")
    state = assert_consistent(env)
    backup_id = state.deploy["backup"]
    assert backup_id and state.previous and state.previous["needs_restore"]
    manifest = env.state_path / "backups" / backup_id / "manifest.json"
    assert manifest.is_file(), manifest
    assert json.loads(manifest.read_text())
    before_refusal = snapshot(env)

    refused = invoke("rollback", "--env", env.name)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    # the restore hint: which backup to restore, and --force once it is done
    assert backup_id in refused.stderr and "restore" in refused.stderr and "--force" in refused.stderr
    assert snapshot(env) == before_refusal
    assert edge_answer(env)[0] == "2.0.0"

    forced = invoke("rollback", "--env", env.name, "--force", "--reason", "test: breaking", "--json")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert json.loads(forced.stdout)["version"] == previous
    state = assert_consistent(env)
    assert active_version(env) == previous and state.active == before.active


# --- the audit log --------------------------------------------------------------------------------------


def test_audit_verify_names_the_changed_inserted_or_deleted_record(env: Environment, tmp_path: Path) -> None:
    intact = invoke("audit.verify", "--env", env.name)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    store = env.state_path / "audit" / "audit.jsonl"
    lines = store.read_text().splitlines()
    assert len(lines) > 10
    changed = json.loads(lines[2])
    changed["actor"] = "someone-else"
    tampered = {
        "changed": ([*lines[:2], json.dumps(changed, sort_keys=True, separators=(",", ":")), *lines[3:]], 3),
        "inserted": ([*lines[:3], lines[1], *lines[3:]], 4),
        "deleted": (lines[:4] + lines[5:], 5),
    }
    original = store.read_bytes()
    for case, (content, bad) in tampered.items():
        copy = tmp_path / f"{case}.jsonl"
        copy.write_text("\n".join(content) + "\n")
        result = invoke("audit.verify", "--env", env.name, extra_env={"MAXIMUS_AUDIT_STORE": str(copy)})
        assert result.returncode == 1, (case, result.stdout, result.stderr)
        assert f"record {bad} is bad" in result.stderr, (case, result.stderr)
    assert store.read_bytes() == original
    assert invoke("audit.verify", "--env", env.name).returncode == 0


# --- rollback with the metric source and the audit store away -------------------------------------------


def rollback_alerts(env: Environment, reason: str) -> list[dict[str, object]]:
    return [
        a
        for a in alerts_received(env)
        if a.get("labels", {}).get("alertname") == "MaximusRollback"  # type: ignore[union-attr]
        and reason in str(a.get("annotations", {}).get("description"))  # type: ignore[union-attr]
    ]


def alertmanager_has(env: Environment, reason: str) -> bool:
    answer = httpx.get(
        f"http://127.0.0.1:{env.local_ports.alertmanager}/api/v2/alerts",
        params={"filter": 'alertname="MaximusRollback"'},
        timeout=5.0,
    )
    answer.raise_for_status()
    return any(reason in a.get("annotations", {}).get("description", "") for a in answer.json())


def test_rollback_works_with_prometheus_and_audit_store_unreachable(env: Environment, tmp_path: Path) -> None:
    before = assert_consistent(env)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the audit store's directory should be\n")
    away = {"MAXIMUS_AUDIT_STORE": str(blocker / "audit.jsonl")}
    spool = env.state_path / "audit" / "spool.jsonl"
    store = env.state_path / "audit" / "audit.jsonl"
    records_before = len(store.read_text().splitlines())
    localenv.supervisorctl(env, "stop", "prometheus")
    try:
        first = invoke(
            "rollback", "--env", env.name, "--reason", "drill: stores away", "--json", extra_env=away
        )
        assert first.returncode == 0, first.stdout + first.stderr
        done = json.loads(first.stdout)
        assert done["path"] == "switch" and done["verified"] and done["notified"] == "alertmanager"
        assert edge_answer(env)[1] == done["to"] != before.active
        spooled = [json.loads(line) for line in spool.read_text().splitlines()]
        assert [e["operation"] for e in spooled] == ["rollback"]
        assert spooled[0]["reason"] == "drill: stores away"
        assert len(store.read_text().splitlines()) == records_before
        # Alertmanager has it (it notifies the receiver once per group: earlier rollbacks did already)
        assert alertmanager_has(env, "drill: stores away")

        localenv.supervisorctl(env, "stop", "alertmanager")
        second = invoke(
            "rollback", "--env", env.name, "--reason", "drill: all away", "--json", extra_env=away
        )
        assert second.returncode == 0, second.stdout + second.stderr
        assert json.loads(second.stdout)["notified"] == "webhook"
        assert len(spool.read_text().splitlines()) == 2
    finally:
        localenv.supervisorctl(env, "start", "alertmanager", check=False)
        prometheus_back(env)
    assert rollback_alerts(env, "drill: all away")  # straight to the webhook, at once
    # the store is back: the next sync chains the spooled records in, in order
    log = audit.for_environment(env)
    assert os.environ.get("MAXIMUS_AUDIT_STORE") is None
    assert log.sync() == 2
    assert not spool.exists()
    report = log.verify()
    assert report.ok and report.records == records_before + 2, report.as_dict()
    moved = list(log.records())[-2:]
    assert [r["reason"] for r in moved] == ["drill: stores away", "drill: all away"]
    assert assert_consistent(env).active == before.active


def test_dry_run_changes_nothing(env: Environment) -> None:
    before = snapshot(env)
    result = invoke("deploy", "--env", env.name, "--version", "1.3.0", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "planned"
    assert snapshot(env) == before


def test_previous_color_stops_after_its_rollback_window_and_rollback_then_redeploys(
    env: Environment, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = next_release(env)
    with SteadyLoad(edge_url(env), rps=50):  # post-promotion analysis needs users' requests to judge
        report = deploy.deploy(env, version)
    assert report.outcome == "done", report.as_dict()
    previous = report.from_color
    result = invoke("scale-down", "--env", env.name, "--json")
    assert result.returncode == 0, result.stderr
    assert "still warm" in json.loads(result.stdout)["reason"]
    assert previous in running_workloads(env)
    later = datetime.now(UTC) + timedelta(seconds=env.deploy.rollback_window_s + 1)
    monkeypatch.setattr(deploy, "_now", lambda: later)
    stopped = deploy.scale_down(env)
    assert (stopped.done, stopped.color) == (True, previous), stopped.as_dict()
    assert previous not in running_workloads(env)
    assert_consistent(env)
    back = deploy.rollback(env, reason="after the window")
    assert (back.path, back.to_color, back.verified) == ("redeploy", previous, True), back.as_dict()
    assert assert_consistent(env).active == previous
