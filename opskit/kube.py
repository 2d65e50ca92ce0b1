"""One small Kubernetes client: what the deploy tooling and on-demand backups need, nothing more.

`KubeClient` is the interface: `get`, `patch` (merge or JSON patch), `create` and `delete` on an API path
such as `/apis/networking.istio.io/v1/namespaces/maximus-staging/virtualservices/hitl`, and plain HTTP to a
Service through the API server's service proxy (`service_client`), and `get_text` for plain-text answers
(a pod's log). `HttpKubeClient` is the one production implementation, on httpx: a base URL, a bearer
token and a CA bundle, a timeout on every call. Tests plug a fake Kubernetes API in at the HTTP boundary
(`transport=`), never above it.

Optimistic concurrency: `guarded_patch` reads an object, plans a patch from what it read and sends it
guarded by the object's resourceVersion (a JSON patch `test` op, or `metadata.resourceVersion` in a merge
patch). A concurrent writer makes the API server refuse the whole patch (422 for a failed `test`, 409 for a
stale resourceVersion); the object is then read again and the patch planned again, so a change is applied
completely against the state it was planned from, or not at all.

Errors are `KubeError`s (exit code 1), one line each, naming the object and what to check.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import subprocess
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import yaml

from opskit.errors import OperationFailed

PatchType = Literal["merge", "json"]
PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
}
DEFAULT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
CONFLICT_ATTEMPTS = 5
CONFLICT_BACKOFF_S = 0.05
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_SERVER_MESSAGE = 300
EXEC_TIMEOUT_S = 30.0
EXEC_TOKEN_MARGIN = timedelta(seconds=60)


class KubeError(OperationFailed):
    """A Kubernetes API call failed; nothing was changed by it."""

    exit_code = 1


class KubeConfigError(KubeError):
    """The kubeconfig or in-cluster configuration cannot be used."""

    exit_code = 2


class KubeAuthError(KubeError):
    """401 or 403: the token was rejected or RBAC does not allow the call."""


class KubeNotFound(KubeError):
    """404: the object (or its API) does not exist."""


class KubeConflict(KubeError):
    """409, or 422 from a failed JSON patch `test`: the object changed since it was read."""


class KubeUnreachable(KubeError):
    """No answer from the API server: connection refused, DNS, TLS, timeout."""


class KubeClient(Protocol):
    """The Kubernetes API as the ops tooling uses it. Paths start with `/api/` or `/apis/`."""

    def get(self, api_path: str) -> dict[str, Any]:
        """The object at `api_path`."""
        ...

    def patch(self, api_path: str, body: Any, patch_type: PatchType = "merge") -> dict[str, Any]:
        """Apply one patch in one request (the API server applies all of it or none); the object after."""
        ...

    def create(self, api_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create `body` in the collection at `api_path`; the object as created."""
        ...

    def delete(self, api_path: str) -> None:
        """Delete the object at `api_path` (already gone counts as deleted)."""
        ...

    def get_text(self, api_path: str) -> str:
        """The plain-text answer at `api_path` (a pod's log: `/api/v1/namespaces/<ns>/pods/<pod>/log`)."""
        ...

    def service_client(self, namespace: str, service: str, port: int, timeout_s: float) -> httpx.Client:
        """Plain HTTP to a Service through the API server's service proxy: the client's base URL is
        `.../namespaces/<namespace>/services/<service>:<port>/proxy`, with this client's credentials."""
        ...


# --- paths and resourceVersion -----------------------------------------------------------------------


