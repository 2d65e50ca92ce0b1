"""Change policy as data: `governance/policy.yaml`, validated, enforced and rendered.

`check_change` is what `invoke deploy` asks before anything changes: a governed environment's change
needs a ticket, a risk level no lower than its release's migration implies, the approvers that risk (or
an emergency) requires, none of them the person deploying, and a start inside a deployment window
(emergency changes excepted). `evaluate` gives the same verdicts as a list, for the audit report to
check recorded changes against. The Markdown tables of governance/change-management.md are rendered
here (`python -m opskit.policy --check` or `--write`), so the policy is never typed twice.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opskit import controls as control_matrix
from opskit.errors import BadInput, OperationFailed
from opskit.model import ROOT, Regex, keys_by_alias, one_line_error

POLICY_PATH = ROOT / "governance" / "policy.yaml"
Risk = Literal["low", "medium", "high"]
ChangeType = Literal["standard", "normal", "emergency"]
Migration = Literal["none", "compatible", "breaking"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
RISKS: tuple[Risk, ...] = get_args(Risk)
CHANGE_TYPES: tuple[ChangeType, ...] = get_args(ChangeType)
DAYS: tuple[Day, ...] = get_args(Day)
CLOCK = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RiskLevel(Strict):
    definition: str = Field(min_length=1)
    approvers: int = Field(ge=0, le=5)
    approved_by: str = Field(min_length=1)


class RiskLevels(Strict):
    low: RiskLevel
    medium: RiskLevel
    high: RiskLevel

    @model_validator(mode="after")
    def _rising(self) -> RiskLevels:
        if not self.low.approvers <= self.medium.approvers <= self.high.approvers:
            raise ValueError("approvers must not fall as risk rises; accepted: low <= medium <= high")
        return self

    def of(self, risk: Risk) -> RiskLevel:
        level: RiskLevel = getattr(self, risk)
        return level


class MinRisk(Strict):
    none: Risk
    compatible: Risk
    breaking: Risk


class ChangeTypeRule(Strict):
    definition: str = Field(min_length=1)
    risks: list[Risk] = Field(min_length=1)
    windows: bool
    approvers: int | None = Field(default=None, ge=0, le=5)
    review_within_hours: int | None = Field(default=None, ge=1, le=168)


class ChangeTypes(Strict):
    standard: ChangeTypeRule
    normal: ChangeTypeRule
    emergency: ChangeTypeRule

    @model_validator(mode="after")
    def _emergency_reviewed(self) -> ChangeTypes:
        if self.emergency.review_within_hours is None:
            raise ValueError("emergency.review_within_hours is required; accepted: hours from 1 to 168")
        return self

    def of(self, change_type: ChangeType) -> ChangeTypeRule:
        rule: ChangeTypeRule = getattr(self, change_type)
        return rule


class Window(Strict):
    days: list[Day] = Field(min_length=1)
    start: str = Field(alias="from")
    end: str = Field(alias="to")

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not CLOCK.fullmatch(value):
            raise ValueError(f"{value!r} is not a time of day; accepted: HH:MM from 00:00 to 24:00")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end <= self.start:
            raise ValueError(f"to {self.end} is not after from {self.start}; accepted: from < to")
        return self

    def contains(self, moment: datetime) -> bool:
        day = DAYS[moment.weekday()]
        clock = moment.strftime("%H:%M")
        return day in self.days and self.start <= clock < self.end

    def describe(self) -> str:
        return f"{_days(self.days)} {self.start}-{self.end}"


class EnvironmentRules(Strict):
    tickets: list[ChangeType]
    approvals: bool
    windows: list[Window] = Field(min_length=1)


class Policy(Strict):
    ticket_pattern: Regex
    risk_levels: RiskLevels
    min_risk_by_migration: MinRisk
    change_types: ChangeTypes
    environments: dict[str, EnvironmentRules]


# --- loading ------------------------------------------------------------------------------------------------


def parse_policy(data: Any, source: str = "governance/policy.yaml") -> Policy:
    """Validate a raw mapping; BadInput with one line naming the first bad key."""
    if not isinstance(data, dict):
        accepted = ", ".join(keys_by_alias(Policy))
        raise BadInput(f"{source}: not a mapping of policy keys; accepted keys: {accepted}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise BadInput(one_line_error(Policy, exc, source, keys_by_alias)) from None


def load_policy(path: Path = POLICY_PATH) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"{path.name}: unreadable ({exc.strerror}); the change policy is required") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"{path.name}{where}: not valid YAML; fix the file and run again") from None
    return parse_policy(data, f"governance/{path.name}" if path == POLICY_PATH else path.name)


@cache
def policy() -> Policy:
    """The repository's policy, loaded once per process."""
    return load_policy()


