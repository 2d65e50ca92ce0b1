"""Render and check the Pulumi stacks without a cluster or the Pulumi CLI.

`run_stack` runs the real stack program (`infra.program.main`) under Pulumi mocks with the stack's own
config, recording every resource the program declares: its type, name, parent, options (protect,
ignore_changes) and inputs, secrets still marked as secrets. `render` writes every Kubernetes object as it
will be in the cluster, one YAML file per object; `check` renders, validates every core object with
kubernetes-validate (strict, Kubernetes 1.31), runs the policy pack's rules and checkov's Kubernetes checks.

Secrets: the stack files hold Pulumi `secure:` ciphertext that only the stack's secrets provider can
decrypt. Here each secure key gets a placeholder value marked secret, so every secret flows through the
program exactly as in a real run, and anything that would leak it in plaintext is detectable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pulumi
import yaml
from pulumi.runtime import mocks, rpc, settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

from infra import policies, program
from opskit.errors import BadInput, OperationFailed
from opskit.model import ROOT, STACKS_DIR

STACKS = ("staging", "production")
PROJECT = "maximus"
KUBERNETES_VERSION = "1.31"
PLACEHOLDER = "placeholder-secret"
REDACTED = "(secret)"
RENDER_MARKER = ".maximus-render"
HELM_DIR = "_helm"
CLUSTER_DIR = "_cluster"
CHECKOV_VAR = "MAXIMUS_CHECKOV"
CHECKOV_TIMEOUT_S = 600
HELM_TYPES = ("kubernetes:helm.sh/v3:Release", "kubernetes:helm.sh/v4:Chart")
SECRET_SIG = rpc._special_sig_key  # the wire marker Pulumi wraps secret values with
SECRET_VALUE = rpc._special_secret_sig
CORE_GROUPS = frozenset(
    {
        "v1",
        "apps/v1",
        "batch/v1",
        "autoscaling/v2",
        "policy/v1",
        "networking.k8s.io/v1",
        "rbac.authorization.k8s.io/v1",
        "storage.k8s.io/v1",
    }
)


# --- running the program under mocks -----------------------------------------------------------------


@dataclass
class Declared:
    """One resource the stack program declared, as the engine would receive it."""

    type: str
    name: str
    urn: str
    parent: str
    custom: bool
    protect: bool
    ignore_changes: list[str]
    inputs: dict[str, Any]
    dependencies: list[str] = field(default_factory=list)

    @property
    def props(self) -> dict[str, Any]:
        """Inputs with secrets unwrapped and whole numbers as integers (what a policy pack sees)."""
        value: dict[str, Any] = normalize(unwrap(self.inputs))
        return value

    def manifest(self) -> dict[str, Any] | None:
        """The Kubernetes object as applied, secrets redacted; None for Helm releases and non-Kubernetes."""
        if not self.custom or not self.type.startswith("kubernetes:") or self.type in HELM_TYPES:
            return None
        if self.type.startswith("kubernetes:index:"):  # the provider itself
            return None
        obj: dict[str, Any] = normalize(redact(self.inputs))
        return obj


@dataclass
class StackRun:
    stack: str
    resources: list[Declared]
    outputs: dict[str, Any]
    secret_outputs: list[str]

    def objects(self) -> list[dict[str, Any]]:
        found = [m for m in (r.manifest() for r in self.resources) if m is not None]
        return sorted(found, key=object_key)

    def helm_releases(self) -> list[Declared]:
        return sorted((r for r in self.resources if r.type in HELM_TYPES), key=lambda r: r.name)

    def of_type(self, type_: str) -> list[Declared]:
        return [r for r in self.resources if r.type == type_]

    def named(self, name: str) -> Declared:
        for r in self.resources:
            if r.name == name:
                return r
        raise KeyError(name)


class _Mocks(mocks.Mocks):
    """The engine's side of each resource: its id and output state (the inputs, plus what providers add)."""

    def new_resource(self, args: mocks.MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        state = dict(args.inputs)
        if args.typ == "docker:index/image:Image":
            digest = hashlib.sha256(str(state.get("imageName")).encode()).hexdigest()
            state["repoDigest"] = f"{str(state.get('imageName')).rsplit(':', 1)[0]}@sha256:{digest}"
        if args.typ in HELM_TYPES:
            state["status"] = {"status": "deployed", "version": state.get("version")}
        return f"{args.name}-id", state

    def call(self, args: mocks.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None


class _RecordingMonitor(mocks.MockMonitor):
    """The mock monitor, also recording each registration with its options and secret markers."""

    def __init__(self, mock: mocks.Mocks) -> None:
        super().__init__(mock)
        self.declared: list[Declared] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]  # untyped in pulumi
        if request.type != "pulumi:pulumi:Stack":
            _ensure_event_loop()  # type: ignore[no-untyped-call]  # untyped in pulumi
            inputs = rpc.deserialize_properties(request.object, keep_internal=True)
            self.declared.append(
                Declared(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    custom=bool(request.custom),
                    protect=bool(request.protect),
                    ignore_changes=list(request.ignoreChanges),
                    inputs=inputs,
                    dependencies=sorted(request.dependencies),
                )
            )
        return response


def stack_config(stack: str) -> tuple[dict[str, str], list[str]]:
    """The stack file's config as the engine hands it to the program; each secure value a placeholder."""
    path = stack_file(stack)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInput(f"{path.name}: not valid YAML ({exc.__class__.__name__}); fix the file") from exc
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in (data.get("config") or {}).items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            config[key] = f"{PLACEHOLDER}-{key}"
            secret_keys.append(key)
        elif isinstance(value, str):
            config[key] = value
        else:
            config[key] = json.dumps(value)
    return config, secret_keys


def stack_file(stack: str) -> Path:
    if stack not in STACKS:
        raise BadInput(f"--stack: {stack!r} is not a stack; accepted: {', '.join(STACKS)}")
    path = STACKS_DIR / f"Pulumi.{stack}.yaml"
    if not path.is_file():
        raise BadInput(f"--stack: {path.name} is missing; accepted: {', '.join(STACKS)}")
    return path


def ensure_event_loop() -> None:
    """Pulumi's runtime asks for the current event loop; after an `asyncio.run` there is none."""
    try:
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


def run_stack(
    stack: str, config: Mapping[str, str] | None = None, secret_keys: list[str] | None = None
) -> StackRun:
    """Run the stack program under mocks: with the stack file's config, or with `config` if given."""
    if config is None:
        config, secret_keys = stack_config(stack)
    elif stack not in STACKS:
        stack_file(stack)
    ensure_event_loop()
    mock = _Mocks()
    monitor = _RecordingMonitor(mock)
    settings.ROOT.set(None)
    mocks.set_mocks(mock, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(dict(config), list(secret_keys or []))
    exported: dict[str, Any] = {}

    def body() -> None:
        exported.update(program.main())

    try:
        _sync_await(run_pulumi_func(body))
    except pulumi.RunError as exc:  # an error raised inside an apply
        raise OperationFailed(f"stack {stack}: the program failed: {exc}") from exc
    outputs: dict[str, Any] = {}
    secret_outputs: list[str] = []
    for key, value in exported.items():
        output = pulumi.Output.from_input(value)
        outputs[key] = _sync_await(output.future())
        if _sync_await(output.is_secret()):
            secret_outputs.append(key)
    return StackRun(stack=stack, resources=monitor.declared, outputs=outputs, secret_outputs=secret_outputs)


# --- values --------------------------------------------------------------------------------------------


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) == SECRET_VALUE


def unwrap(value: Any) -> Any:
    if is_secret(value):
        return unwrap(value["value"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def redact(value: Any) -> Any:
    """Secret values replaced by a marker; a secret mapping keeps its keys (a Secret's `stringData`)."""
    if is_secret(value):
        inner = unwrap(value)
        return {k: REDACTED for k in inner} if isinstance(inner, dict) else REDACTED
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def normalize(value: Any) -> Any:
    """Whole numbers back to integers (inputs travel as floats) and internal keys dropped."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def plaintext_leaks(value: Any, needles: list[str], path: str = "") -> Iterator[str]:
    """Paths where one of `needles` appears outside a secret-marked value."""
    if is_secret(value):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from plaintext_leaks(v, needles, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from plaintext_leaks(v, needles, f"{path}[{i}]")
    elif isinstance(value, str) and any(n in value for n in needles):
        yield path or "(value)"


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (
        str(meta.get("namespace", "")),
        str(obj.get("kind", "")),
        str(meta.get("name", "")),
        str(obj.get("apiVersion")),
    )


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or CLUSTER_DIR
    return f"{namespace}/{str(obj.get('kind', 'object')).lower()}-{meta.get('name', 'unnamed')}.yaml"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    return yaml.dump(
        obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=100, allow_unicode=True
    )


# --- render -------------------------------------------------------------------------------------------


@dataclass
class RenderReport:
    stack: str
    out: Path
    objects: int
    files: list[str]
    helm_releases: list[dict[str, str]]
    kinds: dict[str, int]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "out": str(self.out),
            "objects": self.objects,
            "kinds": self.kinds,
            "helm_releases": self.helm_releases,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {out} is a file; accepted: a new or empty directory, or a previous render")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RENDER_MARKER).is_file():
            raise BadInput(
                f"--out: {out} is not empty; accepted: a new or empty directory, or a previous render"
            )
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write(run: StackRun, out: Path) -> RenderReport:
    started = time.monotonic()
    _prepare(out)
    files: list[str] = []
    kinds: dict[str, int] = {}
    seen: set[str] = set()
    for obj in run.objects():
        relative = object_path(obj)
        if relative in seen:
            raise OperationFailed(f"stack {run.stack}: two objects render to {relative}")
        seen.add(relative)
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(to_yaml(obj))
        files.append(relative)
        kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
    releases = []
    for release in run.helm_releases():
        props = release.props
        info = {
            "name": str(props.get("name")),
            "chart": str(props.get("chart")),
            "version": str(props.get("version")),
            "repo": str((props.get("repositoryOpts") or {}).get("repo")),
            "namespace": str(props.get("namespace")),
        }
        releases.append(info)
        target = out / HELM_DIR / f"{info['name']}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(to_yaml({**info, "values": normalize(redact(release.inputs)).get("values", {})}))
    (out / RENDER_MARKER).write_text(f"stack {run.stack}\n")
    return RenderReport(
        stack=run.stack,
        out=out,
        objects=len(files),
        files=files,
        helm_releases=releases,
        kinds=dict(sorted(kinds.items())),
        seconds=time.monotonic() - started,
    )


def render(stack: str, out: Path) -> RenderReport:
    """Write every Kubernetes object of the stack under `out`, one YAML file per object (deterministic)."""
    started = time.monotonic()
    run = run_stack(stack)
    report = write(run, out)
    report.seconds = time.monotonic() - started
    return report


# --- check --------------------------------------------------------------------------------------------


@dataclass
class Finding:
    source: str  # schema, policy or checkov
    rule: str
    subject: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "rule": self.rule, "subject": self.subject, "message": self.message}


@dataclass
class CheckReport:
    stack: str
    objects: int = 0
    schema_validated: int = 0
    custom_objects: int = 0
    helm_releases: int = 0
    policies: int = 0
    checkov_passed: int = 0
    checkov_skipped: list[dict[str, str]] = field(default_factory=list)
    failures: list[Finding] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "ok": self.ok,
            "objects": self.objects,
            "schema_validated": self.schema_validated,
            "custom_objects": self.custom_objects,
            "helm_releases": self.helm_releases,
            "policies": self.policies,
            "checkov": {"passed": self.checkov_passed, "skipped": self.checkov_skipped},
            "failures": [f.as_dict() for f in self.failures],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def raise_for_failures(self) -> None:
        if self.failures:
            first = self.failures[0]
            raise OperationFailed(
                f"stack {self.stack}: {len(self.failures)} check failure(s); "
                f"first: {first.source} {first.rule} {first.subject}: {first.message}"
            )


def validate_schemas(objects: list[dict[str, Any]], report: CheckReport) -> None:
    for obj in objects:
        subject = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        if obj.get("apiVersion") in CORE_GROUPS:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in getattr(exc, "path", []) or [])
                report.failures.append(
                    Finding("schema", "kubernetes-validate", subject, f"{path}: {exc.message}")
                )
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
                report.failures.append(
                    Finding("schema", "kubernetes-validate", subject, str(exc).splitlines()[0])
                )
            report.schema_validated += 1
        else:
            report.custom_objects += 1
            meta = obj.get("metadata") or {}
            if not meta.get("name") or not meta.get("namespace"):
                report.failures.append(
                    Finding("schema", "custom-object", subject, "needs metadata.name and namespace")
                )


def checkov_binary() -> Path:
    configured = os.environ.get(CHECKOV_VAR)
    candidate = Path(configured) if configured else ROOT / ".venv-checkov" / "bin" / "checkov"
    if candidate.is_file():
        return candidate
    found = shutil.which("checkov")
    if found:
        return Path(found)
    raise OperationFailed(
        f"checkov not found at {candidate}; run scripts/setup (it installs tools/checkov.lock), then again"
    )


def run_checkov(directory: Path, report: CheckReport) -> None:
    command = [
        str(checkov_binary()),
        "--directory",
        str(directory),
        "--framework",
        "kubernetes",
        "--output",
        "json",
        "--skip-download",
        "--skip-path",
        HELM_DIR,
    ]
    environment = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=CHECKOV_TIMEOUT_S, check=False, env=environment
        )
    except subprocess.TimeoutExpired as exc:
        raise OperationFailed(f"checkov did not finish within {CHECKOV_TIMEOUT_S} s") from exc
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OperationFailed(f"checkov failed (exit {result.returncode}): {tail[0]}") from exc
    runs = data if isinstance(data, list) else [data]
    for run in runs:
        results = run.get("results") or {}
        report.checkov_passed += len(results.get("passed_checks") or [])
        for item in results.get("failed_checks") or []:
            report.failures.append(
                Finding(
                    "checkov",
                    str(item.get("check_id")),
                    f"{item.get('resource')} ({item.get('file_path')})",
                    str(item.get("check_name")),
                )
            )
        for item in results.get("skipped_checks") or []:
            report.checkov_skipped.append(
                {
                    "check": str(item.get("check_id")),
                    "resource": str(item.get("resource")),
                    "reason": str((item.get("check_result") or {}).get("suppress_comment") or ""),
                }
            )


def check_run(run: StackRun, *, checkov: bool = True) -> CheckReport:
    """Validate one program run: schemas, the policy pack's rules and (unless told not to) checkov."""
    report = CheckReport(stack=run.stack)
    objects = run.objects()
    report.objects = len(objects)
    report.helm_releases = len(run.helm_releases())
    started = time.monotonic()
    validate_schemas(objects, report)
    report.seconds["schema"] = time.monotonic() - started
    started = time.monotonic()
    for violation in policies.evaluate(run):
        report.failures.append(Finding("policy", violation.policy, violation.subject, violation.message))
    report.policies = len(policies.RESOURCE_POLICIES) + len(policies.STACK_POLICIES)
    report.seconds["policy"] = time.monotonic() - started
    if checkov:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"maximus-{run.stack}-") as tmp:
            write(run, Path(tmp) / "render")
            run_checkov(Path(tmp) / "render", report)
        report.seconds["checkov"] = time.monotonic() - started
    return report


def check(stack: str) -> CheckReport:
    """Render the stack and check it: kubernetes-validate (strict, 1.31), policies, checkov."""
    started = time.monotonic()
    run = run_stack(stack)
    rendered = time.monotonic() - started
    report = check_run(run)
    report.seconds = {"render": rendered, **report.seconds, "total": time.monotonic() - started}
    return report
