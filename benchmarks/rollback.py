"""`invoke rollback` latency, and failed requests while traffic is switched under load.

Rollback latency: from starting `invoke rollback` (a new process, its start-up included) until every answer
of a prober that sends one request through the edge every 10 ms comes from the previous release. Target:
a median of 1 s or less. Baseline, measured in the same run: the cold path, where the previous color was
stopped first, so the rollback has to start it again before it can switch.

Failed requests during cutover: a steady 200 requests/s through the edge while the colors are switched
`--switches` times; target 0.

The environment must be running and have a previous release to go back to (a deploy done before); it
ends on the color it started on. Usage: python benchmarks/rollback.py [--env local] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
from _common import ROOT, summary

from opskit import envstate, health, localenv
from opskit.errors import OpsError
from opskit.model import Environment, load_environment
from opskit.traffic import SteadyLoad

INVOKE = os.path.join(os.path.dirname(sys.executable), "invoke")
PROBE_INTERVAL_S = 0.01
SETTLE_S = 1.0  # keep probing this long after the command returned: a flip back would show


@dataclass
class Prober:
    """One request through the edge every 10 ms, each on a new connection; (sent, answered, version)."""

    url: str
    answers: list[tuple[float, float, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=2.0, headers={"Connection": "close"}) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    version = client.get(self.url + "/version").headers.get("X-App-Version")
                except httpx.HTTPError:
                    version = None
                self.answers.append((sent, time.monotonic(), version))
                self.stop.wait(max(0.0, PROBE_INTERVAL_S - (time.monotonic() - sent)))


def current(env: Environment) -> tuple[str, str]:
    state = envstate.read_state(env)
    return state.active, str(state.colors[state.active]["version"])


def timed_rollback(env: Environment) -> tuple[float, str]:
    """Seconds from starting `invoke rollback` until the prober sees only the previous release; the path
    the rollback took (switch or redeploy)."""
    state = envstate.read_state(env)
    assert state.previous is not None
    target = str(state.previous["version"])
    prober = Prober(localenv.endpoints(env)["edge"])
    thread = threading.Thread(target=prober.run, daemon=True)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    run = subprocess.run(
        [INVOKE, "rollback", "--env", env.name, "--reason", "benchmark", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    time.sleep(SETTLE_S)
    prober.stop.set()
    thread.join()
    if run.returncode != 0:
        raise SystemExit(f"invoke rollback failed ({run.returncode}): {run.stderr.strip()}")
    after = [a for a in prober.answers if a[0] >= started]
    last_other = max((n for n, (_, _, version) in enumerate(after) if version != target), default=-1)
    final = after[last_other + 1 :]
    if not final:
        raise SystemExit(f"the edge never served {target} only after the rollback")
    # the first answer of the unbroken run of the previous release that lasts until the end
    return final[0][1] - started, str(json.loads(run.stdout)["path"])


def make_cold(env: Environment) -> None:
    """Stop the previous color, and wait until HAProxy's health check sees it down."""
    state = envstate.read_state(env)
    assert state.previous is not None
    color = state.previous["color"]
    localenv.supervisorctl(env, "stop", localenv.program_name(env, color))
    router = localenv.router(env)
    deadline = time.monotonic() + 30
    while router.server_up(color):
        if time.monotonic() > deadline:
            raise SystemExit(f"HAProxy still sees {color} up 30 s after it was stopped")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", default="local", help="a running single-machine environment (default local)")
    parser.add_argument("--runs", type=int, default=5, help="rollbacks per case (default 5)")
    parser.add_argument("--switches", type=int, default=10, help="switches under load (default 10)")
    parser.add_argument(
        "--rps", type=float, default=200, help="steady load during the switches (default 200)"
    )
    args = parser.parse_args()
    try:
        env = load_environment(args.env).require_local()
    except OpsError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not localenv.running(env):
        raise SystemExit(f"{args.env} is not running: run `invoke local.up --env {args.env}` first")
    if not health.check_environment(env).healthy:
        raise SystemExit(f"{args.env} is not healthy to begin with: run `invoke health --env {args.env}`")
    state = envstate.read_state(env)
    if state.previous is None:
        raise SystemExit(
            f"{args.env} has no previous release to roll back to: "
            f"run `invoke deploy --env {args.env} --version V` first"
        )
    if state.deploy.get("state") in ("in-progress", "held"):
        raise SystemExit(f"a deploy of {args.env} is {state.deploy['state']}: resume or abort it first")
    start_color, start_version = current(env)
    print(f"{args.env}: {start_color} serves {start_version}; previous {state.previous['version']}")

    warm: list[float] = []
    for _ in range(args.runs + 1):  # one more: when the window of the previous color ran out, it redeploys
        seconds, path = timed_rollback(env)
        if path == "switch":
            warm.append(seconds)
        if len(warm) == args.runs:
            break
    cold: list[float] = []
    for _ in range(args.runs):
        make_cold(env)
        seconds, path = timed_rollback(env)
        if path != "redeploy":
            raise SystemExit(f"a rollback to a stopped color took the {path} path: unexpected")
        cold.append(seconds)
    print(summary("rollback, previous color warm (one switch)", warm))
    print(summary("baseline: previous color cold (redeploy)", cold))

    edge = localenv.endpoints(env)["edge"]
    with SteadyLoad(edge, rps=args.rps) as load:
        time.sleep(1.0)
        for _ in range(args.switches):
            run = subprocess.run(
                [INVOKE, "rollback", "--env", env.name, "--reason", "benchmark: cutover under load"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                raise SystemExit(f"invoke rollback failed ({run.returncode}): {run.stderr.strip()}")
            time.sleep(0.5)
    report = load.report
    label = f"failed requests during {args.switches} switches"
    rate = report.as_dict()["requests_per_second"]
    print(
        f"{label:<44} {report.failed} failed of {report.total} "
        f"({rate} requests/s; versions {dict(report.versions)})"
    )
    if current(env)[0] != start_color:
        subprocess.run(
            [INVOKE, "rollback", "--env", env.name, "--reason", "benchmark: back"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    color, version = current(env)
    print(f"{args.env}: {color} serves {version} again")


if __name__ == "__main__":
    main()
