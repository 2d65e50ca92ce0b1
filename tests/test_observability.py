"""Observability as code: rules, unit tests in promtool, routes in amtool, runbooks, dashboards, and the
SLO page alert firing in a real Prometheus and reaching the real local Alertmanager's receiver."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from infra import alerts, dashboards, observability, routing, slo
from infra.monitoring import hand_written_rule_files, prometheus_rule_groups, rule_sets
from opskit import alert_demo, envstate
from opskit.model import Environment, load_environment
from workload.app import Metrics
from workload.config import Config

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"
AMTOOL = "/usr/bin/amtool"
LOCAL = load_environment("local")
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


# --- generated files ----------------------------------------------------------------------------------------


def test_committed_files_equal_the_generated_ones() -> None:
    stale = observability.stale()
    assert stale == [], f"run `python -m infra.observability --write`: {stale}"
    check = run(sys.executable, "-m", "infra.observability", "--check", cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_checks_every_rule_file() -> None:
    files = sorted(str(p) for p in observability.RULES_DIR.glob("*.rules.yml"))
    assert len(files) == len(observability.rule_files(LOCAL))
    result = run(PROMTOOL, "check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("name", ["local", "staging", "production"])
def test_promtool_unit_tests_pass(tmp_path: Path, name: str) -> None:
    """Every SLO alert: a steep burn pages, a slow burn only tickets, healthy is silent; every component
    alert with an example fires on it and is silent before."""
    env = load_environment(name)
    for file, text in observability.rule_files(env).items():
        (tmp_path / file).write_text(text)
    tests = observability.promtool_tests(env)
    assert f"{env.service.name}-slo.tests.yml" in tests
    for file, text in tests.items():
        (tmp_path / file).write_text(text)
    result = run(PROMTOOL, "test", "rules", *sorted(tests), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    slo_cases = yaml.safe_load(tests[f"{env.service.name}-slo.tests.yml"])["tests"]
    titles = {t["name"] for t in slo_cases}
    for alert in slo.SLO_NAMES.values():
        assert {f"{alert}: a steep burn pages", f"{alert}: a slow burn only tickets"} <= titles
        assert f"{alert}: a healthy service is silent" in titles


def test_key_component_alerts_have_examples() -> None:
    with_example = {a.name for a in observability.all_alerts(LOCAL) if a.example is not None}
    assert with_example >= {
        "ServiceDown",
        "TargetDown",
        "Watchdog",
        "PostgresReplicationLag",
        "PostgresConnectionsNearMax",
        "PostgresBackupTooOld",
        "RedisMemoryHigh",
        "RedisRejectedConnections",
        "RedisLastSaveFailed",
        "KafkaUnderReplicatedPartitions",
        "KafkaOfflinePartitions",
        "KafkaConsumerLagHigh",
        "KongHighErrorRatio",
        "HAProxyHighErrorRatio",
        "IstioHighErrorRatio",
        "MaximusDeploymentStuck",
    }


def test_slo_windows_follow_the_model() -> None:
    burns = [a for a in slo.burn_alerts("availability", LOCAL.service)]
    assert [(a.severity, a.labels["window"]) for a in burns] == [
        ("critical", "1h"),
        ("critical", "6h"),
        ("warning", "1d"),
        ("warning", "3d"),
    ]
    assert "> 0.0144" in str(burns[0].expr) and "ratio_rate5m" in str(burns[0].expr)
    week = LOCAL.service.model_copy(update={"slo": LOCAL.service.slo.model_copy(update={"window_days": 7})})
    assert [a.labels["window"] for a in slo.burn_alerts("availability", week)] == [
        "14m",
        "1h24m",
        "5h36m",
        "16h48m",
    ]
    assert slo.le_bucket(300) == "0.3"


# --- every alert is complete, and bad input fails naming it -------------------------------------------------


def test_every_alert_has_severity_summary_description_and_an_existing_runbook() -> None:
    every = observability.all_alerts(LOCAL)
    assert len({a.name for a in every}) >= 20
    for alert in every:
        assert alert.severity in alerts.SEVERITIES
        assert alert.summary and alert.description
        assert (ROOT / alert.runbook_url).is_file(), alert.name
    for group in observability.rule_groups(LOCAL):
        for rule in group.document()["rules"]:
            if "alert" in rule:
                assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
                assert rule["labels"]["severity"] in alerts.SEVERITIES


def test_every_runbook_belongs_to_an_alert_and_names_commands_that_exist() -> None:
    names = {a.name for a in observability.all_alerts(LOCAL)}
    files = {p.stem for p in (ROOT / "runbooks" / "alerts").glob("*.md")}
    assert files == names
    listing = run(sys.executable, "-m", "invoke", "--list", cwd=ROOT)
    assert listing.returncode == 0, listing.stderr
    tasks = set(re.findall(r"^  ([a-z][a-z0-9.-]*)", listing.stdout, re.M))
    assert {"health", "status", "rollback", "deploy"} <= tasks
    generated = {a.name for groups in rule_sets(LOCAL).values() for g in groups for a in g.alerts}
    for path in sorted((ROOT / "runbooks" / "alerts").glob("*.md")):
        if path.stem not in generated:
            continue  # a hand-written rule file's runbook: its owner's tests hold it
        text = path.read_text()
        assert "## Check" in text and "## Act" in text, path.name
        blocks = re.findall(r"```sh\n(.+?)```", text, re.S)
        assert blocks and all(b.strip() for b in blocks), f"{path.name} shows no command to run"
        used = set(re.findall(r"\binvoke ([a-z][a-z.]*)", text))
        assert used <= tasks, f"{path.name}: {used - tasks} are not tasks"


def test_unknown_severity_fails_naming_the_alert() -> None:
    with pytest.raises(
        alerts.RuleError, match=r"alert Broken: severity 'page-me' is unknown; accepted: critical"
    ):
        alerts.Alert("Broken", "up == 0", "page-me", "s", "d", runbook="alerts/ServiceDown.md")


def test_an_alert_without_a_runbook_fails_naming_it() -> None:
    with pytest.raises(alerts.RuleError, match=r"alert NoBook: has no runbook \(runbooks/alerts/NoBook.md"):
        alerts.Alert("NoBook", "up == 0", "warning", "s", "d")
    with pytest.raises(alerts.RuleError, match="alert Escape: runbook"):
        alerts.Alert("Escape", "up == 0", "warning", "s", "d", runbook="../README.md")


def test_an_slo_objective_outside_0_1_fails_naming_it() -> None:
    for bad in (1.0, 0.0, 1.5):
        broken_slo = LOCAL.service.slo.model_construct(availability=bad, latency_p95_ms=300, window_days=30)
        service = LOCAL.service.model_copy(update={"slo": broken_slo})
        with pytest.raises(
            alerts.RuleError, match=rf"service hitl: slo availability objective {bad!r} is outside"
        ):
            slo.rule_groups(service)


def test_a_latency_threshold_between_buckets_fails_naming_it() -> None:
    broken_slo = LOCAL.service.slo.model_copy(update={"latency_p95_ms": 280})
    service = LOCAL.service.model_copy(update={"slo": broken_slo})
    with pytest.raises(alerts.RuleError, match=r"slo.latency_p95_ms: 280 is not a bucket boundary.*300"):
        slo.rule_groups(service)


def test_the_latency_buckets_are_the_workloads() -> None:
    from workload.app import DURATION_BUCKETS

    assert slo.LATENCY_BUCKETS_S == DURATION_BUCKETS


def test_a_hand_written_rule_file_is_held_to_the_same_checks(tmp_path: Path) -> None:
    rule = {"alert": "HandMade", "expr": "up == 0", "labels": {"severity": "warning"}}
    rule["annotations"] = {
        "summary": "s",
        "description": "d",
        "runbook_url": "runbooks/alerts/ServiceDown.md",
    }
    path = tmp_path / "x.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [rule]}]}))
    assert [a.name for g in alerts.load_rule_file(path) for a in g.alerts] == ["HandMade"]
    for broken, message in (
        ({"labels": {"severity": "sev1"}}, r"x.rules.yml: alert HandMade: severity 'sev1' is unknown"),
        (
            {"annotations": {"summary": "s", "description": "d"}},
            r"x.rules.yml: alert HandMade: has no runbook",
        ),
    ):
        path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{**rule, **broken}]}]}))
        with pytest.raises(alerts.RuleError, match=message):
            alerts.load_rule_file(path)


def test_the_backup_tooling_writes_the_metrics_the_rules_read() -> None:
    source = (ROOT / "opskit" / "backup.py").read_text()
    for name in dashboards.TOOLING_METRICS:
        assert name in source, name


def test_the_model_refuses_an_objective_outside_0_1() -> None:
    from opskit.errors import BadInput
    from opskit.model import parse_environment

    data = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
    data["service"]["slo"]["availability"] = 1.2
    with pytest.raises(BadInput, match=r"service\.slo\.availability"):
        parse_environment("local", data)


# --- Alertmanager -------------------------------------------------------------------------------------------


def local_config(tmp_path: Path) -> Path:
    template = jinja2.Template(observability.ALERTMANAGER_TEMPLATE.read_text())
    path = tmp_path / "alertmanager-local.yml"
    path.write_text(template.render(ansible_managed="test", maximus_ports={"alert_receiver": 19095}))
    return path


def kubernetes_config(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pagerduty-routing-key").write_text("placeholder")
    (secrets / "slack-webhook-url").write_text("https://hooks.slack.invalid/placeholder")
    path = tmp_path / "alertmanager-kubernetes.yml"
    path.write_text(alerts.dump_yaml(routing.config("kubernetes", str(secrets))))
    return path


@pytest.mark.parametrize("target", ["local", "kubernetes"])
def test_amtool_checks_the_config(tmp_path: Path, target: str) -> None:
    path = local_config(tmp_path) if target == "local" else kubernetes_config(tmp_path)
    result = run(AMTOOL, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 inhibit rules" in result.stdout


ROUTE_CASES = [
    ({"severity": "critical", "alertname": "AvailabilityBudgetBurn"}, "pagerduty,slack"),
    ({"severity": "warning", "alertname": "AvailabilityBudgetBurn"}, "slack"),
    ({"severity": "info", "alertname": "Anything"}, "slack"),
    ({"severity": "none", "alertname": "Anything"}, "null"),
    ({"severity": "none", "alertname": "Watchdog"}, "null"),
]


@pytest.mark.parametrize("target", ["local", "kubernetes"])
@pytest.mark.parametrize(("labels", "receivers"), ROUTE_CASES)
def test_amtool_routes_each_severity(
    tmp_path: Path, target: str, labels: dict[str, str], receivers: str
) -> None:
    path = local_config(tmp_path) if target == "local" else kubernetes_config(tmp_path)
    pairs = [f"{k}={v}" for k, v in labels.items()]
    result = run(
        AMTOOL, "config", "routes", "test", f"--config.file={path}", f"--verify.receivers={receivers}", *pairs
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(routing.receivers_of(labels["severity"]))


def test_unrouted_alerts_reach_the_local_webhook_on_local(tmp_path: Path) -> None:
    path = local_config(tmp_path)
    result = run(
        AMTOOL, "config", "routes", "test", f"--config.file={path}", "--verify.receivers=local", "x=y"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    urls = {r["name"]: r["webhook_configs"][0]["url"] for r in config["receivers"] if "webhook_configs" in r}
    assert urls["local"] == "http://127.0.0.1:19095/alerts"
    assert urls["pagerduty"].endswith("/alerts/pagerduty") and urls["slack"].endswith("/alerts/slack")


def test_inhibition_mutes_warning_by_critical_of_the_same_alert_and_service() -> None:
    rule = routing.config("local")["inhibit_rules"][0]
    assert rule["source_matchers"] == ['severity="critical"']
    assert rule["equal"] == ["alertname", "service", "environment"]


def test_kubernetes_keys_come_from_mounted_secrets_only() -> None:
    text = json.dumps(routing.config("kubernetes", "/etc/alertmanager/secrets/x"))
    assert "routing_key_file" in text and "api_url_file" in text
    assert '"routing_key"' not in text and '"api_url"' not in text
    with pytest.raises(ValueError, match="secrets_dir"):
        routing.config("kubernetes")


# --- the stacks get the same rules --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["staging", "production"])
def test_the_prometheus_rule_carries_the_same_groups(name: str) -> None:
    env = load_environment(name)
    groups = prometheus_rule_groups(env)
    from_files = [
        g for text in observability.rule_files(env).values() for g in yaml.safe_load(text)["groups"]
    ]
    hand_written = [g.document() for p in hand_written_rule_files() for g in alerts.load_rule_file(p)]
    assert groups == from_files + hand_written
    assert {r.get("alert") for g in groups for r in g["rules"]} - {None} == {
        a.name for a in observability.all_alerts(env) if a.expr is not None
    }
    assert set(rule_sets(env)) == {
        Path(f).name.removesuffix(".rules.yml") for f in observability.rule_files(env)
    }


# --- dashboards ---------------------------------------------------------------------------------------------

EXPECTED_PANELS = {
    "hitl-overview": {
        "Requests per second per color",
        "5xx ratio per color",
        "Duration per color (p50, p95, p99)",
    },
    "hitl-slo": {"Error budget left (30 days)", "Burn rate (1 = spending exactly the budget)"},
    "hitl-deployments": {"Version per color", "Requests per second per color", "5xx ratio per color"},
    "postgres": {"Last backup, age", "Replication lag", "Connections used of max_connections"},
    "redis": {"Memory used of maxmemory", "Clients", "Last RDB save ok"},
    "kafka": {"Under-replicated partitions", "Offline partitions", "Consumer lag per group and topic"},
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its labels, strings, groupings or functions)."""
    text = re.sub(r'"[^"]*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b\d+[smhdwy]\b", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()[:1]
        word = match.group(0)
        if following == "(" or word in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def known_metrics(env: Environment) -> set[str]:
    """What the workload really exposes, what the rules record, and the exporters' metrics."""
    config = Config(
        service=env.service.name,
        environment=env.name,
        color="blue",
        version="1.0.0",
        database_url="postgresql://x@127.0.0.1/x",
        database_password=None,
        redis_url="redis://127.0.0.1/0",
        redis_password=None,
        fault_error_rate=0.0,
        fault_latency_ms=0,
        fault_crash=False,
        fault_never_ready=False,
    )
    exposed: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in Metrics(config).registry.collect():
        exposed |= {family.name + suffix for suffix in suffixes[family.type]}
    recorded = {
        r.record for g in observability.rule_groups(env) for r in g.rules if isinstance(r, alerts.Recording)
    }
    return exposed | recorded | set(dashboards.EXPORTER_METRICS) | set(dashboards.TOOLING_METRICS)


@pytest.mark.parametrize("name", ["staging", "production"])
def test_dashboards_have_the_expected_panels_and_read_metrics_that_exist(name: str) -> None:
    env = load_environment(name)
    boards = dashboards.dashboards(env)
    assert set(boards) == set(EXPECTED_PANELS)
    known = known_metrics(env)
    for key, text in boards.items():
        board = json.loads(text)
        titles = {p["title"] for p in board["panels"]}
        assert EXPECTED_PANELS[key] <= titles, key
        assert board["uid"] and "maximus" in board["tags"]
        exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
        exprs += [a["expr"] for a in board.get("annotations", {}).get("list", []) if a.get("expr")]
        for expr in exprs:
            unknown = metric_names(expr) - known
            assert not unknown, f"{key}: {expr} reads {unknown}"
    deploys = json.loads(boards["hitl-deployments"])["annotations"]["list"]
    assert {a["name"] for a in deploys} >= {"deploys", "rollbacks"}


def test_alert_rules_read_metrics_that_exist() -> None:
    known = known_metrics(LOCAL)
    for alert in observability.all_alerts(LOCAL):
        if alert.expr is not None:
            assert not metric_names(alert.expr) - known, alert.name


# --- in the real Prometheus and Alertmanager ----------------------------------------------------------------


@pytest.mark.localenv
def test_the_page_alert_fires_in_prometheus_and_reaches_the_receiver(local_env: Environment) -> None:
    import httpx

    prometheus = f"http://127.0.0.1:{local_env.local_ports.prometheus}"
    loaded = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {g["name"] for g in loaded} >= {g.name for g in observability.rule_groups(local_env)}
    failing = [
        (g["name"], r["name"], r.get("lastError")) for g in loaded for r in g["rules"] if r["health"] == "err"
    ]
    assert not failing, failing

    ok, detail, data = alert_demo.page_alert_fires(local_env, timeout_s=240)
    assert ok, detail
    assert data["seconds_to_page"] < 180
    (alert,) = data["received"]
    assert alert["receiver"] == "pagerduty"
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["service"] == "hitl"
    assert alert["annotations"]["runbook_url"] == "runbooks/alerts/AvailabilityBudgetBurn.md"
    # either page window may cross first: the 1h one is diluted by whatever good traffic earlier tests sent
    assert any(a.get("window") in ("1h", "6h") for a in data["firing_in_prometheus"])
    assert alert_demo.firing_in_prometheus(local_env, "Watchdog"), "the Watchdog always fires"
    assert alert_demo.received(local_env, "Watchdog") == [], "the Watchdog goes to the null receiver"
    state = envstate.read_state(local_env)
    assert state.deploy.get("state") != "in-progress"
    assert "green" not in state.colors or state.colors["green"]["faults"]["error_rate"] == 0
