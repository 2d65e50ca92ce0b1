"""Backups proven by restores: PostgreSQL and Redis of a single-machine environment.

A backup is a directory of sealed (compressed, AES-256-GCM encrypted) files and a `manifest.json`: id,
source and tool versions, start, end, duration, size and sha256 of every file, per-table row counts and
checksums, the Redis key digest and the encryption key id, authenticated with an HMAC under the key.
It is assembled under a temporary name and published by the storage only when complete and verified
(see opskit.backup_storage): an interrupted, killed or disk-full backup is never listed as good, and the
next backup, prune or drill sweeps what it left behind.

PostgreSQL: `logical` (pg_dump, directory format, parallel jobs, one exported snapshot shared with the
per-table checksums) or `physical` (pg_basebackup's own tar streamed into the sealed archive and checked
against its backup manifest as it passes, see opskit.basebackup; db.verify and the drill run
pg_verifybackup on it in full). Per-table checksums are sums of a 64-bit hash per row (opskit.pgtools: by
value where the column types allow it, else by text; the method is recorded per table), counted on
parallel connections, a large table in block ranges (beside a physical backup's stream: on one). A
logical restore feeds every table's data to pg_restore through a named pipe as it is decrypted (each
chunk authenticated first, the file's sha256 checked in the same pass): no plaintext copy on disk.
Redis: BGSAVE confirmed by LASTSAVE and INFO persistence, the RDB copied, checked by redis-check-rdb and
loaded into a scratch server for its key digest.

`backup_and_verify(env)` is what a deploy calls before a breaking migration (it holds the lock already).
The other entry points take the environment's lock and write an audit record.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from opskit import (
    audit,
    backup_crypto,
    backup_kube,
    backup_storage,
    basebackup,
    kuberollout,
    localenv,
    lock,
    output,
    pgtools,
)
from opskit.backup_crypto import BackupKey, Compression
from opskit.backup_kube import DrillOutcome, KubeBackupReport, KubeDrillReport, KubeRestoreReport
from opskit.backup_storage import MANIFEST, Storage
from opskit.errors import BadInput, OperationFailed, OpsError
from opskit.kube import KubeClient
from opskit.model import Environment

FORMAT = 1
BACKUP_ID = re.compile(r"^b-\d{8}T\d{12}Z$")
DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
METRICS_FILE = "maximus_backup.prom"
STATE_FILE = "backup-state.json"
DEFAULT_JOBS = 2
PHYSICAL_ARCHIVE = "pgdata.tar"
TABLE_DATA = re.compile(r"^postgres/\d+\.dat\.[a-z.]+$")
PIPE_BYTES = 1 << 20
PIPE_POLL_S = 0.002

Tick = Callable[[int], None]


# --- reports --------------------------------------------------------------------------------------------


@dataclass
class BackupReport:
    id: str
    environment: str
    method: str
    storage: str
    size: int
    files: int
    seconds: float
    tables: int
    rows: int
    redis_keys: int
    key_id: str
    swept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    id: str
    ok: bool
    checks: list[str]
    problems: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreReport:
    id: str
    environment: str
    database: str
    replaced_live: bool
    safety_backup: str | None
    tables: int
    rows: int
    identical: bool
    redis: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DrillReport(DrillOutcome):
    """A drill of a backup of a single-machine environment."""

    metrics_file: str


@dataclass
class PruneReport:
    kept: dict[str, str]
    deleted: list[str]
    swept: list[str]
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- small helpers --------------------------------------------------------------------------------------


def new_id(now: datetime | None = None) -> str:
    return "b-" + (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")


def id_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id[2:], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)


def check_id(backup_id: str) -> str:
    if not BACKUP_ID.fullmatch(backup_id):
        raise BadInput(
            f"--backup: {backup_id!r} is not a backup id; accepted: an id from `invoke db.list` "
            "such as b-20260101T030000000000Z"
        )
    return backup_id


def check_database_name(name: str) -> str:
    if not DATABASE_NAME.fullmatch(name):
        raise BadInput(
            f"--into: {name!r} is not accepted; accepted: a new database name of lower-case letters, digits "
            "and '_' (no path, no quotes), at most 63 characters"
        )
    return name


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _mac(manifest: dict[str, Any], key: BackupKey) -> str:
    return backup_crypto.manifest_mac(manifest, key)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _jobs(env: Environment) -> int:
    return env.backup.jobs


def work_dir(env: Environment) -> Path:
    """Where plaintext is handled for a moment (never inside a published backup): mode 0700."""
    if env.state_dir is None:
        return kuberollout.state_home(env) / "backups" / ".work"
    return env.state_path / "backups" / ".work"


class _Bar:
    """One rich progress bar in bytes, or nothing (quiet or --json)."""

    def __init__(self, progress: Progress | None, description: str, total: int | None) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.task = progress.add_task(description, total=total) if progress is not None else None

    def __call__(self, amount: int) -> None:
        if self.progress is not None and self.task is not None:
            with self.lock:
                self.progress.advance(self.task, amount)

    def done(self) -> None:
        if self.progress is not None and self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, total=max(task.completed, 1), completed=max(task.completed, 1))

    @contextmanager
    def watching(self, path: Path) -> Iterator[None]:
        """Show the bytes a tool has written below `path` so far, while it runs."""
        if self.progress is None or self.task is None:
            yield
            return
        stop = threading.Event()
        progress, task = self.progress, self.task

        def sample() -> None:
            while not stop.wait(0.25):
                written = (
                    sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
                )
                task_info = progress.tasks[task]
                total = task_info.total if task_info.total and task_info.total > written else None
                progress.update(task, completed=written, total=total)

        watcher = threading.Thread(target=sample, name="progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


@contextmanager
def _progress(show: bool) -> Iterator[Progress | None]:
    if not show:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=output.console,
        transient=False,
    ) as progress:
        yield progress


def _seal_tree(
    plain: Path, target: Path, key: BackupKey, compression: Compression, *, jobs: int, tick: Tick
) -> dict[str, dict[str, Any]]:
    """Seal every file below `plain` into `target`, in parallel; name -> {size, plain_size, sha256}."""
    files = sorted(p for p in plain.rglob("*") if p.is_file())
    target.mkdir(parents=True, exist_ok=True)
    suffix = backup_crypto.SUFFIX[compression]

    def one(path: Path) -> tuple[str, dict[str, Any]]:
        name = path.relative_to(plain).as_posix() + suffix
        sealed = target / name
        sealed.parent.mkdir(parents=True, exist_ok=True)
        size, digest = backup_crypto.seal_file(path, sealed, key, compression, tick)
        return name, {"size": size, "plain_size": path.stat().st_size, "sha256": digest}

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return dict(pool.map(one, files))


# --- backup ---------------------------------------------------------------------------------------------


def _dump_logical(
    env: Environment, staged: Path, key: BackupKey, progress: Progress | None
) -> dict[str, Any]:
    database = pgtools.database_name(env)
    plain = staged / "plain-postgres"
    jobs = _jobs(env)
    with pgtools.connect(env, database, autocommit=False) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot(), current_setting('server_version')").fetchone()
        assert row is not None  # noqa: S101
        snapshot, server_version = str(row[0]), str(row[1])
        checksums: dict[str, Any] = {}
        failure: list[BaseException] = []

        def checksum() -> None:
            try:
                checksums.update(pgtools.table_checksums(conn))
            except BaseException as exc:  # reported below, in the main thread
                failure.append(exc)

        worker = threading.Thread(target=checksum, name="table-checksums")
        row = conn.execute(
            "SELECT coalesce(sum(pg_table_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
        bar = _Bar(progress, "postgres: pg_dump", int(row[0]) if row else None)
        worker.start()
        try:
            with bar.watching(plain):
                pgtools.run_tool(
                    [
                        pgtools.pg_bin(env, "pg_dump"),
                        *pgtools.connect_args(env),
                        "--format=directory",
                        f"--jobs={jobs}",
                        "--compress=0",
                        f"--snapshot={snapshot}",
                        f"--file={plain}",
                        database,
                    ],
                    env=pgtools.tool_env(env),
                    what=f"pg_dump of {database}",
                )
        finally:
            worker.join()
        bar.done()
        if failure:
            raise OperationFailed(f"table checksums of {database}: {failure[0]}") from failure[0]
        conn.rollback()
    listing = pgtools.run_tool(
        [pgtools.pg_bin(env, "pg_restore"), "--list", str(plain)], what="pg_restore --list of the new dump"
    )
    entries = sum(1 for line in listing.splitlines() if line and not line.startswith(";"))
    total = sum(p.stat().st_size for p in plain.rglob("*") if p.is_file())
    seal_bar = _Bar(progress, f"postgres: compress ({env.backup.compression}) + encrypt", total)
    files = _seal_tree(plain, staged / "postgres", key, env.backup.compression, jobs=jobs, tick=seal_bar)
    shutil.rmtree(plain)
    return {
        "method": "logical",
        "database": database,
        "server_version": server_version,
        "tool": pgtools.run_tool(
            [pgtools.pg_bin(env, "pg_dump"), "--version"], what="pg_dump --version"
        ).strip(),
        "jobs": jobs,
        "snapshot": snapshot,
        "toc_entries": entries,
        "tables": checksums,
        "files": {f"postgres/{name}": meta for name, meta in files.items()},
    }


def _dump_physical(
    env: Environment, staged: Path, key: BackupKey, progress: Progress | None
) -> dict[str, Any]:
    database = pgtools.database_name(env)
    with pgtools.connect(env, "postgres") as conn:
        row = conn.execute(
            "SELECT sum(pg_database_size(datname))::bigint, current_setting('server_version') "
            "FROM pg_database"
        ).fetchone()
    assert row is not None  # noqa: S101
    server_version = str(row[1])
    checksums: dict[str, Any] = {}
    failure: list[BaseException] = []

    def checksum() -> None:  # beside the stream
        try:
            with pgtools.connect(env, database) as conn:
                checksums.update(pgtools.table_checksums_alone(conn))
        except BaseException as exc:  # reported below, in the main thread
            failure.append(exc)

    worker = threading.Thread(target=checksum, name="table-checksums")
    compression = env.backup.compression
    bar = _Bar(
        progress, f"postgres: pg_basebackup + {compression} + encrypt", int(row[0]) if row[0] else None
    )
    name = f"postgres/{PHYSICAL_ARCHIVE}{backup_crypto.SUFFIX[compression]}"
    (staged / "postgres").mkdir()
    work = staged / "checked"  # what the stream is checked with; never published
    worker.start()
    try:
        with (staged / name).open("wb") as out:
            sink = backup_crypto.SealWriter(out, key, compression)  # one compressor: the cores are busy
            streamed = basebackup.stream(env, sink.write, work=work, tick=bar)
            size, digest = sink.finish()
            out.flush()
            os.fsync(out.fileno())
        bar.done()
    finally:
        worker.join()
        shutil.rmtree(work, ignore_errors=True)
    if failure:
        raise OperationFailed(f"table checksums of {database}: {failure[0]}") from failure[0]
    return {
        "method": "physical",
        "database": database,
        "server_version": server_version,
        "tool": pgtools.run_tool(
            [pgtools.pg_bin(env, "pg_basebackup"), "--version"], what="pg_basebackup --version"
        ).strip(),
        "archive": "pg_basebackup",  # its own tar: the data directory's files at the archive's root
        "tables": checksums,
        "tables_note": "counted while the base backup ran; equal after restore when nothing was written then",
        "files": {name: {"size": size, "plain_size": streamed, "sha256": digest}},
    }


def _bgsave(client: redis.Redis, timeout_s: float = 600) -> dict[str, Any]:
    """BGSAVE and wait until LASTSAVE moved and INFO persistence reports it finished and ok."""
    before = int(client.lastsave().timestamp())
    while int(time.time()) <= before:  # LASTSAVE has a resolution of one second
        time.sleep(0.05)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.bgsave()
            break
        except redis.ResponseError as exc:  # another save or an AOF rewrite is running
            if time.monotonic() > deadline:
                raise OperationFailed(f"redis BGSAVE refused: {exc}") from exc
            time.sleep(0.2)
    while True:
        info: dict[str, Any] = client.info("persistence")
        lastsave = int(client.lastsave().timestamp())
        if lastsave > before and int(info["rdb_bgsave_in_progress"]) == 0:
            if info.get("rdb_last_bgsave_status") != "ok":
                raise OperationFailed(
                    f"redis BGSAVE failed: rdb_last_bgsave_status={info.get('rdb_last_bgsave_status')}"
                )
            return {"lastsave": lastsave, "rdb_last_bgsave_status": "ok"}
        if time.monotonic() > deadline:
            raise OperationFailed("redis BGSAVE did not finish in time; see the redis log")
        time.sleep(0.05)


def _dump_redis(env: Environment, staged: Path, key: BackupKey, progress: Progress | None) -> dict[str, Any]:
    client = pgtools.live_redis(env)
    try:
        server: dict[str, Any] = client.info("server")
        config = client.config_get("dir")
        config.update(client.config_get("dbfilename"))
        confirmed = _bgsave(client)
        databases = sorted(pgtools.keyspace(client))
    except redis.RedisError as exc:
        raise OperationFailed(
            f"redis of {env.name}: {exc}; is it up? `invoke health --env {env.name}`"
        ) from exc
    finally:
        client.close()
    plain_dir = staged / "plain-redis"
    plain_dir.mkdir()
    rdb = plain_dir / "dump.rdb"
    shutil.copyfile(Path(str(config["dir"])) / str(config["dbfilename"]), rdb)
    pgtools.run_tool([pgtools.REDIS_CHECK_RDB, str(rdb)], what="redis-check-rdb of the copied RDB")
    with pgtools.ScratchRedis(rdb, staged / "scratch-redis") as scratch:
        digest = pgtools.redis_digest(
            scratch.client, sorted(set(databases) | set(pgtools.keyspace(scratch.client())))
        )
    bar = _Bar(progress, f"redis: compress ({env.backup.compression}) + encrypt", rdb.stat().st_size)
    files = _seal_tree(plain_dir, staged / "redis", key, env.backup.compression, jobs=1, tick=bar)
    shutil.rmtree(plain_dir)
    return {
        "server_version": server.get("redis_version"),
        "tool": "BGSAVE + redis-check-rdb",
        **confirmed,
        **digest,
        "files": {f"redis/{name}": meta for name, meta in files.items()},
    }


def _run_backup(env: Environment, storage: Storage, *, show_progress: bool, reason: str) -> BackupReport:
    env.require_local()
    key = backup_crypto.load_key(env, create=True)
    swept = storage.sweep()
    backup_id = new_id()
    started_at, started = _now(), time.monotonic()
    staged = storage.staging(backup_id)
    try:
        with _progress(show_progress) as progress:
            dump = _dump_physical if env.backup.method == "physical" else _dump_logical
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis") as pool:  # beside PostgreSQL
                redis_future = pool.submit(_dump_redis, env, staged, key, progress)
                postgres = dump(env, staged, key, progress)
                redis_part = redis_future.result()
        files = {**postgres.pop("files"), **redis_part.pop("files")}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "id": backup_id,
            "environment": env.name,
            "reason": reason,
            "method": env.backup.method,
            "compression": env.backup.compression,
            "encryption": "AES-256-GCM",
            "key_id": key.id,
            "started_at": started_at,
            "finished_at": _now(),
            "duration_seconds": round(time.monotonic() - started, 3),
            "versions": {
                "postgres": postgres["server_version"],
                "redis": redis_part["server_version"],
                "postgres_tool": postgres["tool"],
                "maximus_ops": _version("maximus-ops"),
                "cryptography": _version("cryptography"),
                "zstandard": _version("zstandard"),
            },
            "postgres": postgres,
            "redis": redis_part,
            "files": files,
            "size": sum(f["size"] for f in files.values()),
            "verified": True,
        }
        manifest["mac"] = _mac(manifest, key)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        storage.publish(backup_id, staged)
    except BaseException as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(exc, OperationFailed | BadInput):
            raise
        if isinstance(exc, OSError):
            raise OperationFailed(
                f"backup {backup_id} failed and was removed: {exc}; free space in {storage.description} "
                "and run again"
            ) from exc
        raise
    tables = postgres["tables"]
    return BackupReport(
        id=backup_id,
        environment=env.name,
        method=env.backup.method,
        storage=storage.description,
        size=manifest["size"],
        files=len(files),
        seconds=manifest["duration_seconds"],
        tables=len(tables),
        rows=sum(t["rows"] for t in tables.values()),
        redis_keys=sum(redis_part["keys"].values()),
        key_id=key.id,
        swept=swept,
    )


def backup_and_verify(env: Environment) -> str:
    """A complete, verified backup of the environment's data; its id (OperationFailed otherwise).

    Called by a deploy that holds the environment's lock already.
    """
    storage = backup_storage.for_environment(env)
    try:
        report = _run_backup(env, storage, show_progress=False, reason="deploy")
    except OpsError as exc:
        audit.for_environment(env).write(env.name, "db.backup", result="failed", reason=str(exc))
        raise OperationFailed(f"backup before the migration failed: {exc}; nothing deployed") from exc
    _record_success(env, "backup", report.id)
    audit.for_environment(env).write(env.name, "db.backup", result="ok", reason="deploy", **_brief(report))
    return report.id


def _brief(report: BackupReport) -> dict[str, Any]:
    return {"backup": report.id, "size": report.size, "seconds": report.seconds, "key_id": report.key_id}


def backup(
    env: Environment,
    *,
    show_progress: bool = False,
    storage: Storage | None = None,
    break_stale_lock: bool = False,
) -> BackupReport | KubeBackupReport:
    """`invoke db.backup`: take the lock, make a verified backup, audit it.

    On a Kubernetes environment: an on-demand CloudNativePG backup plus the Kafka topic export and the
    restore drill's consistency point (opskit.backup_kube), through the kubeconfig's client.
    """
    if env.kind == "kubernetes":
        return backup_kube.backup(
            env,
            _kube_client(env),
            storage=storage or backup_storage.for_environment(env),
            checksums=True,
            on_phase=(lambda phase: output.console.print(f"[dim]CloudNativePG backup: {phase}[/dim]"))
            if show_progress
            else None,
        )
    env.require_local()
    store = storage or backup_storage.for_environment(env)
    log = audit.for_environment(env)
    with lock.hold(env, "db.backup", break_stale=break_stale_lock):
        try:
            report = _run_backup(env, store, show_progress=show_progress, reason="manual")
        except OperationFailed as exc:
            log.write(env.name, "db.backup", result="failed", reason=str(exc))
            raise
    _record_success(env, "backup", report.id)
    log.write(env.name, "db.backup", result="ok", **_brief(report))
    return report


def _kube_client(env: Environment) -> KubeClient:
    return kuberollout.client_for(env)


# --- list and verify ------------------------------------------------------------------------------------


def list_backups(env: Environment, storage: Storage | None = None) -> list[dict[str, Any]]:
    """Complete backups, newest first: what `invoke db.list` prints."""
    store = storage or backup_storage.for_environment(env)
    rows = []
    for backup_id in reversed(store.ids()):
        manifest = store.manifest(backup_id)
        rows.append(
            {
                "id": backup_id,
                "started_at": manifest.get("started_at"),
                "method": manifest.get("method"),
                "size": manifest.get("size"),
                "duration_seconds": manifest.get("duration_seconds"),
                "tables": len(manifest.get("postgres", {}).get("tables", {})),
                "redis_keys": sum((manifest.get("redis", {}).get("keys") or {}).values()),
                "compression": manifest.get("compression"),
                "key_id": manifest.get("key_id"),
                "verified": bool(manifest.get("verified")),
                "reason": manifest.get("reason"),
            }
        )
    return rows


def _manifest(storage: Storage, backup_id: str, key: BackupKey) -> dict[str, Any]:
    manifest = storage.manifest(check_id(backup_id))
    if manifest.get("key_id") != key.id:
        raise backup_crypto.WrongKey(
            f"backup {backup_id} was encrypted with key id {manifest.get('key_id')}, but the key from "
            f"{key.source} has id {key.id}; accepted: the key this backup was made with"
        )
    if not hmac.compare_digest(str(manifest.get("mac")), _mac(manifest, key)):
        raise OperationFailed(f"backup {backup_id}: {MANIFEST} fails its authentication (changed)")
    return manifest


def _unseal_all(
    storage: Storage,
    manifest: dict[str, Any],
    key: BackupKey,
    scratch: Path,
    *,
    tick: Tick,
    jobs: int,
    skip: Callable[[str], bool] = lambda _: False,
) -> Path:
    """Check and decrypt the backup's files (but those `skip` names) into `scratch/plain`; the plain root."""
    compression: Compression = manifest["compression"]
    suffix = backup_crypto.SUFFIX[compression]
    plain = scratch / "plain"
    names = sorted(name for name in manifest["files"] if not skip(name))

    def one(name: str) -> None:
        stored = storage.fetch(manifest["id"], name, scratch / "fetched")
        if _sha256(stored) != manifest["files"][name]["sha256"]:
            raise OperationFailed(f"backup {manifest['id']}: {name} fails its sha256 (changed or damaged)")
        target = plain / name.removesuffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        backup_crypto.unseal_file(stored, target, key, compression, f"{manifest['id']}/{name}", tick=tick)

    plain.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for _ in pool.map(one, names):
            pass
    return plain


