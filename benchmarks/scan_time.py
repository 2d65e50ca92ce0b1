"""Wall time of `invoke scan`: every tool, a few at a time, as the task runs them; and each tool's share.

The pip-audit figure here is the time to find out that no advisory data is reachable (UNVERIFIED), not
an audit. Usage: python benchmarks/scan_time.py [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import summary

from opskit import scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    args = parser.parse_args()
    totals: list[float] = []
    per_tool: dict[str, list[float]] = {}
    statuses: dict[str, str] = {}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="maximus-bench-scan-") as tmp:
            started = time.perf_counter()
            report = scan.run(reports_dir=Path(tmp), allow_unverified=True)
            totals.append(time.perf_counter() - started)
        for result in report.results:
            per_tool.setdefault(result.tool, []).append(result.seconds)
            statuses[result.tool] = result.status
    print(summary("invoke scan (all tools, 3 at a time)", totals))
    for tool, seconds in per_tool.items():
        print(summary(f"  {tool} ({statuses[tool]})", seconds))


if __name__ == "__main__":
    main()