# --- enforcing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """A change as the policy saw it; `as_audit()` is what `deploy.started` records."""

    environment: str
    governed: bool
    change_type: ChangeType
    risk: Risk
    ticket: str | None
    approvers: tuple[str, ...]
    review_due: datetime | None = None

    def as_audit(self) -> dict[str, Any]:
        return {
            "change_type": self.change_type,
            "risk": self.risk,
            "approvers": list(self.approvers),
            "review_due": self.review_due.isoformat(timespec="seconds") if self.review_due else None,
            "policy": "governed" if self.governed else "not governed",
        }


def parse_approvers(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`--approver alice,bob` (or a list): distinct names, order kept."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if not NAME.fullmatch(item):
            raise BadInput(
                f"--approver: {item!r} is not a name; accepted: letters, digits and . _ @ -, "
                "several separated by commas"
            )
        if item not in names:
            names.append(item)
    return tuple(names)


def _person(identity: str | None) -> str | None:
    return identity.split("@", 1)[0].lower() if identity else None


def minimum_risk(rules: Policy, migration: Migration | None) -> Risk:
    if migration is None:
        return "low"
    floor: Risk = getattr(rules.min_risk_by_migration, migration)
    return floor


def required_approvers(rules: Policy, change_type: ChangeType, risk: Risk) -> int:
    override = rules.change_types.of(change_type).approvers
    return rules.risk_levels.of(risk).approvers if override is None else override


def in_window(rules: EnvironmentRules, moment: datetime) -> bool:
    return any(w.contains(moment) for w in rules.windows)


def next_window(rules: EnvironmentRules, moment: datetime) -> datetime | None:
    """When the next deployment window after `moment` opens (within a week), or None."""
    starts = []
    for offset in range(8):
        day = (moment + timedelta(days=offset)).replace(second=0, microsecond=0)
        for window in rules.windows:
            if DAYS[day.weekday()] in window.days and window.start != "24:00":
                hour, minute = (int(part) for part in window.start.split(":"))
                opening = day.replace(hour=hour, minute=minute)
                if opening > moment:
                    starts.append(opening)
    return min(starts, default=None)


def check_change(
    env: str,
    ticket: str | None,
    risk: str | None,
    approver: str | list[str] | tuple[str, ...] | None,
    now: datetime,
    *,
    change_type: str | None = None,
    migration: Migration | None = None,
    actor: str | None = None,
    rules: Policy | None = None,
) -> Change:
    """Refuse a change the policy does not allow, before anything changes.

    BadInput (exit 2) for a missing or wrong ticket, risk, change type or approver; OperationFailed
    (exit 1) for a start outside the environment's deployment windows. Returns the change as approved.
    """
    rules = rules or policy()
    kind = _choice("--change-type", change_type or "normal", CHANGE_TYPES)
    floor = minimum_risk(rules, migration)
    chosen = _choice("--risk", risk, RISKS) if risk else floor
    approvers = parse_approvers(approver)
    if now.tzinfo is None:
        raise ValueError("check_change needs an aware time (UTC)")
    env_rules = rules.environments.get(env)
    if env_rules is None:
        return Change(env, False, kind, chosen, ticket, approvers)
    problems = evaluate(
        rules,
        env,
        ticket=ticket,
        risk=chosen,
        change_type=kind,
        approvers=approvers,
        migration=migration,
        actor=actor,
        at=now,
    )
    for problem in problems:
        if not isinstance(problem, WindowProblem):
            raise BadInput(str(problem))
    for problem in problems:
        raise OperationFailed(str(problem))
    review = rules.change_types.of(kind).review_within_hours
    return Change(
        env,
        True,
        kind,
        chosen,
        ticket,
        approvers,
        review_due=now + timedelta(hours=review) if review else None,
    )


class Problem(str):
    """One way a change breaks the policy: a one-line message naming the option."""


class WindowProblem(Problem):
    """The change starts outside every deployment window."""


def evaluate(
    rules: Policy,
    env: str,
    *,
    ticket: str | None,
    risk: Risk,
    change_type: ChangeType,
    approvers: tuple[str, ...],
    migration: Migration | None,
    actor: str | None,
    at: datetime,
) -> list[Problem]:
    """Every way a change to `env` breaks the policy (empty: it complies); used at deploy and in reports."""
    env_rules = rules.environments.get(env)
    if env_rules is None:
        return []
    problems: list[Problem] = []
    kind = rules.change_types.of(change_type)
    if change_type in env_rules.tickets:
        if not ticket:
            problems.append(
                Problem(
                    f"--ticket: required for a change to {env} "
                    f"({change_type} changes; governance/policy.yaml)"
                )
            )
        elif not re.fullmatch(rules.ticket_pattern, ticket):
            problems.append(
                Problem(f"--ticket: {ticket!r} is not a ticket id; accepted: {rules.ticket_pattern}")
            )
    floor = minimum_risk(rules, migration)
    if RISKS.index(risk) < RISKS.index(floor):
        allowed = ", ".join(RISKS[RISKS.index(floor) :])
        problems.append(
            Problem(
                f"--risk: {risk} is below what the release's {migration} migration implies; "
                f"accepted: {allowed}"
            )
        )
    if risk not in kind.risks:
        fits = ", ".join(t for t in CHANGE_TYPES if risk in rules.change_types.of(t).risks)
        problems.append(
            Problem(
                f"--change-type: {change_type} changes may not be {risk} risk; accepted for {risk}: {fits}"
            )
        )
    if env_rules.approvals:
        needed = required_approvers(rules, change_type, risk)
        person = _person(actor)
        if person and any(_person(a) == person for a in approvers):
            problems.append(
                Problem(
                    f"--approver: {actor} is the person making the change; accepted: approvers other than "
                    "the person deploying"
                )
            )
        elif len(approvers) < needed:
            problems.append(
                Problem(
                    f"--approver: a {risk}-risk {change_type} change to {env} needs {needed} approver"
                    f"{'s' if needed != 1 else ''} ({rules.risk_levels.of(risk).approved_by}), got "
                    f"{len(approvers)}; accepted: names separated by commas"
                )
            )
    if kind.windows and not in_window(env_rules, at):
        upcoming = next_window(env_rules, at)
        when = upcoming.strftime("%a %Y-%m-%d %H:%M UTC") if upcoming else "none within a week"
        windows = "; ".join(w.describe() for w in env_rules.windows)
        problems.append(
            WindowProblem(
                f"window: {at.strftime('%a %H:%M')} UTC is outside {env}'s deployment windows "
                f"({windows} UTC); "
                f"next: {when}; nothing was changed. Restoring service in an incident: "
                "--change-type emergency with an approver"
            )
        )
    return problems


def _choice(option: str, value: str | None, accepted: tuple[str, ...]) -> Any:
    if value not in accepted:
        raise BadInput(f"{option}: {value!r} is not accepted; accepted: {', '.join(accepted)}")
    return value


# --- rendering ----------------------------------------------------------------------------------------------

SECTIONS = ("approvals", "change-types", "environments", "controls")
BEGIN = "<!-- policy:{name} (generated from governance/*.yaml by `python -m opskit.policy --write`) -->"
END = "<!-- /policy:{name} -->"


def _days(days: list[Day]) -> str:
    ordered = sorted(days, key=DAYS.index)
    indexes = [DAYS.index(d) for d in ordered]
    if len(ordered) > 2 and indexes == list(range(indexes[0], indexes[-1] + 1)):
        return f"{ordered[0].capitalize()}-{ordered[-1].capitalize()}"
    return ", ".join(d.capitalize() for d in ordered)


def _cell(rules: Policy, change_type: ChangeType, risk: Risk) -> str:
    if risk not in rules.change_types.of(change_type).risks:
        return "not allowed"
    needed = required_approvers(rules, change_type, risk)
    return "0 (pre-approved)" if needed == 0 else str(needed)


def render(rules: Policy, name: str) -> str:
    """One generated Markdown table: `approvals`, `change-types`, `environments` or `controls`."""
    lines: list[str]
    if name == "controls":
        return control_matrix.render(control_matrix.controls())
    if name == "approvals":
        migrations = rules.min_risk_by_migration.model_dump()
        lines = [
            "| risk | definition | standard | normal | emergency | who approves | at least this risk for |",
            "|---|---|---|---|---|---|---|",
        ]
        for risk in RISKS:
            level = rules.risk_levels.of(risk)
            floors = ", ".join(f"`{m}` migration" for m, r in migrations.items() if r == risk) or "-"
            cells = " | ".join(_cell(rules, t, risk) for t in CHANGE_TYPES)
            lines.append(f"| {risk} | {level.definition} | {cells} | {level.approved_by} | {floors} |")
    elif name == "change-types":
        lines = [
            "| change type | definition | risks | deployment windows | review |",
            "|---|---|---|---|---|",
        ]
        for kind_name in CHANGE_TYPES:
            kind = rules.change_types.of(kind_name)
            windows = "required" if kind.windows else "may start at any time"
            review = (
                f"within {kind.review_within_hours} h after the change"
                if kind.review_within_hours
                else "before the change (the approvals)"
            )
            lines.append(
                f"| {kind_name} | {kind.definition} | {', '.join(kind.risks)} | {windows} | {review} |"
            )
    elif name == "environments":
        lines = [
            "| environment | ticket required for | approvals by risk | deployment windows (UTC) |",
            "|---|---|---|---|",
        ]
        for env_name, env_rules in rules.environments.items():
            tickets = ", ".join(env_rules.tickets) or "none"
            windows = "; ".join(w.describe() for w in env_rules.windows)
            approvals = "required" if env_rules.approvals else "not required"
            lines.append(f"| {env_name} | {tickets} | {approvals} | {windows} |")
        lines.append("| any other (`local`, tests) | none | not required | any time |")
    else:
        raise ValueError(f"unknown section {name!r}; accepted: {', '.join(SECTIONS)}")
    return "\n".join(lines) + "\n"


def embedded(text: str, name: str) -> str | None:
    """The generated section `name` as a document embeds it, or None when it has no such markers."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def refresh(text: str, rules: Policy) -> str:
    """The document with every embedded section replaced by the one generated from the policy."""
    for name in SECTIONS:
        begin, end = BEGIN.format(name=name), END.format(name=name)
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1]
            text = f"{head}{begin}\n{render(rules, name)}{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opskit.policy", description="Render the change policy's tables into the docs."
    )
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files embedding policy sections")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when a file's tables differ")
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the files")
    args = parser.parse_args(argv)
    try:
        rules = load_policy()
        sections = {name: render(rules, name) for name in SECTIONS}
    except BadInput as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    if not args.files:
        sys.stdout.write("\n".join(sections.values()))
        return 0
    stale = []
    for path in args.files:
        text = path.read_text()
        fresh = refresh(text, rules)
        if fresh != text:
            stale.append(str(path))
            if args.write:
                path.write_text(fresh)
    if stale and not args.write:
        sys.stderr.write(f"policy tables out of date in: {', '.join(stale)}; run with --write\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
