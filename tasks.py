"""maximus-ops command line: `invoke --list` shows every task, `invoke --help TASK` its arguments.

Each task parses its arguments, calls opskit and prints the result (rich for people, --json for
machines). Exit codes: 0 done; 1 the operation or a gate failed, the system left safe; 2 bad input,
nothing changed; 3 another operation holds the environment's lock.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from opskit import backup as backups
from opskit import backup_kube, localenv, output
from opskit import demo as demo_steps
from opskit import health as health_checks
from opskit import status as status_report
from opskit.backup_kube import BackupIncomplete, KubeBackupReport
from opskit.errors import BadInput, OpsError
from opskit.model import Environment, load_environment

ENV_HELP = "environment name: local (the default), staging, production, or one in $MAXIMUS_ENVIRONMENTS_DIR"
JSON_HELP = "print one JSON document instead of tables"


@contextmanager
def contract() -> Iterator[None]:
    """Turn opskit's errors into one line on stderr and the contract's exit code."""
    try:
        yield
    except OpsError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise Exit(
            "interrupted: the environment was left as it was; run the same command again", code=1
        ) from None


def _local(env_name: str) -> Environment:
    return load_environment(env_name).require_local()


@task(help={"env": ENV_HELP, "json": JSON_HELP})
def up(c: Context, env: str = "local", json: bool = False) -> None:
    """Provision and start a single-machine environment (idempotent: a second run changes nothing)."""
    with contract():
        environment = _local(env)
        report = localenv.up(environment, on_output=None if json else output.progress_line)
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(
                f"local.up {env}: ok={report.ok} changed={report.changed} failed={report.failed} "
                f"in {report.seconds:.1f} s; edge {localenv.endpoints(environment)['edge']}"
            )


@task(help={"env": ENV_HELP, "purge": "also delete the environment's state: data, backups, logs, secrets"})
def down(c: Context, env: str = "local", purge: bool = False) -> None:
    """Stop every process of a single-machine environment; --purge also deletes its state."""
    with contract():
        localenv.down(_local(env), purge=purge)
        output.console.print(f"local.down {env}: stopped" + (", state deleted" if purge else ""))


@task(help={"env": ENV_HELP, "json": JSON_HELP})
def status(c: Context, env: str = "local", json: bool = False) -> None:
    """Active color and version, the previous one, deploy state, components and last operations."""
    with contract():
        report = status_report.environment_status(load_environment(env))
        if json:
            output.print_json(report)
        else:
            output.print_status(report)


@task(help={"env": ENV_HELP, "color": "check only this color's workload: blue or green", "json": JSON_HELP})
def health(c: Context, env: str = "local", color: str | None = None, json: bool = False) -> None:
    """Run every health check concurrently, each with its own timeout; exit 0 only when all required pass."""
    with contract():
        report = health_checks.check_environment(load_environment(env), color)
        if json:
            output.print_json(report.as_dict())
        else:
            output.print_health(report)
        if not report.healthy:
            failed = ", ".join(c.name for c in report.checks if c.required and not c.ok)
            raise Exit(f"unhealthy: {failed}; see the runbook runbooks/health.md", code=1)


@task(help={"env": "a single-machine environment to run the story on (default local)", "json": JSON_HELP})
def demo(c: Context, env: str = "local", json: bool = False) -> None:
    """The whole story on `local`, end to end: provision, status, health, real traffic through the edge."""
    with contract():
        report = demo_steps.run(_local(env), quiet=json)
        if json:
            output.print_json(report.as_dict())
        else:
            output.print_demo(report)
        if not report.ok:
            raise Exit("demo: a step failed; see above", code=1)


@task(
    help={
        "env": ENV_HELP,
        "version": "the release to deploy (releases/<service>.yaml lists them)",
        "ticket": "the change ticket; required where the environment's policy says so (production)",
        "risk": "low, medium or high (governance/policy.yaml); default: what the release's migration implies",
        "approver": "who approved the change, several separated by commas; never the person deploying",
        "change_type": "standard, normal (the default) or emergency (may start outside deployment windows)",
        "inject": "drills, local only: faults of the new release, e.g. error-rate=0.3,latency-ms=500",
        "yes": "do not ask for confirmation",
        "resume": "continue an interrupted or held deploy from the step it stopped at",
        "abort": "undo an interrupted or held deploy: traffic back on the previous color, new one stopped",
        "dry_run": "print the plan and change nothing",
        "break_stale_lock": "break a lock left by a process that is no longer running",
        "json": JSON_HELP,
    }
)
def deploy(
    c: Context,
    env: str = "local",
    version: str | None = None,
    ticket: str | None = None,
    risk: str | None = None,
    approver: str | None = None,
    change_type: str | None = None,
    inject: str | None = None,
    yes: bool = False,
    resume: bool = False,
    abort: bool = False,
    dry_run: bool = False,
    break_stale_lock: bool = False,
    json: bool = False,
) -> None:
    """Blue-green deploy: release on the idle color, analysis, atomic switch, analysis, previous kept warm."""
    with contract():
        from opskit import deploy as deployments

        report = deployments.deploy(
            load_environment(env),
            version,
            ticket=ticket,
            risk=risk,
            approver=approver,
            change_type=change_type,
            inject=inject,
            resume=resume,
            abort=abort,
            dry_run=dry_run,
            break_stale_lock=break_stale_lock,
            events=None if json else output.event_line,
        )
        if json:
            output.print_json(report.as_dict())
        else:
            output.print_deploy(report.as_dict())
        if not report.ok:
            raise Exit(f"deploy {report.outcome}: {report.reason}", code=1)


@task(
    name="scale-down",
    help={
        "env": ENV_HELP,
        "dry_run": "say what would be stopped and change nothing",
        "break_stale_lock": "break a lock left by a process that is no longer running",
        "json": JSON_HELP,
    },
)
def scale_down(
    c: Context, env: str = "local", dry_run: bool = False, break_stale_lock: bool = False, json: bool = False
) -> None:
    """Stop the previous color once its rollback window has passed; run it on a schedule (idempotent)."""
    with contract():
        from opskit import deploy as deployments

        report = deployments.scale_down(
            load_environment(env), dry_run=dry_run, break_stale_lock=break_stale_lock
        )
        if json:
            output.print_json(report.as_dict())
        else:
            what = f"{report.color} ({report.version})" if report.color else "nothing"
            verb = "stopped" if report.done else "kept"
            output.console.print(f"scale-down {report.environment}: {what} {verb}: {report.reason}")


@task(
    help={
        "env": ENV_HELP,
        "reason": "why: recorded in the audit log and sent with the notification",
        "force": "roll back although the release ran a breaking migration (restore the database first)",
        "break_stale_lock": "break a lock left by a process that is no longer running",
        "json": JSON_HELP,
    }
)
def rollback(
    c: Context,
    env: str = "local",
    reason: str | None = None,
    force: bool = False,
    break_stale_lock: bool = False,
    json: bool = False,
) -> None:
    """Back to the previous release at once: one switch when its color is warm, else a redeploy of it."""
    with contract():
        from opskit import deploy as deployments

        report = deployments.rollback(
            load_environment(env), reason=reason, force=force, break_stale_lock=break_stale_lock
        )
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(
                f"rollback {report.environment}: {report.from_color} -> {report.to_color} "
                f"({report.version}) by {report.path} in {report.seconds:.3f} s; "
                f"verified {report.verified}; notified via {report.notified}"
            )
        if not report.verified:
            raise Exit("rollback: the edge does not serve the previous release; `invoke status`", code=1)


@task(help={"env": ENV_HELP, "json": JSON_HELP})
def audit_verify(c: Context, env: str = "local", json: bool = False) -> None:
    """Verify the audit log's hash chain; exit 1 naming the first changed, inserted or deleted record."""
    with contract():
        from opskit import audit, kuberollout

        environment = load_environment(env)
        log = (
            kuberollout.audit_log(environment)
            if environment.kind == "kubernetes"
            else audit.for_environment(environment)
        )
        synced = log.sync()
        report = log.verify()
        if json:
            output.print_json({**report.as_dict(), "synced_from_spool": synced})
        else:
            output.console.print(
                output.verdict(report.ok, f"audit log intact: {report.records} records")
                if report.ok
                else output.verdict(False, f"record {report.first_bad}: {report.reason}")
            )
        if not report.ok:
            raise Exit(f"audit log of {env}: record {report.first_bad} is bad: {report.reason}", code=1)


