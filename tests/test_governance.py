"""Tests that keep governance/ and runbooks/ true: the change policy, the tables generated from it, every
documented command against the real task list, every control's evidence, every alert's runbook."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
import yaml
from invoke.parser import ParseError, Parser
from invoke.program import Program

import tasks
from opskit import controls as control_matrix
from opskit import policy
from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment, load_environment

ROOT = Path(__file__).resolve().parent.parent
INVOKE = str(Path(sys.executable).parent / "invoke")
DOC_DIRS = (ROOT / "runbooks", ROOT / "governance")
OPERATION_RUNBOOKS = (
    "deploy",
    "rollback",
    "restore",
    "drill",
    "postgres-failover",
    "secret-rotation",
    "scaling",
)
OWN_RUNBOOKS = ("postgres-failover", "secret-rotation", "scaling")
GOVERNANCE_DOCS = (
    "change-management",
    "incident-response",
    "security",
    "access-control",
    "backup-dr",
    "slo-policy",
    "controls",
)
# A Wednesday inside production's window, and a Saturday outside every window.
WEDNESDAY = datetime(2026, 12, 2, 10, 30, tzinfo=UTC)
SATURDAY = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)


# --- the policy data ---------------------------------------------------------------------------------------


def policy_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(policy.POLICY_PATH.read_text())
    return data


def test_the_repository_policy_loads() -> None:
    rules = policy.load_policy()
    assert "production" in rules.environments
    assert rules.change_types.emergency.review_within_hours == 24


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(colour="red"), "colour: unknown key; accepted keys: ticket_pattern"),
        (lambda d: d["risk_levels"]["high"].update(approvers="two"), "risk_levels.high.approvers"),
        (lambda d: d["risk_levels"]["high"].update(approverz=2), "risk_levels.high.approverz: unknown key"),
        (lambda d: d["risk_levels"]["low"].update(approvers=3), "approvers must not fall as risk rises"),
        (
            lambda d: d["change_types"]["emergency"].pop("review_within_hours"),
            "emergency.review_within_hours",
        ),
        (lambda d: d["change_types"]["normal"].update(risks=["huge"]), "change_types.normal.risks.0"),
        (lambda d: d["environments"]["production"]["windows"][0].update(days=["moon"]), "windows.0.days.0"),
        (lambda d: d["environments"]["production"]["windows"][0].update(to="07:00"), "not after from"),
        (lambda d: d["environments"]["production"]["windows"][0].update(to="25:00"), "not a time of day"),
        (lambda d: d["environments"]["production"].update(tickets=["big"]), "production.tickets.0"),
        (lambda d: d["environments"]["staging"].update(extra=1), "staging.extra: unknown key; accepted keys"),
        (
            lambda d: d["risk_levels"]["low"].update(extra=1),
            "risk_levels.low.extra: unknown key; accepted keys: definition, approvers, approved_by",
        ),
        (
            lambda d: d["environments"]["staging"]["windows"][0].update(extra=1),
            "staging.windows.0.extra: unknown key; accepted keys: days, from, to",
        ),
        (
            lambda d: d["environments"].update({5: d["environments"].pop("staging")}),
            "environments.5: 5: Input should be a valid string",
        ),
        (lambda d: d.update(ticket_pattern="(["), "ticket_pattern"),
        (lambda d: d.pop("min_risk_by_migration"), "min_risk_by_migration: missing"),
    ],
)
def test_a_bad_policy_is_refused_in_one_line_naming_the_key(change: Any, expected: str) -> None:
    data = policy_data()
    change(data)
    with pytest.raises(BadInput) as caught:
        policy.parse_policy(data)
    message = str(caught.value)
    assert expected in message
    assert message.startswith("governance/policy.yaml: ")
    assert "\n" not in message


def test_the_environment_models_agree_with_the_policy_on_tickets() -> None:
    """`deploy.ticket_required` in the model and `tickets` in policy.yaml never say different things."""
    rules = policy.load_policy()
    for name, env_rules in rules.environments.items():
        model = load_environment(name)
        assert model.deploy.ticket_required == (set(env_rules.tickets) == set(policy.CHANGE_TYPES)), name


# --- check_change: what `invoke deploy` asks ---------------------------------------------------------------


def check(**overrides: Any) -> policy.Change:
    arguments: dict[str, Any] = {
        "env": "production",
        "ticket": "CHG-1234",
        "risk": None,
        "approver": "dana",
        "now": WEDNESDAY,
        "migration": "compatible",
        "actor": "sam@deploy-host",
    }
    arguments.update(overrides)
    env, ticket, risk, approver, now = (
        arguments.pop(k) for k in ("env", "ticket", "risk", "approver", "now")
    )
    return policy.check_change(env, ticket, risk, approver, now, **arguments)


def test_a_change_inside_the_policy_passes_and_says_how_it_was_approved() -> None:
    change = check()
    assert change.governed and change.risk == "medium" and change.change_type == "normal"
    assert change.approvers == ("dana",)
    assert change.as_audit()["approvers"] == ["dana"]
    high = check(risk="high", approver="dana, lee", migration="breaking")
    assert high.approvers == ("dana", "lee")
    standard = check(change_type="standard", approver=None, migration="none")
    assert standard.risk == "low" and standard.approvers == ()


REFUSED = {
    "no ticket": ({"ticket": None}, BadInput, "--ticket: required for a change to production"),
    "not a ticket id": ({"ticket": "fix it"}, BadInput, "--ticket: 'fix it' is not a ticket id"),
    "risk below the migration": ({"risk": "low"}, BadInput, "--risk: low is below"),
    "unknown risk": ({"risk": "huge"}, BadInput, "--risk: 'huge' is not accepted"),
    "unknown change type": ({"change_type": "urgent"}, BadInput, "--change-type: 'urgent' is not accepted"),
    "standard change, medium risk": ({"change_type": "standard"}, BadInput, "--change-type: standard"),
    "no approver": ({"approver": None}, BadInput, "--approver: a medium-risk normal change"),
    "one approver for high risk": (
        {"risk": "high", "migration": "breaking"},
        BadInput,
        "needs 2 approvers",
    ),
    "self-approval": ({"approver": "sam"}, BadInput, "is the person making the change"),
    "bad approver name": ({"approver": "dana;rm"}, BadInput, "--approver: 'dana;rm' is not a name"),
    "outside the window": ({"now": SATURDAY}, OperationFailed, "outside production's deployment windows"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_change_outside_the_policy_is_refused_naming_the_option(case: str) -> None:
    overrides, error, expected = REFUSED[case]
    with pytest.raises(error) as caught:
        check(**overrides)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_window_refusal_names_the_next_window() -> None:
    with pytest.raises(OperationFailed) as caught:
        check(now=SATURDAY)
    assert "next: Mon 2026-12-07 08:00 UTC" in str(caught.value)


def test_an_emergency_change_may_start_any_time_with_one_approver_and_is_due_for_review() -> None:
    change = check(now=SATURDAY, change_type="emergency", ticket="INC-42", risk="high", migration="breaking")
    assert change.review_due == SATURDAY + timedelta(hours=24)
    with pytest.raises(BadInput, match="--approver"):
        check(now=SATURDAY, change_type="emergency", approver=None)


def test_environments_outside_the_policy_are_not_governed() -> None:
    change = check(env="local", ticket=None, approver=None, now=SATURDAY)
    assert not change.governed
    assert change.as_audit()["policy"] == "not governed"
    staging = check(env="staging", ticket=None, approver=None, now=WEDNESDAY)
    assert staging.governed
    with pytest.raises(OperationFailed, match="staging's deployment windows"):
        check(env="staging", ticket=None, approver=None, now=SATURDAY)


# --- the docs show the policy, never typed twice -----------------------------------------------------------


def doc_files() -> list[Path]:
    return sorted(p for d in DOC_DIRS for p in d.rglob("*.md"))


def test_the_docs_tables_equal_the_ones_generated_from_the_policy() -> None:
    rules = policy.load_policy()
    seen: set[str] = set()
    for path in doc_files():
        text = path.read_text()
        for name in policy.SECTIONS:
            shown = policy.embedded(text, name)
            if shown is None:
                continue
            seen.add(name)
            assert shown == policy.render(rules, name), (
                f"{path.relative_to(ROOT)}: the {name} table differs from governance/*.yaml; run "
                f"`python -m opskit.policy --write {path.relative_to(ROOT)}`"
            )
    assert seen == set(policy.SECTIONS)
    change_management = (ROOT / "governance" / "change-management.md").read_text()
    for name in ("approvals", "change-types", "environments"):
        assert policy.embedded(change_management, name) is not None, name


def test_the_approval_table_has_one_row_per_risk_with_the_policy_numbers() -> None:
    rules = policy.load_policy()
    shown = policy.embedded((ROOT / "governance" / "change-management.md").read_text(), "approvals")
    assert shown is not None
    rows = [line.split(" | ") for line in shown.splitlines()[2:]]
    assert [row[0].strip("| ") for row in rows] == list(policy.RISKS)
    for row, risk in zip(rows, policy.RISKS, strict=True):
        normal = rules.risk_levels.of(risk).approvers
        assert row[3] == (str(normal) if normal else "0 (pre-approved)")


def test_the_policy_command_checks_and_rewrites_stale_tables(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    begin, end = policy.BEGIN.format(name="approvals"), policy.END.format(name="approvals")
    doc.write_text(f"# x\n\n{begin}\n| stale |\n{end}\n\nafter\n")
    assert policy.main(["--check", str(doc)]) == 1
    assert policy.main(["--write", str(doc)]) == 0
    assert policy.embedded(doc.read_text(), "approvals") == policy.render(policy.load_policy(), "approvals")
    assert doc.read_text().endswith("\nafter\n")
    assert policy.main(["--check", str(doc)]) == 0


# --- every documented command parses against the real task list --------------------------------------------

PLACEHOLDER = re.compile(r"<[A-Za-z][A-Za-z0-9_ .-]*>")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INLINE = re.compile(r"`(invoke\s[^`]*)`")


def _segments(command: str) -> Iterator[list[str]]:
    lexer = shlex.shlex(PLACEHOLDER.sub("VALUE", command), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segment: list[str] = []
    for token in lexer:
        if token in SEPARATORS:
            yield segment
            segment = []
        else:
            segment.append(token)
    yield segment


def documented_commands(path: Path) -> list[tuple[int, str, bool]]:
    """(line, `invoke ...` argv text, inline) of every invoke command in a doc's code."""
    found: list[tuple[int, str, bool]] = []
    fenced, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            found += [(number, m.group(1), True) for m in INLINE.finditer(line)]
            continue
        if not pending:
            start = number
        pending += line.removeprefix("$ ")
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        for segment in _segments(pending):
            words = [w for w in segment if not ASSIGNMENT.match(w)] if segment else []
            if words and words[0] == "invoke":
                found.append((start, shlex.join(words), False))
        pending = ""
    return found


