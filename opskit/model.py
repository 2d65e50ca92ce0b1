"""The environment model: the single, typed source of truth for one environment.

`local` (and any other single-machine environment) is declared in `environments/<name>.yaml`;
`staging` and `production` in `stacks/Pulumi.<name>.yaml` under the config key `maximus:environment`.
Loading validates everything and stops at the first bad field with one line naming it and what is
accepted (exit code 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from opskit.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS_DIR = ROOT / "environments"
STACKS_DIR = ROOT / "stacks"
EXTRA_ENVIRONMENTS_VAR = "MAXIMUS_ENVIRONMENTS_DIR"
PULUMI_CONFIG_KEY = "maximus:environment"
ENV_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
PRODUCTION_MIN_REPLICAS = 2

Port = Annotated[int, Field(ge=1024, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression ({exc})") from exc
    return value


Regex = Annotated[str, AfterValidator(_compiles)]
Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class LocalPorts(Strict):
    """Loopback ports of a single-machine environment; every one must be distinct."""

    postgres: Port
    redis: Port
    prometheus: Port
    alertmanager: Port
    alert_receiver: Port
    node_exporter: Port
    edge: Port
    haproxy_stats: Port
    blue: Port
    green: Port

    @model_validator(mode="after")
    def _distinct(self) -> LocalPorts:
        seen: dict[int, str] = {}
        for name, port in self.model_dump().items():
            if port in seen:
                raise PortClash(
                    f"ports.{name}",
                    f"port {port} is already used by ports.{seen[port]}; "
                    "accepted: a port no other service of this environment uses",
                )
            seen[port] = name
        return self


class PortClash(ValueError):
    """Two services of one environment on one port; carries the field to name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Replicas(Strict):
    min: int = Field(ge=1, le=100)
    max: int = Field(ge=1, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}; accepted: max >= min")
        return self


class Autoscaling(Strict):
    cpu_percent: int = Field(default=70, ge=10, le=100)
    memory_percent: int = Field(default=80, ge=10, le=100)


class Slo(Strict):
    availability: float = Field(gt=0, lt=1)
    latency_p95_ms: int = Field(gt=0, le=60000)
    window_days: int = Field(default=30, ge=1, le=90)


class Faults(Strict):
    """Fault knobs of the stand-in workload, for drills and tests (local environments only)."""

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: int = Field(default=0, ge=0, le=60000)
    crash: bool = False
    never_ready: bool = False


class Service(Strict):
    """The application service deployed in blue and green."""

    name: str = Field(pattern=r"^[a-z][a-z0-9]{0,29}$")
    image: str = Field(pattern=r"^[a-z0-9.\-/:]+$")
    version: str
    version_pattern: Regex = r"^\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?$"
    port: Port = 8000
    replicas: Replicas
    autoscaling: Autoscaling = Autoscaling()
    slo: Slo
    graceful_shutdown_s: int = Field(default=30, ge=1, le=30)

    @model_validator(mode="after")
    def _version_matches(self) -> Service:
        if not re.fullmatch(self.version_pattern, self.version):
            raise VersionMismatch(self.version, self.version_pattern)
        return self


class VersionMismatch(ValueError):
    def __init__(self, version: str, pattern: str) -> None:
        super().__init__(f"'{version}' does not match the version pattern; accepted: {pattern}")
        self.field = "service.version"


class Analysis(Strict):
    interval_s: Seconds = 5
    window_s: Seconds = 60
    max_failures: int = Field(default=1, ge=0, le=100)
    no_data_before_promotion: Literal["fail", "pass"] = "fail"
    no_data_after_promotion: Literal["hold", "fail", "pass"] = "hold"
    error_ratio_max: float = Field(default=0.05, ge=0, le=1)
    latency_p95_ms_max: int = Field(default=300, gt=0)


class Deploy(Strict):
    ready_deadline_s: Seconds = 60
    analysis: Analysis = Analysis()
    rollback_window_s: Seconds = 900
    ticket_required: bool = False


