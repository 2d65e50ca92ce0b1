"""Release analysis against the real Prometheus of a running environment, and the decision table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from opskit import analysis, localenv
from opskit.analysis import Measurement, PrometheusProvider, ProviderError
from opskit.model import Analysis, Color, Environment

ROOT = Path(__file__).resolve().parent.parent
FAST = {"interval_s": 2, "window_s": 6, "max_failures": 1}
DATA_DEADLINE_S = 45.0


def fast(env: Environment, **changes: Any) -> Environment:
    """The environment with a short analysis window (three rounds of 2 s)."""
    policy = env.deploy.analysis.model_copy(update={**FAST, **changes})
    return env.model_copy(update={"deploy": env.deploy.model_copy(update={"analysis": policy})})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def provider(local_env: Environment) -> PrometheusProvider:
    return analysis.provider_for(local_env, timeout_s=3.0)


@contextmanager
def traffic(base_url: str) -> Iterator[None]:
    """Real user requests to one color, a few dozen a second, until the block ends."""
    stop = threading.Event()

    def drive() -> None:
        with httpx.Client(base_url=base_url, timeout=5.0) as client:
            while not stop.is_set():
                for path in ("/hitl/patches/pending", "/hitl/analytics/summary", "/version"):
                    try:
                        client.get(path)
                    except httpx.HTTPError:
                        time.sleep(0.1)
                stop.wait(0.02)

    worker = threading.Thread(target=drive, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(timeout=10)


def wait_for_data(provider: PrometheusProvider, env: Environment, color: Color) -> list[Measurement]:
    """Poll until Prometheus has a rate for every measurement of `color` (two scrapes with traffic)."""
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        taken = analysis.measure(provider, env, color)
        if all(m.verdict in ("pass", "fail") for m in taken) or time.monotonic() > deadline:
            return taken
        time.sleep(1)


def wait_for_prometheus(provider: PrometheusProvider) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            provider.query("vector(1)")
            return
        except ProviderError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def m(name: str, verdict: analysis.Verdict, round_: int = 1) -> Measurement:
    value = {"pass": 0.0, "fail": 1.0}.get(verdict)
    return Measurement(name, "q", verdict, value, 0.05, verdict, round=round_)


# --- the decision table (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "policy", "outcome"),
    [
        (["pass", "pass"], {}, "promote"),
        (["pass", "fail"], {}, "abort"),
        (["pass", "error"], {}, "abort"),
        (["pass", "no-data"], {}, "abort"),
        (["pass", "no-data"], {"no_data_before_promotion": "pass"}, "promote"),
        (["no-data", "error"], {"no_data_before_promotion": "pass"}, "abort"),
        ([], {}, "abort"),
    ],
)
def test_before_promotion(verdicts: list[analysis.Verdict], policy: dict[str, Any], outcome: str) -> None:
    result = analysis.evaluate([m(f"m{i}", v) for i, v in enumerate(verdicts)], Analysis(**policy), "pre")
    assert result.outcome == outcome, result.reason
    assert result.reason


@pytest.mark.parametrize(
    ("rounds", "policy", "complete", "outcome"),
    [
        ([["pass", "pass"]], {}, True, "pass"),
        ([["pass", "pass"]], {}, False, "continue"),
        ([["fail", "pass"]], {"max_failures": 1}, True, "pass"),
        ([["fail", "fail"]], {"max_failures": 1}, False, "continue"),  # one bad round, both metrics
        ([["fail", "pass"], ["pass", "fail"]], {"max_failures": 1}, False, "rollback"),
        ([["fail", "pass"]], {"max_failures": 0}, False, "rollback"),
        ([["pass", "error"]], {}, False, "hold"),
        ([["fail", "pass"], ["fail", "error"]], {"max_failures": 1}, False, "rollback"),
        ([["no-data", "no-data"]], {}, False, "continue"),
        ([["no-data", "no-data"]], {}, True, "hold"),
        ([["no-data", "pass"], ["pass", "pass"]], {}, True, "pass"),  # data arrived after the switch
        ([["pass", "pass"], ["no-data", "pass"]], {}, True, "hold"),
        ([["no-data", "pass"], ["no-data", "pass"]], {"no_data_after_promotion": "fail"}, False, "rollback"),
        ([["no-data", "no-data"]], {"no_data_after_promotion": "pass"}, True, "pass"),
        ([], {}, True, "hold"),
    ],
)
def test_after_promotion(
    rounds: list[list[analysis.Verdict]], policy: dict[str, Any], complete: bool, outcome: str
) -> None:
    taken = [m(f"m{i}", v, n) for n, verdicts in enumerate(rounds, 1) for i, v in enumerate(verdicts)]
    result = analysis.evaluate(taken, Analysis(**policy), "post", complete=complete, env_name="prod")
    assert result.outcome == outcome, result.reason
    if outcome == "hold":
        assert "invoke rollback --env prod" in result.reason


@pytest.mark.parametrize("phase", ["pre", "post"])
@pytest.mark.parametrize(
    "policy",
    [
        Analysis(),
        Analysis(no_data_before_promotion="pass", no_data_after_promotion="pass", max_failures=100),
    ],
)
def test_all_errored_or_nothing_measured_is_never_a_pass(phase: analysis.Phase, policy: Analysis) -> None:
    for taken in ([], [m("a", "error"), m("b", "error")], [m("a", "error", 1), m("a", "error", 2)]):
        for complete in (True, False):
            result = analysis.evaluate(taken, policy, phase, complete=complete)
            assert result.outcome in ("abort", "hold"), (taken, result)


def test_measurement_json_has_no_bare_infinity() -> None:
    taken = Measurement("latency_p95_ms", "q", "fail", float("inf"), 300, "inf > 300")
    assert json.loads(json.dumps(taken.as_dict()))["value"] == "inf"


# --- the provider against real endpoints --------------------------------------------------------------------


def test_provider_reports_why_it_cannot_measure(local_env: Environment, provider: PrometheusProvider) -> None:
    assert provider.query("vector(1)") == [1.0]
    assert provider.query("vector(0) / 0") == []  # NaN is no data
    with pytest.raises(ProviderError, match="bad_data"):
        provider.query("sum(rate(")
    blue = localenv.endpoints(local_env)["workload-blue"]  # answers HTTP, but is no Prometheus
    with pytest.raises(ProviderError, match="HTTP 404"):
        PrometheusProvider(blue, 2.0).query("vector(1)")
    with socket.socket() as hung:  # accepts connections, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with pytest.raises(ProviderError, match=r"no answer within 0\.5 s"):
            PrometheusProvider(url, 0.5).query("vector(1)")
    with pytest.raises(ProviderError, match="unreachable"):
        PrometheusProvider(f"http://127.0.0.1:{free_port()}", 2.0).query("vector(1)")


# --- real measurements --------------------------------------------------------------------------------------


def test_a_color_without_series_is_no_data(local_env: Environment, provider: PrometheusProvider) -> None:
    env = fast(local_env)
    green = localenv.process_status(env).get("workload-green", {})
    assert green.get("state") != "RUNNING"  # nothing runs or is scraped in green
    taken = analysis.measure(provider, env, "green")
    assert [t.verdict for t in taken] == ["no-data", "no-data"]
    assert analysis.evaluate(taken, env.deploy.analysis, "pre").outcome == "abort"
    assert analysis.evaluate(taken, env.deploy.analysis, "post").outcome == "hold"
    report = analysis.run_analysis(provider, env, "green", "post")
    assert report.outcome == "hold", report.reason
    assert report.rounds == 3  # no-data is judged at the end of the window, not on the first round
    assert "no data" in report.reason


def test_post_analysis_takes_a_round_every_interval_over_the_window(
    local_env: Environment, provider: PrometheusProvider
) -> None:
    env = fast(local_env, window_s=20, interval_s=2.5)  # eight rounds, on a clock the test drives
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds + 0.5  # every round also takes half a second of measuring

    report = analysis.run_analysis(provider, env, "green", "post", sleep=sleep, clock=lambda: now[0])
    assert report.rounds == 8 and report.outcome == "hold"  # green has no data: held at the end
    assert slept == [2.5] + [2.0] * 7  # the schedule keeps the interval, measuring time included
    assert [t.round for t in report.measurements] == [n for n in range(1, 9) for _ in range(2)]


def test_healthy_blue_with_traffic_passes(local_env: Environment, provider: PrometheusProvider) -> None:
    env = fast(local_env)
    seen: list[Measurement] = []
    with traffic(localenv.endpoints(env)["workload-blue"]):
        first = wait_for_data(provider, env, "blue")
        assert [t.verdict for t in first] == ["pass", "pass"], first
        pre = analysis.run_analysis(provider, env, "blue", "pre")
        post = analysis.run_analysis(provider, env, "blue", "post", on_measure=seen.append)
    assert pre.outcome == "promote", pre.reason
    assert post.outcome == "pass", post.reason
    assert post.rounds == 3 and post.failed_rounds == 0
    assert 5.5 <= post.seconds < 20
    document = json.loads(json.dumps(post.as_dict()))
    assert document["ok"] is True
    assert [t["name"] for t in document["measurements"]] == ["error_ratio", "latency_p95_ms"] * 3
    for measurement in document["measurements"]:
        assert 'color="blue"' in measurement["query"]
        assert measurement["value"] is not None and measurement["verdict"] == "pass"
    assert seen == post.measurements
    error_ratio, latency = post.measurements[-2:]
    assert error_ratio.value == 0.0
    assert latency.value is not None and 0 < latency.value <= env.deploy.analysis.latency_p95_ms_max


def test_smoke_measures_a_color_directly(local_env: Environment) -> None:
    healthy = analysis.run_smoke(local_env, "blue", requests=12)
    assert healthy.outcome == "promote", healthy.reason
    assert [t.verdict for t in healthy.measurements] == ["pass", "pass"]
    dead = analysis.smoke(f"http://127.0.0.1:{free_port()}", requests=3, timeout_s=1.0)
    assert [t.verdict for t in dead] == ["error", "error"]
    assert "answered none of 3 requests" in dead[0].detail
    decision = analysis.evaluate(dead, Analysis(no_data_before_promotion="pass"), "pre")
    assert decision.outcome == "abort"
    assert analysis.run_smoke(local_env, "green", requests=3).outcome == "abort"  # green is not running


def test_stopped_prometheus_is_an_error_never_a_pass(
    local_env: Environment, provider: PrometheusProvider
) -> None:
    env = fast(local_env)
    localenv.supervisorctl(env, "stop", "prometheus")
    try:
        taken = analysis.measure(provider, env, "blue")
        assert [t.verdict for t in taken] == ["error", "error"]
        assert all("unreachable" in t.detail and t.value is None for t in taken)
        pre = analysis.run_analysis(provider, env, "blue", "pre")
        post = analysis.run_analysis(provider, env, "blue", "post")
    finally:
        localenv.supervisorctl(env, "start", "prometheus")
        wait_for_prometheus(provider)
    assert pre.outcome == "abort" and "could not measure" in pre.reason
    assert post.outcome == "hold", post.reason
    assert post.rounds == 1  # stopped at the first round
    assert f"invoke rollback --env {env.name}" in post.reason
    assert not post.ok and not pre.ok


@contextmanager
def failing_green(env: Environment) -> Iterator[str]:
    """A real workload in green answering 500 to half of its /hitl requests, scraped by Prometheus."""
    secrets = localenv.secrets_dir(env)
    port = env.local_ports.green
    environ = {
        **os.environ,
        "MAXIMUS_SERVICE": env.service.name,
        "MAXIMUS_ENVIRONMENT": env.name,
        "MAXIMUS_COLOR": "green",
        "MAXIMUS_VERSION": "9.9.9-faulty",
        "MAXIMUS_DATABASE_URL": localenv.database_url(env),
        "MAXIMUS_DATABASE_PASSWORD_FILE": str(secrets / localenv.database_password_secret(env)),
        "MAXIMUS_REDIS_URL": localenv.endpoints(env)["redis"],
        "MAXIMUS_REDIS_PASSWORD_FILE": str(secrets / localenv.REDIS_PASSWORD),
        "MAXIMUS_FAULT_ERROR_RATE": "0.5",
    }
    targets = localenv.etc_dir(env) / "targets" / "workload.json"
    original = targets.read_bytes()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workload", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the faulty workload exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the faulty workload did not start"
            time.sleep(0.2)
        entries = json.loads(original)
        labels = {"color": "green", "service": env.service.name, "environment": env.name}
        entries.append({"labels": labels, "targets": [f"127.0.0.1:{port}"]})
        write_like(targets, json.dumps(entries, indent=4).encode())
        yield url
    finally:
        write_like(targets, original)
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_like(path: Path, content: bytes) -> None:
    """Replace a file atomically, keeping its owner and mode (Prometheus reads it as another user)."""
    stat = path.stat()
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    os.chown(temporary, stat.st_uid, stat.st_gid)
    temporary.chmod(stat.st_mode & 0o777)
    temporary.replace(path)


def test_a_failing_color_fails_and_rolls_back(local_env: Environment, provider: PrometheusProvider) -> None:
    env = fast(local_env, window_s=10)
    with failing_green(env) as green:
        smoked = analysis.smoke(green, requests=40, policy=env.deploy.analysis)
        assert smoked[0].verdict == "fail", smoked[0]
        assert analysis.evaluate(smoked, env.deploy.analysis, "pre").outcome == "abort"
        with traffic(green):
            first = wait_for_data(provider, env, "green")
            assert first[0].verdict == "fail", first
            report = analysis.run_analysis(provider, env, "green", "post")
    assert report.outcome == "rollback", report.reason
    assert report.failed_rounds == 2 and report.rounds == 2  # max_failures=1: stopped at the second
    ratios = [t for t in report.measurements if t.name == "error_ratio"]
    assert all(t.verdict == "fail" and t.value is not None and t.value > 0.05 for t in ratios)
    assert "max_failures=1" in report.reason
