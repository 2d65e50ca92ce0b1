"""The audit log's hash chain and spool, and the environment lock, without a running environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opskit import audit, lock
from opskit.errors import LockHeld
from opskit.model import Environment
from tests.conftest import new_environment


@pytest.fixture
def env(environments_dir: Path) -> Environment:
    return new_environment(environments_dir)


def written(env: Environment, count: int) -> audit.AuditLog:
    log = audit.for_environment(env)
    for number in range(count):
        log.write(env.name, "test.op", number=number)
    return log


def store_lines(env: Environment) -> list[str]:
    return (env.state_path / "audit" / "audit.jsonl").read_text().splitlines()


def rewrite(env: Environment, lines: list[str]) -> None:
    (env.state_path / "audit" / "audit.jsonl").write_text("".join(line + "\n" for line in lines))


def test_an_untouched_chain_verifies(env: Environment) -> None:
    report = written(env, 4).verify()
    assert report.ok and report.records == 4


def test_a_changed_record_is_found(env: Environment) -> None:
    log = written(env, 4)
    lines = store_lines(env)
    record = json.loads(lines[2])
    record["number"] = 99
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    rewrite(env, lines)
    report = log.verify()
    assert (report.first_bad, report.reason) == (3, "hash does not match the record's content (changed)")


def test_a_deleted_record_is_found(env: Environment) -> None:
    log = written(env, 4)
    rewrite(env, [line for i, line in enumerate(store_lines(env)) if i != 1])
    report = log.verify()
    assert report.first_bad == 2 and "inserted or deleted" in (report.reason or "")


def test_an_inserted_record_is_found_even_with_a_recomputed_hash(env: Environment) -> None:
    log = written(env, 3)
    lines = store_lines(env)
    forged = {**json.loads(lines[0]), "operation": "forged"}
    forged["hash"] = audit.record_hash(forged)
    rewrite(env, [lines[0], json.dumps(forged), *lines[1:]])
    assert log.verify().first_bad == 2


def test_records_spool_while_the_store_is_away_and_chain_in_later(env: Environment, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    away = audit.AuditLog(audit.FileSink(blocker / "audit.jsonl"), env.state_path / "audit" / "spool.jsonl")
    away.write(env.name, "rollback", reason="store unreachable")
    assert (env.state_path / "audit" / "spool.jsonl").exists()
    back = audit.for_environment(env)
    back.write(env.name, "later")
    records = list(back.records())
    assert [r["operation"] for r in records] == ["rollback", "later"]
    assert back.verify().ok
    assert not (env.state_path / "audit" / "spool.jsonl").exists()


def test_a_second_holder_gets_exit_3_naming_the_first(env: Environment) -> None:
    held = pytest.raises(LockHeld, match=r"locked by deploy \(pid \d+")
    with lock.hold(env, "deploy"), held as caught, lock.hold(env, "rollback"):
        pass
    assert caught.value.exit_code == 3
    assert not lock.lock_path(env).exists()


def test_a_stale_lock_is_reported_and_broken_only_when_asked(env: Environment) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    with lock.hold(env, "deploy"):
        info = json.loads(lock.lock_path(env).read_text())
    info["pid"] = int(dead.stdout)
    lock.lock_path(env).write_text(json.dumps(info))
    with pytest.raises(LockHeld, match="no longer running: a stale lock"), lock.hold(env, "deploy"):
        pass
    assert lock.lock_path(env).exists()
    with lock.hold(env, "deploy", break_stale=True) as mine:
        assert mine["pid"] == os.getpid()
