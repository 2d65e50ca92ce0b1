"""Status and rollback of a Kubernetes environment (staging, production), through `opskit.kube`.

The cluster is the state: the VirtualService's weights say which color is active (`IstioRouter`), the
color Deployments say which version each color runs (the pod template's `maximus.io/version` label, else
the container's MAXIMUS_VERSION) and whether it is warm (at least one ready replica). Nothing is kept on
this machine but the audit log.

`rollback` goes back to the other color:
- warm: one guarded switch of the VirtualService, read back (path "switch");
- cold (0 ready replicas): its Deployment is scaled to the model's minimum replicas (a guarded patch of
  `spec.replicas`, which the stack leaves to the deploy tooling and the HPA), then, once that many replicas
  are ready, the same switch (path "redeploy"). Traffic moves only in the switch, all of it at once.
Run again after an interruption, it carries on from what the cluster shows: every step is idempotent.

A breaking-migration deploy annotates the VirtualService `maximus.io/needs-restore: "true"`: rolling back
then needs the database restored first, so it is refused (exit 2) unless forced; a forced rollback
removes the annotation.

Audit: a kubernetes environment has no state directory, so the log is the file `$MAXIMUS_AUDIT_STORE`
(else `$XDG_STATE_HOME/maximus-ops/<env>/audit/audit.jsonl`, `~/.local/state` by default) with its spool
always on this machine, so a record is kept while the store is away.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from opskit import audit, notify
from opskit.analysis import PrometheusProvider
from opskit.errors import BadInput, OperationFailed, OpsError
from opskit.kube import (
    HttpKubeClient,
    KubeClient,
    KubeConfigError,
    KubeError,
    KubeNotFound,
    guarded_patch,
    object_path,
    pointer,
)
from opskit.model import COLORS, Environment
from opskit.routers import RouterError, Routing
from opskit.routers.istio import IstioRouter

if TYPE_CHECKING:
    from opskit.deploy import RollbackReport

CONTEXT_VAR = "MAXIMUS_KUBE_CONTEXT"
AUDIT_STORE_VAR = "MAXIMUS_AUDIT_STORE"
# Same keys as infra.app.VERSION_LABEL and the mesh's annotations (a test keeps them equal).
VERSION_LABEL = "maximus.io/version"
VERSION_ENV = "MAXIMUS_VERSION"
NEEDS_RESTORE_ANNOTATION = "maximus.io/needs-restore"
DEPLOYMENTS = ("apps/v1", "deployments")
# The monitoring release's Services (infra/monitoring: RELEASE "maximus-monitoring"; a test keeps them equal).
PROMETHEUS_SERVICE, PROMETHEUS_PORT = "maximus-monitoring-prometheus", 9090
ALERTMANAGER_SERVICE, ALERTMANAGER_PORT = "maximus-monitoring-alertmanager", 9093
PROXY_TIMEOUT_S = 5.0
RECORD_KEY = "record"
RECORD_SUMMARY = ("id", "version", "step", "reason", "started_at", "updated_at")
POLL_S = 1.0
STATUS_OPERATIONS = 5

Sleep = Callable[[float], None]
Clock = Callable[[], float]


def other(color: str) -> str:
    return COLORS[1] if color == COLORS[0] else COLORS[0]


# --- the client --------------------------------------------------------------------------------------------


def kubeconfig_path() -> Path:
    """The kubeconfig `HttpKubeClient.from_kubeconfig` reads: $KUBECONFIG's first file or ~/.kube/config."""
    configured = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(configured) if configured else Path.home() / ".kube" / "config"


