"""Printing reports: rich tables for people, one JSON document for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
errors = Console(stderr=True)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column)
    for row in rows:
        result.add_row(*(_cell(v) for v in row))
    return result


def _cell(value: Any) -> str:
    if value is True:
        return "[green]yes[/green]"
    if value is False:
        return "[red]no[/red]"
    if value is None:
        return "-"
    return str(value)


def verdict(ok: bool, text: str | None = None) -> str:
    word = text or ("pass" if ok else "FAIL")
    return f"[green]{word}[/green]" if ok else f"[bold red]{word}[/bold red]"


def progress_line(line: str) -> None:
    """Ansible's task names as they run, so a long provisioning shows where it is."""
    if line.startswith("TASK [") or line.startswith("RUNNING HANDLER ["):
        console.print(f"[dim]{line.rstrip(' *')}[/dim]", highlight=False)


def _deploy_line(deploy: dict[str, Any]) -> str:
    """`idle`, or where an interrupted or held deploy stopped and what to run next."""
    state = str(deploy.get("state", "-"))
    if state not in ("in-progress", "held") or not deploy.get("step"):
        return state
    return (
        f"[bold yellow]{state}[/bold yellow] at step {deploy['step']} ({deploy.get('id')}, "
        f"{deploy.get('version')}): `invoke deploy --resume` or `--abort`"
    )


def print_status(report: dict[str, Any]) -> None:
    active = report["active"]
    previous = report.get("previous") or {}
    running = verdict(True, "running") if report["running"] else verdict(False, "stopped")
    console.print(
        f"[bold]{report['environment']}[/bold]: {running}"
        f"; active [bold]{active['color']}[/bold] {active['version']}"
        f"; previous {previous.get('color', '-')} {previous.get('version', '')}"
        f"; deploy {_deploy_line(report['deploy'])}; edge {report['edge']}"
    )
    console.print(
        table(
            "components",
            ("component", "state", "pid", "endpoint"),
            ((c["name"], c["state"], c["pid"], c["endpoint"]) for c in report["components"]),
        )
    )
    if report["last_operations"]:
        console.print(
            table(
                "last operations",
                ("when", "operation", "result"),
                ((o.get("at"), o.get("operation"), o.get("result")) for o in report["last_operations"]),
            )
        )


def print_health(report: Any) -> None:
    rows = (
        (
            c.name,
            verdict(c.ok, c.verdict if not c.ok else "pass"),
            "yes" if c.required else "no",
            f"{c.seconds:.3f}",
            c.detail,
            c.endpoint,
        )
        for c in report.checks
    )
    console.print(
        table(
            f"health of {report.environment}",
            ("check", "verdict", "required", "seconds", "detail", "endpoint"),
            rows,
        )
    )
    console.print(verdict(report.healthy, "healthy" if report.healthy else "UNHEALTHY"))


def print_demo(report: Any) -> None:
    console.rule("[bold]summary")
    console.print(
        table(
            f"demo on {report.environment}",
            ("step", "result", "seconds", "detail"),
            ((s.name, verdict(s.ok), f"{s.seconds:.1f}", s.detail) for s in report.steps),
        )
    )


def print_stack_check(report: dict[str, Any]) -> None:
    seconds = report["seconds"]
    console.print(
        f"stack {report['stack']}: {report['objects']} objects "
        f"({report['schema_validated']} schema-validated, {report['custom_objects']} custom), "
        f"{report['helm_releases']} Helm releases, "
        f"checkov {report['checkov']['passed']} passed / {len(report['checkov']['skipped'])} skipped "
        f"with a reason, in {seconds['total']:.1f} s"
    )
    if report["failures"]:
        console.print(
            table(
                "failures",
                ("source", "rule", "subject", "message"),
                ((f["source"], f["rule"], f["subject"], f["message"]) for f in report["failures"]),
            )
        )
    console.print(verdict(report["ok"], "check passed" if report["ok"] else "CHECK FAILED"))


def event_line(line: str) -> None:
    console.print(f"[dim]{line}[/dim]", highlight=False)


def print_deploy(report: dict[str, Any]) -> None:
    console.print(
        table(
            f"deploy {report['id']} of {report['version']} on {report['environment']}: "
            f"{report['from']} -> {report['to']}",
            ("step", "at", "detail"),
            ((s["step"], s["at"], s["detail"]) for s in report["steps"]),
        )
    )
    for analysis in report["analyses"]:
        console.print(
            table(
                f"analysis {analysis['phase']} of {analysis['color']} ({analysis['source']}): "
                f"{analysis['outcome']}",
                ("verdict", "measurement", "value", "threshold", "query"),
                (
                    (m["verdict"], m["name"], m["value"], m["threshold"], m["query"])
                    for m in analysis["measurements"]
                ),
            )
        )
    console.print(
        verdict(report["ok"], report["outcome"]) + (f": {report['reason']}" if report["reason"] else "")
    )
