"""Where backups are kept, behind one interface: a local directory (the default) or S3-compatible storage.

A backup is assembled in a staging directory on this machine and then published. Only a published backup
is listed: a local one is renamed from `.partial-<id>` into place in one step; an S3 one has its files
uploaded first and `manifest.json` last, so a backup without its manifest is never taken for a good one.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MANIFEST = "manifest.json"
PARTIAL = ".partial-"
OWNER_FILE = ".owner"
ABANDONED_AFTER = timedelta(hours=1)


class Storage(Protocol):
    """One place holding complete backups, each a set of named files with `manifest.json` among them."""

    description: str

    def staging(self, backup_id: str) -> Path:
        """A fresh, private directory on this machine where the backup is assembled."""
        ...

    def publish(self, backup_id: str, staged: Path) -> None:
        """Make the staged backup complete and listed, in one step from a reader's point of view."""
        ...

    def ids(self) -> list[str]:
        """Complete backups only, oldest first."""
        ...

    def manifest(self, backup_id: str) -> dict[str, Any]: ...

    def fetch(self, backup_id: str, name: str, scratch: Path) -> Path:
        """A local path holding the stored file `name` (downloaded into `scratch` when remote)."""
        ...

    def delete(self, backup_id: str) -> None: ...

    def sweep(self) -> list[str]:
        """Remove what interrupted backups left behind (their owner is gone); the ids removed."""
        ...


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_staging(parent: Path, backup_id: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staged = parent / f"{PARTIAL}{backup_id}"
    staged.mkdir(mode=0o700)
    (staged / OWNER_FILE).write_text(str(os.getpid()))
    return staged


def _sweep_staging(parent: Path) -> list[str]:
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for staged in parent.glob(f"{PARTIAL}*"):
        try:
            owner = int((staged / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            owner = -1
        if owner > 0 and owner != os.getpid() and _pid_alive(owner):
            continue
        if owner == os.getpid():
            continue
        shutil.rmtree(staged, ignore_errors=True)
        removed.append(staged.name.removeprefix(PARTIAL))
    return removed


class LocalDirStorage:
    """Backups as directories under one local directory (default `<state>/backups`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"local directory {root}"

    def staging(self, backup_id: str) -> Path:
        return _new_staging(self.root, backup_id)

    def publish(self, backup_id: str, staged: Path) -> None:
        (staged / OWNER_FILE).unlink(missing_ok=True)
        _fsync_tree(staged)
        os.replace(staged, self.root / backup_id)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def _dir(self, backup_id: str) -> Path:
        path = self.root / backup_id
        if not (path / MANIFEST).is_file():
            raise BadInput(
                f"--backup: unknown backup {backup_id!r} in {self.description}; see `invoke db.list`"
            )
        return path

    def manifest(self, backup_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self._dir(backup_id) / MANIFEST).read_text())
        return data

    def fetch(self, backup_id: str, name: str, scratch: Path) -> Path:
        return self._dir(backup_id) / name

    def delete(self, backup_id: str) -> None:
        path = self._dir(backup_id)
        doomed = self.root / f"{PARTIAL}deleting-{backup_id}"
        os.replace(path, doomed)  # unlisted at once, then removed
        shutil.rmtree(doomed)

    def sweep(self) -> list[str]:
        return _sweep_staging(self.root)


class S3Storage:
    """Backups as objects under `s3://bucket/prefix/<id>/`, manifest uploaded last."""

    def __init__(self, client: S3Client, bucket: str, prefix: str, staging_root: Path) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.staging_root = staging_root
        self.description = f"s3://{bucket}/{self.prefix}"

    def _key(self, backup_id: str, name: str = "") -> str:
        return f"{self.prefix}/{backup_id}/{name}" if self.prefix else f"{backup_id}/{name}"

    def staging(self, backup_id: str) -> Path:
        return _new_staging(self.staging_root, backup_id)

    def publish(self, backup_id: str, staged: Path) -> None:
        (staged / OWNER_FILE).unlink(missing_ok=True)
        files = sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST)
        try:
            for path in files:
                self.client.upload_file(
                    str(path), self.bucket, self._key(backup_id, path.relative_to(staged).as_posix())
                )
            self.client.upload_file(str(staged / MANIFEST), self.bucket, self._key(backup_id, MANIFEST))
        except Exception as exc:  # botocore raises many kinds; all mean "not published"
            raise OperationFailed(f"upload to {self.description} failed: {exc}") from exc
        shutil.rmtree(staged)

    def _objects(self, prefix: str) -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []) if "Key" in item)
        except Exception as exc:
            raise OperationFailed(f"cannot list {self.description}: {exc}") from exc
        return keys

    def ids(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        found = set()
        for key in self._objects(base):
            rest = key[len(base) :]
            backup_id, _, name = rest.partition("/")
            if name == MANIFEST:
                found.add(backup_id)
        return sorted(found)

    def manifest(self, backup_id: str) -> dict[str, Any]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(backup_id, MANIFEST))[
                "Body"
            ].read()
        except self.client.exceptions.NoSuchKey:
            raise BadInput(
                f"--backup: unknown backup {backup_id!r} in {self.description}; see `invoke db.list`"
            ) from None
        data: dict[str, Any] = json.loads(body)
        return data

    def fetch(self, backup_id: str, name: str, scratch: Path) -> Path:
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(backup_id, name), str(target))
        except Exception as exc:
            raise OperationFailed(
                f"download of {backup_id}/{name} from {self.description} failed: {exc}"
            ) from exc
        return target

    def delete(self, backup_id: str) -> None:
        keys = self._objects(self._key(backup_id))
        manifest = self._key(backup_id, MANIFEST)
        ordered = [manifest] if manifest in keys else []  # unlisted first
        ordered += [k for k in keys if k != manifest]
        for key in ordered:
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def sweep(self) -> list[str]:
        """Local staging leftovers, and remote uploads that never got their manifest (older than an hour)."""
        removed = _sweep_staging(self.staging_root)
        base = f"{self.prefix}/" if self.prefix else ""
        cutoff = datetime.now(UTC) - ABANDONED_AFTER
        complete = set(self.ids())
        abandoned: dict[str, list[str]] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                for item in page.get("Contents", []):
                    backup_id = item["Key"][len(base) :].partition("/")[0]
                    if backup_id not in complete and item["LastModified"] < cutoff:
                        abandoned.setdefault(backup_id, []).append(item["Key"])
            for backup_id, keys in sorted(abandoned.items()):
                for key in keys:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                removed.append(backup_id)
        except Exception as exc:
            raise OperationFailed(f"cannot sweep {self.description}: {exc}") from exc
        return removed


def for_environment(env: Environment, client: S3Client | None = None) -> Storage:
    """The storage the model declares (`backup.storage`)."""
    spec = env.backup.storage
    if spec.kind == "local":
        return LocalDirStorage(Path(spec.path) if spec.path else env.state_path / "backups")
    if not spec.bucket:
        raise BadInput(
            f"environment {env.name}: backup.storage.bucket: missing; accepted: required for kind s3"
        )
    if client is None:
        import boto3  # noqa: PLC0415 - only S3 environments need boto3

        client = boto3.client("s3", endpoint_url=spec.endpoint) if spec.endpoint else boto3.client("s3")
    prefix = spec.path.strip("/") if spec.path else f"maximus/{env.name}"
    if env.state_dir:
        staging_root = env.state_path / "backups"
    else:
        from opskit import kuberollout  # noqa: PLC0415 - a cluster environment's state on this machine

        staging_root = kuberollout.state_home(env) / "backups"
    return S3Storage(client, spec.bucket, prefix, staging_root)