def client_for(env: Environment) -> KubeClient:
    """The API client for `env`'s cluster: the kubeconfig's context $MAXIMUS_KUBE_CONTEXT, else its
    current-context."""
    path = kubeconfig_path()
    context = os.environ.get(CONTEXT_VAR) or None
    if not path.is_file():
        raise OperationFailed(
            f"cannot reach the cluster of {env.name}: no kubeconfig at {path}; set KUBECONFIG to the "
            f"kubeconfig of the {env.name} cluster (and {CONTEXT_VAR} to its context)"
        )
    try:
        return HttpKubeClient.from_kubeconfig(path, context)
    except KubeConfigError as exc:
        which = f"context {context} ({CONTEXT_VAR})" if context else "the current-context"
        raise KubeConfigError(
            f"{exc}; {env.name} uses {which}: set {CONTEXT_VAR} to the {env.name} cluster's context"
        ) from exc


# --- reading the cluster ----------------------------------------------------------------------------------


def _require_cluster(env: Environment) -> str:
    if env.kind != "kubernetes" or env.namespace is None:
        raise BadInput(f"--env: {env.name} is a {env.kind} environment; accepted: a kubernetes environment")
    return env.namespace


def deployment_name(env: Environment, color: str) -> str:
    return f"{env.service.name}-{color}"


def deployment_path(env: Environment, color: str) -> str:
    return object_path(*DEPLOYMENTS, _require_cluster(env), deployment_name(env, color))


def deployment_version(deployment: dict[str, Any]) -> str | None:
    """The release a color Deployment runs: its pod template's version label, else MAXIMUS_VERSION."""
    template = (deployment.get("spec") or {}).get("template") or {}
    label = ((template.get("metadata") or {}).get("labels") or {}).get(VERSION_LABEL)
    if label:
        return str(label)
    for container in (template.get("spec") or {}).get("containers") or []:
        for variable in container.get("env") or []:
            if variable.get("name") == VERSION_ENV and variable.get("value"):
                return str(variable["value"])
    return None


def ready_replicas(deployment: dict[str, Any]) -> int:
    return int((deployment.get("status") or {}).get("readyReplicas") or 0)


def desired_replicas(deployment: dict[str, Any]) -> int:
    replicas = (deployment.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)  # the API server's default


def _rolling(deployment: dict[str, Any]) -> bool:
    """A rollout of this Deployment has not finished (new spec not observed, or replicas not updated)."""
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return True
    updated = status.get("updatedReplicas")
    return updated is not None and updated < desired_replicas(deployment)


def _stuck(deployment: dict[str, Any]) -> str | None:
    """The Progressing condition's message once the Deployment's progress deadline has passed."""
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return str(condition.get("message") or "progress deadline exceeded")
    return None


def read_deployment(client: KubeClient, env: Environment, color: str) -> dict[str, Any] | None:
    """The color's Deployment, or None when it does not exist."""
    try:
        return client.get(deployment_path(env, color))
    except KubeNotFound:
        return None


def _annotations(obj: dict[str, Any]) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _needs_restore(virtual_service: dict[str, Any]) -> bool:
    return str(_annotations(virtual_service).get(NEEDS_RESTORE_ANNOTATION, "")).lower() == "true"


def router_for(env: Environment, client: KubeClient) -> IstioRouter:
    return IstioRouter(client, _require_cluster(env), env.service.name)


def _read_virtual_service(env: Environment, client: KubeClient, router: IstioRouter) -> dict[str, Any]:
    try:
        return client.get(router.path)
    except KubeNotFound as exc:
        raise KubeNotFound(
            f"{exc}; is this the {env.name} cluster? set {CONTEXT_VAR} to its kubeconfig context"
        ) from exc


def observability_namespace(env: Environment) -> str:
    return f"{_require_cluster(env)}-observability"


def prometheus_http(env: Environment, client: KubeClient) -> httpx.Client:
    """Plain HTTP to the cluster's Prometheus, through the API server's service proxy."""
    namespace = observability_namespace(env)
    return client.service_client(namespace, PROMETHEUS_SERVICE, PROMETHEUS_PORT, PROXY_TIMEOUT_S)


