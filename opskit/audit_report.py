"""The evidence an auditor samples, and the DORA metrics, read from an environment's audit log.

The log's hash chain is verified first: a tampered or unreadable log gives no report, only the first
bad record (OperationFailed, exit 1). Then every deploy is rebuilt from its records (`deploy.started`,
`deploy.step`, `deploy.held`, `deploy.aborted`, `rollback`) into one change: who, what, ticket, risk,
approvers, the gates it passed and how it ended, checked again against governance/policy.yaml.

DORA metrics over the report's range:
- deployment frequency: deploys that reached `done`, per week;
- lead time for changes: `done` minus the commit time `deploy.started` carries (`commit_time`, from
  `MAXIMUS_COMMIT_TIME`, which the pipeline sets to the commit's own timestamp);
- change failure rate: deploys rolled back or aborted after their switch / deploys that switched;
- time to restore: from a failed deploy's switch to the rollback (or abort) that ended it.
A manual `rollback` record names no deploy: it is charged to the last deploy that switched traffic and
was not already undone.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from opskit import audit, kuberollout
from opskit import policy as change_policy
from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment

COMMIT_VAR = "MAXIMUS_COMMIT"
COMMIT_TIME_VAR = "MAXIMUS_COMMIT_TIME"
# The gates of a deploy, each passed when the step after it was reached.
GATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("preflight", "health and routing before any change", ("backup", "start-color")),
    ("backup", "a verified backup before a breaking migration", ("start-color",)),
    ("wait-ready", "the new color ready", ("analysis-pre",)),
    ("analysis-pre", "smoke analysis before the switch", ("switch",)),
    ("analysis-post", "analysis after the switch", ("done",)),
)


def commit_fields(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """What `deploy.started` records about the release's commit, for the lead time.

    `MAXIMUS_COMMIT` (the commit id) and `MAXIMUS_COMMIT_TIME` (its timestamp, ISO 8601 with an offset,
    as `git show -s --format=%cI <commit>` prints it). A malformed time is bad input: nothing starts.
    """
    values = os.environ if environ is None else environ
    commit = values.get(COMMIT_VAR) or None
    raw = values.get(COMMIT_TIME_VAR) or None
    if raw is None:
        return {"commit": commit, "commit_time": None}
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise BadInput(
            f"{COMMIT_TIME_VAR}: {raw!r} is not an ISO 8601 time with a UTC offset; "
            "accepted: e.g. 2026-11-30T09:12:00+00:00 (git show -s --format=%cI <commit>)"
        )
    return {"commit": commit, "commit_time": moment.astimezone(UTC).isoformat(timespec="seconds")}


def parse_since(text: str | None) -> date | None:
    """`--since 2026-11-01`: a calendar date (UTC)."""
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--since: {text!r} is not a date; accepted: YYYY-MM-DD") from None


# --- the report ---------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One deploy as the audit log tells it."""

    deploy: str
    started_at: datetime
    actor: str
    version: str
    ticket: str | None
    change_type: str | None
    risk: str | None
    approvers: list[str]
    migration: str | None
    commit: str | None
    commit_time: datetime | None
    review_due: str | None
    steps: list[str] = field(default_factory=list)
    switched_at: datetime | None = None
    done_at: datetime | None = None
    ended_at: datetime | None = None
    result: str = "in-progress"
    reason: str | None = None
    restored_at: datetime | None = None
    governed: bool = False
    policy_problems: list[str] = field(default_factory=list)

    @property
    def checks_passed(self) -> list[str]:
        reached = set(self.steps)
        passed = [gate for gate, _, after in GATES if gate in reached and any(a in reached for a in after)]
        return (["policy"] if self.governed and not self.policy_problems else []) + passed

    @property
    def policy_verdict(self) -> str:
        if not self.governed:
            return "not governed"
        return "; ".join(self.policy_problems) or "ok"

    @property
    def failed(self) -> bool:
        """A change users saw fail: undone after its switch."""
        return self.switched_at is not None and self.result in ("rolled-back", "aborted")

    @property
    def lead_time(self) -> timedelta | None:
        if self.done_at is None or self.commit_time is None:
            return None
        return self.done_at - self.commit_time

    @property
    def time_to_restore(self) -> timedelta | None:
        if not self.failed or self.switched_at is None or self.restored_at is None:
            return None
        return self.restored_at - self.switched_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "deploy": self.deploy,
            "started_at": _iso(self.started_at),
            "actor": self.actor,
            "version": self.version,
            "ticket": self.ticket,
            "change_type": self.change_type,
            "risk": self.risk,
            "approvers": self.approvers,
            "migration": self.migration,
            "commit": self.commit,
            "commit_time": _iso(self.commit_time),
            "checks_passed": self.checks_passed,
            "steps": self.steps,
            "switched_at": _iso(self.switched_at),
            "done_at": _iso(self.done_at),
            "ended_at": _iso(self.ended_at),
            "result": self.result,
            "reason": self.reason,
            "failed": self.failed,
            "lead_time_s": _seconds(self.lead_time),
            "time_to_restore_s": _seconds(self.time_to_restore),
            "review_due": self.review_due,
            "policy": self.policy_verdict,
        }


