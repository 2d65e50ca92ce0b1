"""The alert and recording-rule model every component declares its rules in.

An `Alert` is checked when it is built: a known severity, a summary and a description, and a runbook file
that exists under `runbooks/`. A bad one raises `RuleError` naming the alert, so no rule file, PrometheusRule
or Alertmanager route is ever generated from it. `Group.document()` is the Prometheus rule-group form;
`Example` is a worked input for an alert, turned into a `promtool test rules` case by `example_tests`;
`load_rule_file` holds a hand-written rule file to the same checks.

Severities (the label `severity`) and what Alertmanager does with each (see infra/routing.py):
  critical  page: PagerDuty, someone acts now
  warning   ticket: Slack #maximus-alerts, someone acts today
  info      Slack #maximus-alerts, nobody has to act
  none      no notification (the Watchdog heartbeat)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS_DIR = ROOT / "runbooks"
Severity = Literal["critical", "warning", "info", "none"]
SEVERITIES: tuple[str, ...] = get_args(Severity)
ALERT_NAME = re.compile(r"^[A-Z][A-Za-z0-9]{2,79}$")
RECORD_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DURATION = re.compile(r"^(0|(\d+d)?(\d+h)?(\d+m)?(\d+s)?)$")
RESERVED_LABELS = frozenset({"severity", "alertname"})
TEMPLATE_LABEL = re.compile(r"\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (PromQL stays readable), never anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)


class RuleError(ValueError):
    """A rule that cannot be generated; the message names it and says what is accepted."""


def _duration(owner: str, field_name: str, value: str) -> None:
    if not value or not DURATION.fullmatch(value):
        raise RuleError(f"{owner}: {field_name} {value!r} is not a duration; accepted: like 30s, 5m, 1h, 2d")


def seconds(duration: str) -> int:
    """A Prometheus duration (as DURATION accepts) in seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", duration))


def duration(total_seconds: int) -> str:
    """Seconds as the shortest Prometheus duration: 3600 -> 1h, 5400 -> 1h30m."""
    if total_seconds <= 0:
        return "0"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total_seconds = divmod(total_seconds, size)
        if count:
            out += f"{count}{unit}"
    return out


@dataclass(frozen=True)
class Example:
    """A worked case for one alert: input series (promtool notation) and where the alert must fire.

    `series` maps a series selector to its values, e.g. {'up{job="redis"}': "1 0x20"}; `fires_at` is the
    evaluation time at which the alert fires with `labels` (the labels its expression keeps); at time 0 it
    must be silent unless `silent_at_start` is False.
    """

    series: Mapping[str, str]
    fires_at: str
    labels: Mapping[str, str] = field(default_factory=dict)
    interval: str = "1m"
    silent_at_start: bool = True


@dataclass(frozen=True)
class Alert:
    """One alert. `expr` None: the tooling sends it to Alertmanager itself (no Prometheus rule)."""

    name: str
    expr: str | None
    severity: str
    summary: str
    description: str
    for_: str = "0"
    labels: Mapping[str, str] = field(default_factory=dict)
    runbook: str | None = None
    example: Example | None = None

    def __post_init__(self) -> None:
        owner = f"alert {self.name!r}"
        if not ALERT_NAME.fullmatch(self.name):
            raise RuleError(f"{owner}: not an alert name; accepted: CamelCase letters and digits, 3 to 80")
        if self.severity not in SEVERITIES:
            raise RuleError(
                f"alert {self.name}: severity {self.severity!r} is unknown; accepted: {', '.join(SEVERITIES)}"
            )
        for name in ("summary", "description"):
            if not str(getattr(self, name)).strip():
                raise RuleError(f"alert {self.name}: {name} is empty; accepted: a sentence for on-call")
        if self.expr is not None and not self.expr.strip():
            raise RuleError(f"alert {self.name}: expr is empty; accepted: a PromQL expression")
        _duration(f"alert {self.name}", "for", self.for_)
        for label in self.labels:
            if not LABEL_NAME.fullmatch(label) or label in RESERVED_LABELS:
                raise RuleError(
                    f"alert {self.name}: label {label!r} is not accepted; accepted: a label name other than "
                    f"{', '.join(sorted(RESERVED_LABELS))}"
                )
        path = RUNBOOKS_DIR / self.runbook_path
        if self.runbook is not None and (
            Path(self.runbook).is_absolute() or ".." in Path(self.runbook).parts
        ):
            raise RuleError(f"alert {self.name}: runbook {self.runbook!r}; accepted: a path inside runbooks/")
        if not path.is_file():
            raise RuleError(
                f"alert {self.name}: has no runbook (runbooks/{self.runbook_path} does not exist); "
                "accepted: an alert with a runbook telling on-call what to check and which command to run"
            )

    @property
    def runbook_path(self) -> str:
        """The runbook, relative to runbooks/: `alerts/<name>.md` unless the alert names another."""
        return self.runbook or f"alerts/{self.name}.md"

    @property
    def runbook_url(self) -> str:
        return f"runbooks/{self.runbook_path}"

    @property
    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description, "runbook_url": self.runbook_url}

    @property
    def all_labels(self) -> dict[str, str]:
        return {**self.labels, "severity": self.severity}

    def document(self) -> dict[str, Any]:
        if self.expr is None:
            raise RuleError(f"alert {self.name}: is sent by the tooling; it has no Prometheus rule")
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_ != "0":
            rule["for"] = self.for_
        rule["labels"] = dict(sorted(self.all_labels.items()))
        rule["annotations"] = self.annotations
        return rule


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not RECORD_NAME.fullmatch(self.record):
            raise RuleError(f"recording rule {self.record!r}: not a metric name")
        if not self.expr.strip():
            raise RuleError(f"recording rule {self.record}: expr is empty; accepted: a PromQL expression")

    def document(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            rule["labels"] = dict(sorted(self.labels.items()))
        return rule


Rule = Alert | Recording


@dataclass(frozen=True)
class Group:
    """A rule group: evaluated together, every `interval` (the Prometheus default when None)."""

    name: str
    rules: Sequence[Rule]
    interval: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"^[a-z][a-z0-9_.-]*$", self.name):
            raise RuleError(f"rule group {self.name!r}: accepted: lower-case letters, digits, '.', '_', '-'")
        if self.interval is not None:
            _duration(f"rule group {self.name}", "interval", self.interval)
        if not self.rules:
            raise RuleError(f"rule group {self.name}: has no rules")

    @property
    def alerts(self) -> list[Alert]:
        return [r for r in self.rules if isinstance(r, Alert)]

    def prometheus_rules(self) -> list[Rule]:
        """The rules Prometheus evaluates (alerts the tooling sends itself are left out)."""
        return [r for r in self.rules if not (isinstance(r, Alert) and r.expr is None)]

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.interval is not None:
            doc["interval"] = self.interval
        doc["rules"] = [r.document() for r in self.prometheus_rules()]
        return doc