def prometheus(env: Environment, client: KubeClient) -> PrometheusProvider:
    """The cluster's Prometheus as the analysis' metric provider."""
    described = f"{PROMETHEUS_SERVICE}.{observability_namespace(env)} (through the API server)"
    return PrometheusProvider(described, PROXY_TIMEOUT_S, client=prometheus_http(env, client))


def alertmanager(env: Environment, client: KubeClient) -> httpx.Client:
    """The cluster's Alertmanager, through the API server's service proxy."""
    namespace = observability_namespace(env)
    return client.service_client(namespace, ALERTMANAGER_SERVICE, ALERTMANAGER_PORT, notify.TIMEOUT_S)


def edge(env: Environment) -> str | None:
    """Where clients reach the service: the gateway's host."""
    host = env.platform.gateway.host
    return f"https://{host}" if host else None


# --- status ------------------------------------------------------------------------------------------------


def status(env: Environment, client: KubeClient) -> dict[str, Any]:
    """What the cluster runs now, shaped like `opskit.status.environment_status` of a local environment."""
    namespace = _require_cluster(env)
    try:
        return _status(env, client, namespace)
    except KubeError as exc:
        raise OperationFailed(f"status of {env.name}: {exc}") from exc
    except RouterError as exc:
        raise OperationFailed(f"status of {env.name}: {exc}") from exc


def _status(env: Environment, client: KubeClient, namespace: str) -> dict[str, Any]:
    router = router_for(env, client)
    virtual_service = _read_virtual_service(env, client, router)
    deployments: dict[str, dict[str, Any] | None] = {c: read_deployment(client, env, c) for c in COLORS}
    problem: str | None = None
    try:
        routing: Routing | None = router.routing()
    except RouterError as exc:  # routes edited by hand: report it, do not fail the status
        if isinstance(exc.__cause__, KubeError):
            raise
        routing, problem = None, str(exc)
    active = routing.active if routing else None
    if routing is None:
        color = _annotations(virtual_service).get("maximus.io/active-color")
        active = color if color in COLORS else None
    active_deployment = deployments.get(active) if active else None
    previous: dict[str, Any] | None = None
    if active is not None:
        idle = other(active)
        idle_deployment = deployments[idle]
        if idle_deployment is not None and deployment_version(idle_deployment):
            previous = {
                "color": idle,
                "version": deployment_version(idle_deployment),
                "warm": ready_replicas(idle_deployment) >= 1,
                "ready_replicas": ready_replicas(idle_deployment),
                "needs_restore": _needs_restore(virtual_service),
            }
    record = deploy_record(env, client)
    interrupted = (record.get("deploy") or {}).get("state") in ("in-progress", "held")
    if problem is not None:
        state = "routing-inconsistent"
    elif interrupted:
        state = record["deploy"]["state"]
    elif active is None:
        state = "split"
    elif any(d is not None and _rolling(d) for d in deployments.values()):
        state = "rolling-out"
    else:
        state = "idle"
    components = []
    for color, deployment in deployments.items():
        name = deployment_name(env, color)
        components.append(
            {
                "name": name,
                "endpoint": f"http://{name}.{namespace}.svc.cluster.local:{env.service.port}",
                "state": _component_state(deployment),
                "pid": None,
                "ready": ready_replicas(deployment) if deployment else 0,
                "desired": desired_replicas(deployment) if deployment else 0,
                "version": deployment_version(deployment) if deployment else None,
            }
        )
    return {
        "environment": env.name,
        "kind": env.kind,
        "namespace": namespace,
        "running": active_deployment is not None and ready_replicas(active_deployment) >= 1,
        "edge": edge(env),
        "routing": routing.weights if routing else None,
        "active": {
            "color": active,
            "version": deployment_version(active_deployment) if active_deployment else None,
        },
        "previous": previous,
        "deploy": {
            **{k: v for k, v in (record.get("deploy") or {}).items() if k in RECORD_SUMMARY},
            "state": state,
            "needs_restore": _needs_restore(virtual_service),
            "problem": problem,
        },
        "components": components,
        "last_operations": last_operations(env),
    }


