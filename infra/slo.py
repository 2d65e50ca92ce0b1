"""SLO rules of a service, generated from the environment model's `service.slo`.

Two SLOs per service, each an error ratio over the service's own request metrics (health, readiness and
metrics routes left out: they are the platform's requests, not the users'):
  availability  requests answered 5xx / all requests; objective `slo.availability` (e.g. 0.999)
  latency       requests slower than `slo.latency_p95_ms` / all requests; objective 0.95 (a p95 target:
                95% of requests within the threshold), read from the duration histogram's `le` bucket

Recording rules give each ratio over every window the alerts use (`maximus:slo_errors:ratio_rate<w>`,
label `slo`), and the error budget left over the SLO window (`maximus:slo_error_budget_remaining:ratio`).
Multi-window, multi-burn-rate alerts (for a 30-day SLO window):
  page   (critical)  14.4x over 1h and 5m, 6x over 6h and 30m
  ticket (warning)    3x over 1d and 2h,  1x over 3d and 6h
For another SLO window every alert window scales with it (a 7-day SLO pages on 14.4x over 14m and 1m),
so each alert still means the same share of the budget spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.alerts import Alert, Group, Recording, RuleError, duration, expected, seconds
from opskit.model import Service

BASE_WINDOW_DAYS = 30
LATENCY_OBJECTIVE = 0.95
NOT_USER_ROUTES = "/(healthz|readyz|health|metrics)"
RATIO = "maximus:slo_errors:ratio_rate"
BUDGET = "maximus:slo_error_budget_remaining:ratio"
OBJECTIVE = "maximus:slo_objective:ratio"
BY = "service, environment"
# The services' request-duration histogram buckets (seconds); the latency threshold must be one of them.
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class BurnWindow:
    """Alert when the burn rate exceeds `factor` over both windows (seconds, for a 30-day SLO)."""

    long_s: int
    short_s: int
    factor: float
    severity: str
    for_: str


BURN_WINDOWS = (
    BurnWindow(3600, 300, 14.4, "critical", "1m"),
    BurnWindow(6 * 3600, 1800, 6.0, "critical", "5m"),
    BurnWindow(86400, 2 * 3600, 3.0, "warning", "15m"),
    BurnWindow(3 * 86400, 6 * 3600, 1.0, "warning", "30m"),
)
SLO_NAMES = {"availability": "AvailabilityBudgetBurn", "latency": "LatencyBudgetBurn"}


def scaled(seconds_30d: int, window_days: int) -> str:
    """A window for a 30-day SLO scaled to `window_days`, in whole minutes (at least one)."""
    minutes = max(1, round(seconds_30d * window_days / BASE_WINDOW_DAYS / 60))
    return duration(minutes * 60)


def objective(slo: str, service: Service) -> float:
    value = service.slo.availability if slo == "availability" else LATENCY_OBJECTIVE
    if not 0 < value < 1:
        raise RuleError(
            f"service {service.name}: slo {slo} objective {value!r} is outside (0, 1); accepted: like 0.999"
        )
    return value


def le_bucket(latency_ms: int) -> str:
    """The `le` label of the histogram bucket at the latency threshold, as the Python client writes it."""
    if latency_ms / 1000 not in LATENCY_BUCKETS_S:
        accepted = ", ".join(f"{round(b * 1000)}" for b in LATENCY_BUCKETS_S)
        raise RuleError(
            f"slo.latency_p95_ms: {latency_ms} is not a bucket boundary of the request-duration histogram; "
            f"accepted: {accepted}"
        )
    return repr(latency_ms / 1000)


def error_ratio(slo: str, service: Service, window: str) -> str:
    m = f"maximus_{service.name}_http_request"
    users = f'route!~"{NOT_USER_ROUTES}"'
    if slo == "availability":
        bad = f'sum by ({BY}) (rate({m}s_total{{{users}, status=~"5.."}}[{window}]))'
        total = f"sum by ({BY}) (rate({m}s_total{{{users}}}[{window}]))"
        return f"{bad}\n/\n{total}"
    le = le_bucket(service.slo.latency_p95_ms)
    fast = f'sum by ({BY}) (rate({m}_duration_seconds_bucket{{{users}, le="{le}"}}[{window}]))'
    total = f"sum by ({BY}) (rate({m}_duration_seconds_count{{{users}}}[{window}]))"
    return f"1 - (\n{fast}\n/\n{total}\n)"


def windows(service: Service) -> list[str]:
    days = service.slo.window_days
    found = {scaled(s, days) for w in BURN_WINDOWS for s in (w.long_s, w.short_s)}
    return sorted(found, key=lambda d: (seconds(d), d))


def _describe(slo: str, service: Service) -> str:
    if slo == "availability":
        return f"{objective(slo, service) * 100:g}% of requests answered without a 5xx"
    return f"{LATENCY_OBJECTIVE:.0%} of requests answered within {service.slo.latency_p95_ms} ms"


def _series(slo: str, service: Service, bad_per_minute: int, minutes: int) -> dict[str, str]:
    """promtool input series: 1000 user requests a minute, `bad_per_minute` of them bad."""
    m = f"maximus_{service.name}_http_request"
    base = f'service="{service.name}", environment="test", route="/hitl/patches/pending", method="GET"'
    good = 1000 - bad_per_minute
    health = f'service="{service.name}", environment="test", route="/healthz", method="GET"'
    if slo == "availability":
        return {
            f'{m}s_total{{{base}, status="200"}}': f"0+{good}x{minutes}",
            f'{m}s_total{{{base}, status="500"}}': f"0+{bad_per_minute}x{minutes}",
            f'{m}s_total{{{health}, status="200"}}': f"0+100000x{minutes}",  # probes never dilute the ratio
        }
    le = le_bucket(service.slo.latency_p95_ms)
    return {
        f'{m}_duration_seconds_bucket{{{base}, status="200", le="{le}"}}': f"0+{good}x{minutes}",
        f'{m}_duration_seconds_count{{{base}, status="200"}}': f"0+1000x{minutes}",
    }


def unit_tests(service: Service) -> list[dict[str, Any]]:
    """promtool cases for every burn-rate alert: a steep burn pages (both page windows, no ticket yet),
    a slow burn (5x the budget) only tickets, a healthy service (half the budget) is silent."""
    tests: list[dict[str, Any]] = []
    for slo in ("availability", "latency"):
        budget = 1 - objective(slo, service)
        alerts = burn_alerts(slo, service)
        labels = {"service": service.name, "environment": "test", "slo": slo}
        pages = [a for a in alerts if a.severity == "critical"]
        tickets = [a for a in alerts if a.severity == "warning"]
        steep = min(900, max(1, round(1000 * budget * 14.4 * 2)))
        slow = max(1, round(1000 * budget * 5))
        healthy = round(1000 * budget * 0.5)
        name = SLO_NAMES[slo]
        scenarios: tuple[tuple[str, int, str, list[Alert]], ...] = (
            (f"{name}: a steep burn pages", steep, "10m", pages),
            (f"{name}: a slow burn only tickets", slow, "3h", tickets),
            (f"{name}: a healthy service is silent", healthy, "3h", []),
        )
        for title, bad, at, firing in scenarios:
            tests.append(
                {
                    "name": title,
                    "interval": "1m",
                    "input_series": [
                        {"series": k, "values": v}
                        for k, v in _series(slo, service, bad, seconds(at) // 60 + 1).items()
                    ],
                    "alert_rule_test": [
                        {"eval_time": "0m", "alertname": name, "exp_alerts": []},
                        {
                            "eval_time": at,
                            "alertname": name,
                            "exp_alerts": [expected(a, {**labels, **a.labels}) for a in firing],
                        },
                    ],
                }
            )
    return tests


def burn_alerts(slo: str, service: Service) -> list[Alert]:
    budget = 1 - objective(slo, service)
    days = service.slo.window_days
    alerts = []
    for w in BURN_WINDOWS:
        long, short = scaled(w.long_s, days), scaled(w.short_s, days)
        threshold = round(w.factor * budget, 10)
        page = w.severity == "critical"
        spent = w.factor * w.long_s / (BASE_WINDOW_DAYS * 86400)
        expr = (
            f'{RATIO}{long}{{service="{service.name}", slo="{slo}"}} > {threshold:g}\n'
            f'and\n{RATIO}{short}{{service="{service.name}", slo="{slo}"}} > {threshold:g}'
        )
        alerts.append(
            Alert(
                name=SLO_NAMES[slo],
                expr=expr,
                for_=w.for_,
                severity=w.severity,
                labels={"window": long},
                summary=(
                    f"{{{{ $labels.service }}}} in {{{{ $labels.environment }}}} burns its {slo} error "
                    f"budget {w.factor:g}x too fast over {long} and {short}"
                ),
                description=(
                    f"The {slo} SLO ({_describe(slo, service)} over {days} days) allows an error ratio of "
                    f"{budget:g}; over both {long} and {short} it is above {threshold:g} ({w.factor:g}x). "
                    f"Kept up, this spends {spent:.0%} of the {days}-day budget in {long}"
                    + (": users are hurting now." if page else "; look at it today.")
                ),
            )
        )
    return alerts


def rule_groups(service: Service) -> list[Group]:
    """The service's SLO recording rules, error-budget recordings and burn-rate alerts."""
    days = service.slo.window_days
    recordings: list[Recording] = []
    for slo in ("availability", "latency"):
        for window in windows(service):
            recordings.append(Recording(f"{RATIO}{window}", error_ratio(slo, service, window), {"slo": slo}))
    budget_rules: list[Recording] = []
    for slo in ("availability", "latency"):
        goal = objective(slo, service)
        budget_rules.append(Recording(OBJECTIVE, f"vector({goal:g})", {"service": service.name, "slo": slo}))
        budget_rules.append(
            Recording(
                BUDGET,
                f"1 - (\n{error_ratio(slo, service, f'{days}d')}\n) / {round(1 - goal, 10):g}",
                {"slo": slo},
            )
        )
    alerts = [a for slo in ("availability", "latency") for a in burn_alerts(slo, service)]
    name = service.name
    return [
        Group(f"{name}.slo.ratios", recordings),
        Group(f"{name}.slo.budget", budget_rules, interval="1m"),
        Group(f"{name}.slo.alerts", alerts),
    ]