@dataclass
class Rollback:
    at: datetime
    actor: str
    automatic: bool
    reason: str
    version: str | None
    path: str | None
    seconds: float | None
    deploy: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "actor": self.actor,
            "automatic": self.automatic,
            "reason": self.reason,
            "to_version": self.version,
            "path": self.path,
            "seconds": self.seconds,
            "deploy": self.deploy,
        }


@dataclass
class AuditReport:
    environment: str
    generated_at: datetime
    since: date | None
    start: datetime | None
    records: int
    changes: list[Change]
    rollbacks: list[Rollback]

    # DORA ------------------------------------------------------------------------------------------------

    @property
    def days(self) -> float:
        if self.start is None:
            return 0.0
        return max((self.generated_at - self.start).total_seconds() / 86400, 1.0)

    def dora(self) -> dict[str, Any]:
        done = [c for c in self.changes if c.done_at is not None]
        switched = [c for c in self.changes if c.switched_at is not None]
        failed = [c for c in switched if c.failed]
        leads = [t for t in (c.lead_time for c in done) if t is not None]
        restores = [t for t in (c.time_to_restore for c in failed) if t is not None]
        weeks: dict[str, int] = {}
        for change in done:
            assert change.done_at is not None  # noqa: S101 - filtered above
            year, week, _ = change.done_at.isocalendar()
            weeks[f"{year}-W{week:02d}"] = weeks.get(f"{year}-W{week:02d}", 0) + 1
        return {
            "deployment_frequency": {
                "per_week": round(len(done) / (self.days / 7), 2) if self.days else 0.0,
                "deploys_done": len(done),
                "days": round(self.days, 2),
                "by_week": dict(sorted(weeks.items())),
            },
            "lead_time": {
                "median_s": _median(leads),
                "max_s": _seconds(max(leads)) if leads else None,
                "measured": len(leads),
                "unmeasured": len(done) - len(leads),
            },
            "change_failure_rate": {
                "rate": round(len(failed) / len(switched), 4) if switched else None,
                "failed": len(failed),
                "switched": len(switched),
            },
            "time_to_restore": {
                "median_s": _median(restores),
                "max_s": _seconds(max(restores)) if restores else None,
                "restores": len(restores),
            },
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "generated_at": _iso(self.generated_at),
            "since": self.since.isoformat() if self.since else None,
            "range_start": _iso(self.start),
            "audit_log": {"records": self.records, "chain": "verified"},
            "dora": self.dora(),
            "changes": [c.as_dict() for c in self.changes],
            "rollbacks": [r.as_dict() for r in self.rollbacks],
            "emergency_changes": [
                {"deploy": c.deploy, "started_at": _iso(c.started_at), "review_due": c.review_due}
                for c in self.changes
                if c.change_type == "emergency"
            ],
            "policy_exceptions": [
                {"deploy": c.deploy, "problems": c.policy_problems} for c in self.changes if c.policy_problems
            ],
        }

    def markdown(self) -> str:
        dora = self.dora()
        freq, lead = dora["deployment_frequency"], dora["lead_time"]
        cfr, ttr = dora["change_failure_rate"], dora["time_to_restore"]
        since = self.since.isoformat() if self.since else "the first record"
        lines = [
            f"# Audit report: {self.environment}",
            "",
            f"Generated {_iso(self.generated_at)} from the audit log of `{self.environment}`: "
            f"{self.records} records, hash chain verified. Range: from {since} to the generation time.",
            "",
            "## DORA metrics",
            "",
            "| metric | value | basis |",
            "|---|---|---|",
            f"| deployment frequency | {freq['per_week']} per week | {freq['deploys_done']} deploys done "
            f"in {freq['days']} days |",
            f"| lead time for changes (median) | {_human(lead['median_s'])} | {lead['measured']} deploys "
            f"carried their commit time, {lead['unmeasured']} did not |",
            f"| change failure rate | {_percent(cfr['rate'])} | {cfr['failed']} of {cfr['switched']} deploys "
            "that switched traffic were rolled back or aborted |",
            f"| time to restore (median) | {_human(ttr['median_s'])} | {ttr['restores']} restores, from the "
            "switch to the rollback |",
            "",
            "## Changes",
            "",
        ]
        if not self.changes:
            lines.append("No deploy in this range.")
        else:
            lines += [
                "| deploy | started (UTC) | actor | version | type | risk | ticket | approvers "
                "| checks passed | result | policy |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for c in self.changes:
                lines.append(
                    "| "
                    + " | ".join(
                        _md(v)
                        for v in (
                            c.deploy,
                            _iso(c.started_at),
                            c.actor,
                            c.version,
                            c.change_type,
                            c.risk,
                            c.ticket,
                            ", ".join(c.approvers),
                            ", ".join(c.checks_passed),
                            c.result + (f": {c.reason}" if c.reason else ""),
                            c.policy_verdict,
                        )
                    )
                    + " |"
                )
        lines += ["", "## Rollbacks", ""]
        if not self.rollbacks:
            lines.append("No rollback in this range.")
        else:
            lines += [
                "| at (UTC) | actor | automatic | to version | path | seconds | deploy | reason |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in self.rollbacks:
                lines.append(
                    "| "
                    + " | ".join(
                        _md(v)
                        for v in (
                            _iso(r.at),
                            r.actor,
                            "yes" if r.automatic else "no",
                            r.version,
                            r.path,
                            r.seconds,
                            r.deploy,
                            r.reason,
                        )
                    )
                    + " |"
                )
        emergencies = [c for c in self.changes if c.change_type == "emergency"]
        if emergencies:
            lines += ["", "## Emergency changes (review due within 24 h)", ""]
            lines += [f"- {c.deploy} ({c.ticket}): review due by {c.review_due}" for c in emergencies]
        return "\n".join(lines) + "\n"


# --- building it --------------------------------------------------------------------------------------------


def report(env: Environment, since: date | None = None, *, now: datetime | None = None) -> AuditReport:
    """Verify the environment's audit log, then rebuild its changes and DORA metrics."""
    return report_from_log(log_of(env), env.name, since, now=now)


def log_of(env: Environment) -> audit.AuditLog:
    """The audit log the environment's deploys and rollbacks write: on this machine or the cluster's store."""
    return kuberollout.audit_log(env) if env.kind == "kubernetes" else audit.for_environment(env)


def report_from_log(
    log: audit.AuditLog, environment: str, since: date | None = None, *, now: datetime | None = None
) -> AuditReport:
    records = _verified_records(log, environment)
    return build(records, environment, since, now=now or datetime.now(UTC))


def _verified_records(log: audit.AuditLog, environment: str) -> list[dict[str, Any]]:
    where = getattr(log.sink, "path", "the audit store")
    try:
        verdict = log.verify()
        records = list(log.records())
    except UnicodeDecodeError:
        raise OperationFailed(
            f"audit log of {environment}: record {_first_undecodable(log)} is bad: not valid UTF-8; "
            f"the log was damaged or tampered with: `invoke audit.verify --env {environment}`"
        ) from None
    except OSError as exc:
        raise OperationFailed(
            f"audit log of {environment}: {where} is unreadable ({exc.strerror or exc}); no report without "
            "the whole log"
        ) from None
    if not verdict.ok:
        raise OperationFailed(
            f"audit log of {environment}: record {verdict.first_bad} is bad: {verdict.reason}; no report "
            f"from a broken chain: `invoke audit.verify --env {environment}`"
        )
    return records


def _first_undecodable(log: audit.AuditLog) -> int | str:
    path = getattr(log.sink, "path", None)
    if path is None:
        return "?"
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line.decode()
        except UnicodeDecodeError:
            return number
    return "?"


def build(
    records: Iterable[dict[str, Any]], environment: str, since: date | None, *, now: datetime
) -> AuditReport:
    """The report from verified records (in log order)."""
    start_at = datetime.combine(since, time.min, tzinfo=UTC) if since else None
    rules = change_policy.policy()
    changes: dict[str, Change] = {}
    rollbacks: list[Rollback] = []
    live: Change | None = None  # the last deploy that switched traffic and was not undone
    count = 0
    first: datetime | None = None
    for record in records:
        count += 1
        at = _time(record, "at")
        first = first or at
        operation = record.get("operation")
        deploy_id = record.get("deploy")
        change = changes.get(str(deploy_id)) if deploy_id is not None else None
        if operation == "deploy.started":
            change = _started(record, at)
            changes[change.deploy] = change
        elif operation == "deploy.step" and change is not None:
            step = str(record.get("step"))
            change.steps.append(step)
            if step == "switch" and change.switched_at is None:
                change.switched_at = at
                live = change
            elif step == "done":
                change.done_at = change.ended_at = at
                change.result, change.reason = "done", None
        elif operation == "deploy.held" and change is not None:
            change.result, change.reason = "held", _text(record.get("reason"))
        elif operation == "deploy.resumed" and change is not None:
            change.result = "in-progress"
        elif operation == "deploy.aborted" and change is not None:
            change.result, change.reason, change.ended_at = "aborted", _text(record.get("reason")), at
            if change.switched_at is not None:
                change.restored_at = at
            live = None if live is change else live
        elif operation == "rollback":
            target = change if change is not None else live
            rollbacks.append(
                Rollback(
                    at,
                    str(record.get("actor", "")),
                    bool(record.get("automatic")),
                    _text(record.get("reason")) or "",
                    _text(record.get("version")),
                    _text(record.get("path")),
                    cast(float | None, record.get("seconds")),
                    target.deploy if target else None,
                )
            )
            if target is not None and target.result != "rolled-back":
                target.result, target.reason = "rolled-back", _text(record.get("reason"))
                target.ended_at = target.restored_at = at
            live = None
    for change in changes.values():
        change.governed = environment in rules.environments
        change.policy_problems = _policy_problems(rules, environment, change)
    kept = [c for c in changes.values() if start_at is None or c.started_at >= start_at]
    kept_rollbacks = [r for r in rollbacks if start_at is None or r.at >= start_at]
    return AuditReport(environment, now, since, start_at or first, count, kept, kept_rollbacks)


def _started(record: dict[str, Any], at: datetime) -> Change:
    commit_time = record.get("commit_time")
    return Change(
        deploy=str(record.get("deploy")),
        started_at=at,
        actor=str(record.get("actor", "")),
        version=str(record.get("version", "")),
        ticket=_text(record.get("ticket")),
        change_type=_text(record.get("change_type")),
        risk=_text(record.get("risk")),
        approvers=[str(a) for a in record.get("approvers") or []],
        migration=_text(record.get("migration")),
        commit=_text(record.get("commit")),
        commit_time=_time(record, "commit_time") if commit_time else None,
        review_due=_text(record.get("review_due")),
    )


def _policy_problems(rules: change_policy.Policy, environment: str, change: Change) -> list[str]:
    """The change checked again against today's policy; a governed change must have recorded its terms."""
    if environment not in rules.environments:
        return []
    if change.change_type not in change_policy.CHANGE_TYPES or change.risk not in change_policy.RISKS:
        return ["no change type or risk recorded: started without the policy check"]
    migration = change.migration if change.migration in ("none", "compatible", "breaking") else None
    return [
        str(p)
        for p in change_policy.evaluate(
            rules,
            environment,
            ticket=change.ticket,
            risk=change.risk,
            change_type=change.change_type,
            approvers=tuple(change.approvers),
            migration=cast(change_policy.Migration | None, migration),
            actor=change.actor,
            at=change.started_at,
        )
    ]


def _time(record: dict[str, Any], key: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(record[key]))
    except (KeyError, ValueError):
        raise OperationFailed(
            f"audit log: record {record.get('seq')} has no valid {key!r}; the report cannot place it in time"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat(timespec="seconds") if moment else None


def _seconds(delta: timedelta | None) -> float | None:
    return None if delta is None else round(delta.total_seconds(), 3)


def _median(deltas: list[timedelta]) -> float | None:
    return round(statistics.median(d.total_seconds() for d in deltas), 3) if deltas else None


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if abs(seconds) < 120:
        return f"{seconds:.1f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    if abs(seconds) < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate * 100:.1f}%"


def _md(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")