@task(help={"env": ENV_HELP, "json": JSON_HELP})
def audit_annotate(c: Context, env: str = "local", json: bool = False) -> None:
    """Post the audit log's deploys and rollbacks to Grafana as annotations, each once
    ($MAXIMUS_GRAFANA_URL, $MAXIMUS_GRAFANA_TOKEN)."""
    with contract():
        from opskit import grafana

        code = grafana.annotate_command(env, json)
    if code:
        raise Exit(code=code)


@task(
    help={
        "env": ENV_HELP,
        "since": "only changes from this date on (YYYY-MM-DD, UTC); default: the whole log",
        "json": JSON_HELP,
    }
)
def audit_report(c: Context, env: str = "local", since: str | None = None, json: bool = False) -> None:
    """Evidence for auditors and DORA metrics from the verified audit log, as Markdown or JSON."""
    with contract():
        from opskit import audit_report as reports

        report = reports.report(load_environment(env), reports.parse_since(since))
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(report.markdown(), markup=False, highlight=False, soft_wrap=True)


STACK_HELP = "the stack: staging or production"


@task(
    help={
        "stack": STACK_HELP,
        "out": "directory for the manifests (new, empty or a previous render)",
        "json": JSON_HELP,
    }
)
def render(c: Context, stack: str, out: str, json: bool = False) -> None:
    """Write every Kubernetes object the stack declares, one YAML file per object; no cluster needed."""
    with contract():
        from opskit import stack as stacks  # pulumi is slow to import: only for the stack tasks

        report = stacks.render(stack, Path(out))
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(
                f"stack.render {stack}: {report.objects} objects and "
                f"{len(report.helm_releases)} Helm releases written to {out}"
            )


