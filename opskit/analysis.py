"""Release analysis: measure one color, judge each measurement, decide what the deploy does next.

Every measurement has one of four verdicts:

- ``pass``: measured, within the model's threshold;
- ``fail``: measured, beyond the threshold (the release is bad);
- ``no-data``: the metric source answered but had nothing to judge (no series, no requests: a ratio
  whose denominator is zero, a quantile of an empty histogram); inconclusive, the model's policy decides;
- ``error``: the source could not be asked (unreachable, timeout, an error answer, unreadable JSON).
  An error is never a pass and never a failed metric: nobody knows how the release behaves.

`evaluate` turns measurements into an outcome. Before the switch (phase ``pre``): ``promote`` only when
nothing failed, nothing errored and no-data is allowed by ``no_data_before_promotion``; anything else is
``abort``. After the switch (phase ``post``): ``rollback`` when more rounds than ``max_failures`` failed,
``hold`` (keep serving, alert, a person decides) on an error, or when the last round of the window still
has no data under the ``hold`` policy, otherwise ``continue`` while the window runs and ``pass`` at its
end. No measurement at all is never a pass in either phase.

Two sources of measurements: Prometheus (`PrometheusProvider`, the queries of `queries`) for the color
that serves traffic, and `smoke`, which sends real requests straight to a color's port, for the idle color
before it gets any traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import httpx

from opskit import localenv
from opskit.kube import KubeError
from opskit.model import Analysis, Color, Environment

Verdict = Literal["pass", "fail", "no-data", "error"]
Phase = Literal["pre", "post"]
Outcome = Literal["promote", "abort", "continue", "pass", "rollback", "hold"]

ERROR_RATIO = "error_ratio"
LATENCY_P95 = "latency_p95_ms"
SMOKE_ERROR_RATIO = "smoke_error_ratio"
SMOKE_LATENCY_P95 = "smoke_latency_p95_ms"

SCRAPE_INTERVAL_S = 5  # playbooks/templates/prometheus.yml.j2
MIN_RANGE_S = 4 * SCRAPE_INTERVAL_S  # rate() needs at least two samples; four leave room for a missed scrape
# Requests of the platform itself (health probes, scrapes), not of users: they would dilute a bad release.
PROBE_ROUTES = ("/healthz", "/readyz", "/metrics")
SMOKE_PATHS = ("/hitl/patches/pending", "/hitl/analytics/summary", "/version", "/healthz")
DEFAULT_TIMEOUT_S = 5.0
COLOR_HEADER = "X-App-Color"  # every answer of the workload names the color that gave it
REFUSED_BY_EDGE = (401, 403)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Measurement:
    """One measured value and its verdict; `round` groups the measurements taken at one interval."""

    name: str
    query: str
    verdict: Verdict
    value: float | None
    threshold: float
    detail: str
    at: str = field(default_factory=_now)
    round: int = 1

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        if self.value is not None and math.isinf(self.value):
            result["value"] = str(self.value)  # JSON has no infinity
        return result


# --- metric providers -------------------------------------------------------------------------------------


class ProviderError(Exception):
    """The metric source could not be asked or gave no usable answer; the message says why."""


class MetricProvider(Protocol):
    """Where measurements come from: an instant query answered by a list of sample values."""

    def query(self, promql: str) -> list[float]:
        """The values of an instant query, NaN dropped; [] when there is no data. ProviderError otherwise."""
        ...


def describe(provider: MetricProvider) -> str:
    """A provider's name for reports: its `describe()` when it has one, else its class name."""
    named = getattr(provider, "describe", None)
    return str(named()) if callable(named) else type(provider).__name__