def _table_data(name: str) -> bool:
    """A table's data file of a logical backup: read once, start to end, by pg_restore."""
    return TABLE_DATA.fullmatch(name) is not None


class _TableDataPipes:
    """The table data files of a logical backup as named pipes in the plain directory, each decrypted
    into its pipe when pg_restore opens it: no plaintext copy on disk, decryption beside the restore.

    Every chunk is authenticated (AES-GCM) before it is written to a pipe, so nothing changed reaches the
    database; the whole file's sha256 is compared at the end, in the same pass. `finish()` reports the
    first failure; a pipe pg_restore never opened is abandoned when it exits."""

    def __init__(
        self,
        storage: Storage,
        manifest: dict[str, Any],
        key: BackupKey,
        scratch: Path,
        *,
        tick: Tick,
        jobs: int,
    ) -> None:
        self.storage, self.manifest, self.key, self.scratch, self.tick = storage, manifest, key, scratch, tick
        self.compression: Compression = manifest["compression"]
        suffix = backup_crypto.SUFFIX[self.compression]
        plain = scratch / "plain"
        self.pipes = {
            name: plain / name.removesuffix(suffix) for name in manifest["files"] if _table_data(name)
        }
        for path in self.pipes.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(path, 0o600)
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.pool = ThreadPoolExecutor(max_workers=max(4, 2 * jobs), thread_name_prefix="feed")
        self.opener = threading.Thread(target=self._open_as_read, name="pipes", daemon=True)
        self.opener.start()

    def _open_as_read(self) -> None:
        waiting = dict(self.pipes)
        while waiting and not self.stop.is_set():
            for name, path in list(waiting.items()):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no reader yet
                        continue
                    self.failures.append(exc)
                    return
                del waiting[name]
                os.set_blocking(fd, True)
                with suppress(OSError):  # a larger pipe: fewer switches (at most pipe-max-size)
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
                self.pool.submit(self._feed, name, fd)
            self.stop.wait(PIPE_POLL_S)

    def _feed(self, name: str, fd: int) -> None:
        try:
            digest = hashlib.sha256()
            stored = self.storage.fetch(self.manifest["id"], name, self.scratch / "fetched")
            with stored.open("rb") as source, os.fdopen(fd, "wb", buffering=PIPE_BYTES) as pipe:
                backup_crypto.unseal(
                    source,
                    pipe,
                    self.key,
                    self.compression,
                    f"{self.manifest['id']}/{name}",
                    tick=self.tick,
                    observe=digest.update,
                )
            if digest.hexdigest() != self.manifest["files"][name]["sha256"]:
                raise OperationFailed(
                    f"backup {self.manifest['id']}: {name} fails its sha256 (changed or damaged)"
                )
        except BaseException as exc:  # reported by finish(), in the main thread
            self.failures.append(exc)

    def finish(self) -> None:
        self.stop.set()
        self.opener.join()
        self.pool.shutdown(wait=True)
        if self.failures:
            first = self.failures[0]
            if isinstance(first, OperationFailed | BadInput):
                raise first
            raise OperationFailed(f"backup {self.manifest['id']}: {first}") from first


