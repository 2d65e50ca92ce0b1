"""Rule-evaluation cost of the full rule set, measured by the local Prometheus itself.

Reads Prometheus's own metrics (`prometheus_rule_group_last_duration_seconds`, `_iterations_total`,
`_iterations_missed_total`, `_rules`, `_interval_seconds`) every evaluation interval for `--seconds`, and
prints per rule group the median and maximum evaluation time, the evaluations seen, and its share of one CPU
second per second (median duration / interval); then the totals. Baseline, measured in the same run: the
`platform` group (Watchdog and TargetDown: two trivial rules), the cheapest evaluation Prometheus does.
Usage: python benchmarks/rule_eval.py [--env local] [--seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import _common  # noqa: F401 - puts the repository on sys.path
import httpx
from prometheus_client.parser import text_string_to_metric_families

from opskit import localenv
from opskit.model import load_environment

BASELINE_GROUP = "platform"


def scrape(url: str) -> dict[str, dict[str, float]]:
    """metric name -> group name -> value, for the rule-group metrics of Prometheus's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("prometheus_rule_group"):
            continue
        for sample in family.samples:
            group = sample.labels.get("rule_group", "")
            if group:
                found[sample.name][group.rsplit(";", 1)[-1]] = sample.value
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="local", help="a running single-machine environment (default local)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to sample (default 60)")
    args = parser.parse_args()
    env = load_environment(args.env).require_local()
    url = localenv.endpoints(env)["prometheus"]
    first = scrape(url)
    intervals = first["prometheus_rule_group_interval_seconds"]
    step = min(intervals.values(), default=5.0)
    durations: dict[str, list[float]] = defaultdict(list)
    last = first
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(step)
        last = scrape(url)
        for group, value in last["prometheus_rule_group_last_duration_seconds"].items():
            durations[group].append(value)
    iterations = last["prometheus_rule_group_iterations_total"]
    missed = last["prometheus_rule_group_iterations_missed_total"]
    rules = last["prometheus_rule_group_rules"]
    before = first["prometheus_rule_group_iterations_total"]
    print(f"rule groups of {args.env}'s Prometheus, sampled every {step:g} s for {args.seconds:g} s")
    columns = (("rules", 6), ("every", 8), ("median ms", 11), ("max ms", 9), ("evals", 7), ("missed", 7))
    print(f"{'group':<22}" + "".join(f"{name:>{width}}" for name, width in columns) + f"{'cpu %':>8}")
    total_ms = total_share = 0.0
    for group in sorted(durations, key=lambda g: -statistics.median(durations[g])):
        median_ms = statistics.median(durations[group]) * 1000
        share = median_ms / 1000 / intervals[group] * 100
        total_ms += median_ms
        total_share += share
        print(
            f"{group:<22}{rules[group]:>6.0f}{intervals[group]:>7.0f}s{median_ms:>11.3f}"
            f"{max(durations[group]) * 1000:>9.3f}{iterations[group] - before.get(group, 0):>7.0f}"
            f"{missed.get(group, 0):>7.0f}{share:>8.3f}"
        )
    base = statistics.median(durations[BASELINE_GROUP]) * 1000 if BASELINE_GROUP in durations else None
    print(
        f"total: {sum(rules.values()):.0f} rules in {len(durations)} groups, {total_ms:.3f} ms per round "
        f"of evaluations, {total_share:.3f}% of one CPU"
    )
    if base:
        print(f"baseline ({BASELINE_GROUP}: 2 trivial rules): {base:.3f} ms; full set {total_ms / base:.1f}x")


if __name__ == "__main__":
    main()