@task(help={"stack": STACK_HELP, "json": JSON_HELP})
def check(c: Context, stack: str, json: bool = False) -> None:
    """Render, validate every object (Kubernetes 1.31), run the policies and checkov; exit 1 on failure."""
    with contract():
        from opskit import stack as stacks

        report = stacks.check(stack)
        if json:
            output.print_json(report.as_dict())
        else:
            output.print_stack_check(report.as_dict())
        report.raise_for_failures()


@task(
    help={
        "env": ENV_HELP,
        "profile": "a load profile of loadtests/profiles.yaml: smoke, baseline, stress or soak",
        "ticket": "the change ticket; required where the environment's policy says so (production)",
        "inject": "local only: load a temporary extra workload with these faults, e.g. latency-ms=500",
        "json": JSON_HELP,
    }
)
def loadtest(
    c: Context,
    env: str = "local",
    profile: str = "smoke",
    ticket: str | None = None,
    inject: str | None = None,
    json: bool = False,
) -> None:
    """Run a Locust profile headless; CSV, HTML and JSON in reports/; exit 1 naming each broken threshold."""
    with contract():
        from opskit import load

        progress = None if json else output.console.print
        report = load.run(load_environment(env), profile, ticket=ticket, inject=inject, progress=progress)
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(
                output.table(
                    f"loadtest {report.environment}/{report.profile}: {report.target}",
                    ("endpoint", "requests", "failures", "p50 ms", "p95 ms", "req/s"),
                    (
                        (name, s.requests, s.failures, s.p50_ms, s.p95_ms, s.rps)
                        for name, s in report.endpoints.items()
                    ),
                )
            )
            output.console.print(
                output.table(
                    "thresholds",
                    ("threshold", "limit", "measured", "verdict"),
                    ((t.name, t.limit, t.measured, output.verdict(t.ok)) for t in report.checks),
                )
            )
            output.console.print(f"reports: {', '.join(report.files.values())}", highlight=False)
        report.raise_for_failures()


@task(
    help={
        "allow_unverified": "exit 0 when a tool could not measure (pip-audit offline); printed UNVERIFIED",
        "only": "only these tools, comma-separated: bandit, pip-audit, checkov, zizmor, ansible-lint, "
        "detect-secrets",
        "json": JSON_HELP,
    }
)
def scan(c: Context, allow_unverified: bool = False, only: str | None = None, json: bool = False) -> None:
    """bandit, pip-audit, checkov, zizmor, ansible-lint, detect-secrets: one summary, a report per tool."""
    with contract():
        from opskit import scan as scans

        report = scans.run(scans.select(only, scans.default_scanners()), allow_unverified=allow_unverified)
        if json:
            output.print_json(report.as_dict())
        else:
            marks = {"pass": "pass", "fail": "FAIL", "unverified": "UNVERIFIED", "error": "ERROR"}
            output.console.print(
                output.table(
                    "security scan",
                    ("tool", "verdict", "findings", "seconds", "summary"),
                    (
                        (
                            r.tool,
                            output.verdict(r.status == "pass", marks[r.status]),
                            r.findings,
                            f"{r.seconds:.1f}",
                            r.summary,
                        )
                        for r in report.results
                    ),
                )
            )
            for r in report.results:
                for line in r.details[:20]:
                    output.console.print(f"  {r.tool}: {line}", highlight=False, markup=False)
            reports = ", ".join(Path(r.report_path).name for r in report.results if r.report_path)
            output.console.print(f"reports in reports/: {reports}, scan-summary.json", highlight=False)
            output.console.print(output.verdict(report.status == "pass", report.verdict))
        report.raise_for_failures()