def _check_files(storage: Storage, manifest: dict[str, Any], scratch: Path) -> list[str]:
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        try:
            stored = storage.fetch(manifest["id"], name, scratch / "fetched")
            digest = _sha256(stored)
        except (OSError, OperationFailed) as exc:
            problems.append(f"{name}: missing or unreadable ({exc})")
            continue
        if digest != meta["sha256"]:
            problems.append(
                f"{name}: sha256 {digest[:16]}... differs from the manifest's {meta['sha256'][:16]}..."
            )
    return problems


def verify(
    env: Environment, backup_id: str, *, storage: Storage | None = None, show_progress: bool = False
) -> VerifyReport:
    """`invoke db.verify`: checksums, decryption, pg_restore --list or pg_verifybackup, redis-check-rdb.

    A wrong key is BadInput (exit 2); a failed verification is reported (the task exits 1).
    """
    started = time.monotonic()
    store = storage or backup_storage.for_environment(env)
    key = backup_crypto.load_key(env)
    manifest = _manifest(store, backup_id, key)
    checks = [f"{MANIFEST}: authenticated with key {key.id}"]
    with pgtools.scratch_dir(work_dir(env), f"verify-{backup_id}-") as scratch:
        problems = _check_files(store, manifest, scratch)
        if not problems:
            checks.append(f"{len(manifest['files'])} files: sha256 as recorded")
            try:
                total = sum(int(f["size"]) for f in manifest["files"].values())
                with _progress(show_progress) as progress:
                    bar = _Bar(progress, "decrypt + decompress", total)
                    plain = _unseal_all(store, manifest, key, scratch, tick=bar, jobs=_jobs(env))
                checks.append("every file decrypts and decompresses")
                checks.extend(_check_plain(env, manifest, plain, scratch))
            except OperationFailed as exc:
                problems.append(str(exc))
    return VerifyReport(backup_id, not problems, checks, problems, round(time.monotonic() - started, 3))


