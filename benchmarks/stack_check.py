"""Render plus check time per stack, and its object count.

    .venv/bin/python benchmarks/stack_check.py [--repeat N] [--json]

Each stack is rendered (the program under Pulumi mocks, one YAML file per object) and checked
(kubernetes-validate strict 1.31, the policy pack, checkov's Kubernetes checks); the figures are the
median of N runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opskit import stack


def measure(name: str, repeat: int) -> dict[str, Any]:
    render_s: list[float] = []
    check_s: list[float] = []
    phases: dict[str, list[float]] = {}
    objects = releases = 0
    ok = True
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            rendered = stack.render(name, Path(tmp) / "out")
            render_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        report = stack.check(name)
        check_s.append(time.perf_counter() - started)
        for phase, seconds in report.seconds.items():
            phases.setdefault(phase, []).append(seconds)
        objects, releases, ok = rendered.objects, len(rendered.helm_releases), ok and report.ok
    return {
        "stack": name,
        "objects": objects,
        "helm_releases": releases,
        "render_s": round(statistics.median(render_s), 3),
        "check_s": round(statistics.median(check_s), 3),
        "check_phases_s": {k: round(statistics.median(v), 3) for k, v in phases.items()},
        "ok": ok,
        "runs": repeat,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per stack (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    options = parser.parse_args()
    results = [measure(name, max(options.repeat, 1)) for name in stack.STACKS]
    if options.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"{'stack':<12}{'objects':>8}{'releases':>10}{'render s':>10}{'check s':>9}  phases of check (s)"
        )
        for r in results:
            phases = " ".join(f"{k}={v}" for k, v in r["check_phases_s"].items())
            figures = f"{r['objects']:>8}{r['helm_releases']:>10}{r['render_s']:>10}{r['check_s']:>9}"
            print(f"{r['stack']:<12}{figures}  {phases}{'' if r['ok'] else '  FAILED'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
