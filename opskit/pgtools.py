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
SPLIT_BLOCKS = 1024  # tables of 8 MB and more are counted in parts, on several connections
# Per-table checksums: the row count and an order-independent sum of a 64-bit hash of every row.
# "record" hashes each row's values with their types' own hash functions (no text conversion, independent
# of session settings such as TimeZone); "text" hashes each row's text form. "record" is used where every
# column has a built-in type that can be hashed; "text" elsewhere, and for manifests that name no method.
CHECKSUM_QUERIES = {
    "record": sql.SQL("SELECT count(*), coalesce(sum(hash_record_extended(t, 0)), 0)::text FROM {} AS t"),
    "text": sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text FROM {} AS t"),
}
PROBE_QUERY = sql.SQL("SELECT hash_record_extended(t, 0) FROM {} AS t LIMIT 1")
FIRST_USER_OID = 16384  # types below it are built in: their values hash alike in every database
TABLES_QUERY = """
SELECT n.nspname, c.relname, pg_relation_size(c.oid) / current_setting('block_size')::int,
       coalesce((SELECT bool_and(a.atttypid < %s) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), true)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_%%'
 ORDER BY pg_relation_size(c.oid) DESC, 1, 2
"""


def database_name(env: Environment) -> str:
    return localenv.database_name(env)


def pg_bin(env: Environment, tool: str) -> str:
    return f"/usr/lib/postgresql/{env.components['postgres'].version}/bin/{tool}"


def die_with_parent() -> None:
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
            preexec_fn=die_with_parent,  # one prctl call, nothing that can deadlock
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


def _tables(cur: psycopg.Cursor[Any], methods: dict[str, str] | None) -> list[tuple[str, str, int, str]]:
    """(schema, name, blocks, method) of every user table, the largest first. The method is the one
    `methods` names (from a manifest: "text" where it names none), else chosen here."""
    found = []
    for schema, name, blocks, built_in in cur.execute(TABLES_QUERY, (FIRST_USER_OID,)).fetchall():
        table = f"{schema}.{name}"
        if methods is not None:
            method = methods.get(table, "text")
        elif built_in and _hashable(cur, str(schema), str(name)):
            method = "record"
        else:
            method = "text"
        if method not in CHECKSUM_QUERIES:
            raise OperationFailed(f"table {table}: checksum method {method!r} is not known here")
        found.append((str(schema), str(name), int(blocks), method))
    return found


def _hashable(cur: psycopg.Cursor[Any], schema: str, name: str) -> bool:
    """Whether every column of the table has a hash function (json, point, xml ... have none)."""
    conn = cur.connection
    try:
        if conn.autocommit:
            cur.execute(PROBE_QUERY.format(sql.Identifier(schema, name))).fetchall()
        else:
            with conn.transaction():  # a savepoint inside the caller's transaction
                cur.execute(PROBE_QUERY.format(sql.Identifier(schema, name))).fetchall()
    except psycopg.errors.UndefinedFunction:
        return False
    return True


def _checksum_query(
    schema: str, name: str, method: str, low: int = 0, high: int | None = None
) -> sql.Composed:
    query = CHECKSUM_QUERIES[method].format(sql.Identifier(schema, name))
    if low == 0 and high is None:
        return query
    query += sql.SQL(" WHERE ctid >= {}::tid").format(sql.Literal(f"({low},0)"))
    if high is not None:
        query += sql.SQL(" AND ctid < {}::tid").format(sql.Literal(f"({high},0)"))
    return query


def table_checksums(
    conn: psycopg.Connection[Any], methods: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every user table -> {"rows", "checksum", "method"}, on one connection (in its transaction)."""
    result: dict[str, dict[str, Any]] = {}
    with conn.cursor() as cur:
        for schema, name, _, method in _tables(cur, methods):
            row = cur.execute(_checksum_query(schema, name, method)).fetchone()
            assert row is not None  # noqa: S101 - an aggregate always returns one row
            result[f"{schema}.{name}"] = {"rows": int(row[0]), "checksum": str(row[1]), "method": method}
    return dict(sorted(result.items()))


def table_checksums_alone(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """`table_checksums` in this one backend, without parallel workers: counting beside other work that
    has the other cores (a physical backup's stream)."""
    conn.execute("SET max_parallel_workers_per_gather = 0")
    return table_checksums(conn)


def _block_ranges(blocks: int, parts: int) -> list[tuple[int, int | None]]:
    """`parts` ranges of block numbers covering a table, the last one open-ended (rows appended while
    counting land in it)."""
    if parts <= 1 or blocks < SPLIT_BLOCKS:
        return [(0, None)]
    step = -(-blocks // parts)
    bounds = list(range(0, blocks, step))
    return [(low, bounds[i + 1] if i + 1 < len(bounds) else None) for i, low in enumerate(bounds)]


def table_checksums_parallel(
    connect_to: Callable[[], psycopg.Connection[Any]], jobs: int, methods: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """`table_checksums` over `jobs` connections at once, the largest tables first; a large table is cut
    into ranges of blocks (TID range scans) counted on several connections and summed, which gives the
    same figures as one scan since the checksum is a sum."""
    with connect_to() as conn, conn.cursor() as cur:
        tables = _tables(cur, methods)
    workers = max(1, jobs)
    ranges = [
        ((high if high is not None else blocks) - low, schema, name, method, low, high)
        for schema, name, blocks, method in tables
        for low, high in _block_ranges(blocks, workers)
    ]
    pending = [item[1:] for item in sorted(ranges, key=lambda item: -item[0])]
    lock = threading.Lock()
    parts: dict[str, list[tuple[int, int]]] = {}
    used = {f"{schema}.{name}": method for schema, name, _, method in tables}

    def worker() -> None:
        with connect_to() as conn, conn.cursor() as cur:
            while True:
                with lock:
                    if not pending:
                        return
                    schema, name, method, low, high = pending.pop(0)
                row = cur.execute(_checksum_query(schema, name, method, low, high)).fetchone()
                assert row is not None  # noqa: S101 - an aggregate always returns one row
                with lock:
                    parts.setdefault(f"{schema}.{name}", []).append((int(row[0]), int(row[1])))

    count = max(1, min(workers, len(pending)))
    with ThreadPoolExecutor(max_workers=count) as pool:
        for future in [pool.submit(worker) for _ in range(count)]:
            future.result()
    return {
        table: {
            "rows": sum(rows for rows, _ in found),
            "checksum": str(sum(total for _, total in found)),
            "method": used[table],
        }
        for table, found in sorted(parts.items())
    }


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
            preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call, nothing that can deadlock
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