def deploy_record_path(env: Environment) -> str:
    """The ConfigMap holding the deploy tooling's record: the last deploy, the warm window, the history."""
    return object_path("v1", "configmaps", _require_cluster(env), f"{env.service.name}-deploy")


def deploy_record(env: Environment, client: KubeClient) -> dict[str, Any]:
    """The deploy record (empty before the first deploy)."""
    try:
        config_map = client.get(deploy_record_path(env))
    except KubeNotFound:
        return {}
    text = (config_map.get("data") or {}).get(RECORD_KEY) or "{}"
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise OperationFailed(f"{deploy_record_path(env)}: unreadable deploy record ({exc})") from exc
    return record if isinstance(record, dict) else {}


def _component_state(deployment: dict[str, Any] | None) -> str:
    if deployment is None:
        return "MISSING"
    ready, desired = ready_replicas(deployment), desired_replicas(deployment)
    if desired == 0:
        return "SCALED-DOWN" if ready == 0 else "STOPPING"
    if ready == 0:
        return "STARTING" if _stuck(deployment) is None else "FAILED"
    return "RUNNING" if ready >= desired else "DEGRADED"


def last_operations(env: Environment) -> list[dict[str, Any]]:
    """The environment's last rollbacks from the audit store (empty when it cannot be read)."""
    try:
        records = [r for r in audit_log(env).records() if r.get("environment") == env.name]
    except (OSError, ValueError):
        return []
    operations = []
    for record in records:
        if record.get("operation") == "rollback":
            operation, result = f"rollback to {record.get('version')}", "done"
        elif record.get("operation") == "rollback.failed":
            operation, result = f"rollback to {record.get('version')}", "failed"
        else:
            continue
        operations.append(
            {"at": record.get("at"), "operation": operation, "result": result, "reason": record.get("reason")}
        )
    return operations[-STATUS_OPERATIONS:]


# --- audit -------------------------------------------------------------------------------------------------