def _extract(archive: Path, target: Path) -> None:
    """Unpack a base-backup archive; every member checked first."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            basebackup.check_member(archive.name, member)
        tar.extractall(target, members=members)  # noqa: S202 - every member checked above


def _extract_sealed(
    storage: Storage, manifest: dict[str, Any], key: BackupKey, name: str, *, target: Path, scratch: Path
) -> None:
    """Decrypt the sealed archive `name` and unpack it into `target` in one pass (no plaintext archive on
    disk); each member is checked before it is written, the file's sha256 in the same pass."""
    stored = storage.fetch(manifest["id"], name, scratch / "fetched")
    read_fd, write_fd = os.pipe()
    digest = hashlib.sha256()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with stored.open("rb") as source, os.fdopen(write_fd, "wb") as pipe:
                backup_crypto.unseal(
                    source,
                    pipe,
                    key,
                    manifest["compression"],
                    f"{manifest['id']}/{name}",
                    observe=digest.update,
                )
        except BaseException as exc:  # reported below, in the main thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name="unseal")
    producer.start()
    problem: BaseException | None = None
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            with tarfile.open(fileobj=pipe, mode="r|") as tar:
                for member in tar:
                    basebackup.check_member(name, member)
                    tar.extract(member, target)
            while pipe.read(PIPE_BYTES):  # the archive's padding: the whole file is read and hashed
                pass
    except (OSError, tarfile.TarError, OperationFailed) as exc:
        problem = exc
    finally:
        producer.join()  # it stops at once when the pipe was closed early
    if failure:  # a file that does not decrypt explains any unpacking problem
        raise _as_failure(failure[0], manifest) from failure[0]
    if isinstance(problem, OperationFailed):
        raise problem
    if problem is not None:
        raise OperationFailed(f"backup {manifest['id']}: {name} does not unpack ({problem})") from problem
    if digest.hexdigest() != manifest["files"][name]["sha256"]:
        raise OperationFailed(f"backup {manifest['id']}: {name} fails its sha256 (changed or damaged)")


