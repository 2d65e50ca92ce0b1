"""Blue-green deploys on a Kubernetes environment (staging, production): the cluster `Target` of the
state machine in `opskit.deploy`, everything through the one small client of `opskit.kube`.

- What runs is read from the cluster: a color runs when its Deployment asks for replicas, at the version
  of its pod template's label; where traffic goes is the VirtualService's weights. The deploy record, the
  previous release's warm window and the history live beside them in the ConfigMap `<service>-deploy`,
  each write guarded by the resourceVersion it was planned from.
- `run_colors`: a color that should run gets `<image>:<version>`, the version label, MAXIMUS_VERSION and at
  least the model's minimum replicas in one guarded JSON patch; a color that should not is scaled to zero.
- `wait_ready`: the rollout finished at the version asked for, by the model's ready deadline.
- `smoke`: real requests through the gateway carrying `x-maximus-color: <color>`, which the
  VirtualService's preview routes send to that color alone (Kong's key from $MAXIMUS_GATEWAY_API_KEY).
- `metrics`: the cluster's Prometheus through the API server's service proxy.
- `lock`: the Lease `<service>-deploy-lock`, renewed while held. A holder that stopped renewing (or whose
  process on this host is gone) is stale, broken only with --break-stale-lock.
- `notify`: the cluster's Alertmanager through the proxy, else $MAXIMUS_NOTIFY_WEBHOOK.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx

from opskit import analysis, backup_kube, backup_storage, envstate, health, kuberollout, lock, notify
from opskit.deploy import SMOKE_REQUESTS, RollbackReport
from opskit.errors import LockHeld, OperationFailed
from opskit.health import GATEWAY_KEY_VAR
from opskit.kube import (
    KubeClient,
    KubeConflict,
    KubeError,
    KubeNotFound,
    guarded_patch,
    object_path,
    pointer,
)
from opskit.model import COLORS, Color, Environment
from opskit.routers import Router, RouterError
from opskit.routers.istio import PREVIEW_HEADER

API_KEY_HEADER = "X-API-Key"  # pragma: allowlist secret - a header's name
LEASE_DURATION_S = 60
RENEW_EVERY_S = 15.0
OPERATION_ANNOTATION = "maximus.io/operation"
HTTP_TIMEOUT_S = 5.0


def _require(env: Environment) -> str:
    if env.kind != "kubernetes" or env.namespace is None:
        raise OperationFailed(f"{env.name} is a {env.kind} environment, not a cluster")
    return env.namespace


def lease_path(env: Environment) -> str:
    return object_path("coordination.k8s.io/v1", "leases", _require(env), f"{env.service.name}-deploy-lock")


# --- the lock: a Lease -------------------------------------------------------------------------------------


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_micro(text: Any) -> datetime | None:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _stale(lease: dict[str, Any], now: datetime) -> bool:
    """Nobody renewed it within its duration, or its holder ran on this host and is gone."""
    spec = lease.get("spec") or {}
    host, _, pid = str(spec.get("holderIdentity") or "").rpartition(":")
    if pid.isdigit():  # held from this host: gone, or its pid reused since, is stale (as the file lock)
        acquired = _parse_micro(spec.get("acquireTime"))
        since = acquired.timestamp() if acquired else None
        if lock.is_stale({"host": host, "pid": int(pid), "since_epoch": since}):
            return True
    renewed = _parse_micro(spec.get("renewTime"))
    duration = int(spec.get("leaseDurationSeconds") or LEASE_DURATION_S)
    return renewed is None or now > renewed + timedelta(seconds=duration)


def _describe(lease: dict[str, Any]) -> str:
    spec = lease.get("spec") or {}
    operation = ((lease.get("metadata") or {}).get("annotations") or {}).get(OPERATION_ANNOTATION, "?")
    return f"{operation} ({spec.get('holderIdentity')}, since {spec.get('acquireTime')})"


class HeldLease:
    """The Lease as its holder sees it: `lost` is set once someone else took it (after a stale break)."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.stop = threading.Event()
        self.lost = threading.Event()


