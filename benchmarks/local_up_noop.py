"""`invoke local.up` on an already provisioned environment (the no-op run), wall time.

Baseline, measured in the same run: `ansible-playbook` running a single `ping` task against localhost,
the floor any Ansible-driven provisioning pays. Usage: python benchmarks/local_up_noop.py [--env local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, summary

BIN = Path(sys.executable).parent


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-400:]}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="local", help="single-machine environment (default local)")
    parser.add_argument("--runs", type=int, default=5, help="no-op runs to time (default 5)")
    args = parser.parse_args()

    up = [str(BIN / "invoke"), "local.up", "--env", args.env, "--json"]
    first, _ = timed(up)
    print(f"first run (provisions whatever is missing): {first:.3f} s")

    noop, changed = [], []
    for _ in range(args.runs):
        seconds, out = timed(up)
        noop.append(seconds)
        changed.append(json.loads(out)["changed"])

    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as play:
        play.write("- hosts: localhost\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n")
    floor = [
        timed(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                "localhost,",
                "-c",
                "local",
                "-e",
                f"ansible_python_interpreter={sys.executable}",
                play.name,
            ]
        )[0]
        for _ in range(args.runs)
    ]
    Path(play.name).unlink()

    print(summary(f"invoke local.up --env {args.env} (no-op)", noop))
    print(summary("baseline: ansible-playbook, one ping task", floor))
    print(f"changed per no-op run: {changed} (expected all 0)")
    above = statistics.median(noop) - statistics.median(floor)
    print(f"no-op cost above the Ansible floor: {above:.3f} s")


if __name__ == "__main__":
    main()