def check_unique(groups: Iterable[Group]) -> None:
    """Group names are unique, and an alert name has one runbook whatever its severity."""
    seen_groups: set[str] = set()
    runbooks: dict[str, str] = {}
    for group in groups:
        if group.name in seen_groups:
            raise RuleError(f"rule group {group.name}: declared twice; accepted: unique group names")
        seen_groups.add(group.name)
        for alert in group.alerts:
            if runbooks.setdefault(alert.name, alert.runbook_path) != alert.runbook_path:
                raise RuleError(f"alert {alert.name}: declared with two runbooks; accepted: one runbook")


def rules_file(groups: Sequence[Group], header: str) -> str:
    """A Prometheus rule file of the groups that have rules for Prometheus, with a comment header."""
    docs = [g.document() for g in groups if g.prometheus_rules()]
    body = dump_yaml({"groups": docs})
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + body


def expand(template: str, labels: Mapping[str, str]) -> str:
    """`{{ $labels.x }}` replaced the way Prometheus does it (a missing label is empty)."""
    return TEMPLATE_LABEL.sub(lambda m: labels.get(m.group(1), ""), template)


def expected(alert: Alert, labels: Mapping[str, str]) -> dict[str, Any]:
    """One `exp_alerts` entry: the alert firing with the labels its expression keeps."""
    every = {**labels, **alert.all_labels}
    return {
        "exp_labels": every,
        "exp_annotations": {k: expand(v, every) for k, v in alert.annotations.items()},
    }


def example_tests(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """`promtool test rules` cases from each alert's Example: silent at 0, fires as declared."""
    tests: list[dict[str, Any]] = []
    for group in groups:
        for alert in group.alerts:
            example = alert.example
            if example is None or alert.expr is None:
                continue
            cases: list[dict[str, Any]] = []
            if example.silent_at_start:
                cases.append({"eval_time": "0m", "alertname": alert.name, "exp_alerts": []})
            cases.append(
                {
                    "eval_time": example.fires_at,
                    "alertname": alert.name,
                    "exp_alerts": [expected(alert, example.labels)],
                }
            )
            tests.append(
                {
                    "name": f"{alert.name} fires on its example",
                    "interval": example.interval,
                    "input_series": [{"series": s, "values": v} for s, v in example.series.items()],
                    "alert_rule_test": cases,
                }
            )
    return tests


def unit_tests_file(rule_files: Sequence[str], tests: Sequence[dict[str, Any]]) -> str:
    doc = {"rule_files": list(rule_files), "evaluation_interval": "1m", "tests": list(tests)}
    return dump_yaml(doc)


def load_rule_file(path: Path) -> list[Group]:
    """A hand-written Prometheus rule file, read into the model: every alert in it is held to the same
    checks (severity, summary, description, an existing runbook), naming the file and the alert."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RuleError(f"{path.name}: not valid YAML ({exc})") from None
    groups: list[Group] = []
    for raw in data.get("groups") or []:
        rules: list[Rule] = []
        for rule in raw.get("rules") or []:
            if "record" in rule:
                rules.append(Recording(rule["record"], str(rule["expr"]), rule.get("labels") or {}))
                continue
            labels = dict(rule.get("labels") or {})
            notes = dict(rule.get("annotations") or {})
            name = str(rule.get("alert"))
            unknown = set(notes) - {"summary", "description", "runbook_url"}
            if unknown:
                raise RuleError(
                    f"{path.name}: alert {name}: annotations {sorted(unknown)}; accepted: summary, "
                    "description, runbook_url"
                )
            url = str(notes.get("runbook_url", ""))
            if "record" not in rule and not url.startswith("runbooks/"):
                raise RuleError(
                    f"{path.name}: alert {name}: has no runbook (runbook_url {url!r}); "
                    "accepted: runbook_url runbooks/<path of its runbook>"
                )
            runbook = url.removeprefix("runbooks/")
            try:
                rules.append(
                    Alert(
                        name=name,
                        expr=str(rule["expr"]),
                        severity=str(labels.pop("severity", "")),
                        summary=str(notes.get("summary", "")),
                        description=str(notes.get("description", "")),
                        for_=str(rule.get("for", "0")),
                        labels=labels,
                        runbook=runbook,
                    )
                )
            except RuleError as exc:
                raise RuleError(f"{path.name}: {exc}") from None
        groups.append(Group(str(raw.get("name")), rules, raw.get("interval")))
    return groups