def object_path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    """The API path of a namespaced object (or of its collection when `name` is None)."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


@dataclass(frozen=True)
class PathInfo:
    plural: str
    name: str | None
    namespace: str | None

    def describe(self) -> str:
        what = f"{self.plural}/{self.name}" if self.name else self.plural
        return f"{what} in namespace {self.namespace}" if self.namespace else what


def parse_path(api_path: str) -> PathInfo:
    """What an API path names: resource plural, object name and namespace (for error messages)."""
    parts = [p for p in api_path.split("?", 1)[0].split("/") if p]
    # /api/v1/... or /apis/<group>/<version>/...
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        rest = rest[2:]
        if not rest:  # the namespace object itself
            return PathInfo("namespaces", namespace, None)
    plural = rest[0] if rest else api_path
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:  # a subresource: deployments/scale
        plural = f"{plural}/{rest[2]}"
    return PathInfo(plural, name, namespace)


def service_proxy_path(namespace: str, service: str, port: int) -> str:
    """The API server's proxy to a Service's port (RBAC: `get`/`create` on `services/proxy`)."""
    return f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"


def resource_version(obj: Mapping[str, Any]) -> str:
    """The object's metadata.resourceVersion (every object the API server returns has one)."""
    value = (obj.get("metadata") or {}).get("resourceVersion")
    if not isinstance(value, str) or not value:
        name = (obj.get("metadata") or {}).get("name", "?")
        raise KubeError(f"{obj.get('kind', 'object')} {name} has no metadata.resourceVersion")
    return value


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) to the given keys and indexes, `~` and `/` escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def guard(body: Any, patch_type: PatchType, version: str) -> Any:
    """The patch made conditional on `version`: the API server refuses it once the object changed."""
    if patch_type == "json":
        return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *body]
    metadata = {**(body.get("metadata") or {}), "resourceVersion": version}
    return {**body, "metadata": metadata}


Plan = Callable[[dict[str, Any]], Any]


def guarded_patch(
    client: KubeClient,
    api_path: str,
    plan: Plan,
    patch_type: PatchType = "json",
    *,
    attempts: int = CONFLICT_ATTEMPTS,
    backoff_s: float = CONFLICT_BACKOFF_S,
) -> tuple[dict[str, Any], bool]:
    """Read, plan a patch from what was read, send it guarded by the resourceVersion read; on a conflict
    read again and plan again. `plan` returns None (or an empty patch) when nothing needs to change.

    Returns the object after the patch (or as read, when nothing needed to change) and whether it patched.
    """
    for attempt in range(1, attempts + 1):
        current = client.get(api_path)
        body = plan(current)
        if not body:
            return current, False
        try:
            return client.patch(
                api_path, guard(body, patch_type, resource_version(current)), patch_type
            ), True
        except KubeConflict:
            if attempt == attempts:
                break
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise KubeConflict(
        f"{parse_path(api_path).describe()} kept changing under this change ({attempts} attempts, "
        "nothing applied): another writer is active; find it in metadata.managedFields and try again"
    )


# --- the HTTP implementation -------------------------------------------------------------------------


