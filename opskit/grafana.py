"""Deploys and rollbacks on the dashboards: audit records posted to Grafana as annotations.

`Annotations` is the interface: find annotations by tags, post one. `GrafanaAnnotations` is the production
implementation on httpx against Grafana's HTTP API (`GET` and `POST /api/annotations`), authenticated with a
service account token; tests plug a fake Grafana in at the HTTP boundary (`transport=`).

    annotation_for(record)            the annotation of one audit record, or None for other operations
    sync(env, annotations, records)   post every such record Grafana does not have yet; a SyncReport
    annotate_command(env, json)       the command line's body: read, verify, sync, print; the exit code

Each annotation carries the tag `audit:<first 16 hex digits of the record's hash>`, so a record is found
again and never posted twice: running the sync again (or from two machines) posts only what is missing.
The Deployments dashboard (infra/dashboards.py) shows them by the family and environment tags below.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx

from opskit import audit, audit_report, output
from opskit.errors import BadInput, OperationFailed
from opskit.kube import server_message
from opskit.model import Environment, load_environment

URL_VAR = "MAXIMUS_GRAFANA_URL"
TOKEN_VAR = "MAXIMUS_GRAFANA_TOKEN"  # noqa: S105 - the variable's name
TIMEOUT_S = 2.0
DEPLOY_TAG = "maximus-deploy"
ROLLBACK_TAG = "maximus-rollback"
AUDIT_TAG_PREFIX = "audit:"
AUDIT_HASH_DIGITS = 16
# One lookup fetches this many of an environment's annotations; beyond it, records are looked up one by one.
LOOKUP_LIMIT = 5000
MAX_SERVER_MESSAGE = 200


def env_tag(environment: str) -> str:
    return f"env:{environment}"


def audit_tag(record_hash: str) -> str:
    return f"{AUDIT_TAG_PREFIX}{record_hash[:AUDIT_HASH_DIGITS]}"


class GrafanaError(OperationFailed):
    """A call to Grafana failed; what was posted before it stays posted."""


class GrafanaUnreachable(GrafanaError):
    """No answer from Grafana: connection refused, DNS, TLS, timeout."""


class GrafanaAuthError(GrafanaError):
    """401 or 403: the token was rejected or may not write annotations."""


@dataclass(frozen=True)
class Annotation:
    """A point in time on every dashboard that shows annotations with these tags."""

    time_ms: int
    tags: tuple[str, ...]
    text: str

    @property
    def audit_tag(self) -> str:
        return next(t for t in self.tags if t.startswith(AUDIT_TAG_PREFIX))

    def payload(self) -> dict[str, Any]:
        """The body of `POST /api/annotations`."""
        return {"time": self.time_ms, "timeEnd": self.time_ms, "tags": list(self.tags), "text": self.text}


class Annotations(Protocol):
    """Grafana's annotations as the tooling uses them."""

    def find(
        self, tags: Sequence[str], *, from_ms: int | None = None, to_ms: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Annotations carrying every one of `tags` (between from_ms and to_ms when given), newest first."""
        ...

    def post(self, annotation: Annotation) -> int:
        """Create one annotation; its id."""
        ...


class GrafanaAnnotations:
    """Grafana's HTTP API with a service account token (`Authorization: Bearer`), on httpx, with a short
    timeout on every call. `transport` replaces the network (tests plug a fake Grafana in here)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise BadInput(f"{URL_VAR}: {url!r} is not a URL; accepted: Grafana's base URL, https://...")
        if not token:
            raise BadInput(f"{TOKEN_VAR}: empty; accepted: a Grafana service account token")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s),
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "maximus-ops",
            },
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, transport: httpx.BaseTransport | None = None
    ) -> GrafanaAnnotations:
        """Grafana's base URL from $MAXIMUS_GRAFANA_URL, the token from $MAXIMUS_GRAFANA_TOKEN."""
        values = os.environ if environ is None else environ
        url, token = values.get(URL_VAR, "").strip(), values.get(TOKEN_VAR, "").strip()
        if not url:
            raise BadInput(
                f"{URL_VAR} is not set; accepted: Grafana's base URL, e.g. https://grafana.example.org"
            )
        if not token:
            raise BadInput(
                f"{TOKEN_VAR} is not set; accepted: a token of a Grafana service account with the "
                "annotations:write and annotations:read permissions"
            )
        return cls(url, token, transport=transport)

    def find(
        self, tags: Sequence[str], *, from_ms: int | None = None, to_ms: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: list[tuple[str, str | int]] = [("tags", t) for t in tags]
        params += [("type", "annotation"), ("limit", limit)]
        if from_ms is not None:
            params.append(("from", from_ms))
        if to_ms is not None:
            params.append(("to", to_ms))
        data = self._call("GET", "/api/annotations", "read annotations", params=params).json()
        if not isinstance(data, list):
            raise GrafanaError(f"Grafana at {self.url}: GET /api/annotations did not answer with a list")
        return [a for a in data if isinstance(a, dict)]

    def post(self, annotation: Annotation) -> int:
        response = self._call("POST", "/api/annotations", "post an annotation", json=annotation.payload())
        data = response.json()
        return int(data.get("id", 0)) if isinstance(data, dict) else 0

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise GrafanaUnreachable(
                f"Grafana at {self.url} did not answer ({type(exc).__name__}: {detail}); check that "
                f"{URL_VAR} points at it and that it is up, then run the same command again: it posts "
                "only what is missing"
            ) from exc
        if response.status_code == 401:
            raise GrafanaAuthError(
                f"Grafana at {self.url} rejected the token (401) to {what}: set {TOKEN_VAR} to a valid "
                "service account token"
            )
        if response.status_code == 403:
            raise GrafanaAuthError(
                f"Grafana at {self.url} refused to {what} (403): the service account of {TOKEN_VAR} needs "
                "the annotations:read and annotations:write permissions"
            )
        if response.is_error:
            raise GrafanaError(
                f"Grafana at {self.url} answered {response.status_code} to {what}: "
                f"{server_message(response, MAX_SERVER_MESSAGE)}"
            )
        try:
            response.json()
        except ValueError as exc:
            raise GrafanaError(
                f"Grafana at {self.url}: {method} {path} did not answer with JSON; is {URL_VAR} Grafana's "
                "base URL?"
            ) from exc
        return response


# --- from audit records to annotations ---------------------------------------------------------------------


def _millis(at: str) -> int:
    return int(datetime.fromisoformat(at).timestamp() * 1000)


def _kind(record: Mapping[str, Any]) -> str | None:
    """The annotated kind of a record: its operation, `deploy.done` for a deploy's last step; None for
    records that are not annotated."""
    operation = record.get("operation")
    if operation in ("deploy.started", "deploy.aborted", "deploy.held", "rollback"):
        return str(operation)
    if operation == "deploy.step" and record.get("step") == "done":
        return "deploy.done"
    return None


def _text(kind: str, record: Mapping[str, Any]) -> str:
    env = record.get("environment")
    version = record.get("version")
    reason = record.get("reason")
    deploy = record.get("deploy")
    if kind == "deploy.started":
        ticket = f", ticket {record['ticket']}" if record.get("ticket") else ""
        text = f"deploy of {version} started on {env}{ticket}"
    elif kind == "deploy.done":
        text = f"deploy of {version} done on {env}: {record.get('color')} serves it"
    elif kind == "deploy.aborted":
        text = f"deploy {deploy} aborted on {env}: {reason}"
    elif kind == "deploy.held":
        text = f"deploy {deploy} held on {env}: {reason}"
    else:
        how = "automatic rollback" if record.get("automatic") else "rollback"
        path = f" by {record['path']}" if record.get("path") else ""
        text = f"{how} of {env} to {version} ({record.get('to')}){path}"
        text += f": {reason}" if reason else ""
    actor = record.get("actor")
    return text + (f" (by {actor}; audit record {record.get('seq')})" if actor else "")


def annotation_for(record: Mapping[str, Any]) -> Annotation | None:
    """The annotation of a deploy start, a deploy done, abort or hold, or a rollback; None for any other
    record, and for a record that is not chained yet (no hash: nothing to recognise it by later)."""
    kind = _kind(record)
    if kind is None or not record.get("hash") or not record.get("at") or not record.get("environment"):
        return None
    tags = [
        ROLLBACK_TAG if kind == "rollback" else DEPLOY_TAG,
        env_tag(str(record["environment"])),
        f"op:{kind}",
        audit_tag(str(record["hash"])),
    ]
    if record.get("version"):
        tags.append(f"version:{record['version']}")
    return Annotation(_millis(str(record["at"])), tuple(tags), _text(kind, record))


# --- sync --------------------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    environment: str
    grafana: str
    records: int = 0
    to_annotate: int = 0
    posted: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "grafana": self.grafana,
            "ok": self.ok,
            "records": self.records,
            "to_annotate": self.to_annotate,
            "posted": self.posted,
            "skipped": self.skipped,
            "failed": self.failed,
            "errors": self.errors,
        }


