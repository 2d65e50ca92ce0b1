"""The Istio router: weights of the service's VirtualService routes (staging, production).

The stack (infra/mesh.py) declares one VirtualService named after the service, whose every HTTP route has
exactly two destinations, the `blue` and `green` subsets, and annotates it with the active color. Pulumi
ignores those fields after creation: they belong to this router.

`switch` changes every route's weights and the annotation in ONE JSON-patch request guarded by a `test` of
the resourceVersion it was planned from: the API server applies all of it or none, and a concurrent writer
makes it plan again from a fresh read instead of half-applying. istiod then pushes the new routes to every
sidecar at once; requests already in flight finish on the color they started on.
"""

from __future__ import annotations

from typing import Any

from opskit.errors import BadInput
from opskit.kube import KubeClient, KubeError, object_path, pointer
from opskit.model import COLORS
from opskit.routers import RouterError, Routing, patch_and_read_back

API_VERSION = "networking.istio.io/v1"
PLURAL = "virtualservices"
# Same key as infra.common.ACTIVE_COLOR_ANNOTATION (a test keeps them equal; opskit does not import infra).
ACTIVE_COLOR_ANNOTATION = "maximus.io/active-color"
UNMANAGED_ROUTE_KINDS = ("tcp", "tls")
# Preview routes send a request carrying this header to the color it names, whatever the weights: the
# pre-promotion analysis reaches the idle color through them. They are fixed; a switch leaves them alone.
PREVIEW_HEADER = "x-maximus-color"
PREVIEW_ROUTE_PREFIX = "preview-"


class IstioRouter:
    """Traffic per color as the weights of the VirtualService `namespace/name`."""

    def __init__(self, client: KubeClient, namespace: str, name: str) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.path = object_path(API_VERSION, PLURAL, namespace, name)
        self.subject = f"VirtualService {namespace}/{name}"

    def routing(self) -> Routing:
        return self._agreed(self._read())

    def switch(self, color: str) -> Routing:
        if color not in COLORS:
            raise BadInput(f"color {color!r}: accepted: {', '.join(COLORS)}")
        after = patch_and_read_back(
            self.client,
            self.path,
            lambda obj: self._plan(obj, color),
            "json",
            subject=self.subject,
            color=color,
        )
        routing = self._agreed(after)
        annotation = _annotations(after).get(ACTIVE_COLOR_ANNOTATION)
        if routing.active != color or annotation != color:
            raise RouterError(
                f"{self.subject}: read back after the switch to {color}: weights {routing.weights}, "
                f"{ACTIVE_COLOR_ANNOTATION}={annotation}; another writer changed it since: "
                "check who, then switch again"
            )
        return routing

    # --- reading -----------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            return self.client.get(self.path)
        except KubeError as exc:
            raise RouterError(f"{self.subject}: cannot read the routing: {exc}") from exc

    def _rules(self, obj: dict[str, Any]) -> list[tuple[int, str, list[dict[str, Any]]]]:
        """Every switched HTTP rule's index, name and destinations, checked: exactly the blue and green
        subsets, integer weights adding up to 100. Anything else is refused: this router does not guess."""
        spec = obj.get("spec") or {}
        for kind in UNMANAGED_ROUTE_KINDS:
            if spec.get(kind):
                raise RouterError(
                    f"{self.subject}: has spec.{kind} routes this router does not switch; "
                    "accepted: HTTP routes only (spec.http)"
                )
        http = spec.get("http")
        if not isinstance(http, list) or not http:
            raise RouterError(
                f"{self.subject}: spec.http has no routes; accepted: the routes the stack declares"
            )
        rules: list[tuple[int, str, list[dict[str, Any]]]] = []
        for index, rule in enumerate(http):
            if isinstance(rule, dict) and str(rule.get("name", "")).startswith(PREVIEW_ROUTE_PREFIX):
                self._check_preview(index, rule)
                continue
            label = f"spec.http[{index}]" + (
                f" ({rule['name']})" if isinstance(rule, dict) and "name" in rule else ""
            )
            destinations = rule.get("route") if isinstance(rule, dict) else None
            if not isinstance(destinations, list):
                raise RouterError(f"{self.subject}: {label} has no route list")
            subsets = [((d or {}).get("destination") or {}).get("subset") for d in destinations]
            if sorted(str(s) for s in subsets) != sorted(COLORS):
                raise RouterError(
                    f"{self.subject}: {label} routes to subsets {subsets}; "
                    f"accepted: exactly {' and '.join(COLORS)}, one destination each"
                )
            weights = [d.get("weight", 0) for d in destinations]
            if any(not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 100 for w in weights):
                raise RouterError(f"{self.subject}: {label} weights {weights}; accepted: integers 0..100")
            if sum(weights) != 100:
                raise RouterError(
                    f"{self.subject}: {label} weights add up to {sum(weights)}; accepted: 100 in total"
                )
            rules.append((index, label, destinations))
        if not rules:
            raise RouterError(
                f"{self.subject}: spec.http has only preview routes; accepted: the stack's routes"
            )
        return rules

    def _check_preview(self, index: int, rule: dict[str, Any]) -> None:
        """A preview route sends its color's header to that color alone; anything else was edited (or
        shifted by an update of the stack) and is refused rather than trusted."""
        color = str(rule["name"]).removeprefix(PREVIEW_ROUTE_PREFIX)
        subsets = [((d or {}).get("destination") or {}).get("subset") for d in rule.get("route") or []]
        if subsets != [color]:
            raise RouterError(
                f"{self.subject}: spec.http[{index}] ({rule['name']}) routes to subsets {subsets}; accepted: "
                f"exactly [{color!r}]; re-apply the stack's routes (pulumi up) before switching"
            )

    def _agreed(self, obj: dict[str, Any]) -> Routing:
        """The routing when every HTTP rule sends the same share to each color."""
        seen: dict[str, dict[str, int]] = {}
        for _, label, destinations in self._rules(obj):
            seen[label] = {d["destination"]["subset"]: int(d.get("weight", 0)) for d in destinations}
        distinct = {tuple(sorted(w.items())) for w in seen.values()}
        if len(distinct) != 1:
            detail = "; ".join(f"{label} {weights}" for label, weights in seen.items())
            raise RouterError(
                f"{self.subject}: routes disagree ({detail}): edited by hand or by an older tool; "
                "a switch sets them all"
            )
        weights = next(iter(seen.values()))
        return Routing({color: weights[color] for color in COLORS})

    # --- switching ---------------------------------------------------------------------------------

    def _plan(self, obj: dict[str, Any], color: str) -> list[dict[str, Any]]:
        """The JSON patch that puts `obj` at 100 % `color` (empty when it already is)."""
        ops: list[dict[str, Any]] = []
        for index, _, destinations in self._rules(obj):
            for position, destination in enumerate(destinations):
                want = 100 if destination["destination"]["subset"] == color else 0
                if destination.get("weight") != want:
                    path = pointer("spec", "http", index, "route", position, "weight")
                    ops.append({"op": "add", "path": path, "value": want})
        annotations = _annotations(obj)
        if annotations.get(ACTIVE_COLOR_ANNOTATION) != color:
            if "annotations" in (obj.get("metadata") or {}):
                path = pointer("metadata", "annotations", ACTIVE_COLOR_ANNOTATION)
                ops.append({"op": "add", "path": path, "value": color})
            else:
                ops.append(
                    {"op": "add", "path": "/metadata/annotations", "value": {ACTIVE_COLOR_ANNOTATION: color}}
                )
        return ops


def _annotations(obj: dict[str, Any]) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    return annotations if isinstance(annotations, dict) else {}
