"""What an environment runs now: active color and version, the previous one, every component."""

from __future__ import annotations

from typing import Any

from opskit import envstate, kuberollout, localenv
from opskit.model import Environment


def environment_status(env: Environment) -> dict[str, Any]:
    if env.kind == "kubernetes":
        return kuberollout.status(env, kuberollout.client_for(env))
    state = envstate.read_state(env)
    processes = localenv.process_status(env)
    endpoints = localenv.endpoints(env)
    components = [
        {
            "name": name,
            "endpoint": endpoint,
            "state": processes.get(name, {}).get("state", "STOPPED"),
            "pid": processes.get(name, {}).get("pid"),
        }
        for name, endpoint in endpoints.items()
        if name != "edge"
    ]
    active = state.active
    return {
        "environment": env.name,
        "kind": env.kind,
        "running": localenv.running(env),
        "edge": endpoints["edge"],
        "active": {"color": active, "version": state.colors.get(active, {}).get("version")},
        "previous": state.previous,
        "deploy": state.deploy,
        "components": components,
        "last_operations": state.history[-5:],
    }
