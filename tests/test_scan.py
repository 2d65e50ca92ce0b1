"""`invoke scan`: planted findings fail, no advisory data is UNVERIFIED, the workflows pass the linters."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from opskit import scan
from opskit.errors import BadInput, OperationFailed
from opskit.model import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bandit_passes_on_the_project(tmp_path: Path) -> None:
    result = scan.Bandit().run(tmp_path)
    assert result.status == "pass", result.details


def test_bandit_fails_on_a_planted_finding_in_a_copy(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "opskit", tree / "opskit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "opskit" / "planted.py").write_text(
        "import subprocess\n\n\ndef run(command: str) -> None:\n    subprocess.run(command, shell=True)\n"
    )
    reports = tmp_path / "reports"
    reports.mkdir()
    result = scan.Bandit(root=tree).run(reports)
    assert result.status == "fail"
    assert result.findings == 1
    assert "B602: opskit/planted.py:5" in result.details[0]
    report = scan.ScanReport([result], 1.0)
    with pytest.raises(OperationFailed, match="FAILED: bandit fail") as caught:
        report.raise_for_failures()
    assert caught.value.exit_code == 1


def test_a_ruff_noqa_for_the_same_check_counts_as_reviewed(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "opskit").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "opskit" / "reviewed.py").write_text(
        'SCRATCH = "/tmp/scratch"  # noqa: S108 - a private mount\nOTHER = "/tmp/other"  # noqa: S105\n'
    )
    result = scan.Bandit(root=tree).run(tmp_path)
    assert result.status == "fail"  # the second line's noqa names another check
    assert [d.split(":")[0] for d in result.details] == ["B108"]
    assert "reviewed.py:2" in result.details[0]


def test_unreachable_advisory_service_is_unverified_never_clean(tmp_path: Path) -> None:
    proxy = f"http://127.0.0.1:{closed_port()}"
    offline = {
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    result = scan.PipAudit(extra_env=offline).run(tmp_path)
    assert result.status == "unverified", result.summary
    assert result.summary.startswith("UNVERIFIED")
    written = json.loads((tmp_path / "pip-audit.json").read_text())
    assert written["status"] == "UNVERIFIED"
    assert "clean" not in json.dumps(written).lower()

    report = scan.ScanReport([result], 1.0)
    assert report.status == "unverified"
    assert "NOT a clean scan" in report.verdict
    with pytest.raises(OperationFailed, match=r"UNVERIFIED.*--allow-unverified") as caught:
        report.raise_for_failures()
    assert caught.value.exit_code == 1

    allowed = scan.ScanReport([result], 1.0, allow_unverified=True)
    allowed.raise_for_failures()  # exit 0, but still loudly unverified
    assert allowed.as_dict()["status"] == "unverified"
    assert allowed.verdict.startswith("UNVERIFIED")


def test_an_error_is_never_hidden_by_unverified() -> None:
    results = [
        scan.ToolResult("pip-audit", "unverified", 0, None, "UNVERIFIED"),
        scan.ToolResult("zizmor", "error", 0, None, "zizmor is not installed"),
    ]
    report = scan.ScanReport(results, 1.0, allow_unverified=True)
    assert report.status == "error"
    assert not report.ok


def test_unknown_tool_is_bad_input() -> None:
    with pytest.raises(BadInput, match="--only: unknown tool 'trivy'; accepted: bandit, pip-audit") as caught:
        scan.select("bandit,trivy", scan.default_scanners())
    assert caught.value.exit_code == 2
    assert [s.name for s in scan.select("zizmor, bandit", scan.default_scanners())] == ["bandit", "zizmor"]


def test_detect_secrets_fails_on_a_secret_missing_from_the_baseline(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(ROOT / ".secrets.baseline", tree / ".secrets.baseline")
    (tree / "settings.py").write_text(f'ACCESS_KEY_ID = "{"AKIA" + "Z7" * 8}"\n')  # built here: no literal
    reports = tmp_path / "reports"
    reports.mkdir()
    result = scan.DetectSecrets(root=tree).run(reports)
    assert result.status == "fail"
    assert any("AWS Access Key: settings.py:1" in d for d in result.details)


def test_workflows_pass_zizmor_and_checkov(tmp_path: Path) -> None:
    zizmor = scan.Zizmor().run(tmp_path)
    assert zizmor.status == "pass", zizmor.details
    checkov = scan.Checkov(stacks=()).run(tmp_path)
    assert checkov.status == "pass", checkov.details
    assert "workflows" in checkov.summary


def _workflows() -> dict[str, dict[Any, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(WORKFLOWS.glob("*.yml"))}


def test_workflows_pin_actions_and_grant_least_privilege() -> None:
    workflows = _workflows()
    assert set(workflows) == {"pr.yml", "main.yml", "nightly.yml", "scale-down.yml"}
    for name, workflow in workflows.items():
        assert workflow["permissions"] == {}, name
        for job_name, job in workflow["jobs"].items():
            assert "permissions" in job, f"{name}: {job_name} has no permissions of its own"
            uses = [step["uses"] for step in job.get("steps", []) if "uses" in step]
            for action in uses:
                assert PINNED.match(action), f"{name}: {job_name}: {action} is not pinned by commit SHA"
            wants_cloud = any(a.startswith("aws-actions/configure-aws-credentials@") for a in uses)
            assert (job["permissions"].get("id-token") == "write") == wants_cloud, f"{name}: {job_name}"
            for step in job.get("steps", []):
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False


def test_each_environment_deploys_in_one_concurrency_group() -> None:
    workflows = _workflows()
    main = workflows["main.yml"]["jobs"]
    assert main["staging"]["environment"] == "staging"
    assert main["staging"]["concurrency"]["group"] == "deploy-staging"
    assert main["production"]["environment"] == "production"
    assert main["production"]["concurrency"]["group"] == "deploy-production"
    assert main["production"]["needs"] == ["staging", "ticket"]
    production_runs = " ".join(s.get("run", "") for s in main["production"]["steps"])
    assert "invoke deploy --env production" in production_runs
    assert '--ticket "$TICKET"' in production_runs
    for job in [*workflows["nightly.yml"]["jobs"].values(), *workflows["scale-down.yml"]["jobs"].values()]:
        assert job["concurrency"]["group"].startswith("deploy-")
        assert job["concurrency"]["cancel-in-progress"] is False