def server_message(response: httpx.Response, limit: int = MAX_SERVER_MESSAGE) -> str:
    """An HTTP API's error message (the JSON `message`, else the body), on one line and short."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message = data.get("message") if isinstance(data, dict) else None
    text = str(message) if message else response.text or response.reason_phrase
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class HttpKubeClient:
    """The Kubernetes API over HTTPS with a bearer token, on httpx.

    `token` is sent as is; `token_file` is read on every request (projected service account tokens
    rotate). The API server's CA: `ca_file` (a PEM bundle) or `ca_data` (PEM text); neither uses the
    system store.
    `transport` replaces the network (tests plug a fake API server in here).
    """

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        exec_plugin: ExecPlugin | None = None,
        ca_file: str | Path | None = None,
        ca_data: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not server.startswith(("https://", "http://")):
            raise KubeConfigError(f"server {server!r}: accepted: an https:// URL of the API server")
        self.server = server.rstrip("/")
        self.timeout_s = timeout_s
        self._token = token
        self._token_file = Path(token_file) if token_file else None
        self._exec = exec_plugin
        verify: ssl.SSLContext | bool = True
        if ca_data is not None:
            verify = _ssl_context(cadata=ca_data)
        elif ca_file is not None:
            verify = _ssl_context(cafile=Path(ca_file))
        self.verify = verify
        self._transport = transport
        self._http = httpx.Client(
            base_url=self.server,
            verify=verify,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
            headers={"Accept": "application/json", "User-Agent": "maximus-ops"},
            transport=transport,
            follow_redirects=False,
        )

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_kubeconfig(
        cls,
        path: str | Path | None = None,
        context: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> HttpKubeClient:
        """A client for one context of a kubeconfig (default: $KUBECONFIG's first file or ~/.kube/config;
        the current-context).

        Supported: the cluster's `server`, `certificate-authority` or `certificate-authority-data`, and
        the user's `token` or `tokenFile`. Not supported: exec and auth-provider plugins, client
        certificates, basic auth, `insecure-skip-tls-verify`; such a kubeconfig is refused with what to use
        instead (a service account token, e.g. from `kubectl create token maximus-deploy`).
        """
        if path is None:
            configured = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
            path = Path(configured) if configured else Path.home() / ".kube" / "config"
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise KubeConfigError(f"kubeconfig {path}: cannot read it ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise KubeConfigError(f"kubeconfig {path}: not valid YAML") from exc
        if not isinstance(config, dict):
            raise KubeConfigError(
                f"kubeconfig {path}: accepted: a YAML mapping with clusters, users, contexts"
            )
        name = context or config.get("current-context")
        if not name:
            raise KubeConfigError(f"kubeconfig {path}: no context given and no current-context set")
        ctx = _named(config, "contexts", "context", str(name), path)
        cluster = _named(config, "clusters", "cluster", str(ctx.get("cluster")), path)
        user = _named(config, "users", "user", str(ctx.get("user")), path)
        where = f"kubeconfig {path} context {name}"
        server = cluster.get("server")
        if not isinstance(server, str) or not server:
            raise KubeConfigError(f"{where}: cluster has no server")
        if cluster.get("insecure-skip-tls-verify"):
            raise KubeConfigError(
                f"{where}: insecure-skip-tls-verify is not accepted; set certificate-authority-data"
            )
        ca_data: str | None = None
        ca_file: Path | None = None
        if cluster.get("certificate-authority-data"):
            try:
                ca_data = base64.b64decode(str(cluster["certificate-authority-data"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise KubeConfigError(f"{where}: certificate-authority-data is not base64 PEM") from exc
        elif cluster.get("certificate-authority"):
            ca_file = path.parent / str(cluster["certificate-authority"])  # relative to the kubeconfig
        for unsupported in ("auth-provider", "client-certificate", "client-certificate-data"):
            if user.get(unsupported):
                raise KubeConfigError(
                    f"{where}: user {ctx.get('user')} authenticates with {unsupported}, which is not "
                    "supported; use a token (kubectl create token maximus-deploy) or an exec plugin"
                )
        token = user.get("token")
        token_file = user.get("tokenFile")
        plugin = ExecPlugin.from_config(user["exec"], where) if user.get("exec") else None
        if not token and not token_file and plugin is None:
            raise KubeConfigError(f"{where}: user {ctx.get('user')} has no token, tokenFile or exec plugin")
        return cls(
            server,
            token=str(token) if token else None,
            token_file=(path.parent / str(token_file)) if token_file and not token else None,
            exec_plugin=plugin if not (token or token_file) else None,
            ca_file=ca_file,
            ca_data=ca_data,
            timeout_s=timeout_s,
            transport=transport,
        )

    @classmethod
    def in_cluster(
        cls,
        *,
        directory: Path = SERVICE_ACCOUNT_DIR,
        environ: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> HttpKubeClient:
        """A client for the pod's own service account: its token and CA files, the API server from
        KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT."""
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError("in-cluster: KUBERNETES_SERVICE_HOST is not set; not running in a pod")
        token_file, ca_file = directory / "token", directory / "ca.crt"
        for required in (token_file, ca_file):
            if not required.is_file():
                raise KubeConfigError(
                    f"in-cluster: {required} is missing; mount the service account token "
                    "(automountServiceAccountToken or a projected volume)"
                )
        host = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{host}:{port}",
            token_file=token_file,
            ca_file=ca_file,
            timeout_s=timeout_s,
            transport=transport,
        )

    # -- KubeClient -----------------------------------------------------------------------------------

    def get(self, api_path: str) -> dict[str, Any]:
        return self._request("GET", api_path)

    def patch(self, api_path: str, body: Any, patch_type: PatchType = "merge") -> dict[str, Any]:
        if patch_type not in PATCH_CONTENT_TYPES:
            raise ValueError(f"patch_type {patch_type!r}: accepted: merge, json")
        return self._request("PATCH", api_path, body, PATCH_CONTENT_TYPES[patch_type])

    def create(self, api_path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._request("POST", api_path, dict(body), "application/json")

    def delete(self, api_path: str) -> None:
        try:
            self._request("DELETE", api_path)
        except KubeNotFound:
            return

    def get_text(self, api_path: str) -> str:
        return self._send("GET", api_path, accept="text/plain").text

    def service_client(self, namespace: str, service: str, port: int, timeout_s: float) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.server}{service_proxy_path(namespace, service, port)}",
            verify=self.verify,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
            headers={"User-Agent": "maximus-ops"},
            auth=_BearerAuth(self.headers),
            transport=self._transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpKubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire -------------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """The per-request headers: the bearer token (read from its file when it comes from one)."""
        token = self._token
        if self._exec is not None:
            token = self._exec.token()
        elif self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()
            except OSError as exc:
                raise KubeConfigError(
                    f"token file {self._token_file}: cannot read it ({exc.strerror})"
                ) from exc
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _request(
        self, method: str, api_path: str, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any]:
        response = self._send(method, api_path, body, content_type)
        try:
            data = response.json()
        except ValueError as exc:
            raise KubeError(f"{method} {api_path}: the API server answered with no JSON") from exc
        if not isinstance(data, dict):
            raise KubeError(f"{method} {api_path}: the API server answered with no object")
        return data

    def _send(
        self,
        method: str,
        api_path: str,
        body: Any = None,
        content_type: str | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        """One request; a successful response, else the KubeError that names what failed."""
        headers = self.headers()
        if accept is not None:
            headers["Accept"] = accept
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        try:
            response = self._http.request(method, api_path, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise KubeUnreachable(
                f"cluster unreachable: {self.server} did not answer {method} {api_path} within "
                f"{self.timeout_s:g} s; check the network path to the API server"
            ) from exc
        except httpx.TransportError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise KubeUnreachable(
                f"cluster unreachable: {self.server} ({reason}); check the server URL, network and CA"
            ) from exc
        if response.is_success:
            return response
        raise self._error(method, api_path, body, response)

    def _error(self, method: str, api_path: str, body: Any, response: httpx.Response) -> KubeError:
        info = parse_path(api_path)
        if method == "POST" and info.name is None and isinstance(body, dict):  # name the object created
            info = PathInfo(info.plural, (body.get("metadata") or {}).get("name"), info.namespace)
        what = info.describe()
        verb = {"GET": "get", "PATCH": "patch", "POST": "create", "DELETE": "delete"}.get(
            method, method.lower()
        )
        status = response.status_code
        message = server_message(response)
        if status == 401:
            return KubeAuthError(
                f"unauthorized (401) to {verb} {what}: the API server rejected the token; check the "
                "kubeconfig user's token (expired? another cluster's?) or the service account token"
            )
        if status == 403:
            return KubeAuthError(
                f"forbidden (403) to {verb} {what}: {message}; check RBAC: the Role bound to this identity "
                f"must allow '{verb}' on {info.plural.split('/')[0]}"
                + (f" (resourceNames: {info.name})" if info.name and verb == "patch" else "")
            )
        if status == 404:
            return KubeNotFound(
                f"not found (404): {what} does not exist ({message}); check the namespace and name, "
                "and that the stack was applied (pulumi up)"
            )
        if status == 409:
            if method == "POST":
                return KubeConflict(f"conflict (409): {what} already exists ({message})")
            return KubeConflict(f"conflict (409): {what} changed since it was read ({message})")
        has_test = isinstance(body, list) and any(
            isinstance(op, dict) and op.get("op") == "test" for op in body
        )
        if status == 422 and has_test and "test" in message.lower():
            return KubeConflict(f"conflict: {what} changed since it was read ({message})")
        if status == 422:
            return KubeError(f"invalid (422): the API server refused to {verb} {what}: {message}")
        return KubeError(f"the API server answered {status} to {verb} {what}: {message}")


class ExecPlugin:
    """A kubeconfig user's `exec` credential plugin (`aws eks get-token`, `gke-gcloud-auth-plugin`, ...):
    run it, read the bearer token from the ExecCredential it prints, reuse it until shortly before it
    expires."""

    def __init__(self, command: list[str], environment: dict[str, str], api_version: str, where: str) -> None:
        self.command = command
        self.environment = environment
        self.api_version = api_version
        self.where = where
        self._token: str | None = None
        self._expires: datetime | None = None

    @classmethod
    def from_config(cls, config: Any, where: str) -> ExecPlugin:
        if not isinstance(config, dict) or not isinstance(config.get("command"), str):
            raise KubeConfigError(f"{where}: the user's exec plugin has no command")
        args = config.get("args") or []
        variables = {str(e["name"]): str(e["value"]) for e in config.get("env") or [] if "name" in e}
        api_version = str(config.get("apiVersion") or "client.authentication.k8s.io/v1beta1")
        return cls([config["command"], *map(str, args)], variables, api_version, where)

    def token(self) -> str:
        now = datetime.now(UTC)
        if self._token and (self._expires is None or now < self._expires - EXEC_TOKEN_MARGIN):
            return self._token
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        environment = {**os.environ, **self.environment, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            done = subprocess.run(
                self.command,
                env=environment,
                capture_output=True,
                text=True,
                timeout=EXEC_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KubeConfigError(f"{self.where}: exec plugin {self.command[0]}: {exc}") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise KubeAuthError(f"{self.where}: exec plugin {self.command[0]} failed ({last})")
        try:
            status = json.loads(done.stdout)["status"]
            token = str(status["token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeAuthError(
                f"{self.where}: exec plugin {self.command[0]} printed no ExecCredential with a token"
            ) from exc
        expiry = status.get("expirationTimestamp")
        self._token = token
        self._expires = datetime.fromisoformat(expiry.replace("Z", "+00:00")) if expiry else None
        return token


class _BearerAuth(httpx.Auth):
    """The API server's bearer token on every proxied request, read when sent (token files rotate)."""

    def __init__(self, headers: Callable[[], dict[str, str]]) -> None:
        self._headers = headers

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self._headers())
        yield request


def _ssl_context(*, cafile: Path | None = None, cadata: str | None = None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile else None, cadata=cadata)
    except FileNotFoundError as exc:
        raise KubeConfigError(f"CA bundle {cafile}: no such file") from exc
    except (ssl.SSLError, ValueError) as exc:
        source = f"CA bundle {cafile}" if cafile else "certificate-authority-data"
        raise KubeConfigError(f"{source}: not a PEM certificate ({exc})") from exc


def _named(config: Mapping[str, Any], section: str, key: str, name: str, path: Path) -> dict[str, Any]:
    """The `key` mapping of the entry called `name` in a kubeconfig section (clusters, users, contexts)."""
    for entry in config.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise KubeConfigError(f"kubeconfig {path}: {section} entry {name} has no {key} mapping")
            return value
    raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")