def _as_failure(exc: BaseException, manifest: dict[str, Any]) -> OpsError:
    if isinstance(exc, OpsError):
        return exc
    return OperationFailed(f"backup {manifest['id']}: {exc}")


def _check_plain(env: Environment, manifest: dict[str, Any], plain: Path, scratch: Path) -> list[str]:
    checks = []
    if manifest["method"] == "cloudnative-pg":
        for path in sorted(plain.rglob("*.json")):
            document = json.loads(path.read_text())
            if "kafka_topics" in document:
                checks.append(f"{path.name}: {len(document['kafka_topics'])} Kafka topic declarations")
            else:
                groups = document.get("groups") or {}
                read_at = document.get("read_at")
                checks.append(f"{path.name}: offsets of {len(groups)} consumer groups, read at {read_at}")
        csvs = sorted(plain.rglob("*.csv"))
        if csvs:
            checks.append(
                f"{len(csvs)} offset files for kafka-consumer-groups.sh --reset-offsets --from-file"
            )
        record = manifest.get("consumer_offsets")
        if record and record.get("status") != "exported":
            checks.append(f"consumer offsets: unavailable ({record.get('reason')})")
        return checks
    if manifest["method"] == "physical":
        _extract(plain / "postgres" / PHYSICAL_ARCHIVE, _unpack_into(manifest, scratch / "extracted"))
        pgtools.run_tool(
            [pgtools.pg_bin(env, "pg_verifybackup"), "--quiet", str(scratch / "extracted" / "pgdata")],
            what="pg_verifybackup",
        )
        checks.append("pg_verifybackup: the base backup matches its backup_manifest")
    else:
        listing = pgtools.run_tool(
            [pgtools.pg_bin(env, "pg_restore"), "--list", str(plain / "postgres")], what="pg_restore --list"
        )
        entries = sum(1 for line in listing.splitlines() if line and not line.startswith(";"))
        if entries != manifest["postgres"].get("toc_entries", entries):
            raise OperationFailed(f"pg_restore --list: {entries} entries, the manifest recorded more")
        checks.append(f"pg_restore --list: {entries} entries")
    pgtools.run_tool([pgtools.REDIS_CHECK_RDB, str(plain / "redis" / "dump.rdb")], what="redis-check-rdb")
    checks.append("redis-check-rdb: the RDB is sound")
    return checks


# --- restore --------------------------------------------------------------------------------------------


def _restore_logical(
    env: Environment, plain: Path, target: str, owner: str, pipes: _TableDataPipes | None = None
) -> None:
    """pg_restore of the plain dump into a new database `target`; with `pipes`, the table data arrive
    decrypted through named pipes while it runs. Any failure drops `target`."""
    try:
        with pgtools.connect(env, "postgres") as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                    sql.Identifier(target), sql.Identifier(owner)
                )
            )
    except BaseException:
        if pipes is not None:
            pipes.finish()
        raise
    try:
        failed: OperationFailed | None = None
        try:
            pgtools.run_tool(
                [
                    pgtools.pg_bin(env, "pg_restore"),
                    *pgtools.connect_args(env),
                    f"--dbname={target}",
                    f"--jobs={_jobs(env)}",
                    "--exit-on-error",
                    str(plain / "postgres"),
                ],
                env=pgtools.tool_env(env),
                what=f"pg_restore into {target}",
            )
        except OperationFailed as exc:
            failed = exc
        finally:
            if pipes is not None:
                pipes.finish()  # raises a decryption failure first: it explains a restore's failure better
        if failed is not None:
            raise failed
    except BaseException:
        with pgtools.connect(env, "postgres") as admin:
            pgtools.drop_database(admin, target)
        raise


def _methods(manifest: dict[str, Any]) -> dict[str, str]:
    """How each table's checksum was computed (manifests before methods were recorded: from the text)."""
    return {table: str(meta.get("method", "text")) for table, meta in manifest["postgres"]["tables"].items()}