def _existing_audit_tags(
    env: Environment, annotations: Annotations, wanted: Sequence[Annotation]
) -> set[str]:
    """The audit tags of `wanted` that Grafana already has (one lookup per tag family, then one per record
    only if a lookup came back full)."""
    found: set[str] = set()
    times = [a.time_ms for a in wanted] or [0]
    full = False
    for family in (DEPLOY_TAG, ROLLBACK_TAG):
        existing = annotations.find(
            [family, env_tag(env.name)], from_ms=min(times) - 1, to_ms=max(times) + 1, limit=LOOKUP_LIMIT
        )
        full = full or len(existing) >= LOOKUP_LIMIT
        found |= {str(t) for a in existing for t in a.get("tags", []) if str(t).startswith(AUDIT_TAG_PREFIX)}
    if full:
        for annotation in wanted:
            tag = annotation.audit_tag
            if tag not in found and annotations.find([tag, env_tag(env.name)], limit=1):
                found.add(tag)
    return found


def sync(env: Environment, annotations: Annotations, records: Iterable[Mapping[str, Any]]) -> SyncReport:
    """Post an annotation for every deploy and rollback record of `env` that Grafana does not have yet.

    Grafana not answering at the start raises GrafanaUnreachable (nothing was posted); a rejected token
    raises GrafanaAuthError. A post that fails is counted and named in the report; when Grafana stops
    answering midway, the rest count as failed. Running it again posts only what is still missing."""
    grafana = getattr(annotations, "url", type(annotations).__name__)
    report = SyncReport(env.name, str(grafana))
    wanted: list[Annotation] = []
    for record in records:
        report.records += 1
        if record.get("environment") != env.name:
            continue
        annotation = annotation_for(record)
        if annotation is not None:
            wanted.append(annotation)
    report.to_annotate = len(wanted)
    existing = _existing_audit_tags(env, annotations, wanted)
    for index, annotation in enumerate(wanted):
        if annotation.audit_tag in existing:
            report.skipped += 1
            continue
        try:
            annotations.post(annotation)
        except GrafanaUnreachable as exc:
            report.failed += len(wanted) - index
            report.errors.append(str(exc))
            break
        except GrafanaAuthError:
            raise
        except GrafanaError as exc:
            report.failed += 1
            report.errors.append(f"{annotation.audit_tag}: {exc}")
            continue
        existing.add(annotation.audit_tag)
        report.posted += 1
    return report