def state_home(env: Environment) -> Path:
    """This machine's state of a cluster environment: $XDG_STATE_HOME/maximus-ops/<env>."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "maximus-ops" / env.name


def audit_log(env: Environment) -> audit.AuditLog:
    """The audit log of a cluster environment: $MAXIMUS_AUDIT_STORE, else a file under `state_home`; the
    spool is always on this machine."""
    local = state_home(env) / "audit"
    store = Path(os.environ.get(AUDIT_STORE_VAR) or local / "audit.jsonl")
    return audit.AuditLog(audit.FileSink(store), local / "spool.jsonl")


# --- rollback ----------------------------------------------------------------------------------------------


def rollback(
    env: Environment,
    client: KubeClient,
    *,
    reason: str | None = None,
    force: bool = False,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> RollbackReport:
    """Back to the other color: one switch when it is warm, else scale it up, wait until ready, switch."""
    # opskit.deploy dispatches kubernetes environments here: imported when called, never in a cycle.
    from opskit.deploy import RollbackReport  # noqa: PLC0415

    _require_cluster(env)
    started = clock()
    reason = reason or "no reason given"
    router = router_for(env, client)
    try:
        virtual_service = _read_virtual_service(env, client, router)
        routing = router.routing()
    except (KubeError, RouterError) as exc:
        raise OperationFailed(f"rollback of {env.name}: {exc}; nothing was changed") from exc
    active = routing.active
    if active is None:
        raise OperationFailed(
            f"rollback of {env.name}: traffic is split {routing.weights}, so there is no previous color; "
            "nothing was changed; `invoke status` shows it: finish or abort the deploy first"
        )
    target = other(active)
    try:
        current = read_deployment(client, env, active)
        previous = read_deployment(client, env, target)
    except KubeError as exc:
        raise OperationFailed(f"rollback of {env.name}: {exc}; nothing was changed") from exc
    version = deployment_version(previous) if previous is not None else None
    if previous is None or version is None:
        what = "does not exist" if previous is None else f"has no {VERSION_LABEL} label"
        raise OperationFailed(
            f"rollback of {env.name}: nothing to roll back to: Deployment {deployment_name(env, target)} "
            f"{what}; nothing was changed; `invoke status --env {env.name}` shows what runs"
        )
    needs_restore = _needs_restore(virtual_service)
    if needs_restore and not force:
        raise BadInput(
            f"rollback: the release on {active} ran a breaking migration ({NEEDS_RESTORE_ANNOTATION}), so "
            f"{version} needs the database as it was: restore the backup taken before it first "
            f"(`invoke db.list --env {env.name}`, `invoke db.restore --env {env.name} --backup ID`, "
            "runbooks/rollback.md), then run again with --force; nothing was changed"
        )
    from_version = deployment_version(current) if current is not None else None
    log = audit_log(env)
    details: dict[str, Any] = {
        "automatic": False,
        "reason": reason,
        "from": active,
        "from_version": from_version,
        "to": target,
        "version": version,
        "forced": force and needs_restore,
    }
    try:
        log.write(env.name, "rollback.start", **details)
    except OSError as exc:
        raise OperationFailed(
            f"rollback of {env.name}: cannot write the audit spool {log.spool} ({exc.strerror}); nothing "
            "was changed; free the disk or set XDG_STATE_HOME to a writable directory"
        ) from exc
    path: Literal["switch", "redeploy"] = "switch" if ready_replicas(previous) >= 1 else "redeploy"
    try:
        if path == "redeploy":
            _scale_up(env, client, target, sleep=sleep, clock=clock)
            now = router.routing()  # the wait is long: someone else may have switched meanwhile
            if now.active != active:
                moved = now.active or f"a split {now.weights}"
                raise OperationFailed(
                    f"while {deployment_name(env, target)} came up, traffic moved from {active} to {moved} "
                    f"by another hand; nothing was switched; `invoke status --env {env.name}`, then decide"
                )
        router.switch(target)
    except OpsError as exc:
        where = _where_traffic_is(router)
        _record(log, env, "rollback.failed", **details, path=path, error=str(exc), traffic=where)
        raise OperationFailed(f"rollback of {env.name}: {exc}; {where}") from exc
    restore_cleared = _clear_needs_restore(client, router.path) if needs_restore else None
    verified = _verify(env, client, router, target)
    seconds = clock() - started
    _record(
        log,
        env,
        "rollback",
        **details,
        path=path,
        seconds=round(seconds, 3),
        verified=verified,
        needs_restore_cleared=restore_cleared,
    )
    notified = notify.send(
        env,
        "MaximusRollback",
        severity="warning",
        summary=f"{env.name}: rolled back to {version}",
        description=f"{reason} (from {from_version} on {active})",
        runbook="alerts/MaximusRollback.md",
        alertmanager=alertmanager(env, client),
    )
    return RollbackReport(env.name, active, target, version, path, reason, seconds, notified, verified)


def _record(log: audit.AuditLog, env: Environment, operation: str, **details: Any) -> None:
    """Audit after the change: a record that cannot be spooled must not hide what was done."""
    # the `rollback.start` record is in the spool or the store already
    with contextlib.suppress(OSError):
        log.write(env.name, operation, **details)


def _scale_up(env: Environment, client: KubeClient, color: str, *, sleep: Sleep, clock: Clock) -> None:
    """Scale the cold color to the model's minimum replicas and wait until that many are ready."""
    wanted = env.service.replicas.min
    path = deployment_path(env, color)
    name = deployment_name(env, color)

    def plan(deployment: dict[str, Any]) -> list[dict[str, Any]] | None:
        if desired_replicas(deployment) >= wanted:
            return None  # already asked for (an earlier, interrupted rollback, or the HPA)
        return [{"op": "add", "path": "/spec/replicas", "value": wanted}]

    try:
        guarded_patch(client, path, plan, "json")
    except KubeError as exc:
        raise OperationFailed(f"scaling {name} to {wanted} replicas: {exc}") from exc
    problem = wait_rollout(env, client, color, sleep=sleep, clock=clock)
    if problem is not None:
        raise OperationFailed(
            f"{problem}, so nothing was switched and {name} stays scaled up; "
            f"`kubectl -n {env.namespace} describe deployment {name}` says why, then run the rollback again"
        )


