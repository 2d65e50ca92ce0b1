"""A deploy killed at each of its steps (SIGKILL right after the step is persisted) is never half-switched,
and both `--resume` and `--abort` end consistent: state.json, HAProxy and the edge agree, no color runs
that the state does not list, and the audit chain is intact.

The analysis itself is tested in test_deploy.py; here a one-round window that lets no-data pass keeps
every resume short without traffic.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from opskit import deploy, localenv, lock
from opskit.model import Environment
from tests.conftest import new_environment
from tests.deploy_support import (
    FAST_DEPLOY,
    assert_consistent,
    edge_answer,
    invoke,
    next_release,
    running_workloads,
)

pytestmark = pytest.mark.localenv

QUICK = {
    **FAST_DEPLOY,
    "analysis": {"interval_s": 2, "window_s": 2, "max_failures": 1, "no_data_after_promotion": "pass"},
}
# backup only runs for a breaking release: it is tested with 2.0.0, last (the env then needs --force back)
CASES = [(step, None) for step in deploy.STEPS if step != "backup"] + [("backup", "2.0.0")]


@pytest.fixture(scope="module")
def env(environments_dir: Path) -> Iterator[Environment]:
    environment = new_environment(environments_dir, deploy=QUICK)
    localenv.up(environment)
    yield environment
    localenv.down(environment, purge=True)


def killed_deploy(env: Environment, version: str, step: str) -> dict[str, object]:
    """`invoke deploy` killed right after persisting `step`; what `invoke status --json` says then."""
    run = invoke("deploy", "--env", env.name, "--version", version, extra_env={deploy.STOP_AFTER_VAR: step})
    assert run.returncode == -9, run.stdout + run.stderr  # SIGKILL: no cleanup ran
    status = invoke("status", "--env", env.name, "--json")
    assert status.returncode == 0, status.stderr
    shown: dict[str, object] = json.loads(status.stdout)["deploy"]
    assert shown["step"] == step and shown["version"] == version, shown
    assert shown["state"] == ("done" if step == "done" else "in-progress"), shown
    # killed between two steps: never half-switched
    assert_consistent(env)
    # the dead deploy's lock is left behind, reported as stale, broken only when asked
    assert lock.lock_path(env).exists()
    return shown


@pytest.mark.parametrize(("step", "version"), CASES, ids=[step for step, _ in CASES])
def test_deploy_killed_at_step_resumes_or_aborts_consistently(
    env: Environment, step: str, version: str | None
) -> None:
    # --abort: back where it started, the new color stopped
    before = assert_consistent(env)
    previous = before.colors[before.active]["version"]
    target = version or next_release(env)
    killed_deploy(env, target, step)
    if step == "done":
        # the deploy had finished: nothing is interrupted, nothing to resume or abort
        assert edge_answer(env)[0] == target
        for action in ("--resume", "--abort"):
            again = invoke("deploy", "--env", env.name, action, "--break-stale-lock")
            assert again.returncode == 2 and "no deploy of" in again.stderr, again.stderr
        state = assert_consistent(env)
        assert state.active != before.active and not lock.lock_path(env).exists()
        return
    refused = invoke("deploy", "--env", env.name, "--abort")
    assert refused.returncode == 3 and "stale lock" in refused.stderr, refused.stderr
    aborted = invoke("deploy", "--env", env.name, "--abort", "--break-stale-lock", "--json")
    assert aborted.returncode == 1, aborted.stdout + aborted.stderr  # not done: the system left safe
    assert json.loads(aborted.stdout)["outcome"] == "aborted"
    state = assert_consistent(env)
    assert state.active == before.active and edge_answer(env)[0] == previous
    assert set(state.colors) == {before.active} and running_workloads(env) == {before.active}
    assert state.deploy["state"] == "aborted"
    assert not lock.lock_path(env).exists()

    # --resume: the persisted step runs again, the deploy completes
    killed_deploy(env, target, step)
    resumed = invoke("deploy", "--env", env.name, "--resume", "--break-stale-lock", "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["outcome"] == "done", report
    state = assert_consistent(env)
    assert state.active != before.active and edge_answer(env) == (target, state.active)
    assert state.deploy["state"] == "done"
    assert state.previous and state.previous["version"] == previous
    if step == "backup":
        assert state.deploy["backup"], state.deploy
        assert (env.state_path / "backups" / state.deploy["backup"] / "manifest.json").is_file()
    assert not lock.lock_path(env).exists()
