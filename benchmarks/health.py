"""`invoke health` wall time, with everything healthy and with one component hung.

A hung component (Alertmanager frozen with SIGSTOP: it accepts connections and never answers) must cost about
its own check's timeout, not the sum of all timeouts. Baseline, measured in the same run: the same checks
run one after another. Usage: python benchmarks/health.py [--env local]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

from _common import summary

from opskit import health, localenv
from opskit.model import load_environment


def concurrent(env_name: str) -> float:
    env = load_environment(env_name)
    started = time.perf_counter()
    health.check_environment(env)
    return time.perf_counter() - started


def sequential(env_name: str) -> float:
    env = load_environment(env_name)
    started = time.perf_counter()
    for check in health.local_checks(env):
        asyncio.run(health.run_checks(env.name, [check]))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="local", help="a running single-machine environment (default local)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    args = parser.parse_args()
    env = load_environment(args.env).require_local()
    if not localenv.running(env):
        raise SystemExit(f"{args.env} is not running: run `invoke local.up --env {args.env}` first")
    report = health.check_environment(env)
    if not report.healthy:
        raise SystemExit(f"{args.env} is not healthy to begin with: run `invoke health --env {args.env}`")

    checks = health.local_checks(env)
    print(f"{len(checks)} checks; timeouts: " + ", ".join(f"{c.name} {c.timeout_s:g} s" for c in checks))
    print(summary("healthy, concurrent (invoke health)", [concurrent(args.env) for _ in range(args.runs)]))
    print(summary("healthy, baseline: one after another", [sequential(args.env) for _ in range(args.runs)]))

    pid = localenv.process_status(env)["alertmanager"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = [concurrent(args.env) for _ in range(args.runs)]
    finally:
        os.kill(pid, signal.SIGCONT)
    timeout = next(c.timeout_s for c in checks if c.name == "alertmanager")
    print(summary("alertmanager hung, concurrent (invoke health)", hung))
    total = sum(c.timeout_s for c in checks)
    print(f"alertmanager check timeout {timeout:g} s; sum of all timeouts {total:g} s")


if __name__ == "__main__":
    main()
