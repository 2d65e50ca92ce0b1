"""PostgreSQL and Redis helpers for backups: connections, tool runs, per-table checksums, scratch Redis.

Child processes (pg_dump, pg_restore, a scratch redis-server) die with the process that started them
(PR_SET_PDEATHSIG), so a backup killed with -9 leaves no tool writing into its staging directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from opskit import localenv
from opskit.errors import OperationFailed
from opskit.model import Environment

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CHECK_RDB = "/usr/bin/redis-check-rdb"
PR_SET_PDEATHSIG = 1
TOOL_TIMEOUT_S = 6 * 3600
CHECKSUM_QUERY = sql.SQL(
    "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text FROM {} AS t"
)
TABLES_QUERY = """
SELECT n.nspname, c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_%'
 ORDER BY 1, 2
"""


def database_name(env: Environment) -> str:
    return localenv.database_name(env)


def pg_bin(env: Environment, tool: str) -> str:
    return f"/usr/lib/postgresql/{env.components['postgres'].version}/bin/{tool}"


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_tool(
    argv: Sequence[str], *, env: dict[str, str] | None = None, what: str, timeout_s: float = TOOL_TIMEOUT_S
) -> str:
    """Run a tool to completion; its stdout. A failure is OperationFailed with the tool's own words."""
    try:
        proc = subprocess.run(
            list(argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            preexec_fn=_die_with_parent,  # one prctl call, nothing that can deadlock
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise OperationFailed(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:500]
        raise OperationFailed(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def superuser_password(env: Environment) -> str:
    return localenv.read_secret(env, localenv.POSTGRES_PASSWORD)


def tool_env(env: Environment) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": superuser_password(env), "PGCONNECT_TIMEOUT": "10"}


def connect_args(env: Environment) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(env.local_ports.postgres), "-U", "postgres"]


def connect(env: Environment, dbname: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            host="127.0.0.1",
            port=env.local_ports.postgres,
            user="postgres",
            password=superuser_password(env),
            dbname=dbname,
            autocommit=autocommit,
            connect_timeout=10,
        )
    except psycopg.Error as exc:
        raise OperationFailed(
            f"PostgreSQL of {env.name} (database {dbname}): {' '.join(str(exc).split())}; "
            f"is it up? `invoke health --env {env.name}`"
        ) from exc


def table_checksums(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """Every user table -> {"rows", "checksum"}: an order-independent sum of a 64-bit hash of each row's
    text, so equal tables give equal checksums whatever their physical order."""
    result: dict[str, dict[str, Any]] = {}
    with conn.cursor() as cur:
        tables = cur.execute(TABLES_QUERY).fetchall()
        for schema, name in tables:
            row = cur.execute(CHECKSUM_QUERY.format(sql.Identifier(schema, name))).fetchone()
            assert row is not None  # noqa: S101 - an aggregate always returns one row
            result[f"{schema}.{name}"] = {"rows": int(row[0]), "checksum": str(row[1])}
    return result


def table_checksums_parallel(
    connect_to: Callable[[], psycopg.Connection[Any]], jobs: int
) -> dict[str, dict[str, Any]]:
    """`table_checksums` over `jobs` connections at once, the largest tables first."""
    with connect_to() as conn:
        tables = conn.execute(
            TABLES_QUERY.replace("ORDER BY 1, 2", "ORDER BY pg_table_size(c.oid) DESC, 1, 2").replace(
                "SELECT n.nspname, c.relname", "SELECT n.nspname, c.relname, c.oid"
            )
        ).fetchall()
    pending = [(str(schema), str(name)) for schema, name, _ in tables]
    lock = threading.Lock()
    result: dict[str, dict[str, Any]] = {}

    def worker() -> None:
        with connect_to() as conn, conn.cursor() as cur:
            while True:
                with lock:
                    if not pending:
                        return
                    schema, name = pending.pop(0)
                row = cur.execute(CHECKSUM_QUERY.format(sql.Identifier(schema, name))).fetchone()
                assert row is not None  # noqa: S101 - an aggregate always returns one row
                with lock:
                    result[f"{schema}.{name}"] = {"rows": int(row[0]), "checksum": str(row[1])}

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(pending)))) as pool:
        for future in [pool.submit(worker) for _ in range(max(1, min(jobs, len(pending))))]:
            future.result()
    return dict(sorted(result.items()))


def database_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    with conn.cursor() as cur:
        return cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Redis ----------------------------------------------------------------------------------------------


def live_redis(env: Environment, db: int = 0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=env.local_ports.redis,
        password=localenv.read_secret(env, localenv.REDIS_PASSWORD),
        db=db,
        socket_timeout=30,
    )


def keyspace(client: redis.Redis) -> dict[int, int]:
    """Database number -> key count, from INFO keyspace."""
    info: dict[str, Any] = client.info("keyspace")
    return {int(name[2:]): int(value["keys"]) for name, value in info.items() if name.startswith("db")}


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def redis_value(client: redis.Redis, key: bytes) -> bytes | None:
    """A canonical serialization of one key's value (members of sets and hashes sorted): DUMP is not
    canonical, a set's order depends on the server process."""
    kind = _bytes(client.type(key)).decode()
    parts: list[bytes]
    if kind == "string":
        value = client.get(key)
        parts = [] if value is None else [_bytes(value)]
    elif kind == "hash":
        found: dict[Any, Any] = client.hgetall(key)
        parts = sorted(_bytes(k) + b"=" + _bytes(v) for k, v in found.items())
    elif kind == "list":
        items: list[Any] = client.lrange(key, 0, -1)
        parts = [_bytes(v) for v in items]
    elif kind == "set":
        members: set[Any] = client.smembers(key)
        parts = sorted(_bytes(v) for v in members)
    elif kind == "zset":
        scored: list[Any] = client.zrange(key, 0, -1, withscores=True)
        parts = [_bytes(member) + b"=" + repr(score).encode() for member, score in scored]
    elif kind == "stream":
        entries = client.xrange(key) or []
        parts = [repr(entry).encode() for entry in entries]
    else:
        return None
    return kind.encode() + b"\0" + b"\0".join(len(p).to_bytes(4, "big") + p for p in parts)


def redis_digest(client_for: Any, databases: Sequence[int]) -> dict[str, Any]:
    """Key counts, keys with a TTL, and an order-independent digest of every key and its value."""
    total = 0
    counts: dict[str, int] = {}
    with_ttl = 0
    for db in databases:
        client: redis.Redis = client_for(db)
        count = 0
        for key in client.scan_iter(count=1000):
            value = redis_value(client, key)
            if value is None:
                continue
            if int(client.pttl(key)) >= 0:
                with_ttl += 1
            item = hashlib.sha256(str(db).encode() + b"\0" + bytes(key) + b"\0" + value).digest()
            total = (total + int.from_bytes(item[:8], "big")) % (1 << 64)
            count += 1
        counts[str(db)] = count
    return {"keys": counts, "with_ttl": with_ttl, "digest": f"{total:016x}"}


class ScratchRedis:
    """A private redis-server on a free loopback port loading one RDB file; no persistence of its own."""

    def __init__(self, rdb: Path, workdir: Path) -> None:
        self.rdb = rdb
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=30)

    def __enter__(self) -> ScratchRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.rdb, self.workdir / "dump.rdb")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--dbfilename",
                "dump.rdb",
                "--appendonly",
                "no",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, nothing that can deadlock
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if int(self.client().info("persistence")["loading"]) == 0:
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise OperationFailed(f"a scratch redis-server could not load {self.rdb.name}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