@contextmanager
def lease_lock(
    env: Environment, client: KubeClient, operation: str, *, break_stale: bool = False
) -> Iterator[HeldLease]:
    """Hold the environment's Lease for `operation`, or raise LockHeld (exit 3) naming the holder."""
    path = lease_path(env)
    me = f"{socket.gethostname()}:{os.getpid()}"
    now = datetime.now(UTC)
    spec = {
        "holderIdentity": me,
        "leaseDurationSeconds": LEASE_DURATION_S,
        "acquireTime": _micro(now),
        "renewTime": _micro(now),
    }
    annotations = {OPERATION_ANNOTATION: operation}
    name = path.rsplit("/", 1)[1]
    try:
        client.create(
            path.rsplit("/", 1)[0],
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": env.namespace, "annotations": annotations},
                "spec": spec,
            },
        )
    except KubeConflict:
        _take(env, client, path, spec, annotations, break_stale=break_stale)
    held = HeldLease(me)
    renewer = threading.Thread(target=_renew, args=(client, path, held), daemon=True)
    renewer.start()
    try:
        yield held
    finally:
        held.stop.set()
        renewer.join()
        _release(client, path, me)


def _take(
    env: Environment,
    client: KubeClient,
    path: str,
    spec: dict[str, Any],
    annotations: dict[str, str],
    *,
    break_stale: bool,
) -> None:
    def plan(lease: dict[str, Any]) -> list[dict[str, Any]]:
        if (lease.get("spec") or {}).get("holderIdentity"):
            if not _stale(lease, datetime.now(UTC)):
                raise LockHeld(
                    f"environment {env.name} is locked by {_describe(lease)}; wait for it to finish"
                )
            if not break_stale:
                raise LockHeld(
                    f"environment {env.name} is locked by {_describe(lease)}, which no longer renews it: "
                    "a stale lock. Check `invoke status`, then run again with --break-stale-lock"
                )
        return [
            {"op": "add", "path": "/spec", "value": spec},
            {"op": "add", "path": "/metadata/annotations", "value": annotations},
        ]

    try:
        guarded_patch(client, path, plan, "json")
    except KubeConflict as exc:  # someone else took it between our read and our write
        raise LockHeld(f"environment {env.name}: its lock was taken meanwhile ({exc})") from exc


def _renew(client: KubeClient, path: str, held: HeldLease) -> None:
    while not held.stop.wait(RENEW_EVERY_S) and not held.lost.is_set():
        renew(client, path, held)


def renew(client: KubeClient, path: str, held: HeldLease) -> None:
    """Move the Lease's renewTime on, if it is still ours; else mark it lost."""
    patch = [
        {"op": "test", "path": "/spec/holderIdentity", "value": held.identity},
        {"op": "add", "path": "/spec/renewTime", "value": _micro(datetime.now(UTC))},
    ]
    try:
        client.patch(path, patch, "json")
    except KubeConflict:
        held.lost.set()  # someone broke it as stale and holds it now
    except KubeError:
        return  # the next renewal tries again; the lease outlives a few missed ones


def _release(client: KubeClient, path: str, me: str) -> None:
    """Give the Lease up if it is still ours (a broken stale lock belongs to someone else now)."""
    patch = [
        {"op": "test", "path": "/spec/holderIdentity", "value": me},
        {"op": "remove", "path": "/spec/holderIdentity"},
    ]
    try:
        client.patch(path, patch, "json")
    except KubeError:
        return  # expires on its own: nobody renews it


# --- the target --------------------------------------------------------------------------------------------


