"""Load tests: run a profile of loadtests/profiles.yaml with Locust and judge it against its thresholds.

`run(env, profile)` starts one headless Locust process on loadtests/locustfile.py, lets it write its CSV
and HTML reports into `reports/`, reads the per-endpoint statistics back from the CSV, checks every
threshold of the profile (p95 per endpoint, error ratio, minimum throughput) and writes
`reports/loadtest-<env>-<profile>.json`. The report names each broken threshold; an endpoint that
received no request at all fails its check ("no data" never passes).

Targets: a single-machine environment is loaded through its edge (HAProxy); staging and production
through their gateway host. `inject` (local only, like `invoke deploy --inject`) starts a temporary
extra workload process with the given faults beside the environment, loads it directly and stops it
afterwards: the environment itself, its routing and its colors are left as they were.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opskit import envstate, localenv
from opskit.deploy import parse_inject
from opskit.errors import BadInput, OperationFailed
from opskit.model import ROOT, Environment, keys_by_alias, one_line_error

PROFILES_FILE = ROOT / "loadtests" / "profiles.yaml"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
REPORTS_DIR = ROOT / "reports"
ENDPOINTS = ("pending", "decide", "analytics", "health")
STARTUP_GRACE_S = 60
STOP_TIMEOUT_S = 5
READY_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 10.0

Endpoint = Literal["pending", "decide", "analytics", "health"]
ProfileName = Literal["smoke", "baseline", "stress", "soak"]
Positive = Annotated[float, Field(gt=0, le=100000)]
Progress = Callable[[str], None]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(Strict):
    p95_ms: dict[Endpoint, Annotated[int, Field(gt=0, le=600000)]]
    error_ratio_max: float = Field(ge=0, le=1)
    min_rps: float = Field(ge=0, le=100000)

    @model_validator(mode="after")
    def _every_endpoint(self) -> Thresholds:
        missing = [e for e in ENDPOINTS if e not in self.p95_ms]
        if missing:
            raise ValueError(f"p95_ms has no limit for {', '.join(missing)}; accepted: all of {ENDPOINTS}")
        return self


class Stage(Strict):
    until_s: int = Field(gt=0, le=86400)
    users: int = Field(ge=1, le=10000)
    spawn_rate: Positive


class Profile(Strict):
    description: str = ""
    users: int | None = Field(default=None, ge=1, le=10000)
    spawn_rate: Positive | None = None
    duration_s: int | None = Field(default=None, gt=0, le=86400)
    per_user_rps: Positive
    stages: list[Stage] | None = None
    seed_patches: int = Field(default=0, ge=0, le=100000)
    thresholds: Thresholds

    @model_validator(mode="after")
    def _steady_or_ramp(self) -> Profile:
        steady = (self.users, self.spawn_rate, self.duration_s)
        if self.stages:
            if any(v is not None for v in steady):
                raise ValueError("a ramp (stages) takes no users, spawn_rate or duration_s")
            ends = [s.until_s for s in self.stages]
            if ends != sorted(set(ends)):
                raise ValueError(f"stages: until_s {ends} must rise; accepted: increasing seconds")
        elif any(v is None for v in steady):
            raise ValueError("accepted: users, spawn_rate and duration_s, or a list of stages")
        return self

    @property
    def seconds(self) -> int:
        """How long the load runs, ramp or steady."""
        return self.stages[-1].until_s if self.stages else int(self.duration_s or 0)


class EnvironmentLoad(Strict):
    decisions: Literal["real", "probe"]
    profiles: dict[ProfileName, Profile]


class LoadFile(Strict):
    environments: dict[str, EnvironmentLoad]


# --- the profiles file ------------------------------------------------------------------------------------


def load_profiles(path: Path = PROFILES_FILE) -> LoadFile:
    """Read and validate the profiles file; BadInput (exit 2) names the first bad key or value."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: the load profiles file does not exist") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path.name}: not valid YAML ({exc.__class__.__name__}); fix the file") from None
    try:
        return LoadFile.model_validate(data)
    except ValidationError as exc:
        raise BadInput(one_line_error(LoadFile, exc, path.name, keys_by_alias)) from None