class Retention(Strict):
    daily: int = Field(default=7, ge=0, le=366)
    weekly: int = Field(default=4, ge=0, le=104)
    monthly: int = Field(default=6, ge=0, le=120)


class BackupStorage(Strict):
    kind: Literal["local", "s3"] = "local"
    path: str | None = None
    bucket: str | None = None
    endpoint: str | None = None


class Backup(Strict):
    method: Literal["logical", "physical"] = "logical"
    schedule: str = Field(default="0 3 * * *", pattern=r"^(\S+\s+){4}\S+$")
    retention: Retention = Retention()
    compression: Literal["none", "gzip", "zstd"] = "zstd"
    encryption_key_env: str = Field(default="MAXIMUS_BACKUP_KEY", pattern=r"^[A-Z][A-Z0-9_]*$")
    storage: BackupStorage = BackupStorage()
    jobs: int = Field(
        default=2, ge=1, le=16, description="parallel pg_dump and pg_restore jobs, and sealing threads"
    )


ComponentName = Literal[
    "postgres",
    "redis",
    "kafka",
    "prometheus",
    "alertmanager",
    "grafana",
    "jaeger",
    "kong",
    "istio",
    "haproxy",
]


class Component(Strict):
    """A platform component: the version pinned for it and, where it has them, its sizes."""

    version: str = Field(min_length=1)
    instances: int = Field(default=1, ge=1, le=9)
    storage_gi: int = Field(default=1, ge=1, le=10000)


ExactVersion = Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")]
Quantity = Annotated[str, Field(pattern=r"^\d+(\.\d+)?(m|Ki|Mi|Gi)?$")]
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
KUBERNETES_COMPONENTS: tuple[ComponentName, ...] = (
    "postgres",
    "redis",
    "kafka",
    "prometheus",
    "alertmanager",
    "grafana",
    "jaeger",
    "kong",
    "istio",
)
PRODUCTION_MIN_INSTANCES: dict[ComponentName, int] = {"postgres": 3, "kafka": 3}


class Chart(Strict):
    """A Helm chart pinned to one exact version (no ranges, no `latest`)."""

    repo: str = Field(pattern=r"^https://\S+$")
    chart: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    version: ExactVersion


class Charts(Strict):
    """Every Helm chart a Kubernetes environment installs, each at an exact version."""

    cloudnative_pg: Chart = Chart(
        repo="https://cloudnative-pg.github.io/charts", chart="cloudnative-pg", version="0.22.1"
    )
    strimzi: Chart = Chart(
        repo="https://strimzi.io/charts/", chart="strimzi-kafka-operator", version="0.43.0"
    )
    kube_prometheus_stack: Chart = Chart(
        repo="https://prometheus-community.github.io/helm-charts",
        chart="kube-prometheus-stack",
        version="65.1.1",
    )
    kong: Chart = Chart(repo="https://charts.konghq.com", chart="kong", version="2.42.0")
    istio_base: Chart = Chart(
        repo="https://istio-release.storage.googleapis.com/charts", chart="base", version="1.23.2"
    )
    istiod: Chart = Chart(
        repo="https://istio-release.storage.googleapis.com/charts", chart="istiod", version="1.23.2"
    )
    istio_cni: Chart = Chart(
        repo="https://istio-release.storage.googleapis.com/charts", chart="cni", version="1.23.2"
    )


class Images(Strict):
    """Exact image tags of what the stacks run directly; each must be a release of its component's version."""

    postgres: str = Field(default="15.8", pattern=r"^\d+\.\d+(\.\d+)?$", description="PostgreSQL is X.Y")
    redis: ExactVersion = "7.0.15"
    kafka: ExactVersion = "3.8.0"
    jaeger: ExactVersion = "2.0.0"
    kong: ExactVersion = "3.8.0"


class Resources(Strict):
    """Requests and limits of one container."""

    cpu_request: Quantity = "100m"
    memory_request: Quantity = "128Mi"
    cpu_limit: Quantity = "500m"
    memory_limit: Quantity = "512Mi"