def wait_rollout(
    env: Environment,
    client: KubeClient,
    color: str,
    *,
    version: str | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> str | None:
    """Wait until the color's rollout is complete: the spec observed, every replica updated (to `version`
    when given) and ready, at least the model's minimum. None, or why not by the model's ready deadline (a
    Deployment past its progress deadline fails at once)."""
    path = deployment_path(env, color)
    name = deployment_name(env, color)
    deadline = clock() + env.deploy.ready_deadline_s
    last, verdict = "no replica ready yet", f"was not ready within {env.deploy.ready_deadline_s:g} s"
    while True:
        try:
            deployment = client.get(path)
        except KubeError as exc:
            raise OperationFailed(f"waiting for {name}: {exc}") from exc
        wanted = max(env.service.replicas.min, desired_replicas(deployment))
        ready = ready_replicas(deployment)
        running = deployment_version(deployment)
        if version is not None and running != version:
            last = f"it runs {running}, not {version}"
        elif ready >= wanted and not _rolling(deployment):
            return None
        else:
            last = f"{ready}/{wanted} replicas ready"
        stuck = _stuck(deployment)
        if stuck is not None:
            last, verdict = f"{last}: {stuck}", "cannot get ready"
            break
        if clock() >= deadline:
            break
        sleep(POLL_S)
    return f"{name} {verdict} ({last})"


def _where_traffic_is(router: IstioRouter) -> str:
    """After a failure: where traffic is now, read from the cluster rather than assumed."""
    try:
        routing = router.routing()
    except RouterError:
        return "where traffic is now could not be read: `invoke status` once the cluster answers"
    if routing.active is None:
        return f"traffic is split {routing.weights}: `invoke status`, then switch"
    return f"traffic is on {routing.active}"


def _clear_needs_restore(client: KubeClient, path: str) -> bool:
    """Remove the needs-restore annotation once a forced rollback switched; False when it could not."""
    try:
        set_needs_restore(client, path, False)
    except KubeError:
        return False
    return True


def set_needs_restore(client: KubeClient, path: str, needed: bool) -> None:
    """Annotate the VirtualService: rolling back from the active release needs the database restored."""
    key = pointer("metadata", "annotations", NEEDS_RESTORE_ANNOTATION)

    def plan(obj: dict[str, Any]) -> list[dict[str, Any]] | None:
        present = NEEDS_RESTORE_ANNOTATION in _annotations(obj)
        if needed and not _needs_restore(obj):
            if "annotations" not in (obj.get("metadata") or {}):
                return [
                    {
                        "op": "add",
                        "path": "/metadata/annotations",
                        "value": {NEEDS_RESTORE_ANNOTATION: "true"},
                    }
                ]
            return [{"op": "add", "path": key, "value": "true"}]
        if not needed and present:
            return [{"op": "remove", "path": key}]
        return None

    guarded_patch(client, path, plan, "json")


def _verify(env: Environment, client: KubeClient, router: IstioRouter, target: str) -> bool:
    """Read back: the VirtualService sends everything to `target` and `target` has ready replicas."""
    try:
        deployment = read_deployment(client, env, target)
        return (
            router.routing().active == target and deployment is not None and ready_replicas(deployment) >= 1
        )
    except (KubeError, RouterError):
        return False
