"""`invoke scan`: the security scanners behind one interface, one summary, one report file per tool.

Every tool is a small class with a `name` and `run(reports_dir) -> ToolResult`; the result's status is
one of four verdicts, never more:

  pass        the tool ran and found nothing that fails the gate
  fail        the tool ran and found something (bandit: medium or high severity; the others: any finding)
  unverified  the tool could not measure (pip-audit without advisory data): never reported as clean
  error       the tool is missing, crashed or timed out

Tools: bandit (configured in pyproject's [tool.bandit]), pip-audit (the hashed lock file, --strict),
checkov (the rendered manifests of both stacks and .github/workflows, from its own tool environment),
zizmor (.github/workflows), ansible-lint (playbooks/, configured in .ansible-lint) and detect-secrets
(the tree against the committed .secrets.baseline). Each writes JSON or SARIF into `reports/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from opskit.errors import BadInput, OperationFailed
from opskit.model import ROOT

Status = Literal["pass", "fail", "unverified", "error"]
REPORTS_DIR = ROOT / "reports"
TOOL_TIMEOUT_S = 900
BANDIT_TARGETS = ("opskit", "infra", "workload", "stacks", "loadtests", "benchmarks", "tasks.py")
BANDIT_FAILING = frozenset({"MEDIUM", "HIGH"})
STACKS = ("staging", "production")
WORKFLOWS = Path(".github") / "workflows"
BASELINE = ".secrets.baseline"
# pip-audit's messages when it gets no advisory data: no network, a refusing proxy, or an index that
# serves packages but not PyPI's JSON API (which carries the advisories).
NO_ADVISORY_DATA = re.compile(
    r"could not be audited|ConnectionError|Max retries exceeded|Failed to establish|ProxyError|"
    r"Name or service not known|Temporary failure in name resolution|timed out|ServiceError|SSLError",
    re.IGNORECASE,
)
RENDER = "import sys, pathlib\nfrom opskit import stack\nstack.render(sys.argv[1], pathlib.Path(sys.argv[2]))"
GITHUB_TOKEN_VARS = ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN")


@dataclass
class ToolResult:
    tool: str
    status: Status
    findings: int
    report_path: str | None
    summary: str
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "status": self.status,
            "findings": self.findings,
            "report": self.report_path,
            "summary": self.summary,
            "seconds": round(self.seconds, 3),
            "details": self.details,
        }


class Scanner(Protocol):
    """One security tool: run it, write its report into `reports_dir`, return the verdict."""

    name: str

    def run(self, reports_dir: Path) -> ToolResult: ...


# --- helpers ----------------------------------------------------------------------------------------------


def tool_path(name: str) -> Path | None:
    """A tool installed beside the running interpreter (the project's virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def checkov_path() -> Path | None:
    """checkov lives in its own tool environment (its pins conflict with pulumi's)."""
    configured = os.environ.get("MAXIMUS_CHECKOV")
    candidate = Path(configured) if configured else ROOT / ".venv-checkov" / "bin" / "checkov"
    if candidate.is_file():
        return candidate
    found = shutil.which("checkov")
    return Path(found) if found else None


def missing(tool: str, how: str = "run scripts/setup (it installs the locked tools)") -> ToolResult:
    return ToolResult(tool, "error", 0, None, f"{tool} is not installed; {how}")


def execute(
    command: Sequence[str],
    cwd: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = TOOL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    environment.update(extra_env or {})
    return subprocess.run(
        list(command), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else "no output"


def tool_failed(tool: str, result: subprocess.CompletedProcess[str]) -> ToolResult:
    """The tool gave no report to judge: an error, with its exit code and its last words."""
    return ToolResult(
        tool, "error", 0, None, f"{tool} failed (exit {result.returncode}): {last_line(result)}"
    )


def judged(tool: str, report: Path, findings: list[str], *, failed: str, passed: str) -> ToolResult:
    """Fail on any finding (each in the details), else pass; both name the report."""
    if findings:
        return ToolResult(tool, "fail", len(findings), str(report), failed, details=findings)
    return ToolResult(tool, "pass", 0, str(report), passed)


def json_documents(text: str) -> list[Any]:
    """Every JSON document in `text` (a tool may print several one after another), lists flattened."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        document, index = decoder.raw_decode(text, index)
        found.extend(document if isinstance(document, list) else [document])
    if not found:
        raise ValueError("no JSON document")
    return found


def sarif_results(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The SARIF results that are not suppressed."""
    found: list[dict[str, Any]] = []
    for run in document.get("runs") or []:
        found.extend(r for r in run.get("results") or [] if not r.get("suppressions"))
    return found


def sarif_line(result: Mapping[str, Any]) -> str:
    locations = result.get("locations") or [{}]
    physical = locations[0].get("physicalLocation") or {}
    uri = (physical.get("artifactLocation") or {}).get("uri", "?")
    line = (physical.get("region") or {}).get("startLine", "?")
    message = (result.get("message") or {}).get("text", "")
    return f"{result.get('ruleId')}: {uri}:{line}: {message.splitlines()[0] if message else ''}"


# --- the scanners -----------------------------------------------------------------------------------------


@dataclass
class Bandit:
    """bandit with the [tool.bandit] settings of pyproject.toml; medium and high severity fail.

    A finding on a line whose `# noqa:` names ruff's port of the same check (bandit B108 is ruff S108)
    was reviewed inline for the project's ruff gate: it is listed as suppressed, and does not fail.
    """

    root: Path = ROOT
    name: str = "bandit"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = tool_path("bandit")
        if binary is None:
            return missing(self.name)
        targets = [t for t in BANDIT_TARGETS if (self.root / t).exists()]
        report = reports_dir / "bandit.json"
        report.unlink(missing_ok=True)  # never judge a previous run's report
        command = [str(binary), "-c", "pyproject.toml", "-r", *targets, "-f", "json", "-o", str(report), "-q"]
        result = execute(command, self.root)
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            return tool_failed(self.name, result)
        if data.get("errors"):
            first = data["errors"][0]
            return ToolResult(
                self.name,
                "error",
                0,
                str(report),
                f"bandit could not read {first.get('filename')}: {first.get('reason')}",
            )
        failing, suppressed, low = [], [], 0
        for issue in data.get("results") or []:
            if issue.get("issue_severity") not in BANDIT_FAILING:
                low += 1
                continue
            where = f"{issue.get('test_id')}: {issue.get('filename')}:{issue.get('line_number')}: "
            text = where + str(issue.get("issue_text"))
            if self._reviewed(issue):
                suppressed.append(text)
            else:
                failing.append(text)
        data["maximus"] = {"failing": failing, "suppressed_by_ruff_noqa": suppressed}
        report.write_text(json.dumps(data, indent=2) + "\n")
        counts = f"{low} low, {len(suppressed)} reviewed inline (ruff noqa)"
        return judged(
            self.name,
            report,
            failing,
            failed=f"{len(failing)} medium/high; {counts}",
            passed=f"no medium/high findings; {counts}",
        )

    def _reviewed(self, issue: Mapping[str, Any]) -> bool:
        test_id = str(issue.get("test_id", ""))
        path = self.root / str(issue.get("filename", ""))
        try:
            line = path.read_text().splitlines()[int(issue.get("line_number", 0)) - 1]
        except (OSError, IndexError, ValueError):
            return False
        match = re.search(r"#\s*noqa:\s*([A-Z0-9, ]+)", line)
        return bool(match) and f"S{test_id[1:]}" in re.split(r"[,\s]+", match.group(1))  # type: ignore[union-attr]


@dataclass
class PipAudit:
    """pip-audit on the hashed lock file with --strict: a dependency it cannot audit is UNVERIFIED."""

    root: Path = ROOT
    lock_file: str = "requirements.lock"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    name: str = "pip-audit"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = tool_path("pip-audit")
        if binary is None:
            return missing(self.name)
        report = reports_dir / "pip-audit.json"
        report.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="maximus-pip-audit-") as cache:
            command = [
                str(binary),
                "--requirement",
                self.lock_file,
                "--require-hashes",
                "--disable-pip",
                "--strict",
                "--progress-spinner",
                "off",
                "--format",
                "json",
                "--output",
                str(report),
                "--cache-dir",
                cache,  # fresh advisories on every scan
            ]
            result = execute(command, self.root, self.extra_env)
        output = f"{result.stderr}\n{result.stdout}"
        data: dict[str, Any] | None = None
        if report.is_file():
            try:
                data = json.loads(report.read_text())
            except ValueError:
                data = None
        if data is not None:
            vulnerable = [d for d in data.get("dependencies") or [] if d.get("vulns")]
            skipped = [d for d in data.get("dependencies") or [] if d.get("skip_reason")]
            if vulnerable:
                details = [
                    f"{d['name']} {d.get('version')}: {', '.join(v.get('id', '?') for v in d['vulns'])}"
                    for d in vulnerable
                ]
                summary = f"{len(details)} vulnerable packages"
                return ToolResult(self.name, "fail", len(details), str(report), summary, details=details)
            if skipped:
                return self._unverified(report, f"{len(skipped)} dependencies could not be audited", output)
            if result.returncode == 0:
                audited = len(data.get("dependencies") or [])
                return ToolResult(
                    self.name, "pass", 0, str(report), f"{audited} locked packages, no known vulnerabilities"
                )
        if NO_ADVISORY_DATA.search(output):
            return self._unverified(report, "the advisory service gave no data", output)
        return tool_failed(self.name, result)

    def _unverified(self, report: Path, why: str, output: str) -> ToolResult:
        reasons = [
            re.sub(r"^[A-Z]+:[\w.]+:", "", line.strip())  # drop the logger's prefix
            for line in output.splitlines()
            if NO_ADVISORY_DATA.search(line)
        ][:5]
        document = {
            "status": "UNVERIFIED",
            "message": f"UNVERIFIED: {why}; the lock file was NOT checked against vulnerability advisories",
            "reasons": reasons,
        }
        report.write_text(json.dumps(document, indent=2) + "\n")
        return ToolResult(
            self.name, "unverified", 0, str(report), f"UNVERIFIED: {why}; not checked", details=reasons
        )


@dataclass
class Checkov:
    """checkov on the Kubernetes manifests `stack.render` writes for each stack, and on the workflows.

    One checkov run per target (its JSON output mixes frameworks when given several directories), all
    gathered into one report, `checkov.json`: {target: checkov's result}.
    """

    root: Path = ROOT
    stacks: Sequence[str] = STACKS
    workflows: bool = True
    name: str = "checkov"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = checkov_path()
        if binary is None:
            return missing(self.name, "run scripts/setup (it installs tools/checkov.lock into .venv-checkov)")
        documents: dict[str, list[Any]] = {}
        with tempfile.TemporaryDirectory(prefix="maximus-scan-render-") as tmp:
            targets: list[tuple[str, Path, str]] = []
            for stack in self.stacks:
                out = Path(tmp) / stack
                failed_render = self._render(stack, out)
                if failed_render is not None:
                    return failed_render
                targets.append((f"stack {stack}", out, "kubernetes"))
            if self.workflows and (self.root / WORKFLOWS).is_dir():
                targets.append(("workflows", self.root / WORKFLOWS, "github_actions"))
            if not targets:
                return ToolResult(self.name, "error", 0, None, "nothing to check: no stacks and no workflows")
            for label, directory, framework in targets:
                command = [str(binary), "--directory", str(directory), "--framework", framework]
                command += ["--output", "json", "--compact", "--skip-download", "--skip-path", "_helm"]
                extra = {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
                result = execute(command, self.root, extra)
                try:
                    documents[label] = json_documents(result.stdout)
                except ValueError:
                    return ToolResult(
                        self.name,
                        "error",
                        0,
                        None,
                        f"checkov on {label} failed (exit {result.returncode}): {last_line(result)}",
                    )
        report = reports_dir / "checkov.json"
        report.write_text(json.dumps(documents, indent=2) + "\n")
        failed, passed, skipped = [], 0, 0
        for label, runs in documents.items():
            for run in runs:
                if not isinstance(run, dict):
                    continue
                results = run.get("results") or {}
                passed += len(results.get("passed_checks") or [])
                skipped += len(results.get("skipped_checks") or [])
                for item in results.get("failed_checks") or []:
                    failed.append(
                        f"{label}: {item.get('check_id')}: {item.get('resource')} ({item.get('file_path')}): "
                        f"{item.get('check_name')}"
                    )
        counts = f"{passed} passed, {skipped} skipped with a reason ({', '.join(documents)})"
        return judged(self.name, report, failed, failed=f"{len(failed)} failed; {counts}", passed=counts)

    def _render(self, stack: str, out: Path) -> ToolResult | None:
        """`stack.render` in its own interpreter: the Pulumi mocks are process-global state."""
        result = execute([sys.executable, "-c", RENDER, stack, str(out)], self.root)
        if result.returncode != 0:
            return ToolResult(
                self.name, "error", 0, None, f"stack.render {stack} failed: {last_line(result)}"
            )
        return None


@dataclass
class Zizmor:
    """zizmor on .github/workflows; offline unless a GitHub token is set (then also its online audits)."""

    root: Path = ROOT
    name: str = "zizmor"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = tool_path("zizmor")
        if binary is None:
            return missing(self.name)
        online = any(os.environ.get(v) for v in GITHUB_TOKEN_VARS)
        command = [str(binary), "--format", "sarif", "--no-exit-codes", str(WORKFLOWS)]
        if not online:
            command.insert(1, "--offline")
        result = execute(command, self.root)
        try:
            data = json.loads(result.stdout)
        except ValueError:
            return tool_failed(self.name, result)
        report = reports_dir / "zizmor.sarif"
        report.write_text(json.dumps(data, indent=2) + "\n")
        findings = [sarif_line(r) for r in sarif_results(data)]
        mode = "online and offline audits" if online else "offline audits (set GH_TOKEN for the online ones)"
        return judged(
            self.name,
            report,
            findings,
            failed=f"{len(findings)} findings; {mode}",
            passed=f"no findings; {mode}",
        )


@dataclass
class AnsibleLint:
    """ansible-lint on playbooks/ with the repository's .ansible-lint (production profile, strict)."""

    root: Path = ROOT
    name: str = "ansible-lint"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = tool_path("ansible-lint")
        if binary is None:
            return missing(self.name)
        report = reports_dir / "ansible-lint.sarif"
        report.unlink(missing_ok=True)
        command = [str(binary), "--offline", "-q", "--sarif-file", str(report), "playbooks/"]
        result = execute(command, self.root)
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            return tool_failed(self.name, result)
        findings = [sarif_line(r) for r in sarif_results(data)]
        if result.returncode != 0 and not findings:  # a failure the report does not explain
            findings = [last_line(result)]
        return judged(
            self.name,
            report,
            findings,
            failed=f"{len(findings)} findings (exit {result.returncode})",
            passed="no findings (production profile)",
        )


@dataclass
class DetectSecrets:
    """detect-secrets over the tree against the committed baseline, which stays unchanged.

    Fails on a potential secret the baseline does not list, and on one the baseline's audit marked as a
    real secret. The files excluded are the baseline's own `--exclude-files` pattern.
    """

    root: Path = ROOT
    baseline: str = BASELINE
    name: str = "detect-secrets"

    def run(self, reports_dir: Path) -> ToolResult:
        binary = tool_path("detect-secrets")
        if binary is None:
            return missing(self.name)
        try:
            committed = json.loads((self.root / self.baseline).read_text())
        except (OSError, ValueError) as exc:
            return ToolResult(
                self.name,
                "error",
                0,
                None,
                f"{self.baseline} is unreadable ({exc.__class__.__name__});"
                " create it with `detect-secrets scan --all-files ... > .secrets.baseline`",
            )
        command = [str(binary), "scan", "--all-files"]
        for filter_ in committed.get("filters_used") or []:
            if filter_.get("path", "").endswith("should_exclude_file"):
                for pattern in filter_.get("pattern") or []:
                    command += ["--exclude-files", pattern]
        result = execute(command, self.root)
        try:
            current = json.loads(result.stdout)
        except ValueError:
            return tool_failed(self.name, result)
        known = {
            (path, s.get("type"), s.get("hashed_secret")): s
            for path, secrets in (committed.get("results") or {}).items()
            for s in secrets
        }
        new, confirmed = [], []
        for path, secrets in (current.get("results") or {}).items():
            for secret in secrets:
                key = (path, secret.get("type"), secret.get("hashed_secret"))
                where = f"{secret.get('type')}: {path}:{secret.get('line_number')}"
                if key not in known:
                    new.append(where)
                elif known[key].get("is_secret"):
                    confirmed.append(where)
        report = reports_dir / "detect-secrets.json"
        report.write_text(
            json.dumps({"new": new, "confirmed_secrets": confirmed, "scan": current}, indent=2) + "\n"
        )
        findings = [f"not in {self.baseline}: {w}" for w in new] + [
            f"marked a real secret: {w}" for w in confirmed
        ]
        return judged(
            self.name,
            report,
            findings,
            failed=f"{len(new)} new, {len(confirmed)} confirmed; audit them, then update the baseline",
            passed=f"nothing beyond the {len(known)} audited baseline entries",
        )


# --- the scan ---------------------------------------------------------------------------------------------


def default_scanners(root: Path = ROOT) -> list[Scanner]:
    return [Bandit(root), PipAudit(root), Checkov(root), Zizmor(root), AnsibleLint(root), DetectSecrets(root)]


TOOLS = tuple(s.name for s in default_scanners())


@dataclass
class ScanReport:
    results: list[ToolResult]
    seconds: float
    allow_unverified: bool = False
    summary_path: str | None = None

    @property
    def status(self) -> Status:
        statuses = {r.status for r in self.results}
        order: tuple[Status, ...] = ("error", "fail", "unverified")
        for worst in order:
            if worst in statuses:
                return worst
        return "pass"

    @property
    def ok(self) -> bool:
        return self.status == "pass" or (self.status == "unverified" and self.allow_unverified)

    @property
    def verdict(self) -> str:
        """Never "clean" unless every tool measured and passed."""
        if self.status == "pass":
            return "clean"
        if self.status == "unverified":
            names = ", ".join(r.tool for r in self.results if r.status == "unverified")
            allowed = " (allowed by --allow-unverified)" if self.allow_unverified else ""
            return f"UNVERIFIED: {names} could not measure{allowed}; this is NOT a clean scan"
        bad = ", ".join(f"{r.tool} {r.status}" for r in self.results if r.status in ("fail", "error"))
        return f"FAILED: {bad}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "verdict": self.verdict,
            "ok": self.ok,
            "allow_unverified": self.allow_unverified,
            "seconds": round(self.seconds, 3),
            "tools": [r.as_dict() for r in self.results],
            "summary": self.summary_path,
        }

    def raise_for_failures(self) -> None:
        """OperationFailed (exit 1) unless clean, or unverified with --allow-unverified."""
        if not self.ok:
            hint = "; --allow-unverified accepts an unverified result" if self.status == "unverified" else ""
            raise OperationFailed(
                f"scan {self.verdict}{hint}; reports in {Path(self.summary_path or '').parent}"
            )


def select(only: str | None, scanners: Iterable[Scanner]) -> list[Scanner]:
    chosen = list(scanners)
    if not only:
        return chosen
    names = [n.strip() for n in only.split(",") if n.strip()]
    accepted = [s.name for s in chosen]
    for name in names:
        if name not in accepted:
            raise BadInput(f"--only: unknown tool {name!r}; accepted: {', '.join(accepted)}")
    return [s for s in chosen if s.name in names]


def _timed(scanner: Scanner, reports_dir: Path) -> ToolResult:
    started = time.monotonic()
    try:
        result = scanner.run(reports_dir)
    except subprocess.TimeoutExpired:
        result = ToolResult(scanner.name, "error", 0, None, f"did not finish within {TOOL_TIMEOUT_S} s")
    except OSError as exc:
        result = ToolResult(scanner.name, "error", 0, None, f"could not run: {exc}")
    result.seconds = time.monotonic() - started
    return result


def run(
    scanners: Sequence[Scanner] | None = None,
    *,
    reports_dir: Path = REPORTS_DIR,
    allow_unverified: bool = False,
    workers: int = 3,
) -> ScanReport:
    """Run the scanners (a few at a time), write `scan-summary.json`, return the report."""
    chosen = list(scanners) if scanners is not None else default_scanners()
    reports_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda s: _timed(s, reports_dir), chosen))
    report = ScanReport(results, time.monotonic() - started, allow_unverified)
    summary = reports_dir / "scan-summary.json"
    report.summary_path = str(summary)
    summary.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def demo_step(reports_dir: Path = REPORTS_DIR) -> tuple[bool, str, dict[str, Any]]:
    """`invoke demo`'s scan summary: every tool's verdict in one line; UNVERIFIED stays UNVERIFIED.

    The demo accepts an unverified pip-audit (no advisory data on this machine) as `invoke scan
    --allow-unverified` does, and says so; it never calls such a scan clean.
    """
    report = run(reports_dir=reports_dir, allow_unverified=True)
    tools = ", ".join(
        f"{r.tool} {r.status.upper() if r.status != 'pass' else r.status}" for r in report.results
    )
    detail = f"{tools}; {report.verdict}; in {report.seconds:.0f} s; reports in {reports_dir}"
    return report.ok, detail, report.as_dict()