class Sizes(Strict):
    app: Resources = Resources(
        cpu_request="250m", memory_request="256Mi", cpu_limit="1", memory_limit="512Mi"
    )
    postgres: Resources = Resources(
        cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="2Gi"
    )
    redis: Resources = Resources(
        cpu_request="100m", memory_request="256Mi", cpu_limit="500m", memory_limit="512Mi"
    )
    kafka: Resources = Resources(cpu_request="500m", memory_request="2Gi", cpu_limit="2", memory_limit="4Gi")
    jaeger: Resources = Resources(
        cpu_request="100m", memory_request="256Mi", cpu_limit="1", memory_limit="1Gi"
    )


class KafkaTopic(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9.-]{0,99}$")
    partitions: int = Field(default=3, ge=1, le=1000)
    retention_hours: int = Field(default=168, ge=1, le=87600)


class KafkaSettings(Strict):
    topics: list[KafkaTopic] = []

    @field_validator("topics")
    @classmethod
    def _unique(cls, value: list[KafkaTopic]) -> list[KafkaTopic]:
        names = [t.name for t in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"topic {name!r} is declared twice; accepted: unique topic names")
        return value


class RouteLimit(Strict):
    """A gateway route and how many requests per minute one client IP may send to it."""

    path: str = Field(pattern=r"^/[a-z0-9/_-]*$")
    per_minute: int = Field(ge=1, le=100000)
    auth: bool = True