class ClusterTarget:
    """A Kubernetes environment as the deploy state machine sees it."""

    def __init__(
        self,
        env: Environment,
        client: KubeClient,
        *,
        edge_transport: httpx.BaseTransport | None = None,
        storage: backup_storage.Storage | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = env
        self.namespace = _require(env)
        self.client = client
        self.istio = kuberollout.router_for(env, client)
        self.router: Router = self.istio
        self.log = kuberollout.audit_log(env)
        self.edge_transport = edge_transport
        self.storage = storage
        self.held: HeldLease | None = None
        self.sleep = sleep
        self.clock = clock

    @classmethod
    def connect(cls, env: Environment) -> ClusterTarget:
        return cls(env, kuberollout.client_for(env))

    # -- state ------------------------------------------------------------------------------------------

    def read_state(self) -> envstate.EnvState:
        try:
            record = kuberollout.deploy_record(self.env, self.client)
            active = self.router.routing().active or record.get("active")
            deployments = {c: kuberollout.read_deployment(self.client, self.env, c) for c in COLORS}
        except (KubeError, RouterError) as exc:
            raise OperationFailed(f"{self.env.name}: cannot read the cluster: {exc}") from exc
        colors: dict[str, dict[str, Any]] = {
            color: {"version": kuberollout.deployment_version(d), "faults": {}}
            for color, d in deployments.items()
            if d is not None and kuberollout.desired_replicas(d) > 0 and kuberollout.deployment_version(d)
        }
        if active not in colors:
            raise OperationFailed(
                f"{self.env.name}: the active color {active} runs no replicas (`invoke status --env "
                f"{self.env.name}`); scale it up or roll back first"
            )
        return envstate.EnvState(
            active=str(active),
            colors=colors,
            previous=record.get("previous"),
            deploy=record.get("deploy") or {"state": "idle"},
            history=record.get("history") or [],
        )

    def write_state(self, state: envstate.EnvState) -> None:
        if self.held is not None and self.held.lost.is_set():
            raise LockHeld(
                f"{self.env.name}: this operation lost its lock (someone broke it as stale) and stopped "
                "before changing anything more; `invoke status` shows where it stood"
            )
        text = json.dumps(
            {
                "active": state.active,
                "previous": state.previous,
                "deploy": state.deploy,
                "history": state.history,
            },
            sort_keys=True,
        )
        path = kuberollout.deploy_record_path(self.env)
        key = kuberollout.RECORD_KEY

        def plan(config_map: dict[str, Any]) -> list[dict[str, Any]]:
            data = config_map.get("data") or {}
            return (
                []
                if data.get(key) == text
                else [{"op": "add", "path": "/data", "value": {**data, key: text}}]
            )

        try:
            guarded_patch(self.client, path, plan, "json")
        except KubeNotFound:
            collection, name = path.rsplit("/", 1)
            self.client.create(
                collection,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": self.namespace},
                    "data": {key: text},
                },
            )

    # -- what runs --------------------------------------------------------------------------------------

    def run_colors(self, state: envstate.EnvState) -> None:
        for color in COLORS:
            wanted = state.colors.get(color)
            plan = self._run_plan(wanted["version"] if wanted else None)
            try:
                guarded_patch(self.client, kuberollout.deployment_path(self.env, color), plan, "json")
            except KubeError as exc:
                what = f"run {wanted['version']} on" if wanted else "scale down"
                raise OperationFailed(f"cannot {what} {color}: {exc}") from exc

    def _run_plan(self, version: str | None) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
        minimum = self.env.service.replicas.min

        def plan(deployment: dict[str, Any]) -> list[dict[str, Any]]:
            desired = kuberollout.desired_replicas(deployment)
            if version is None:
                return [{"op": "add", "path": "/spec/replicas", "value": 0}] if desired else []
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            variable = (container.get("env") or [{}])[0]
            if variable.get("name") != kuberollout.VERSION_ENV:
                raise OperationFailed(
                    f"{deployment['metadata']['name']}: its first container's first variable is not "
                    f"{kuberollout.VERSION_ENV}; re-apply the stack (pulumi up)"
                )
            ops: list[dict[str, Any]] = []
            image = f"{self.env.service.image}:{version}"
            if container.get("image") != image:
                ops.append({"op": "add", "path": "/spec/template/spec/containers/0/image", "value": image})
            if variable.get("value") != version:
                ops.append(
                    {"op": "add", "path": "/spec/template/spec/containers/0/env/0/value", "value": version}
                )
            if kuberollout.deployment_version(deployment) != version:
                label = pointer("spec", "template", "metadata", "labels", kuberollout.VERSION_LABEL)
                ops.append({"op": "add", "path": label, "value": version})
            if desired < minimum:
                ops.append({"op": "add", "path": "/spec/replicas", "value": minimum})
            return ops

        return plan

    def wait_ready(self, color: str, version: str) -> str | None:
        return kuberollout.wait_rollout(
            self.env, self.client, color, version=version, sleep=self.sleep, clock=self.clock
        )

    # -- measuring --------------------------------------------------------------------------------------

    def smoke(
        self, color: str, on_measure: Callable[[analysis.Measurement], None]
    ) -> analysis.AnalysisReport:
        started = time.monotonic()
        edge = kuberollout.edge(self.env)
        key = os.environ.get(GATEWAY_KEY_VAR)
        policy = self.env.deploy.analysis
        if edge is None or not key:
            why = (
                "the model has no platform.gateway.host" if edge is None else f"${GATEWAY_KEY_VAR} is not set"
            )
            detail = f"cannot reach {color} through the gateway: {why}"
            taken = analysis.not_measured("smoke through the gateway", detail, policy)
        else:
            client = httpx.Client(
                base_url=edge,
                headers={PREVIEW_HEADER: color, API_KEY_HEADER: key},
                timeout=HTTP_TIMEOUT_S,
                transport=self.edge_transport,
            )
            taken = analysis.smoke(
                edge,
                SMOKE_REQUESTS,
                policy=policy,
                client=client,
                expect=(analysis.COLOR_HEADER, color),
            )
        for measurement in taken:
            on_measure(measurement)
        return analysis.smoke_report(
            self.env,
            cast("Color", color),
            f"smoke through {edge} ({PREVIEW_HEADER}: {color})",
            taken,
            time.monotonic() - started,
        )

    def metrics(self) -> analysis.MetricProvider:
        return kuberollout.prometheus(self.env, self.client)

    def unhealthy(self) -> list[str]:
        report = health.check_environment(self.env, client=self.client, edge_transport=self.edge_transport)
        return [c.name for c in report.checks if c.required and not c.ok]

    # -- the rest ---------------------------------------------------------------------------------------

    @contextmanager
    def lock(self, operation: str, break_stale: bool) -> Iterator[HeldLease]:
        with lease_lock(self.env, self.client, operation, break_stale=break_stale) as held:
            self.held = held
            try:
                yield held
            finally:
                self.held = None

    def mark_needs_restore(self, needed: bool) -> None:
        kuberollout.set_needs_restore(self.client, self.istio.path, needed)

    def notify(self, name: str, *, severity: str, summary: str, description: str, runbook: str) -> str:
        return notify.send(
            self.env,
            name,
            severity=severity,
            summary=summary,
            description=description,
            runbook=runbook,
            alertmanager=kuberollout.alertmanager(self.env, self.client),
        )

    def backup(self) -> str:
        report = backup_kube.backup(
            self.env,
            self.client,
            storage=self.storage or backup_storage.for_environment(self.env),
            sleep=self.sleep,
            clock=self.clock,
        )
        return report.name


