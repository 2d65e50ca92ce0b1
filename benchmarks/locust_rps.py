"""Load generation and the workload's latency: what one Locust process sustains against a local environment.

1. Maximum throughput: one Locust process (FastHttpUser, the HITL mix of loadtests/locustfile.py) with
   users that do not pace themselves, through the edge; prints requests per second, failures and p95.
2. The workload's p95 at a fixed 200 requests per second (40 paced users; a decision task sends two
   requests, so the task rate is set to give 200 requests per second); the target is a p95 under 300 ms.

Both use `real` decisions on patches the benchmark adds first. Everything runs on this machine's
loopback, bounded in time. Usage: python benchmarks/locust_rps.py [--env local] [--seconds 30]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

from _common import ROOT  # noqa: F401 - puts the repository on sys.path

from opskit import load, localenv
from opskit.model import load_environment

TARGET_P95_MS = 300
FIXED_RPS = 200
FIXED_USERS = 40
# The locustfile's task weights (pending 4, decide 2, analytics 2, health 1); decide sends 2 requests.
REQUESTS_PER_TASK = (4 + 2 * 2 + 2 + 1) / 9


def measure(env_name: str, users: int, per_user_rps: float, seconds: int, reports: Path) -> load.LoadReport:
    env = load_environment(env_name).require_local()
    declared = load.EnvironmentLoad(decisions="real", profiles={})
    thresholds = load.load_profiles().environments["local"].profiles["smoke"].thresholds
    profile = load.Profile(
        users=users,
        spawn_rate=users,
        duration_s=seconds,
        per_user_rps=per_user_rps,
        thresholds=thresholds,
    )
    # A decision takes 1 of 9 task slots and each one decides one patch: enough for any rate below.
    load.seed_patches(env, int(users * per_user_rps * seconds / 4) + 100)
    report = load.LoadReport(env.name, f"benchmark-{users}u", load.target_url(env), "real", None, None, "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load.run_locust(declared, profile, report, report.target, reports)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"  (the Locust process used {cpu / report.seconds:.0%} of one core over {report.seconds:.0f} s)")
    return report


def show(label: str, report: load.LoadReport) -> None:
    p95 = ", ".join(f"{name} {s.p95_ms:g}" for name, s in sorted(report.endpoints.items()))
    print(
        f"{label:<34} {report.rps:8.1f} req/s   p95 {report.p95_ms:6.0f} ms   "
        f"failures {report.failures}/{report.requests}   p95 per endpoint (ms): {p95}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="local", help="a running single-machine environment (default local)")
    parser.add_argument("--seconds", type=int, default=30, help="length of each run (default 30)")
    parser.add_argument("--users", type=int, default=64, help="users of the unpaced run (default 64)")
    args = parser.parse_args()
    env = load_environment(args.env).require_local()
    if not localenv.running(env):
        raise SystemExit(f"{args.env} is not running: run `invoke local.up --env {args.env}` first")
    with tempfile.TemporaryDirectory(prefix="maximus-bench-") as tmp:
        unpaced = measure(args.env, args.users, 1000.0, args.seconds, Path(tmp))
        show(f"max, {args.users} unpaced users", unpaced)
        per_user = FIXED_RPS / REQUESTS_PER_TASK / FIXED_USERS
        fixed = measure(args.env, FIXED_USERS, per_user, args.seconds, Path(tmp))
        show(f"fixed {FIXED_RPS} req/s offered", fixed)
    verdict = "meets" if fixed.p95_ms < TARGET_P95_MS else "MISSES"
    print(f"p95 at {FIXED_RPS} req/s: {fixed.p95_ms:.0f} ms, {verdict} the {TARGET_P95_MS} ms target")


if __name__ == "__main__":
    main()