class Gateway(Strict):
    host: str = Field(default="hitl.maximus.example.com", pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
    tls_certificate: DnsLabel = Field(
        default="maximus-gateway-tls", description="name of the kubernetes.io/tls Secret the gateway serves"
    )
    cluster_issuer: DnsLabel | None = Field(
        default=None,
        description="cert-manager ClusterIssuer; unset: certificate and key come from Pulumi config secrets",
    )
    auth: Literal["key-auth", "jwt"] = "key-auth"
    per_consumer_per_minute: int = Field(default=100, ge=1, le=100000)
    routes: list[RouteLimit] = [
        RouteLimit(path="/analyze", per_minute=10),
        RouteLimit(path="/health", per_minute=100, auth=False),
        RouteLimit(path="/metrics", per_minute=60),
        RouteLimit(path="/hitl", per_minute=100),
    ]
    proxy_replicas: int = Field(default=2, ge=1, le=20)


class Tracing(Strict):
    sampling_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    max_traces: int = Field(default=100000, ge=1000, le=10000000)


class Monitoring(Strict):
    retention_days: int = Field(default=15, ge=1, le=365)
    storage_gi: int = Field(default=50, ge=1, le=10000)
    alertmanager_replicas: int = Field(default=1, ge=1, le=5)


class Build(Strict):
    """Build and push the service image with pulumi-docker (otherwise the image must already exist)."""

    context: str = Field(default="workload", pattern=r"^[A-Za-z0-9_./-]+$")
    dockerfile: str = Field(default="Dockerfile", pattern=r"^[A-Za-z0-9_./-]+$")
    registry: str = Field(default="ghcr.io", pattern=r"^[a-z0-9.-]+(:\d+)?$")
    username: str = Field(default="maximus-ci", pattern=r"^[A-Za-z0-9_.-]+$")


class Platform(Strict):
    """What the Kubernetes stacks need beyond the components: charts, images, sizes, routing."""

    charts: Charts = Charts()
    images: Images = Images()
    sizes: Sizes = Sizes()
    kafka: KafkaSettings = KafkaSettings()
    gateway: Gateway = Gateway()
    tracing: Tracing = Tracing()
    monitoring: Monitoring = Monitoring()
    initial_color: Color = "blue"
    build: Build | None = None


class Environment(Strict):
    name: str
    kind: Literal["local", "kubernetes"]
    state_dir: str | None = Field(
        default=None, description="single-machine environments: where all state lives"
    )
    ports: LocalPorts | None = None
    namespace: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,62}$")
    components: dict[ComponentName, Component]
    service: Service
    faults: Faults = Faults()
    deploy: Deploy = Deploy()
    backup: Backup = Backup()
    platform: Platform = Platform()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ENV_NAME.fullmatch(value):
            raise ValueError("accepted: lower-case letters, digits and '-', starting with a letter")
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"'{value}' is relative; accepted: an absolute path")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> Environment:
        if self.kind == "local":
            for field in ("state_dir", "ports"):
                if getattr(self, field) is None:
                    raise FieldError(field, "missing; accepted: required when kind is local")
            for needed in ("postgres", "redis", "prometheus", "alertmanager", "haproxy"):
                if needed not in self.components:
                    raise FieldError(f"components.{needed}", "missing; required when kind is local")
        else:
            if self.namespace is None:
                raise FieldError("namespace", "missing; accepted: required when kind is kubernetes")
            if self.faults != Faults():
                raise FieldError("faults", "fault injection is accepted on local environments only")
            self._kubernetes_fields()
        if self.name == "production" and self.service.replicas.min < PRODUCTION_MIN_REPLICAS:
            raise FieldError(
                "service.replicas.min",
                f"{self.service.replicas.min} is below the production minimum; "
                f"accepted: {PRODUCTION_MIN_REPLICAS} or more",
            )
        return self

    def _kubernetes_fields(self) -> None:
        for needed in KUBERNETES_COMPONENTS:
            if needed not in self.components:
                raise FieldError(f"components.{needed}", "missing; required when kind is kubernetes")
        if self.name == "production":
            for name, minimum in PRODUCTION_MIN_INSTANCES.items():
                if self.components[name].instances < minimum:
                    raise FieldError(
                        f"components.{name}.instances",
                        f"{self.components[name].instances} is below the production minimum; "
                        f"accepted: {minimum} or more",
                    )
        images = self.platform.images
        pinned: tuple[tuple[ComponentName, str], ...] = (
            ("postgres", images.postgres),
            ("redis", images.redis),
            ("kafka", images.kafka),
            ("jaeger", images.jaeger),
            ("kong", images.kong),
        )
        for name, tag in pinned:
            version = self.components[name].version
            if tag != version and not tag.startswith(f"{version}."):
                raise FieldError(
                    f"platform.images.{name}",
                    f"{tag!r} is not a release of components.{name}.version {version!r}; "
                    f"accepted: {version} or {version}.N",
                )
        istio = self.components["istio"].version
        charts = self.platform.charts
        for field in ("istio_base", "istiod", "istio_cni"):
            chart: Chart = getattr(charts, field)
            if not chart.version.startswith(f"{istio}."):
                raise FieldError(
                    f"platform.charts.{field}.version",
                    f"{chart.version!r} is not a release of components.istio.version {istio!r}; "
                    f"accepted: {istio}.N",
                )

    @property
    def state_path(self) -> Path:
        if self.state_dir is None:
            raise BadInput(
                f"environment {self.name}: kind {self.kind} has no state directory on this machine"
            )
        return Path(self.state_dir)

    @property
    def local_ports(self) -> LocalPorts:
        if self.ports is None:
            raise BadInput(f"environment {self.name}: kind {self.kind} has no local ports")
        return self.ports

    def require_local(self) -> Environment:
        if self.kind != "local":
            raise BadInput(
                f"--env: {self.name} is a {self.kind} environment; accepted: a single-machine environment "
                f"({', '.join(local_environment_names())})"
            )
        return self

    def version_ok(self, version: str) -> bool:
        return re.fullmatch(self.service.version_pattern, version) is not None


class FieldError(ValueError):
    """A cross-field rule broken; names the field it is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def keys_by_name(model: type[BaseModel]) -> list[str]:
    """A model's keys by field name, sorted: how the environment model lists what it accepts."""
    return sorted(model.model_fields)


def keys_by_alias(model: type[BaseModel]) -> list[str]:
    """A model's keys as written in YAML (alias, else name), in declaration order."""
    return [info.alias or name for name, info in model.model_fields.items()]


