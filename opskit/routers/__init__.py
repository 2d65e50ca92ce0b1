"""Routers: who decides which color the edge sends traffic to. One interface, small classes behind it.

- `haproxy.HAProxyRouter`: the `local` edge, through HAProxy's runtime API socket.
- `istio.IstioRouter`: weights of the Istio VirtualService routes (staging, production).
- `service.ServiceSelectorRouter`: the color in a Kubernetes Service's selector.

A switch is atomic for its caller: when `switch` returns, every new request goes to the target color
and none is split in a way nobody chose; requests already in flight finish where they started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from opskit.errors import OpsError
from opskit.kube import KubeClient, KubeError, PatchType, Plan, guarded_patch


class RouterError(OpsError):
    """The router could not be read or changed; nothing was switched."""

    exit_code = 1


@dataclass(frozen=True)
class Routing:
    """What the edge does now: percent of new requests per color (they add up to 100)."""

    weights: dict[str, int]

    @property
    def active(self) -> str | None:
        """The color taking all traffic, or None while traffic is split."""
        full = [color for color, weight in self.weights.items() if weight == 100]
        return full[0] if full else None


class Router(Protocol):
    def routing(self) -> Routing:
        """Read what the edge does now."""
        ...

    def switch(self, color: str) -> Routing:
        """Send every new request to `color`; idempotent; return the routing read back after the change."""
        ...


def patch_and_read_back(
    client: KubeClient, path: str, plan: Plan, patch_type: PatchType, *, subject: str, color: str
) -> dict[str, Any]:
    """A Kubernetes router's switch: one guarded patch, then the object read back as the cluster now
    has it (what the proxies will get); RouterError says whether the switch was applied."""
    try:
        after, changed = guarded_patch(client, path, plan, patch_type)
    except KubeError as exc:
        raise RouterError(f"{subject}: switch to {color} not done: {exc}") from exc
    if not changed:
        return after
    try:
        return client.get(path)
    except KubeError as exc:
        raise RouterError(
            f"{subject}: switched to {color} but cannot read it back: {exc}; check with `invoke status`"
        ) from exc