BACKUP_ID_HELP = "backup id from `invoke db.list` (Kubernetes: a CloudNativePG Backup name)"


def _confirm_live_restore(env_name: str, yes: bool) -> bool:
    """--force needs the environment's name typed back (or --yes in CI)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise BadInput("--force: no terminal to confirm on; add --yes to overwrite the live database")
    typed = input(f"This replaces the live database and Redis of {env_name}. Type {env_name} to go on: ")
    if typed.strip() != env_name:
        raise BadInput("--force: the confirmation did not match; nothing changed")
    return True


@task(
    name="backup",
    help={
        "env": ENV_HELP,
        "json": JSON_HELP,
        "break_stale_lock": "break the lock of an operation whose process is gone (after a crash or kill -9)",
    },
)
def db_backup(c: Context, env: str = "local", json: bool = False, break_stale_lock: bool = False) -> None:
    """Back up PostgreSQL and Redis (Kubernetes: an on-demand CloudNativePG backup), verified and listed."""
    with contract():
        try:
            report = backups.backup(
                load_environment(env), show_progress=not json, break_stale_lock=break_stale_lock
            )
        except BackupIncomplete as incomplete:  # the backup is kept: its report says what is missing
            if json:
                output.print_json(incomplete.report.as_dict())
            else:
                output.console.print(f"db.backup {env}: {_backup_line(incomplete.report)}")
            raise
        if json:
            output.print_json(report.as_dict())
        else:
            output.console.print(
                f"db.backup {env}: {output.verdict(True, 'verified')} " + _backup_line(report)
            )


def _backup_line(report: backups.BackupReport | KubeBackupReport) -> str:
    data = report.as_dict()
    if "size" in data:
        return (
            f"{data['id']}: {data['tables']} tables, {data['rows']} rows, {data['redis_keys']} Redis keys, "
            f"{data['size'] / 1e6:.1f} MB in {data['seconds']:.1f} s; key {data['key_id']}; {data['storage']}"
        )
    return (
        f"{data['name']}: {data['phase']} in {data['seconds']:.0f} s; {data['kafka_topics']} Kafka topics "
        f"and consumer offsets ({data['consumer_offsets']}) in export {data['kafka_export']}"
    )


@task(name="list", help={"env": ENV_HELP, "json": JSON_HELP})
def db_list(c: Context, env: str = "local", json: bool = False) -> None:
    """List complete, verified backups, newest first."""
    with contract():
        rows = backups.list_backups(load_environment(env))
        if json:
            output.print_json(rows)
            return
        output.console.print(
            output.table(
                f"backups of {env}",
                ("id", "started", "method", "MB", "seconds", "tables", "redis keys", "compression", "key id"),
                (
                    (
                        r["id"],
                        r["started_at"],
                        r["method"],
                        f"{(r['size'] or 0) / 1e6:.1f}",
                        r["duration_seconds"],
                        r["tables"],
                        r["redis_keys"],
                        r["compression"],
                        r["key_id"],
                    )
                    for r in rows
                ),
            )
        )


@task(name="verify", help={"env": ENV_HELP, "backup": BACKUP_ID_HELP, "json": JSON_HELP})
def db_verify(c: Context, backup: str, env: str = "local", json: bool = False) -> None:
    """Verify a backup: manifest, sha256 of every file, decryption, pg_restore --list or pg_verifybackup."""
    with contract():
        report = backups.verify(load_environment(env), backup, show_progress=not json)
        if json:
            output.print_json(report.as_dict())
        else:
            for check in report.checks:
                output.console.print(f"  {output.verdict(True, 'ok')} {check}")
            for problem in report.problems:
                output.console.print(f"  {output.verdict(False)} {problem}")
            output.console.print(
                output.verdict(report.ok, "verified" if report.ok else "VERIFICATION FAILED")
            )
        if not report.ok:
            raise Exit(code=1)


@task(
    name="restore",
    help={
        "env": ENV_HELP,
        "backup": BACKUP_ID_HELP,
        "into": "name of the NEW database to restore into (default <db>_restore_<time>; "
        "Kubernetes: the new Cluster's name)",
        "force": "restore OVER the live database and Redis (after a safety backup); asks for the "
        "environment's name",
        "yes": "with --force: do not ask (CI)",
        "json": JSON_HELP,
    },
)
def db_restore(
    c: Context,
    backup: str,
    env: str = "local",
    into: str | None = None,
    force: bool = False,
    yes: bool = False,
    json: bool = False,
) -> None:
    """Restore a backup into a new database (default), or over the live one with --force."""
    with contract():
        environment = load_environment(env)
        confirmed = False
        if force:
            backups.check_id(backup)
            confirmed = _confirm_live_restore(env, yes)
        report = backups.restore(
            environment, backup, into=into, force=force, confirmed=confirmed, show_progress=not json
        )
        if json:
            output.print_json(report.as_dict())
            return
        data = report.as_dict()
        if "database" in data:
            replaced = (
                f" (replaced the live one; safety backup {data['safety_backup']})"
                if data["replaced_live"]
                else ""
            )
            output.console.print(
                f"db.restore {env}: {data['id']} -> database {data['database']}{replaced}: "
                f"{data['tables']} tables, {data['rows']} rows identical to the backup; "
                f"redis: {data['redis']}; {data['seconds']:.1f} s"
            )
        else:
            output.console.print(
                f"db.restore {env}: new Cluster {data['cluster']} from {data['source_backup']}"
            )
            output.console.print(f"next: {data['next_step']}")


@task(
    name="prune",
    help={
        "env": ENV_HELP,
        "dry_run": "show what the retention would delete, delete nothing",
        "json": JSON_HELP,
    },
)
def db_prune(c: Context, env: str = "local", dry_run: bool = False, json: bool = False) -> None:
    """Apply the model's retention (daily/weekly/monthly); never deletes the last verified backup."""
    with contract():
        report = backups.prune(load_environment(env), dry_run=dry_run)
        if json:
            output.print_json(report.as_dict())
            return
        output.console.print(
            output.table(
                f"prune {env}{' (dry run)' if dry_run else ''}",
                ("backup", "kept because"),
                [
                    *report.kept.items(),
                    *((d, "would delete" if dry_run else "[red]deleted[/red]") for d in report.deleted),
                ],
            )
        )