def one_line_error(
    root: type[BaseModel],
    exc: ValidationError,
    prefix: str,
    accepted_keys: Callable[[type[BaseModel]], list[str]] = keys_by_name,
) -> str:
    """The first error of validating `root` as `<prefix>: <field path>: <what is wrong; what is accepted>`.

    An unknown key lists the keys its model accepts, as `accepted_keys` gives them.
    """
    error = exc.errors()[0]
    ctx_error = (error.get("ctx") or {}).get("error")
    field = ".".join(str(part) for part in error["loc"] if part != "[key]")
    if isinstance(ctx_error, PortClash | FieldError | VersionMismatch):
        field = ctx_error.field
        message = str(ctx_error)
    elif error["type"] == "extra_forbidden":
        parent = _model_at(root, tuple(error["loc"][:-1]))
        accepted = ", ".join(accepted_keys(parent)) if parent else "none"
        message = f"unknown key; accepted keys: {accepted}"
    elif error["type"] == "literal_error":
        message = f"{error['input']!r} is not accepted; accepted: {error['ctx']['expected']}"
    elif error["type"] == "missing":
        message = "missing; this key is required"
    else:
        text = str(error["msg"]).removeprefix("Value error, ")
        shown = error.get("input")
        message = text if isinstance(shown, dict | list) else f"{shown!r}: {text}"
    return f"{prefix}: {field or '(top level)'}: {message}"


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at `loc`; a dict key or list index steps into the item type."""
    current: Any = root
    for part in loc:
        current = _step(current, part)
        if current is None:
            return None
    return _inner_model(current)


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one location part below `annotation`, or None where the part leads nowhere."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part) if isinstance(part, str) else None
        return None if field is None else field.annotation
    origin = get_origin(annotation)
    if origin is dict:
        return get_args(annotation)[1]
    if origin is list:
        return get_args(annotation)[0]
    for arg in get_args(annotation):
        found = _step(arg, part)
        if found is not None:
            return found
    return None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _sources() -> list[Path]:
    dirs = [ENVIRONMENTS_DIR]
    extra = os.environ.get(EXTRA_ENVIRONMENTS_VAR)
    if extra:
        dirs.append(Path(extra))
    return dirs


def local_environment_names() -> list[str]:
    names = {p.stem for d in _sources() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(n for n in names if ENV_NAME.fullmatch(n))


def environment_names() -> list[str]:
    stacks = {p.name.split(".")[1] for p in STACKS_DIR.glob("Pulumi.*.yaml")}
    return sorted({*local_environment_names(), *(n for n in stacks if ENV_NAME.fullmatch(n))})


def _raw(name: str) -> dict[str, Any]:
    if not ENV_NAME.fullmatch(name):
        raise BadInput(
            f"--env: {name!r} is not an environment name; accepted: {', '.join(environment_names())}"
        )
    stack_file = STACKS_DIR / f"Pulumi.{name}.yaml"
    if stack_file.is_file():
        config = _read_yaml(stack_file).get("config") or {}
        data = config.get(PULUMI_CONFIG_KEY)
        if not isinstance(data, dict):
            raise BadInput(
                f"environment {name}: {stack_file.name} has no mapping under config {PULUMI_CONFIG_KEY}"
            )
        return data
    for directory in reversed(_sources()):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            data = _read_yaml(candidate)
            if not isinstance(data, dict):
                raise BadInput(f"environment {name}: {candidate.name} is not a mapping")
            return data
    raise BadInput(f"--env: unknown environment {name!r}; accepted: {', '.join(environment_names())}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"{path.name}{where}: not valid YAML; fix the file and run again") from exc
    return data if isinstance(data, dict) else {}


def parse_environment(name: str, data: dict[str, Any]) -> Environment:
    """Validate a raw mapping as the environment `name` (the name in the data must agree)."""
    if data.get("name", name) != name:
        raise BadInput(f"environment {name}: name: {data.get('name')!r} differs; accepted: {name!r}")
    try:
        return Environment.model_validate({**data, "name": name})
    except ValidationError as exc:
        raise BadInput(one_line_error(Environment, exc, f"environment {name}")) from None


def load_environment(name: str) -> Environment:
    """Load and validate one environment; raise BadInput (exit 2) naming the first bad field."""
    return parse_environment(name, _raw(name))