def _compare(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    mismatches = []
    for table in sorted(set(expected) | set(found)):
        want, got = expected.get(table), found.get(table)
        if want is None or got is None:
            mismatches.append(f"{table}: {'missing after restore' if got is None else 'not in the backup'}")
        elif (want["rows"], want["checksum"]) != (got["rows"], got["checksum"]):
            mismatches.append(
                f"{table}: rows {got['rows']} (recorded {want['rows']}), checksum "
                f"{'equal' if want['checksum'] == got['checksum'] else 'differs'}"
            )
    return mismatches


def _redis_scratch_check(manifest: dict[str, Any], plain: Path, scratch: Path) -> tuple[bool, str]:
    recorded = manifest["redis"]
    with pgtools.ScratchRedis(plain / "redis" / "dump.rdb", scratch / "redis-scratch") as server:
        found = pgtools.redis_digest(server.client, [int(db) for db in recorded["keys"]])
    ok = found["keys"] == recorded["keys"] and found["digest"] == recorded["digest"]
    keys = sum(found["keys"].values())
    return ok, f"{keys} keys loaded in a scratch server, digest {'equal' if ok else 'DIFFERS'}"


def _redis_replace_live(env: Environment, plain: Path, scratch: Path) -> str:
    """Replace every key of the live Redis by the backup's, one transaction per database."""
    with pgtools.ScratchRedis(plain / "redis" / "dump.rdb", scratch / "redis-scratch") as server:
        source_dbs = pgtools.keyspace(server.client())
        live_dbs = pgtools.keyspace(pgtools.live_redis(env))
        restored = 0
        for db in sorted(set(source_dbs) | set(live_dbs)):
            source, live = server.client(db), pgtools.live_redis(env, db)
            try:
                pipe = live.pipeline(transaction=True)
                pipe.flushdb()
                for name in source.scan_iter(count=1000):
                    value = source.dump(name)
                    if value is None:
                        continue
                    ttl = int(source.pttl(name))
                    pipe.restore(name, max(ttl, 0), value, replace=True)
                    restored += 1
                pipe.execute()
            finally:
                live.close()
    return f"{restored} keys replaced the live ones"


def restore(
    env: Environment,
    backup_id: str,
    *,
    into: str | None = None,
    force: bool = False,
    confirmed: bool = False,
    storage: Storage | None = None,
    show_progress: bool = False,
) -> RestoreReport | KubeRestoreReport:
    """`invoke db.restore`: into a new database by default; over the live one only with force + confirmed,
    after a safety backup. Bad input (unknown id, a bad name, no --force, a wrong key) changes nothing.

    On a Kubernetes environment `backup_id` names a CloudNativePG Backup and a NEW Cluster (`into`) is
    bootstrapped from it; never in place, so `force` is refused there.
    """
    if env.kind == "kubernetes":
        if force:
            raise BadInput("--force: not accepted on Kubernetes; a restore always creates a new Cluster")
        return backup_kube.restore(env, _kube_client(env), backup_name=backup_id, into=into)
    env.require_local()
    check_id(backup_id)
    live = pgtools.database_name(env)
    if into is not None:
        check_database_name(into)
    if into == live and not force:
        raise BadInput(
            f"--into: {live} is the live database; overwriting it needs --force and a confirmation"
        )
    if force and not confirmed:
        raise BadInput("--force: overwriting the live database needs the typed confirmation (or --yes in CI)")
    if force and into not in (None, live):
        raise BadInput("--into: not accepted with --force (which restores over the live database)")
    store = storage or backup_storage.for_environment(env)
    key = backup_crypto.load_key(env)
    manifest = _manifest(store, backup_id, key)
    if manifest["method"] != "logical":
        raise BadInput(
            f"--backup: {backup_id} is a physical backup; restore it as a new cluster (runbooks/restore.md)"
        )
    target = into or f"{live}_restore_{_stamp()}"
    with pgtools.connect(env, "postgres") as admin:
        if not force and pgtools.database_exists(admin, target):
            raise BadInput(f"--into: database {target} exists; accepted: a new name")
    log = audit.for_environment(env)
    started = time.monotonic()
    with lock.hold(env, "db.restore"):
        log.write(env.name, "db.restore", result="started", backup=backup_id, into=target, force=force)
        try:
            report = _restore_locked(
                env,
                store,
                manifest,
                key,
                target=target,
                force=force,
                show_progress=show_progress,
                started=started,
            )
        except OperationFailed as exc:
            log.write(env.name, "db.restore", result="failed", backup=backup_id, reason=str(exc))
            raise
    log.write(
        env.name,
        "db.restore",
        result="ok",
        **{k: v for k, v in report.as_dict().items() if k != "environment"},
    )
    return report


def _restore_locked(
    env: Environment,
    store: Storage,
    manifest: dict[str, Any],
    key: BackupKey,
    *,
    target: str,
    force: bool,
    show_progress: bool,
    started: float,
) -> RestoreReport:
    live = pgtools.database_name(env)
    safety = None
    if force:
        safety = _run_backup(
            env, store, show_progress=show_progress, reason=f"safety before restoring {manifest['id']}"
        ).id
    with pgtools.scratch_dir(work_dir(env), f"restore-{manifest['id']}-") as scratch:
        total = sum(int(f["size"]) for f in manifest["files"].values())
        with _progress(show_progress) as progress:
            unsealing = _Bar(progress, "decrypt + decompress + pg_restore", total)
            plain = _unseal_all(
                store, manifest, key, scratch, tick=unsealing, jobs=_jobs(env), skip=_table_data
            )
            pipes = _TableDataPipes(store, manifest, key, scratch, tick=unsealing, jobs=_jobs(env))
            incoming = f"{live}__incoming_{_stamp()}" if force else target
            _restore_logical(env, plain, incoming, live, pipes)
            unsealing.done()
        found = pgtools.table_checksums_parallel(
            lambda: pgtools.connect(env, incoming), _jobs(env), _methods(manifest)
        )
        mismatches = _compare(manifest["postgres"]["tables"], found)
        if mismatches:
            with pgtools.connect(env, "postgres") as admin:
                pgtools.drop_database(admin, incoming)
            raise OperationFailed(f"restored data differ from the backup: {'; '.join(mismatches[:5])}")
        if force:
            _swap_live(env, incoming, live)
            redis_detail = _redis_replace_live(env, plain, scratch)
        else:
            ok, redis_detail = _redis_scratch_check(manifest, plain, scratch)
            redis_detail += "; the live Redis is untouched" if ok else ""
            if not ok:
                raise OperationFailed(f"redis: {redis_detail}")
    return RestoreReport(
        id=manifest["id"],
        environment=env.name,
        database=live if force else target,
        replaced_live=force,
        safety_backup=safety,
        tables=len(found),
        rows=sum(t["rows"] for t in found.values()),
        identical=True,
        redis=redis_detail,
        seconds=round(time.monotonic() - started, 3),
    )


def _swap_live(env: Environment, incoming: str, live: str) -> None:
    """Put the restored database in place of the live one by two renames; the old one is dropped."""
    replaced = f"{live}__replaced_{_stamp()}"
    with pgtools.connect(env, "postgres") as admin:
        with admin.transaction():
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(live)))
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (live,))
        try:
            admin.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(live), sql.Identifier(replaced)
                )
            )
        except psycopg.Error:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(live)))
            raise
        admin.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(incoming), sql.Identifier(live))
        )
        pgtools.drop_database(admin, replaced)


# --- drill ----------------------------------------------------------------------------------------------