# --- rollback ----------------------------------------------------------------------------------------------


def rollback(
    env: Environment,
    *,
    reason: str | None = None,
    force: bool = False,
    break_stale_lock: bool = False,
    target: ClusterTarget | None = None,
) -> RollbackReport:
    """`invoke rollback` on a cluster: under the Lease, `kuberollout.rollback`; an interrupted or held deploy
    whose release was rolled back is closed as rolled back."""
    target = target or ClusterTarget.connect(env)
    with target.lock("rollback", break_stale_lock):
        before = target.read_state()
        deploy = before.deploy
        if deploy.get("state") in ("in-progress", "held") and before.active != deploy["to"]["color"]:
            raise OperationFailed(
                f"deploy {deploy['id']} stopped at step {deploy['step']}, before its switch: traffic is "
                f"still on {before.active}, {deploy['to']['color']} runs the unproven {deploy['version']}; "
                f"undo it with `invoke deploy --env {env.name} --abort`; nothing was changed"
            )
        report = kuberollout.rollback(
            env, target.client, reason=reason, force=force, sleep=target.sleep, clock=target.clock
        )
        try:
            state = target.read_state()
        except OperationFailed:
            return report  # rolled back and audited; the record catches up at the next deploy
        deploy = state.deploy
        if deploy.get("state") in ("in-progress", "held") and deploy["to"]["color"] == report.from_color:
            state.deploy = {**deploy, "state": "rolled-back", "reason": report.reason}
        # The release rolled back from stays warm for the window, as after a deploy (a second rollback
        # goes forward to it again).
        state.previous = {
            "color": report.from_color,
            "version": state.colors.get(report.from_color, {}).get("version"),
            "warm_until": (datetime.now(UTC) + timedelta(seconds=env.deploy.rollback_window_s)).isoformat(
                timespec="seconds"
            ),
            "needs_restore": False,
            "backup": None,
        }
        state.history = [
            *state.history,
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "operation": f"rollback to {report.version}",
                "result": "done",
                "reason": report.reason,
            },
        ][-20:]
        with contextlib.suppress(KubeError):  # the audit log has the rollback; only the record lags
            target.write_state(state)
    return report