class PrometheusProvider:
    """Prometheus' HTTP API (`GET /api/v1/query`), each query bounded by `timeout_s`.

    `client` reaches a Prometheus that is not on this machine (a cluster's, through the API server's
    service proxy); its base URL is Prometheus' root.
    """

    def __init__(
        self, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S, client: httpx.Client | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def describe(self) -> str:
        return f"Prometheus at {self.base_url}"

    def query(self, promql: str) -> list[float]:
        return _values(self.query_data(promql), self.describe())

    def query_data(self, promql: str) -> Any:
        """The `data` of an instant query's answer: {"resultType": ..., "result": [...]}."""
        params = {"query": promql, "timeout": f"{self.timeout_s:g}"}  # seconds
        try:
            response = self.client.get("api/v1/query", params=params, timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise ProviderError(f"{self.describe()}: no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.describe()} is unreachable ({_reason(exc)})") from None
        except KubeError as exc:  # the API server's credentials, on the way to a cluster's Prometheus
            raise ProviderError(f"{self.describe()}: {exc}") from None
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            raise ProviderError(
                f"{self.describe()}: HTTP {response.status_code}, query error {body.get('errorType', '?')}: "
                f"{body.get('error', 'no reason given')}"
            )
        if response.status_code != 200:
            raise ProviderError(f"{self.describe()}: HTTP {response.status_code} ({_snippet(response.text)})")
        if not isinstance(body, dict) or body.get("status") != "success":
            raise ProviderError(f"{self.describe()}: not a Prometheus answer ({_snippet(response.text)})")
        return body.get("data")


def _values(data: Any, source: str) -> list[float]:
    if not isinstance(data, dict):
        raise ProviderError(f"{source}: the answer has no data")
    kind = data.get("resultType")
    result: Any = data.get("result")
    try:
        if kind == "scalar":
            raw = [result[1]]
        elif kind == "vector":
            raw = [sample["value"][1] for sample in result]
        else:
            raise ProviderError(f"{source}: expected a vector or scalar, got {kind!r}")
        values = [float(v) for v in raw]
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise ProviderError(f"{source}: unreadable sample values ({_reason(exc)})") from None
    return [v for v in values if not math.isnan(v)]


def _snippet(text: str) -> str:
    return repr(" ".join(text.split())[:160])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def provider_for(env: Environment, timeout_s: float = DEFAULT_TIMEOUT_S) -> PrometheusProvider:
    """The Prometheus of a single-machine environment."""
    return PrometheusProvider(localenv.endpoints(env)["prometheus"], timeout_s)


# --- the queries ------------------------------------------------------------------------------------------


def _label(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def range_s(policy: Analysis) -> int:
    """The rate() range: one interval, but never fewer than four scrapes."""
    return max(MIN_RANGE_S, math.ceil(policy.interval_s))


def queries(env: Environment, color: Color) -> dict[str, tuple[str, float]]:
    """Measurement name -> (PromQL, threshold) for one color of an environment.

    The series carry `color` from the scrape target and `service`/`environment` from both the target and
    the workload. Probe and scrape routes are left out: only the requests of users judge a release.
    """
    policy = env.deploy.analysis
    prefix = f"maximus_{env.service.name}_http_"
    probes = "|".join(PROBE_ROUTES)
    selector = f"environment={_label(env.name)},color={_label(color)},route!~{_label(probes)}"
    window = f"[{range_s(policy)}s]"
    errors = f'sum(rate({prefix}requests_total{{{selector},status=~"5.."}}{window}))'
    everything = f"sum(rate({prefix}requests_total{{{selector}}}{window}))"
    buckets = f"sum by (le) (rate({prefix}request_duration_seconds_bucket{{{selector}}}{window}))"
    return {
        # No 5xx series yet means no 5xx: `or vector(0)`. No requests at all: 0/0 = NaN or no series: no-data.
        ERROR_RATIO: (f"({errors} or vector(0)) / {everything}", policy.error_ratio_max),
        LATENCY_P95: (f"histogram_quantile(0.95, {buckets}) * 1000", float(policy.latency_p95_ms_max)),
    }


def judge(name: str, query: str, values: Sequence[float], threshold: float, round_: int = 1) -> Measurement:
    """The verdict of the values a query returned (the worst one counts)."""
    if not values:
        return Measurement(
            name, query, "no-data", None, threshold, "no samples (no series, or no requests)", round=round_
        )
    value = max(values)
    if value > threshold:
        return Measurement(name, query, "fail", value, threshold, f"{value:g} > {threshold:g}", round=round_)
    return Measurement(name, query, "pass", value, threshold, f"{value:g} <= {threshold:g}", round=round_)


def measure(provider: MetricProvider, env: Environment, color: Color, round_: int = 1) -> list[Measurement]:
    """Take every measurement of one color once."""
    result = []
    for name, (promql, threshold) in queries(env, color).items():
        try:
            values = provider.query(promql)
        except ProviderError as exc:
            result.append(Measurement(name, promql, "error", None, threshold, str(exc), round=round_))
            continue
        result.append(judge(name, promql, values, threshold, round_))
    return result


# --- smoke: real requests straight to a color --------------------------------------------------------------


def smoke(
    base_url: str,
    requests: int = 20,
    *,
    policy: Analysis | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    paths: Sequence[str] = SMOKE_PATHS,
    client: httpx.Client | None = None,
    expect: tuple[str, str] | None = None,
) -> list[Measurement]:
    """Send `requests` GETs to a color directly; its error ratio (5xx or no answer) and p95 latency.

    Needs no Prometheus. A color that answers none of them is an error (it cannot be measured), not a fail.
    `client` reaches a color that is not on this machine (through its cluster's gateway). Answers that
    did not come from the release are not measurements: a 401 or 403 (the gateway refused the request),
    or a non-5xx answer without the `expect`ed header (another color answered).
    """
    if requests < 1:
        raise ValueError("requests: accepted: 1 or more")
    policy = policy or Analysis()
    base_url = base_url.rstrip("/")
    described = f"smoke: {requests} GET to {base_url} ({', '.join(paths)})"
    latencies: list[float] = []
    failed = 0
    transport: list[str] = []
    unmeasured: list[str] = []
    with client or httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        for i in range(requests):
            started = time.perf_counter()
            try:
                response = http.get(paths[i % len(paths)].lstrip("/"))
            except httpx.HTTPError as exc:
                failed += 1
                transport.append(_reason(exc))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code in REFUSED_BY_EDGE:
                unmeasured.append(f"HTTP {response.status_code}: the gateway refused the request")
                continue
            if expect and response.status_code < 500 and response.headers.get(expect[0]) != expect[1]:
                answered = response.headers.get(expect[0])
                unmeasured.append(f"answered with {expect[0]}: {answered}, not {expect[1]}")
                continue
            latencies.append(elapsed)
            if response.status_code >= 500:
                failed += 1
    ratio_t, latency_t = policy.error_ratio_max, float(policy.latency_p95_ms_max)
    if unmeasured:  # misrouted or refused: what answered is not the release, so nothing is known of it
        detail = f"{len(unmeasured)} of {requests} answers did not come from the release ({unmeasured[0]})"
        return not_measured(described, detail, policy)
    if not latencies:
        return not_measured(
            described, f"{base_url} answered none of {requests} requests ({transport[0]})", policy
        )
    ratio = failed / requests
    p95 = round(_nearest_rank(latencies, 0.95), 2)
    note = f"; {len(transport)} without an answer ({transport[0]})" if transport else ""
    ratio_m = judge(SMOKE_ERROR_RATIO, described, [ratio], ratio_t)
    latency_m = judge(SMOKE_LATENCY_P95, described, [p95], latency_t)
    return [
        replace(ratio_m, detail=f"{failed}/{requests} failed; {ratio_m.detail}{note}"),
        replace(latency_m, detail=f"{len(latencies)} answers; {latency_m.detail}"),
    ]


def not_measured(described: str, detail: str, policy: Analysis) -> list[Measurement]:
    """A smoke that could not measure: an error for each measurement, never a pass or a fail."""
    return [
        Measurement(SMOKE_ERROR_RATIO, described, "error", None, policy.error_ratio_max, detail),
        Measurement(SMOKE_LATENCY_P95, described, "error", None, float(policy.latency_p95_ms_max), detail),
    ]


def _nearest_rank(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- the decision ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    outcome: Outcome
    reason: str
    failed_rounds: int
    counts: dict[str, int]


def evaluate(
    measurements: Sequence[Measurement],
    policy: Analysis,
    phase: Phase,
    *,
    complete: bool = True,
    env_name: str = "<env>",
) -> Evaluation:
    """The outcome of the measurements taken so far and what to do next.

    `complete` (phase post): the window is over; a clean run is then `pass`, before that `continue`.
    A round fails when one of its measurements fails, or is no-data under a `fail` policy. After the switch,
    no-data under the `hold` policy is inconclusive while the window runs (the metrics of a color that just
    got its traffic lag by a scrape or two) and holds when the last round still has no data.
    """
    counts = {v: sum(1 for m in measurements if m.verdict == v) for v in ("pass", "fail", "no-data", "error")}
    no_data_policy = policy.no_data_before_promotion if phase == "pre" else policy.no_data_after_promotion
    failing: set[Verdict] = {"fail", "no-data"} if no_data_policy == "fail" else {"fail"}
    failed_rounds = len({m.round for m in measurements if m.verdict in failing})
    errors = [m for m in measurements if m.verdict == "error"]
    no_data = [m for m in measurements if m.verdict == "no-data"]
    failures = [m for m in measurements if m.verdict in failing]

    def done(outcome: Outcome, reason: str) -> Evaluation:
        return Evaluation(outcome, reason, failed_rounds, counts)

    if phase == "pre":
        retry = "nothing was switched; traffic stays where it was. Fix the cause, then deploy again"
        if not measurements:
            return done("abort", f"no measurement was taken; {retry}")
        if errors:
            return done("abort", f"could not measure: {_first(errors)}; {retry}")
        if failures:
            return done("abort", f"the new release is not healthy: {_first(failures)}; {retry}")
        allowed = f" ({len(no_data)} no-data allowed by no_data_before_promotion=pass)" if no_data else ""
        return done("promote", f"every measurement passed{allowed}; switch traffic to the new color")

    rollback = f"`invoke rollback --env {env_name}` puts the previous release back"
    if not measurements:
        return done(
            "hold",
            "no measurement was taken; traffic stays on the new color. Check the metric source; "
            f"if the release misbehaves, {rollback}",
        )
    if failed_rounds > policy.max_failures:
        return done(
            "rollback",
            f"{failed_rounds} failed rounds exceed max_failures={policy.max_failures} "
            f"(latest: {_first(failures[::-1])}); roll back to the previous release",
        )
    if errors:
        return done(
            "hold",
            f"cannot measure: {_first(errors)}. Holding: traffic stays on the new color and nothing is "
            f"rolled back automatically. Restore the metric source and check the release by hand; "
            f"if it misbehaves, {rollback}",
        )
    latest = max(m.round for m in measurements)
    still_no_data = [m for m in no_data if m.round == latest]
    if not complete:
        waiting = f"; {len(no_data)} no-data so far, judged at the end" if no_data else ""
        return done(
            "continue",
            f"{failed_rounds} failed rounds so far (max_failures={policy.max_failures}){waiting}",
        )
    if still_no_data and no_data_policy == "hold":
        return done(
            "hold",
            f"no data at the end of the window: {_first(still_no_data)}. Holding: traffic stays on the new "
            f"color. Check that it receives traffic and that Prometheus scrapes it; if it misbehaves, "
            f"{rollback}",
        )
    return done(
        "pass",
        f"the analysis window passed ({failed_rounds} failed rounds, max_failures={policy.max_failures}); "
        "the release stays",
    )


def _first(measurements: Sequence[Measurement]) -> str:
    m = measurements[0]
    return f"{m.name} {m.verdict} ({m.detail})"


# --- a whole analysis ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisReport:
    environment: str
    color: str
    phase: Phase
    source: str
    outcome: Outcome
    reason: str
    rounds: int
    failed_rounds: int
    seconds: float
    policy: dict[str, Any]
    measurements: list[Measurement]

    @property
    def ok(self) -> bool:
        return self.outcome in ("promote", "pass")

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "color": self.color,
            "phase": self.phase,
            "source": self.source,
            "outcome": self.outcome,
            "ok": self.ok,
            "reason": self.reason,
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "seconds": self.seconds,
            "policy": self.policy,
            "measurements": [m.as_dict() for m in self.measurements],
        }


def run_analysis(
    provider: MetricProvider,
    env: Environment,
    color: Color,
    phase: Phase,
    *,
    on_measure: Callable[[Measurement], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> AnalysisReport:
    """Measure `color` through `provider` and decide.

    Phase pre: one round at once. Phase post: a round every `interval_s` (the first one interval after
    the start, so the switched traffic shows in the metrics) until `window_s` has passed; stops early on
    rollback or hold (an error holds at once; no-data is judged by the last round).
    """
    policy = env.deploy.analysis
    started = clock()
    rounds = 1 if phase == "pre" else max(1, math.floor(policy.window_s / policy.interval_s + 1e-9))
    taken: list[Measurement] = []
    evaluation = evaluate(taken, policy, phase, complete=False, env_name=env.name)
    for number in range(1, rounds + 1):
        if phase == "post":
            sleep(max(0.0, started + number * policy.interval_s - clock()))
        for measurement in measure(provider, env, color, number):
            taken.append(measurement)
            if on_measure is not None:
                on_measure(measurement)
        evaluation = evaluate(taken, policy, phase, complete=number == rounds, env_name=env.name)
        if evaluation.outcome in ("rollback", "hold"):
            break
    return _report(
        env,
        color,
        phase,
        source=describe(provider),
        evaluation=evaluation,
        taken=taken,
        seconds=clock() - started,
    )


def run_smoke(
    env: Environment,
    color: Color,
    requests: int = 20,
    *,
    on_measure: Callable[[Measurement], None] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> AnalysisReport:
    """The pre-promotion analysis of a single-machine environment's idle color: smoke its port, decide."""
    started = time.monotonic()
    url = localenv.endpoints(env)[localenv.program_name(env, color)]
    taken = smoke(
        url, requests, policy=env.deploy.analysis, timeout_s=timeout_s, expect=(COLOR_HEADER, color)
    )
    if on_measure is not None:
        for measurement in taken:
            on_measure(measurement)
    return smoke_report(env, color, f"smoke to {url}", taken, time.monotonic() - started)


def smoke_report(
    env: Environment, color: Color, source: str, taken: list[Measurement], seconds: float
) -> AnalysisReport:
    """The pre-promotion verdict on a smoke's measurements."""
    evaluation = evaluate(taken, env.deploy.analysis, "pre", env_name=env.name)
    return _report(env, color, "pre", source=source, evaluation=evaluation, taken=taken, seconds=seconds)


def _report(
    env: Environment,
    color: Color,
    phase: Phase,
    *,
    source: str,
    evaluation: Evaluation,
    taken: list[Measurement],
    seconds: float,
) -> AnalysisReport:
    return AnalysisReport(
        environment=env.name,
        color=color,
        phase=phase,
        source=source,
        outcome=evaluation.outcome,
        reason=evaluation.reason,
        rounds=len({m.round for m in taken}),
        failed_rounds=evaluation.failed_rounds,
        seconds=round(seconds, 3),
        policy=env.deploy.analysis.model_dump(),
        measurements=taken,
    )