def drill(
    env: Environment, *, storage: Storage | None = None, show_progress: bool = False
) -> DrillReport | KubeDrillReport:
    """`invoke drill`: the latest backup restored into a scratch database and compared with what it recorded;
    the measured RTO goes to the audit log and the metrics file. A failed drill is OperationFailed.

    On a Kubernetes environment: the newest CloudNativePG backup with recorded checksums, recovered into a
    scratch Cluster to its restore point (opskit.backup_kube.drill), through the kubeconfig's client.
    """
    if env.kind == "kubernetes":
        try:
            made = backup_kube.drill(
                env,
                _kube_client(env),
                storage=storage or backup_storage.for_environment(env),
                on_phase=(lambda phase: output.console.print(f"[dim]scratch Cluster: {phase}[/dim]"))
                if show_progress
                else None,
            )
        except OperationFailed:
            _record_kube_drill(env, None)
            raise
        made.metrics_file = str(_record_kube_drill(env, made))
        return made
    env.require_local()
    store = storage or backup_storage.for_environment(env)
    key = backup_crypto.load_key(env)
    ids = store.ids()
    if not ids:
        raise OperationFailed(
            f"environment {env.name} has no backup to drill; run `invoke db.backup --env {env.name}`"
        )
    backup_id = ids[-1]
    log = audit.for_environment(env)
    with lock.hold(env, "drill"):
        store.sweep()
        started = time.monotonic()
        manifest = _manifest(store, backup_id, key)
        scratch_db = f"{pgtools.database_name(env)}_drill_{_stamp()}"
        mismatches: list[str] = []
        try:
            with pgtools.scratch_dir(work_dir(env), f"drill-{backup_id}-") as scratch:
                total = sum(int(f["size"]) for f in manifest["files"].values())
                logical = manifest["method"] != "physical"
                with _progress(show_progress) as progress:
                    bar = _Bar(progress, "decrypt + decompress" + (" + pg_restore" if logical else ""), total)
                    plain = _unseal_all(
                        store,
                        manifest,
                        key,
                        scratch,
                        tick=bar,
                        jobs=_jobs(env),
                        skip=_table_data if logical else _base_archive,
                    )
                    if logical:
                        pipes = _TableDataPipes(store, manifest, key, scratch, tick=bar, jobs=_jobs(env))
                        _restore_logical(env, plain, scratch_db, pgtools.database_name(env), pipes)
                # the RTO: until the data are restored and checked; cleaning up the scratch copy is not in it
                if not logical:
                    found, redis_ok, redis_detail, rto = _drill_physical(
                        env,
                        manifest,
                        plain,
                        scratch,
                        started=started,
                        unpack=lambda target: _extract_sealed(
                            store,
                            manifest,
                            key,
                            _archive_name(manifest),
                            target=_unpack_into(manifest, target),
                            scratch=scratch,
                        ),
                    )
                else:
                    try:
                        found = pgtools.table_checksums_parallel(
                            lambda: pgtools.connect(env, scratch_db), _jobs(env), _methods(manifest)
                        )
                        redis_ok, redis_detail = _redis_scratch_check(manifest, plain, scratch)
                        rto = round(time.monotonic() - started, 3)
                    finally:
                        with pgtools.connect(env, "postgres") as admin:
                            pgtools.drop_database(admin, scratch_db)
                mismatches = _compare(manifest["postgres"]["tables"], found)
                if not redis_ok:
                    mismatches.append(f"redis: {redis_detail}")
        except OperationFailed as exc:
            _record_failure(env, "drill")
            log.write(env.name, "drill", result="failed", backup=backup_id, reason=str(exc))
            raise
        report = DrillReport(
            id=backup_id,
            environment=env.name,
            ok=not mismatches,
            rto_seconds=rto,
            tables=len(found),
            rows=sum(t["rows"] for t in found.values()),
            mismatches=mismatches,
            redis=redis_detail,
            metrics_file=str(metrics_path(env)),
        )
        if report.ok:
            _record_success(env, "drill", backup_id, rto_seconds=rto)
        else:
            _record_failure(env, "drill")
        details = {k: v for k, v in report.as_dict().items() if k not in ("environment", "ok")}
        log.write(env.name, "drill", result="ok" if report.ok else "failed", **details)
    return report


def _record_kube_drill(env: Environment, made: KubeDrillReport | None) -> Path:
    """The drill metrics of a cluster environment, in the same text format, under this machine's state of
    it (a cluster environment has no state directory); None records a failure. The file written."""
    directory = kuberollout.state_home(env) / "metrics"
    state_file = directory / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if made is None:
        state["drill_last_failure"] = time.time()
    else:
        state.update(
            drill_last_success=time.time(), drill_last_backup=made.id, drill_rto_seconds=made.rto_seconds
        )
    _write_atomic(state_file, json.dumps(state, indent=2, sort_keys=True))
    _write_atomic(directory / METRICS_FILE, metrics_text(env.name, env.service.name, state))
    return directory / METRICS_FILE


def _base_archive(name: str) -> bool:
    """The data directory's archive of a physical backup."""
    return name.startswith(f"postgres/{PHYSICAL_ARCHIVE}")


def _archive_name(manifest: dict[str, Any]) -> str:
    return f"postgres/{PHYSICAL_ARCHIVE}{backup_crypto.SUFFIX[manifest['compression']]}"


def _unpack_into(manifest: dict[str, Any], extracted: Path) -> Path:
    """Where a physical backup's archive is unpacked so that its data directory is `extracted/pgdata`: the
    archive is pg_basebackup's own tar, or (backups made before it streamed) a tar of `pgdata/`."""
    return extracted / "pgdata" if manifest["postgres"].get("archive") == "pg_basebackup" else extracted


def _drill_physical(
    env: Environment,
    manifest: dict[str, Any],
    plain: Path,
    scratch: Path,
    *,
    started: float,
    unpack: Callable[[Path], None],
) -> tuple[dict[str, Any], bool, str, float]:
    """Start a scratch PostgreSQL on the restored data directory (as the service account) and count."""
    import pwd  # noqa: PLC0415

    account = pwd.getpwnam("maximus")
    parent = localenv.data_dir(env) / "drill"
    parent.mkdir(mode=0o700, exist_ok=True)
    os.chown(parent, account.pw_uid, account.pw_gid)
    extracted = Path(tempfile.mkdtemp(prefix="cluster-", dir=parent))
    try:
        return _drill_cluster(
            env,
            manifest,
            plain,
            scratch,
            extracted=extracted,
            account=account,
            started=started,
            unpack=unpack,
        )
    finally:
        shutil.rmtree(extracted, ignore_errors=True)