def parse_invoke(argv: list[str]) -> Any:
    program = Program(namespace=tasks.namespace)
    parser = Parser(initial=program.initial_context, contexts=tasks.namespace.to_contexts())
    return parser.parse_argv(argv)


def test_documented_commands_are_found_in_code_blocks_and_inline(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `invoke health --env local` first.\n\n```sh\n"
        "invoke status --env <env>   # comment\n"
        "MAXIMUS_X=1 invoke deploy --env local \\\n    --version 1.2.0 && invoke rollback --env local\n"
        "kubectl get pods | grep invoke\n```\n"
    )
    assert [(n, c) for n, c, _ in documented_commands(doc)] == [
        (1, "invoke health --env local"),
        (4, "invoke status --env VALUE"),
        (5, "invoke deploy --env local --version 1.2.0"),
        (5, "invoke rollback --env local"),
    ]
    with pytest.raises(ParseError, match="--versio"):
        parse_invoke(["deploy", "--versio", "1"])
    with pytest.raises(ParseError, match="nosuch"):
        parse_invoke(["nosuch.task"])


def test_every_command_in_runbooks_and_governance_parses_against_the_task_list() -> None:
    problems, count = [], 0
    for path in doc_files():
        for number, command, inline in documented_commands(path):
            count += 1
            try:
                result = parse_invoke(shlex.split(command)[1:])
            except ValueError as exc:  # unbalanced quotes
                problems.append(f"{path.relative_to(ROOT)}:{number}: `{command}`: {exc}")
                continue
            except ParseError as exc:
                # An inline mention may name a task without its required arguments; a code block may not.
                if inline and "did not receive required positional arguments" in str(exc):
                    continue
                problems.append(f"{path.relative_to(ROOT)}:{number}: `{command}`: {exc}")
                continue
            if len(result) < 2 and not any(a.got_value for a in result[0].args.values()):
                problems.append(f"{path.relative_to(ROOT)}:{number}: `{command}` runs no task")
    assert count > 50
    assert not problems, "\n".join(problems)


