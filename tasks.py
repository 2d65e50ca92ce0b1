"""maximus-ops command line: `invoke --list` shows every task, `invoke --help TASK` its arguments.

Each task parses its arguments, calls opskit and prints the result (rich for people, --json for
machines). Exit codes: 0 done; 1 the operation or a gate failed, the system left safe; 2 bad input,
nothing changed; 3 another operation holds the environment's lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from opskit import demo as demo_steps
from opskit import health as health_checks
from opskit import localenv, output
from opskit import status as status_report
from opskit.errors import OpsError
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
audit_tasks = Collection("audit")
audit_tasks.add_task(audit_verify, name="verify")
namespace.add_collection(audit_tasks)