def _drill_cluster(
    env: Environment,
    manifest: dict[str, Any],
    plain: Path,
    scratch: Path,
    *,
    extracted: Path,
    account: Any,
    started: float,
    unpack: Callable[[Path], None],
) -> tuple[dict[str, Any], bool, str, float]:
    unpack(extracted)
    pgdata = extracted / "pgdata"
    for path in [extracted, *extracted.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    pgdata.chmod(0o700)
    port = pgtools.free_port()
    ctl = ["/usr/sbin/runuser", "-u", "maximus", "--", pgtools.pg_bin(env, "pg_ctl")]
    options = (
        f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={extracted} "
        "-c archive_mode=off"
    )
    pgtools.run_tool(
        [
            *ctl,
            "-D",
            str(pgdata),
            "-l",
            str(extracted / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "300",
            "start",
        ],
        what="scratch PostgreSQL start",
    )
    try:
        found = pgtools.table_checksums_parallel(
            lambda: psycopg.connect(
                host="127.0.0.1",
                port=port,
                user="postgres",
                password=pgtools.superuser_password(env),
                dbname=manifest["postgres"]["database"],
                autocommit=True,
            ),
            _jobs(env),
            _methods(manifest),
        )
        ok, detail = _redis_scratch_check(manifest, plain, scratch)
        rto = round(time.monotonic() - started, 3)
    finally:
        pgtools.run_tool(
            [*ctl, "-D", str(pgdata), "-m", "fast", "-w", "stop"], what="scratch PostgreSQL stop"
        )
    return found, ok, detail, rto


# --- prune ----------------------------------------------------------------------------------------------


def retention_plan(ids: list[str], daily: int, weekly: int, monthly: int) -> dict[str, str]:
    """Backup id -> why it is kept: the newest of each of the last `daily` days, `weekly` ISO weeks and
    `monthly` months that have a backup (grandfather-father-son)."""
    kept: dict[str, str] = {}
    newest_first = sorted(ids, reverse=True)
    for label, count, bucket in (
        ("daily", daily, lambda t: t.strftime("%Y-%m-%d")),
        ("weekly", weekly, lambda t: f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}"),
        ("monthly", monthly, lambda t: t.strftime("%Y-%m")),
    ):
        seen: list[str] = []
        for backup_id in newest_first:
            period = bucket(id_time(backup_id))
            if period in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(period)
            kept.setdefault(backup_id, f"{label} {period}")
    return kept


def prune(env: Environment, *, storage: Storage | None = None, dry_run: bool = False) -> PruneReport:
    """`invoke db.prune`: delete what the model's retention does not keep; never the last verified backup."""
    store = storage or backup_storage.for_environment(env)
    policy = env.backup.retention
    with lock.hold(env, "db.prune"):
        swept = [] if dry_run else store.sweep()
        ids = store.ids()
        kept = retention_plan(ids, policy.daily, policy.weekly, policy.monthly)
        verified = [i for i in ids if store.manifest(i).get("verified")]
        if verified and verified[-1] not in kept:
            kept[verified[-1]] = "the last verified backup"
        doomed = [i for i in ids if i not in kept]
        if not dry_run:
            for backup_id in doomed:
                store.delete(backup_id)
            audit.for_environment(env).write(
                env.name, "db.prune", result="ok", deleted=doomed, kept=sorted(kept)
            )
    return PruneReport(kept=dict(sorted(kept.items())), deleted=doomed, swept=swept, dry_run=dry_run)


# --- the drill's metric ---------------------------------------------------------------------------------


def metrics_path(env: Environment) -> Path:
    """A Prometheus text-format file (node_exporter's textfile collector reads such files)."""
    return env.state_path / "metrics" / METRICS_FILE


def _state_path(env: Environment) -> Path:
    return env.state_path / "metrics" / STATE_FILE


def _read_state(env: Environment) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(_state_path(env).read_text())
    except (OSError, ValueError):
        return {}
    return data


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _record_success(env: Environment, what: str, backup_id: str, **extra: float) -> None:
    state = _read_state(env)
    state[f"{what}_last_success"] = time.time()
    state[f"{what}_last_backup"] = backup_id
    state.update({f"{what}_{k}": v for k, v in extra.items()})
    _write_state(env, state)


def _record_failure(env: Environment, what: str) -> None:
    state = _read_state(env)
    state[f"{what}_last_failure"] = time.time()
    _write_state(env, state)


def _write_state(env: Environment, state: dict[str, Any]) -> None:
    _write_atomic(_state_path(env), json.dumps(state, indent=2, sort_keys=True))
    _write_atomic(metrics_path(env), metrics_text(env.name, env.service.name, state))


def metrics_text(environment: str, service: str, state: dict[str, Any]) -> str:
    labels = f'service="{service}",environment="{environment}"'
    lines = []
    series = (
        (
            "maximus_backup_last_success_timestamp_seconds",
            "backup_last_success",
            "Last successful verified backup.",
        ),
        (
            "maximus_backup_drill_last_success_timestamp_seconds",
            "drill_last_success",
            "Last successful restore drill.",
        ),
        (
            "maximus_backup_drill_last_failure_timestamp_seconds",
            "drill_last_failure",
            "Last failed restore drill.",
        ),
        (
            "maximus_backup_drill_rto_seconds",
            "drill_rto_seconds",
            "Measured RTO of the last successful drill.",
        ),
    )
    for name, field_name, text in series:
        if field_name in state:
            lines += [
                f"# HELP {name} {text}",
                f"# TYPE {name} gauge",
                f"{name}{{{labels}}} {state[field_name]}",
            ]
    return "\n".join(lines) + "\n"


# --- the demo's steps -----------------------------------------------------------------------------------


def demo_backup(env: Environment, quiet: bool = False) -> tuple[bool, str, dict[str, Any]]:
    """`invoke demo`: a verified backup, then `db.verify` of it (a demo StepBody)."""
    made = backup(env, show_progress=not quiet)
    assert isinstance(made, BackupReport)  # noqa: S101 - the demo runs on a single-machine environment
    checked = verify(env, made.id)
    detail = (
        f"{made.id}: {made.tables} tables, {made.rows} rows, {made.redis_keys} Redis keys, "
        f"{made.size / 1e6:.1f} MB {env.backup.compression}+AES-256-GCM (key {made.key_id}) "
        f"in {made.seconds:.1f} s; "
        f"verify {'ok' if checked.ok else 'FAILED: ' + '; '.join(checked.problems)}"
    )
    return checked.ok, detail, {"backup": made.as_dict(), "verify": checked.as_dict()}


def demo_drill(env: Environment, quiet: bool = False) -> tuple[bool, str, dict[str, Any]]:
    """`invoke demo`: the restore drill of the latest backup (a demo StepBody)."""
    report = drill(env, show_progress=not quiet)
    detail = (
        f"{report.id} restored into a scratch database: {report.tables} tables, {report.rows} rows "
        f"{'identical' if report.ok else 'DIFFER: ' + '; '.join(report.mismatches)}; {report.redis}; "
        f"RTO {report.rto_seconds:.1f} s"
    )
    return report.ok, detail, report.as_dict()
