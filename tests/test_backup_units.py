"""Backup parts that need no running environment: sealed streams, retention, the drill's metric and its
alert rules (promtool). The Kubernetes side is in tests/test_backup_kube.py."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from opskit import backup, backup_crypto, backup_storage, model
from opskit.errors import BadInput
from tests.conftest import ROOT, new_environment

KEY = backup_crypto.BackupKey(bytes(range(32)), "test key")


# --- sealed streams -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("size", [0, 1, backup_crypto.CHUNK, 3 * backup_crypto.CHUNK + 17])
def test_seal_round_trip(compression: backup_crypto.Compression, size: int) -> None:
    data = (bytes(range(251)) * (size // 251 + 1))[:size]
    sealed = io.BytesIO()
    backup_crypto.seal(io.BytesIO(data), sealed, KEY, compression)
    back = io.BytesIO()
    backup_crypto.unseal(io.BufferedReader(io.BytesIO(sealed.getvalue())), back, KEY, compression, "f")
    assert back.getvalue() == data


def _sealed(data: bytes) -> bytes:
    out = io.BytesIO()
    backup_crypto.seal(io.BytesIO(data), out, KEY, "none")
    return out.getvalue()


def _open(blob: bytes, key: backup_crypto.BackupKey = KEY) -> bytes:
    out = io.BytesIO()
    backup_crypto.unseal(io.BufferedReader(io.BytesIO(blob)), out, key, "none", "file.enc")
    return out.getvalue()


def test_sealed_file_refuses_tampering_truncation_and_a_wrong_key() -> None:
    data = b"x" * (2 * backup_crypto.CHUNK + 5)
    blob = _sealed(data)
    flipped = bytearray(blob)
    flipped[backup_crypto.HEADER_BYTES + 100] ^= 1
    with pytest.raises(backup_crypto.Corrupt, match="chunk 0 fails authentication"):
        _open(bytes(flipped))
    first_two = backup_crypto.HEADER_BYTES + 2 * (4 + backup_crypto.CHUNK + 16)
    with pytest.raises(backup_crypto.Corrupt, match="chunk 1 fails"):
        _open(blob[:first_two])  # cut at a chunk boundary: the last-chunk flag does not match
    other = backup_crypto.BackupKey(b"\x01" * 32, "$MAXIMUS_BACKUP_KEY")
    with pytest.raises(backup_crypto.WrongKey, match=f"has id {other.id}") as caught:
        _open(blob, other)
    assert caught.value.exit_code == 2
    with pytest.raises(backup_crypto.Corrupt, match="bad header"):
        _open(b"not a backup")


def test_keys_parse_from_hex_or_base64_and_name_their_source() -> None:
    import base64

    raw = bytes(range(32))
    assert backup_crypto.parse_key(raw.hex(), "x").id == KEY.id
    assert backup_crypto.parse_key(base64.b64encode(raw).decode(), "x").id == KEY.id
    for bad in ("short", "zz" * 32, base64.b64encode(b"16 bytes only!!!").decode()):
        with pytest.raises(BadInput, match=r"^\$K: "):
            backup_crypto.parse_key(bad, "$K")
    assert KEY.key.hex() not in repr(KEY)


# --- retention ------------------------------------------------------------------------------------------


def _fake_backup(root: Path, when: datetime) -> str:
    backup_id = backup.new_id(when)
    (root / backup_id).mkdir(parents=True)
    (root / backup_id / "manifest.json").write_text(json.dumps({"id": backup_id, "verified": True}))
    return backup_id


@pytest.fixture
def unstarted(environments_dir: Path) -> Iterator[Callable[..., model.Environment]]:
    """Environments that are never started: only their state directory is used (removed afterwards)."""
    made: list[model.Environment] = []

    def make(**overrides: Any) -> model.Environment:
        made.append(new_environment(environments_dir, **overrides))
        return made[-1]

    yield make
    for env in made:
        shutil.rmtree(env.state_path, ignore_errors=True)
        (environments_dir / f"{env.name}.yaml").unlink(missing_ok=True)


def test_prune_keeps_exactly_the_policy_set(unstarted: Callable[..., model.Environment]) -> None:
    env = unstarted()
    root = env.state_path / "backups"
    made = {}
    day = date(2026, 1, 1)
    while day <= date(2026, 4, 30):
        made[day] = _fake_backup(root, datetime(day.year, day.month, day.day, 3, tzinfo=UTC))
        day += timedelta(days=1)
    earlier_today = _fake_backup(root, datetime(2026, 4, 30, 1, tzinfo=UTC))
    stale = root / ".partial-b-20260430T050000000000Z"
    stale.mkdir()
    (stale / ".owner").write_text("999999999")
    # 7 daily (Apr 24-30), 4 weekly (ISO weeks ending Apr 30, 26, 19, 12), 6 monthly (only 4 months exist)
    expected = {made[date(2026, 4, d)] for d in range(24, 31)}
    expected |= {made[date(2026, 4, 19)], made[date(2026, 4, 12)]}
    expected |= {made[date(2026, 3, 31)], made[date(2026, 2, 28)], made[date(2026, 1, 31)]}
    plan = backup.prune(env, dry_run=True)
    assert set(plan.kept) == expected and not plan.swept
    assert earlier_today in plan.deleted
    report = backup.prune(env)
    assert set(backup_storage.for_environment(env).ids()) == expected
    assert len(report.deleted) == len(made) + 1 - len(expected)
    assert report.swept == ["b-20260430T050000000000Z"] and not stale.exists()


def test_prune_never_deletes_the_last_verified_backup(unstarted: Callable[..., model.Environment]) -> None:
    env = unstarted(backup={"retention": {"daily": 0, "weekly": 0, "monthly": 0}})
    root = env.state_path / "backups"
    ids = [_fake_backup(root, datetime(2026, 1, d, tzinfo=UTC)) for d in (1, 2, 3)]
    report = backup.prune(env)
    assert report.kept == {ids[-1]: "the last verified backup"}
    assert backup_storage.for_environment(env).ids() == [ids[-1]]


def test_ids_and_names_are_checked() -> None:
    assert backup.check_id("b-20260101T030000000000Z")
    for bad in ("", "b-1", "../b-20260101T030000000000Z", "b-20260101T030000000000Z/..", "x" * 300):
        with pytest.raises(BadInput, match="--backup"):
            backup.check_id(bad)
    for bad in ("../x", "a/b", "Hitl", "x;drop", "a" * 64, ""):
        with pytest.raises(BadInput, match="--into"):
            backup.check_database_name(bad)


def test_model_accepts_backup_jobs_and_keeps_defaults() -> None:
    env = model.load_environment("local")
    assert env.backup.jobs == 2
    with pytest.raises(BadInput, match=r"backup\.jobs"):
        model.parse_environment(
            "local", {**yaml.safe_load((ROOT / "environments/local.yaml").read_text()), "backup": {"jobs": 0}}
        )


# --- the drill's metric and its alerts ------------------------------------------------------------------


def test_metrics_text_and_alert_rules(tmp_path: Path) -> None:
    text = backup.metrics_text("local", "hitl", {"drill_last_success": 1000.0, "drill_rto_seconds": 2.5})
    assert (
        'maximus_backup_drill_last_success_timestamp_seconds{service="hitl",environment="local"} 1000.0'
        in text
    )
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    rules = ROOT / "infra" / "backup.rules.yml"
    series = 'maximus_backup_drill_last_success_timestamp_seconds{service="hitl",environment="local"}'
    failures = 'maximus_backup_drill_last_failure_timestamp_seconds{service="hitl",environment="local"}'
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {  # a drill at t=0, none after: overdue after 8 days and 30 minutes
                "interval": "5m",
                "input_series": [{"series": series, "values": "0+0x3000"}],
                "alert_rule_test": [
                    {"eval_time": "7d", "alertname": "MaximusBackupDrillOverdue", "exp_alerts": []},
                    {
                        "eval_time": "9d",
                        "alertname": "MaximusBackupDrillOverdue",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "service": "hitl",
                                    "environment": "local",
                                },
                                "exp_annotations": {
                                    "summary": "No successful restore drill of hitl in local for 8 days",
                                    "description": "The last successful restore drill was 9d 0h 0m 0s ago; "
                                    "backups are proven only by restores. Run `invoke drill --env local`.",
                                    "runbook_url": "runbooks/alerts/MaximusBackupDrillOverdue.md",
                                },
                            }
                        ],
                    },
                ],
            },
            {  # a failure newer than the last success pages
                "interval": "1m",
                "input_series": [
                    {"series": series, "values": "100x20"},
                    {"series": failures, "values": "50x5 200x15"},
                ],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "MaximusBackupDrillFailing", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "MaximusBackupDrillFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "service": "hitl",
                                    "environment": "local",
                                },
                                "exp_annotations": {
                                    "summary": "The last restore drill of hitl in local failed",
                                    "description": "The newest backup did not restore to the data it "
                                    "recorded. Treat backups as unproven until a drill passes: "
                                    "`invoke drill --env local`.",
                                    "runbook_url": "runbooks/alerts/MaximusBackupDrillFailing.md",
                                },
                            }
                        ],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "backup_test.yml"
    test_file.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        ["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for alert in yaml.safe_load(rules.read_text())["groups"][0]["rules"]:
        assert (ROOT / alert["annotations"]["runbook_url"]).is_file(), alert["alert"]
