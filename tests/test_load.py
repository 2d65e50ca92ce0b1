"""Load tests: the profiles file's validation, the threshold verdicts, and real runs against `local_env`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opskit import load
from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment, load_environment

PROFILES = yaml.safe_load(load.PROFILES_FILE.read_text())


def write_profiles(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_committed_profiles_file_is_valid() -> None:
    declared = load.load_profiles()
    assert set(declared.environments) == {"local", "staging", "production"}
    assert set(declared.environments["local"].profiles) == {"smoke", "baseline", "stress", "soak"}
    assert declared.environments["local"].profiles["stress"].stages
    assert set(declared.environments["production"].profiles) == {"smoke", "baseline"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda d: d["environments"]["local"]["profiles"]["smoke"].update(userz=3),
            "smoke.userz: unknown key",
        ),
        (
            lambda d: d["environments"]["local"]["profiles"]["smoke"]["thresholds"].update(p99_ms={}),
            "thresholds.p99_ms: unknown key",
        ),
        (
            lambda d: d["environments"]["local"]["profiles"]["smoke"]["thresholds"].update(error_ratio_max=2),
            "error_ratio_max: 2",
        ),
        (
            lambda d: d["environments"]["local"]["profiles"]["smoke"]["thresholds"]["p95_ms"].update(login=5),
            "p95_ms.login",
        ),
        (lambda d: d["environments"]["local"]["profiles"].update(spike={}), "profiles.spike"),
        (
            lambda d: d["environments"]["local"].update(decisions="maybe"),
            "decisions: 'maybe' is not accepted",
        ),
    ],
)
def test_bad_profiles_file_exits_2_naming_the_key(tmp_path: Path, change: object, named: str) -> None:
    data = json.loads(json.dumps(PROFILES))
    change(data)  # type: ignore[operator]
    with pytest.raises(BadInput, match=r"^profiles\.yaml: ") as caught:
        load.load_profiles(write_profiles(tmp_path, data))
    assert caught.value.exit_code == 2
    assert named in str(caught.value)


def test_unknown_profile_exits_2_listing_the_accepted_ones() -> None:
    with pytest.raises(BadInput, match="unknown profile 'spike' for production; accepted: smoke, baseline"):
        load.profile_for(load_environment("production"), "spike")


def test_production_refuses_without_a_ticket(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="--ticket") as caught:
        load.run(load_environment("production"), "smoke", reports_dir=tmp_path)
    assert caught.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_inject_is_refused_outside_local(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="local environments only"):
        load.run(load_environment("staging"), "smoke", inject="latency-ms=500", reports_dir=tmp_path)


def _report(**endpoints: load.EndpointStats) -> load.LoadReport:
    report = load.LoadReport("local", "smoke", "http://127.0.0.1:1", "real", None, None, "now")
    report.endpoints = dict(endpoints)
    report.requests = sum(s.requests for s in endpoints.values())
    report.failures = sum(s.failures for s in endpoints.values())
    report.rps = 10.0
    return report


def test_an_endpoint_without_requests_fails_its_threshold() -> None:
    thresholds = load.load_profiles().environments["local"].profiles["smoke"].thresholds
    fast = load.EndpointStats(requests=50, failures=0, p50_ms=5, p95_ms=20, max_ms=40, rps=4)
    report = _report(pending=fast, analytics=fast, health=fast)
    load.evaluate(report, thresholds)
    assert [c.name for c in report.broken] == ["p95_ms.decide"]
    assert "no requests measured" in report.broken[0].describe()
    with pytest.raises(OperationFailed, match=r"p95_ms\.decide"):
        report.raise_for_failures()


@pytest.mark.localenv
def test_smoke_passes_its_thresholds(local_env: Environment, tmp_path: Path) -> None:
    report = load.run(local_env, "smoke", reports_dir=tmp_path)
    assert report.ok, report.as_dict()["broken"]
    assert set(report.endpoints) == set(load.ENDPOINTS)
    stem = f"loadtest-{local_env.name}-smoke"
    assert (tmp_path / f"{stem}.html").stat().st_size > 0
    assert (tmp_path / f"{stem}_stats.csv").is_file()
    summary = json.loads((tmp_path / f"{stem}.json").read_text())
    assert summary["verdict"] == "pass"
    assert summary["endpoints"]["decide"]["requests"] > 0


@pytest.mark.localenv
def test_smoke_fails_under_injected_latency(local_env: Environment, tmp_path: Path) -> None:
    report = load.run(local_env, "smoke", inject="latency-ms=500", reports_dir=tmp_path)
    assert not report.ok
    broken = {c.name for c in report.broken}
    assert {"p95_ms.pending", "p95_ms.decide", "p95_ms.analytics"} <= broken
    assert "p95_ms.health" not in broken  # the fault slows /hitl only
    assert report.target != load.target_url(local_env)  # a temporary slowed process, not the edge
    with pytest.raises(OperationFailed, match=r"broken thresholds: p95_ms\.pending: \d+ ms") as caught:
        report.raise_for_failures()
    assert caught.value.exit_code == 1