# --- the command line --------------------------------------------------------------------------------------


def annotate_command(env_name: str, json_output: bool, *, annotations: Annotations | None = None) -> int:
    """`invoke audit.annotate --env E [--json]`: verify the environment's audit log, post its deploy and
    rollback records to Grafana (each once), print the report. 0 all there; 1 some could not be posted.
    Bad configuration raises BadInput (2); Grafana unreachable or refusing the token, GrafanaError (1)."""
    env = load_environment(env_name)
    client = annotations if annotations is not None else GrafanaAnnotations.from_environ()
    log = audit_report.log_of(env)
    audit.require_intact(log)
    report = sync(env, client, log.records())
    if json_output:
        output.print_json(report.as_dict())
    else:
        output.console.print(
            output.table(
                f"annotations of {env.name} in Grafana ({report.grafana})",
                ("audit records", "deploys and rollbacks", "posted", "already there", "failed"),
                [(report.records, report.to_annotate, report.posted, report.skipped, report.failed)],
            )
        )
        for error in report.errors:
            output.errors.print(error, style="red", markup=False, highlight=False)
        summary = (
            f"Grafana has every deploy and rollback of {env.name}"
            if report.ok
            else f"{report.failed} not posted; run the same command again (it posts only what is missing)"
        )
        output.console.print(output.verdict(report.ok, summary))
    return 0 if report.ok else 1