def test_the_access_table_classifies_every_task_and_only_real_ones() -> None:
    text = (ROOT / "governance" / "access-control.md").read_text()
    section = text.split("## Tasks by role", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z.-]+)` \|", section, flags=re.MULTILINE)
    assert len(listed) == len(set(listed))
    assert set(listed) == set(tasks.namespace.task_names), "governance/access-control.md vs `invoke --list`"


# --- runbooks: one per operation and one per alert ---------------------------------------------------------


@pytest.mark.parametrize("name", OPERATION_RUNBOOKS)
def test_every_operation_has_a_runbook(name: str) -> None:
    assert (ROOT / "runbooks" / f"{name}.md").is_file(), f"runbooks/{name}.md"


@pytest.mark.parametrize("name", OWN_RUNBOOKS)
def test_operation_runbooks_give_commands_good_output_and_escalation(name: str) -> None:
    text = (ROOT / "runbooks" / f"{name}.md").read_text()
    assert "```sh" in text
    assert "Good output" in text
    assert "## Escalate" in text


@pytest.mark.parametrize("name", GOVERNANCE_DOCS)
def test_every_governance_document_exists_and_links_resolve(name: str) -> None:
    path = ROOT / "governance" / f"{name}.md"
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#]+\.(?:md|yaml))\)", text):
        assert (path.parent / target).resolve().is_file(), f"{path.name}: broken link {target}"


