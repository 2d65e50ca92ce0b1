"""The Service-selector router: the color label in a stable Kubernetes Service's selector.

For a cluster without a mesh: the stable Service selects the pods of one color only, so all new
connections go to that color. `switch` is ONE merge patch of the selector, guarded by the resourceVersion
it was planned from (a concurrent writer makes the API server answer 409, and it is planned again from a
fresh read). kube-proxy then moves new connections to the new color's endpoints; established connections
stay where they are.

Note: the stack's stable Service (infra/app.py) selects the pods of BOTH colors and leaves the split to
the Istio VirtualService; there `routing` reports that the Service does not pin a color, and a `switch`
pins it (adds the color label to the selector).
"""

from __future__ import annotations

from typing import Any

from opskit.errors import BadInput
from opskit.kube import KubeClient, KubeError, object_path
from opskit.model import COLORS
from opskit.routers import RouterError, Routing, patch_and_read_back

# Same key as infra.common.COLOR_LABEL (a test keeps them equal; opskit does not import infra).
COLOR_LABEL = "maximus.io/color"


class ServiceSelectorRouter:
    """Traffic per color as the `color_label` of the Service `namespace/service`'s selector."""

    def __init__(
        self, client: KubeClient, namespace: str, service: str, color_label: str = COLOR_LABEL
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.service = service
        self.color_label = color_label
        self.path = object_path("v1", "services", namespace, service)
        self.subject = f"Service {namespace}/{service}"

    def routing(self) -> Routing:
        try:
            obj = self.client.get(self.path)
        except KubeError as exc:
            raise RouterError(f"{self.subject}: cannot read the routing: {exc}") from exc
        return self._routing(obj)

    def switch(self, color: str) -> Routing:
        if color not in COLORS:
            raise BadInput(f"color {color!r}: accepted: {', '.join(COLORS)}")
        after = patch_and_read_back(
            self.client,
            self.path,
            lambda obj: self._plan(obj, color),
            "merge",
            subject=self.subject,
            color=color,
        )
        routing = self._routing(after)
        if routing.active != color:
            raise RouterError(
                f"{self.subject}: read back after the switch to {color}: selector "
                f"{self.color_label}={self._selector(after).get(self.color_label)}; "
                "another writer changed it since: check who, then switch again"
            )
        return routing

    def _selector(self, obj: dict[str, Any]) -> dict[str, Any]:
        selector = (obj.get("spec") or {}).get("selector")
        if not isinstance(selector, dict) or not selector:
            raise RouterError(
                f"{self.subject}: has no spec.selector (its endpoints are managed by hand); "
                "accepted: a Service selecting the service's pods"
            )
        return selector

    def _routing(self, obj: dict[str, Any]) -> Routing:
        color = self._selector(obj).get(self.color_label)
        if color is None:
            raise RouterError(
                f"{self.subject}: spec.selector has no {self.color_label}, so it sends to the pods of every "
                "color; a switch pins one"
            )
        if color not in COLORS:
            raise RouterError(
                f"{self.subject}: spec.selector {self.color_label}={color}; accepted: {', '.join(COLORS)}"
            )
        return Routing({c: 100 if c == color else 0 for c in COLORS})

    def _plan(self, obj: dict[str, Any], color: str) -> dict[str, Any] | None:
        """The merge patch that pins the selector to `color` (None when it already is)."""
        if self._selector(obj).get(self.color_label) == color:
            return None
        return {"spec": {"selector": {self.color_label: color}}}
