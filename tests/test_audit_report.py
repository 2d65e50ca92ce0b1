"""`invoke audit.report`: auditor evidence and DORA metrics rebuilt from a verified audit log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opskit import audit, audit_report
from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment
from tests.conftest import new_environment

ROOT = Path(__file__).resolve().parent.parent
INVOKE = str(Path(sys.executable).parent / "invoke")
MONDAY = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
NOW = MONDAY + timedelta(days=14)
STEPS = ("preflight", "start-color", "wait-ready", "analysis-pre", "switch", "analysis-post", "done")


def write_log(path: Path, events: list[dict[str, Any]]) -> None:
    """Chain events into an audit store exactly as opskit.audit does, with the times the test chooses."""
    prev, lines = audit.GENESIS, []
    for seq, event in enumerate(events, start=1):
        record = {"seq": seq, "environment": "production", "actor": "sam@ci", **event, "prev": prev}
        record["hash"] = prev = audit.record_hash(record)
        lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def at(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def started(deploy: str, moment: datetime, **fields: Any) -> dict[str, Any]:
    terms = {
        "ticket": "CHG-1",
        "change_type": "normal",
        "risk": "medium",
        "approvers": ["dana"],
        "migration": "compatible",
        "commit": "abc123",
        "commit_time": None,
        "review_due": None,
        "policy": "governed",
    }
    terms.update(fields)
    return {"at": at(moment), "operation": "deploy.started", "deploy": deploy, "version": "1.2.0", **terms}


def steps(deploy: str, moment: datetime, names: tuple[str, ...] = STEPS) -> list[dict[str, Any]]:
    return [
        {"at": at(moment + timedelta(minutes=i)), "operation": "deploy.step", "deploy": deploy, "step": s}
        for i, s in enumerate(names)
    ]


def history() -> list[dict[str, Any]]:
    d1, d2, d3, d4, d5 = (MONDAY + timedelta(days=i) for i in range(5))
    d5 = d5 + timedelta(days=7)  # a Friday, the week after: outside the window, but not governed then
    return [
        # d1: done; the commit was made a day before the deploy finished
        started("d1", d1, commit_time=at(d1 - timedelta(days=1))),
        *steps("d1", d1),
        # d2: switched, then rolled back automatically by the post-switch analysis two minutes later
        started("d2", d2, change_type="standard", risk="low", approvers=[], migration="none"),
        *steps("d2", d2, STEPS[:6]),
        {
            "at": at(d2 + timedelta(minutes=6)),
            "operation": "rollback",
            "deploy": "d2",
            "automatic": True,
            "reason": "error ratio 0.3",
            "to": "blue",
            "version": "1.1.0",
        },
        # d3: aborted before its switch: never reached users, no failed change
        started("d3", d3),
        *steps("d3", d3, STEPS[:4]),
        {
            "at": at(d3 + timedelta(minutes=4)),
            "operation": "deploy.aborted",
            "deploy": "d3",
            "reason": "smoke",
        },
        # d4: done, then rolled back by hand 25 minutes after its switch
        started("d4", d4, commit_time=at(d4 - timedelta(hours=2))),
        *steps("d4", d4),
        {
            "at": at(d4 + timedelta(minutes=29)),
            "operation": "rollback",
            "automatic": False,
            "reason": "INC-7 p95 doubled",
            "to": "green",
            "version": "1.2.0",
            "path": "switch",
            "seconds": 0.004,
        },
        # d5: recorded before the policy check existed: an exception; emergency-like fields absent
        {"at": at(d5), "operation": "deploy.started", "deploy": "d5", "version": "1.3.0", "ticket": None},
        *steps("d5", d5),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"


def report_of(store: Path, since: date | None = None, env: str = "production") -> audit_report.AuditReport:
    log = audit.AuditLog(audit.FileSink(store), store.parent / "spool.jsonl")
    return audit_report.report_from_log(log, env, since, now=NOW)


def test_every_change_is_rebuilt_with_its_evidence(store: Path) -> None:
    write_log(store, history())
    report = report_of(store)
    changes = {c.deploy: c.as_dict() for c in report.changes}
    assert [c.deploy for c in report.changes] == ["d1", "d2", "d3", "d4", "d5"]
    assert {k: v["result"] for k, v in changes.items()} == {
        "d1": "done",
        "d2": "rolled-back",
        "d3": "aborted",
        "d4": "rolled-back",
        "d5": "done",
    }
    assert changes["d1"]["checks_passed"] == [
        "policy",
        "preflight",
        "wait-ready",
        "analysis-pre",
        "analysis-post",
    ]
    assert changes["d3"]["checks_passed"] == ["policy", "preflight", "wait-ready"]
    assert changes["d1"]["ticket"] == "CHG-1" and changes["d1"]["approvers"] == ["dana"]
    assert changes["d4"]["reason"] == "INC-7 p95 doubled"  # the manual rollback is charged to d4
    assert changes["d1"]["policy"] == "ok"
    assert "started without the policy check" in changes["d5"]["policy"]
    assert "policy" not in changes["d5"]["checks_passed"]
    assert [r.deploy for r in report.rollbacks] == ["d2", "d4"]


def test_dora_metrics(store: Path) -> None:
    write_log(store, history())
    dora = report_of(store).dora()
    frequency = dora["deployment_frequency"]
    assert frequency["deploys_done"] == 3  # d1, d4 (later rolled back), d5
    assert frequency["days"] == 14.0 and frequency["per_week"] == 1.5
    assert frequency["by_week"] == {"2026-W45": 2, "2026-W46": 1}
    assert dora["lead_time"] == {
        "median_s": (86400 + 360 + 7200 + 360) / 2,
        "max_s": 86400 + 360.0,
        "measured": 2,
        "unmeasured": 1,
    }
    assert dora["change_failure_rate"] == {"rate": round(2 / 4, 4), "failed": 2, "switched": 4}
    assert dora["time_to_restore"] == {"median_s": (120 + 1500) / 2, "max_s": 1500.0, "restores": 2}


def test_since_keeps_later_changes_only(store: Path) -> None:
    write_log(store, history())
    report = report_of(store, since=date(2026, 11, 5))
    assert [c.deploy for c in report.changes] == ["d4", "d5"]
    assert [r.deploy for r in report.rollbacks] == ["d4"]
    assert report.as_dict()["since"] == "2026-11-05"
    assert report.dora()["deployment_frequency"]["days"] == 11.38


def test_an_emergency_change_is_listed_with_its_review_due(store: Path) -> None:
    saturday = datetime(2026, 11, 7, 22, 0, tzinfo=UTC)
    due = at(saturday + timedelta(hours=24))
    write_log(
        store,
        [
            started("e1", saturday, change_type="emergency", ticket="INC-9", risk="high", review_due=due),
            *steps("e1", saturday),
        ],
    )
    report = report_of(store)
    assert report.as_dict()["emergency_changes"] == [
        {"deploy": "e1", "started_at": "2026-11-07T22:00:00+00:00", "review_due": due}
    ]
    assert report.changes[0].as_dict()["policy"] == "ok"  # outside the window, but an emergency
    assert "review due by" in report.markdown()


def test_a_change_that_broke_the_policy_is_an_exception(store: Path) -> None:
    saturday = datetime(2026, 11, 7, 22, 0, tzinfo=UTC)
    write_log(store, [started("x1", saturday, approvers=["sam"]), *steps("x1", saturday)])
    exceptions = report_of(store).as_dict()["policy_exceptions"]
    assert exceptions[0]["deploy"] == "x1"
    assert any("is the person making the change" in p for p in exceptions[0]["problems"])
    assert any("outside production's deployment windows" in p for p in exceptions[0]["problems"])


def test_an_ungoverned_environment_has_no_policy_exceptions(store: Path) -> None:
    write_log(store, history())
    report = report_of(store, env="local").as_dict()
    assert report["policy_exceptions"] == []
    assert {c["policy"] for c in report["changes"]} == {"not governed"}
    assert all("policy" not in c["checks_passed"] for c in report["changes"])


def test_markdown_and_json_carry_the_same_evidence(store: Path) -> None:
    write_log(store, history())
    report = report_of(store)
    text = report.markdown()
    assert text.startswith("# Audit report: production\n")
    assert "| deployment frequency | 1.5 per week | 3 deploys done in 14.0 days |" in text
    assert "| change failure rate | 50.0% | 2 of 4 deploys" in text
    assert "| time to restore (median) | 13.5 min |" in text
    assert "| d4 | 2026-11-05T09:00:00+00:00 | sam@ci | 1.2.0 | normal | medium | CHG-1 | dana |" in text
    document = json.loads(json.dumps(report.as_dict()))
    assert document["audit_log"] == {"records": len(history()), "chain": "verified"}
    assert len(document["changes"]) == 5


def test_an_empty_log_gives_an_empty_report(store: Path) -> None:
    report = report_of(store)
    assert report.changes == [] and report.records == 0
    assert report.dora()["change_failure_rate"]["rate"] is None
    assert "No deploy in this range." in report.markdown()


# --- bad input and a bad log ---------------------------------------------------------------------------


def test_a_tampered_log_gives_no_report_but_the_first_bad_record(store: Path) -> None:
    write_log(store, history())
    lines = store.read_text().splitlines()
    record = json.loads(lines[6])
    record["ticket"] = "CHG-999"  # changed after the fact
    lines[6] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    store.write_text("\n".join(lines) + "\n")
    with pytest.raises(OperationFailed, match="record 7 is bad: hash does not match"):
        report_of(store)


def test_a_deleted_record_is_named(store: Path) -> None:
    write_log(store, history())
    lines = store.read_text().splitlines()
    del lines[3]
    store.write_text("\n".join(lines) + "\n")
    with pytest.raises(OperationFailed, match="record 4 is bad: seq 5 where 4 was expected"):
        report_of(store)


def test_an_unreadable_log_fails(store: Path) -> None:
    store.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(OperationFailed, match="is unreadable"):
        report_of(store)


def test_a_log_with_bytes_that_are_not_text_names_the_record(store: Path) -> None:
    write_log(store, history()[:3])
    lines = store.read_bytes().splitlines()
    lines[1] = lines[1].replace(b"deploy.step", b"deploy.st\xffp")
    store.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(OperationFailed, match="record 2 is bad: not valid UTF-8"):
        report_of(store)


def test_since_and_commit_time_are_validated() -> None:
    assert audit_report.parse_since("2026-11-01") == date(2026, 11, 1)
    assert audit_report.parse_since(None) is None
    with pytest.raises(BadInput, match=r"--since: '1st of May' is not a date; accepted: YYYY-MM-DD"):
        audit_report.parse_since("1st of May")
    fields = audit_report.commit_fields(
        {"MAXIMUS_COMMIT": "abc123", "MAXIMUS_COMMIT_TIME": "2026-11-30T10:12:00+01:00"}
    )
    assert fields == {"commit": "abc123", "commit_time": "2026-11-30T09:12:00+00:00"}
    assert audit_report.commit_fields({}) == {"commit": None, "commit_time": None}
    for bad in ("yesterday", "2026-11-30T10:12:00"):
        with pytest.raises(BadInput, match="MAXIMUS_COMMIT_TIME"):
            audit_report.commit_fields({"MAXIMUS_COMMIT_TIME": bad})


# --- the task ----------------------------------------------------------------------------------------------


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INVOKE, "audit.report", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def report_env(environments_dir: Path) -> Iterator[Environment]:
    """An environment file whose state directory holds only an audit log (nothing runs)."""
    env = new_environment(environments_dir)
    write_log(env.state_path / "audit" / "audit.jsonl", history())
    yield env
    shutil.rmtree(env.state_path, ignore_errors=True)


def test_the_task_prints_markdown_and_json(report_env: Environment) -> None:
    text = run_report("--env", report_env.name)
    assert text.returncode == 0, text.stderr
    assert "## DORA metrics" in text.stdout and "| d4 |" in text.stdout
    machine = run_report("--env", report_env.name, "--since", "2026-11-05", "--json")
    assert machine.returncode == 0, machine.stderr
    document = json.loads(machine.stdout)
    assert [c["deploy"] for c in document["changes"]] == ["d4", "d5"]
    assert document["dora"]["change_failure_rate"]["failed"] == 1


def test_the_task_exits_2_on_a_bad_date_and_1_on_a_tampered_log(
    report_env: Environment, environments_dir: Path
) -> None:
    bad_date = run_report("--env", report_env.name, "--since", "May")
    assert bad_date.returncode == 2
    assert bad_date.stderr.strip().splitlines() == [
        "error: --since: 'May' is not a date; accepted: YYYY-MM-DD"
    ]
    tampered = new_environment(environments_dir)
    log = tampered.state_path / "audit" / "audit.jsonl"
    write_log(log, history())
    log.write_text(log.read_text().replace('"reason":"smoke"', '"reason":"fine"'))
    result = run_report("--env", tampered.name)
    shutil.rmtree(tampered.state_path, ignore_errors=True)
    assert result.returncode == 1
    assert "record 22 is bad: hash does not match" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