def profile_for(env: Environment, name: str, path: Path = PROFILES_FILE) -> tuple[EnvironmentLoad, Profile]:
    load = load_profiles(path)
    declared = load.environments.get(env.name) or load.environments.get(env.kind)
    if declared is None and env.kind == "local":
        declared = load.environments.get("local")  # every single-machine environment loads like `local`
    if declared is None:
        accepted = ", ".join(sorted(load.environments))
        raise BadInput(f"--env: {path.name} declares no load for {env.name}; accepted: {accepted}")
    profile = declared.profiles.get(name)  # type: ignore[call-overload]  # name checked just below
    if profile is None:
        accepted = ", ".join(declared.profiles)
        raise BadInput(f"--profile: unknown profile {name!r} for {env.name}; accepted: {accepted}")
    return declared, profile


# --- the report -------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    limit: float
    measured: float | None
    unit: str
    ok: bool

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.name}: no requests measured (limit {self.limit:g} {self.unit})"
        relation = "at least" if self.name == "min_rps" else "at most"
        return f"{self.name}: {self.measured:g} {self.unit}, {relation} {self.limit:g} {self.unit} allowed"


@dataclass
class EndpointStats:
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    rps: float


@dataclass
class LoadReport:
    environment: str
    profile: str
    target: str
    decisions: str
    ticket: str | None
    inject: dict[str, Any] | None
    started_at: str
    seconds: float = 0.0
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    p95_ms: float = 0.0
    checks: list[Check] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    failure_samples: list[str] = field(default_factory=list)

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def broken(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.broken

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "profile": self.profile,
            "target": self.target,
            "decisions": self.decisions,
            "ticket": self.ticket,
            "inject": self.inject,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 3),
            "verdict": "pass" if self.ok else "fail",
            "ok": self.ok,
            "requests": self.requests,
            "failures": self.failures,
            "error_ratio": round(self.error_ratio, 6),
            "rps": round(self.rps, 3),
            "p95_ms": self.p95_ms,
            "endpoints": {name: vars(stats) for name, stats in self.endpoints.items()},
            "thresholds": [{**vars(c), "text": c.describe()} for c in self.checks],
            "broken": [c.describe() for c in self.broken],
            "failure_samples": self.failure_samples,
            "files": self.files,
        }

    def raise_for_failures(self) -> None:
        """OperationFailed (exit 1) naming every broken threshold."""
        if self.broken:
            names = "; ".join(c.describe() for c in self.broken)
            raise OperationFailed(
                f"loadtest {self.environment}/{self.profile}: broken thresholds: {names}; "
                f"see {self.files.get('html', 'the HTML report')}"
            )


def evaluate(report: LoadReport, thresholds: Thresholds) -> None:
    """Fill report.checks: p95 per endpoint (no data fails), error ratio, minimum throughput."""
    report.checks = []
    for endpoint in ENDPOINTS:
        limit = thresholds.p95_ms[endpoint]  # type: ignore[index]  # every endpoint is validated present
        stats = report.endpoints.get(endpoint)
        if stats is None or stats.requests == 0:
            report.checks.append(Check(f"p95_ms.{endpoint}", limit, None, "ms", False))
        else:
            report.checks.append(
                Check(f"p95_ms.{endpoint}", limit, stats.p95_ms, "ms", stats.p95_ms <= limit)
            )
    if report.requests == 0:
        report.checks.append(Check("error_ratio_max", thresholds.error_ratio_max, None, "", False))
    else:
        ratio, limit_ratio = round(report.error_ratio, 6), thresholds.error_ratio_max
        report.checks.append(Check("error_ratio_max", limit_ratio, ratio, "", ratio <= limit_ratio))
    rps = round(report.rps, 3)
    report.checks.append(Check("min_rps", thresholds.min_rps, rps, "req/s", rps >= thresholds.min_rps))