@task(
    name="offsets",
    help={
        "env": "a Kubernetes environment (staging, production)",
        "backup": "the Kafka export made with a backup (its id is in the db.backup report)",
        "out": "a directory for the CSV files, one per consumer group (written 0600)",
        "json": JSON_HELP,
    },
)
def db_offsets(c: Context, env: str, backup: str, out: str, json: bool = False) -> None:
    """Decrypt the consumer-group offsets exported with a backup: the input of kafka-consumer-groups.sh
    --reset-offsets --from-file."""
    with contract():
        from opskit import backup_storage

        environment = load_environment(env)
        written = backup_kube.write_offsets(
            environment, backup_storage.for_environment(environment), backup, Path(out)
        )
        if json:
            output.print_json({"backup": backup, "files": [str(p) for p in written]})
        else:
            for path in written:
                output.console.print(str(path))
            output.console.print(backup_kube.restore_instructions(environment, backup))


@task(help={"env": ENV_HELP, "json": JSON_HELP})
def drill(c: Context, env: str = "local", json: bool = False) -> None:
    """Restore drill: latest backup -> scratch -> compare with its recorded checksums -> measured RTO."""
    with contract():
        report = backups.drill(load_environment(env), show_progress=not json)
        if json:
            output.print_json(report.as_dict())
        else:
            word = "restored and identical" if report.ok else "MISMATCH"
            output.console.print(
                f"drill {env}: {report.id} {output.verdict(report.ok, word)}: {report.tables} tables, "
                f"{report.rows} rows; redis: {report.redis}; RTO {report.rto_seconds:.1f} s"
            )
            for mismatch in report.mismatches:
                output.console.print(f"  {output.verdict(False, 'differs')} {mismatch}")
        if not report.ok:
            raise Exit(code=1)


local = Collection("local")
local.add_task(up, name="up")
local.add_task(down, name="down")

stack = Collection("stack")
stack.add_task(render, name="render")
stack.add_task(check, name="check")

namespace = Collection()
namespace.add_collection(local)
namespace.add_collection(stack)
namespace.add_task(status)
namespace.add_task(health)
namespace.add_task(demo)
namespace.add_task(deploy)
namespace.add_task(rollback)
namespace.add_task(scale_down)
namespace.add_task(loadtest)
namespace.add_task(scan)
db = Collection("db")
for db_task in (db_backup, db_list, db_verify, db_restore, db_prune, db_offsets):
    db.add_task(db_task)
namespace.add_collection(db)
namespace.add_task(drill)
audit_tasks = Collection("audit")
audit_tasks.add_task(audit_verify, name="verify")
audit_tasks.add_task(audit_annotate, name="annotate")
audit_tasks.add_task(audit_report, name="report")
namespace.add_collection(audit_tasks)