def test_the_incident_policy_defines_p0_to_p4_and_a_post_mortem_due_in_5_business_days() -> None:
    text = (ROOT / "governance" / "incident-response.md").read_text()
    for severity in ("P0", "P1", "P2", "P3", "P4"):
        assert re.search(rf"^\| {severity} \| ", text, flags=re.MULTILINE), severity
    assert "within 5 business" in text and "days** of resolution" in text


def _alerts_in(document: Any, source: str) -> Iterator[tuple[str, str | None, str]]:
    groups = document.get("groups") if isinstance(document, dict) else None
    for group in groups or []:
        for rule in group.get("rules") or []:
            if "alert" in rule:
                annotations = rule.get("annotations") or {}
                yield rule["alert"], annotations.get("runbook_url"), source


@pytest.fixture(scope="module")
def production_manifests() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="maximus-governance-render-"))
    result = subprocess.run(
        [INVOKE, "stack.render", "--stack", "production", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    yield out
    shutil.rmtree(out, ignore_errors=True)


def all_alerts(manifests: Path) -> list[tuple[str, str | None, str]]:
    """Every alert rule: the rule files single-machine Prometheus loads, and the stack's PrometheusRules."""
    alerts: list[tuple[str, str | None, str]] = []
    rule_files = [
        p
        for pattern in ("*.rules.yml", "*.rules.yaml")
        for p in ROOT.glob(f"**/{pattern}")
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
    ]
    for path in rule_files:
        alerts += _alerts_in(yaml.safe_load(path.read_text()), str(path.relative_to(ROOT)))
    for path in sorted(manifests.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "PrometheusRule":
                alerts += _alerts_in(document.get("spec"), f"PrometheusRule {path.name}")
    return alerts


def _objects(manifests: Path, kind: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(manifests.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == kind:
                found.append(document)
    return found


def test_the_access_policy_matches_the_rendered_rbac(production_manifests: Path) -> None:
    """The roles, groups and the Secrets rule access-control.md states are what the stack declares."""
    text = (ROOT / "governance" / "access-control.md").read_text()
    app = load_environment("production").namespace
    roles = {
        r["metadata"]["name"]: r
        for r in _objects(production_manifests, "Role")
        if r["metadata"]["namespace"] == app
    }
    for role in ("admin", "operator", "readonly"):
        assert f"`maximus:{role}`" in text and f"maximus-{role}" in roles, role
    bindings = _objects(production_manifests, "RoleBinding")
    groups = {s["name"] for b in bindings for s in b.get("subjects", []) if s.get("kind") == "Group"}
    assert groups == {"maximus:admin", "maximus:operator", "maximus:readonly"}
    readers_of_secrets = {
        role["metadata"]["name"]
        for role in _objects(production_manifests, "Role")
        for rule in role.get("rules", [])
        if "secrets" in rule.get("resources", [])
    }
    assert readers_of_secrets == {"maximus-admin"}, "access-control.md: only admin reads Secrets"
    assert "`maximus-deploy`" in text and "maximus-deploy" in roles
    deploy_writes = {
        (resource, name)
        for rule in roles["maximus-deploy"]["rules"]
        if "patch" in rule["verbs"]
        for resource in rule["resources"]
        for name in rule.get("resourceNames", ["*"])
    }
    assert deploy_writes == {
        ("deployments", "hitl-blue"),
        ("deployments", "hitl-green"),
        ("virtualservices", "hitl"),
        ("configmaps", "hitl-deploy"),
        ("leases", "hitl-deploy-lock"),
    }
    assert "`hitl-deploy`" in text and "`hitl-deploy-lock`" in text


def test_every_alert_has_its_runbook(production_manifests: Path) -> None:
    alerts = all_alerts(production_manifests)
    names = {name for name, _, _ in alerts}
    assert "ServiceDown" in names
    missing = []
    for name, url, source in alerts:
        runbook = ROOT / "runbooks" / "alerts" / f"{name}.md"
        if not runbook.is_file():
            missing.append(f"{name} ({source}): runbooks/alerts/{name}.md is missing")
        if url and "runbooks/" in url:
            linked = ROOT / ("runbooks/" + url.split("runbooks/", 1)[1].split("#")[0])
            if not linked.is_file():
                missing.append(f"{name} ({source}): runbook_url {url} points at nothing")
    assert not missing, "\n".join(sorted(set(missing)))


def test_every_runbook_an_alert_notification_names_exists() -> None:
    named = set()
    for path in (ROOT / "opskit").rglob("*.py"):
        named |= set(re.findall(r"runbook=\"([A-Za-z0-9_./-]+\.md)\"", path.read_text()))
    assert named
    for runbook in named:
        assert (ROOT / "runbooks" / runbook).is_file(), runbook


# --- the controls matrix ---------------------------------------------------------------------------------


def test_the_controls_matrix_names_code_that_exists_and_the_frameworks() -> None:
    matrix = control_matrix.load_controls()
    frameworks = {f for c in matrix.controls for f in c.frameworks}
    assert {"SOC 2 CC8.1", "ISO 27001 A.8.32"} <= frameworks
    data = yaml.safe_load(control_matrix.CONTROLS_PATH.read_text())
    data["controls"][0]["enforced_by"] = ["opskit/nothing_here.py"]
    with pytest.raises(BadInput, match=r"controls\.0\.enforced_by: 'opskit/nothing_here.py' does not exist"):
        control_matrix.parse_controls(data)
    data = yaml.safe_load(control_matrix.CONTROLS_PATH.read_text())
    data["controls"][0].pop("evidence")
    with pytest.raises(BadInput, match=r"controls\.0\.evidence: missing"):
        control_matrix.parse_controls(data)


def _evidence_commands(env: Environment) -> list[tuple[list[str], list[str]]]:
    commands: dict[tuple[str, ...], list[str]] = {}
    for control in control_matrix.load_controls().controls:
        argv = shlex.split(control.evidence)[1:]
        argv = [
            env.name if before == "--env" else word
            for before, word in zip(["", *argv[:-1]], argv, strict=True)
        ]
        commands.setdefault(tuple(argv), []).append(control.id)
    return [(list(argv), ids) for argv, ids in commands.items()]


@pytest.mark.localenv
def test_every_control_evidence_command_runs_and_prints_evidence(local_env: Environment) -> None:
    """Each distinct evidence command once: the environment's one at a time (health checks have timeouts of
    their own), then the repository's (stack check, scan) side by side."""
    commands = _evidence_commands(local_env)
    # An environment in use has backups: take one, so that db.list and drill have evidence to print.
    backup = subprocess.run(
        [INVOKE, "db.backup", "--env", local_env.name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert backup.returncode == 0, backup.stderr
    results = []
    for argv, ids in commands:
        if "--env" in argv:
            done = subprocess.run(
                [INVOKE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
            )
            results.append((argv, ids, done.returncode, done.stdout, done.stderr))
    side_by_side = [
        (argv, ids, subprocess.Popen([INVOKE, *argv], cwd=ROOT, stdout=PIPE, stderr=PIPE, text=True))
        for argv, ids in commands
        if "--env" not in argv
    ]
    for argv, ids, process in side_by_side:
        stdout, stderr = process.communicate(timeout=300)
        results.append((argv, ids, process.returncode, stdout, stderr))
    assert len(results) == len(commands)
    failures = [
        f"{', '.join(ids)}: `invoke {shlex.join(argv)}` exited {returncode} with {len(stdout)} characters "
        f"of output; stderr: {stderr.strip()[-300:]}"
        for argv, ids, returncode, stdout, stderr in results
        if returncode != 0 or not stdout.strip()
    ]
    assert not failures, "\n".join(failures)


DEPLOY_REFUSALS = {
    "no ticket": (["--version", "1.3.0"], "--ticket: required for a change to production"),
    "risk below the migration": (
        ["--version", "2.0.0", "--ticket", "CHG-1", "--risk", "medium", "--approver", "dana,lee"],
        "--risk: medium is below what the release's breaking migration implies",
    ),
    "too few approvers": (
        ["--version", "2.0.0", "--ticket", "CHG-1", "--approver", "dana"],
        "--approver: a high-risk normal change to production needs 2 approvers",
    ),
    "self-approval": (
        ["--version", "1.2.0", "--ticket", "CHG-1", "--approver", "sam"],
        "--approver: sam@ci is the person making the change",
    ),
    "unknown change type": (
        ["--version", "1.2.0", "--ticket", "CHG-1", "--change-type", "urgent"],
        "--change-type: 'urgent' is not accepted",
    ),
}


def test_invoke_deploy_refuses_a_production_change_outside_the_policy() -> None:
    running = {
        case: subprocess.Popen(
            [INVOKE, "deploy", "--env", "production", *args],
            cwd=ROOT,
            env={**os.environ, "MAXIMUS_ACTOR": "sam@ci"},
            stdout=PIPE,
            stderr=PIPE,
            text=True,
        )
        for case, (args, _) in DEPLOY_REFUSALS.items()
    }
    for case, process in running.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, (case, stderr)
        assert DEPLOY_REFUSALS[case][1] in stderr, (case, stderr)
        assert len(stderr.strip().splitlines()) == 1, (case, stderr)