def _number(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def read_stats(report: LoadReport, csv_prefix: Path) -> None:
    """Per-endpoint and total figures from Locust's `<prefix>_stats.csv` (and samples of failures)."""
    stats_file = Path(f"{csv_prefix}_stats.csv")
    if not stats_file.is_file():
        raise OperationFailed(f"locust wrote no statistics ({stats_file.name}); see the output above")
    with stats_file.open(newline="") as handle:
        for row in csv.DictReader(handle):
            name = row.get("Name", "")
            stats = EndpointStats(
                requests=int(_number(row.get("Request Count"))),
                failures=int(_number(row.get("Failure Count"))),
                p50_ms=_number(row.get("50%")),
                p95_ms=_number(row.get("95%")),
                max_ms=_number(row.get("Max Response Time")),
                rps=round(_number(row.get("Requests/s")), 3),
            )
            if name == "Aggregated":
                report.requests, report.failures, report.rps = stats.requests, stats.failures, stats.rps
                report.p95_ms = stats.p95_ms
            elif name in ENDPOINTS:
                previous = report.endpoints.get(name)
                if previous is None or stats.requests > previous.requests:
                    report.endpoints[name] = stats
    failures_file = Path(f"{csv_prefix}_failures.csv")
    if failures_file.is_file():
        with failures_file.open(newline="") as handle:
            report.failure_samples = [
                f"{r.get('Name')}: {r.get('Error')} x{r.get('Occurrences')}" for r in csv.DictReader(handle)
            ][:10]


# --- targets ------------------------------------------------------------------------------------------------


def target_url(env: Environment) -> str:
    if env.kind == "local":
        return localenv.endpoints(env)["edge"]
    return f"https://{env.platform.gateway.host}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed_patches(env: Environment, count: int) -> int:
    """Add `count` pending patches to a single-machine environment's database, for `real` decisions."""
    if count <= 0:
        return 0
    password = localenv.read_secret(env, localenv.database_password_secret(env))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    rows = [(f"load test patch {stamp} #{i}", "low", 0.5) for i in range(count)]
    try:
        dsn = localenv.database_url(env)
        with psycopg.connect(dsn, password=password, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO patches (title, severity, confidence) VALUES (%s, %s, %s)", rows)
    except psycopg.Error as exc:
        raise OperationFailed(
            f"could not add load-test patches to {env.name}'s database ({exc.__class__.__name__}); "
            f"run `invoke health --env {env.name}`"
        ) from None
    return count


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise OperationFailed(f"the slowed workload exited with {process.returncode}: {tail[0]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise OperationFailed(f"the slowed workload was not ready within {READY_TIMEOUT_S:g} s; see {log}")


@contextlib.contextmanager
def faulty_workload(env: Environment, faults: dict[str, Any], log_dir: Path) -> Iterator[str]:
    """A temporary workload process beside a single-machine environment, with faults; yields its URL.

    It serves the active release on the environment's own database and Redis, on a free loopback
    port, outside supervisord and the edge; it is stopped (SIGTERM, then SIGKILL) on the way out.
    """
    state = envstate.read_state(env)
    color = state.active
    version = str(state.colors[color]["version"])
    secrets = localenv.secrets_dir(env)
    port = _free_port()
    variables = {
        "MAXIMUS_SERVICE": env.service.name,
        "MAXIMUS_ENVIRONMENT": env.name,
        "MAXIMUS_COLOR": color,
        "MAXIMUS_VERSION": version,
        "MAXIMUS_DATABASE_URL": localenv.database_url(env),
        "MAXIMUS_DATABASE_PASSWORD_FILE": str(secrets / localenv.database_password_secret(env)),
        "MAXIMUS_REDIS_URL": localenv.endpoints(env)["redis"],
        "MAXIMUS_REDIS_PASSWORD_FILE": str(secrets / localenv.REDIS_PASSWORD),
        "MAXIMUS_FAULT_ERROR_RATE": str(faults.get("error_rate", 0.0)),
        "MAXIMUS_FAULT_LATENCY_MS": str(faults.get("latency_ms", 0)),
        "MAXIMUS_FAULT_CRASH": "false",
        "MAXIMUS_FAULT_NEVER_READY": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"loadtest-{env.name}-workload.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workload", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("MAXIMUS_")} | variables,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=35)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# --- running ------------------------------------------------------------------------------------------------


def locust_binary() -> Path:
    beside = Path(sys.executable).parent / "locust"
    if beside.is_file():
        return beside
    found = shutil.which("locust")
    if found:
        return Path(found)
    raise OperationFailed("locust is not installed; run scripts/setup (it installs requirements.lock)")


def locust_command(profile: Profile, host: str, csv_prefix: Path, html: Path) -> list[str]:
    command = [
        str(locust_binary()),
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--csv",
        str(csv_prefix),
        "--html",
        str(html),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--exit-code-on-error",
        "0",
    ]
    if not profile.stages:
        command += [
            "--users",
            str(profile.users),
            "--spawn-rate",
            str(profile.spawn_rate),
            "--run-time",
            f"{profile.duration_s}s",
        ]
    return command


def locust_environment(declared: EnvironmentLoad, profile: Profile) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("MAXIMUS_LOAD_")}
    variables |= {
        "MAXIMUS_LOAD_PER_USER_RPS": str(profile.per_user_rps),
        "MAXIMUS_LOAD_DECISIONS": declared.decisions,
        "MAXIMUS_LOAD_STAGES": json.dumps([s.model_dump() for s in profile.stages or []]),
    }
    key = os.environ.get("MAXIMUS_LOAD_API_KEY")
    if key:
        variables["MAXIMUS_LOAD_API_KEY"] = key
    return variables


def run_locust(
    declared: EnvironmentLoad,
    profile: Profile,
    report: LoadReport,
    host: str,
    reports_dir: Path,
    *,
    progress: Progress | None = None,
) -> None:
    stem = f"loadtest-{report.environment}-{report.profile}"
    csv_prefix = reports_dir / stem
    html = reports_dir / f"{stem}.html"
    for stale in reports_dir.glob(f"{stem}_*.csv"):
        stale.unlink()
    command = locust_command(profile, host, csv_prefix, html)
    limit = profile.seconds + STARTUP_GRACE_S
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=locust_environment(declared, profile),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:
        try:
            stdout, stderr = process.communicate(timeout=PROGRESS_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - started
            if elapsed > limit:
                process.kill()
                process.communicate()
                raise OperationFailed(f"locust did not stop within {limit} s; the load was stopped") from None
            if progress is not None:
                progress(
                    f"loadtest {report.environment}/{report.profile}: {elapsed:.0f} of {profile.seconds} s"
                )
    report.seconds = time.monotonic() - started
    if process.returncode not in (0, 1):
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        raise OperationFailed(f"locust failed (exit {process.returncode}): {tail[0]}")
    report.files = {"csv": f"{csv_prefix}_stats.csv", "html": str(html)}
    read_stats(report, csv_prefix)


def run(
    env: Environment,
    profile_name: str,
    *,
    ticket: str | None = None,
    inject: str | None = None,
    reports_dir: Path = REPORTS_DIR,
    profiles_file: Path = PROFILES_FILE,
    progress: Progress | None = None,
) -> LoadReport:
    """Run one profile headless against the environment; write the reports; return the verdict.

    Refuses (exit 2, nothing sent) an unknown profile, a bad profiles file, a production run without
    the change ticket its policy requires, and `inject` outside single-machine environments.
    """
    declared, profile = profile_for(env, profile_name, profiles_file)
    if env.deploy.ticket_required and not (ticket and ticket.strip()):
        raise BadInput(
            f"--ticket: a load test on {env.name} needs the change ticket its deploy policy requires"
        )
    faults = parse_inject(env, inject) if inject else None
    if env.kind == "local" and not localenv.running(env):
        raise OperationFailed(f"{env.name} is not running; run `invoke local.up --env {env.name}` first")
    reports_dir.mkdir(parents=True, exist_ok=True)
    report = LoadReport(
        environment=env.name,
        profile=profile_name,
        target=target_url(env),
        decisions=declared.decisions,
        ticket=ticket,
        inject=faults,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if env.kind == "local" and declared.decisions == "real":
        seed_patches(env, profile.seed_patches)
    if faults is not None:
        with faulty_workload(env, faults, reports_dir) as url:
            report.target = url
            run_locust(declared, profile, report, url, reports_dir, progress=progress)
    else:
        run_locust(declared, profile, report, report.target, reports_dir, progress=progress)
    evaluate(report, profile.thresholds)
    summary = reports_dir / f"loadtest-{env.name}-{profile_name}.json"
    report.files["json"] = str(summary)
    summary.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def demo_step(env: Environment, reports_dir: Path = REPORTS_DIR) -> tuple[bool, str, dict[str, Any]]:
    """`invoke demo`'s smoke load test: (ok, one line, the report) in the demo's step shape."""
    report = run(env, "smoke", reports_dir=reports_dir)
    p95 = ", ".join(f"{name} {stats.p95_ms:g}" for name, stats in report.endpoints.items())
    verdict = "thresholds pass" if report.ok else "broken: " + "; ".join(c.describe() for c in report.broken)
    detail = (
        f"smoke: {report.requests} requests at {report.rps:.1f} req/s, errors {report.error_ratio:.2%}, "
        f"p95 ms {p95}; {verdict}; report {report.files.get('html')}"
    )
    return report.ok, detail, report.as_dict()
