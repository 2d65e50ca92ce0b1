"""PostgreSQL side of the workload: the idempotent schema migration and the queries."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import psycopg
from psycopg.errors import UniqueViolation
from psycopg_pool import AsyncConnectionPool

from workload.config import Config

log = logging.getLogger("workload.db")

SCHEMA_VERSION = 1
MIGRATION_DEADLINE_S = 20.0
CONNECT_TIMEOUT_S = 2
STATEMENT_TIMEOUT_MS = 5000

SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS patches (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        title text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
        severity text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
        confidence numeric(4, 3) NOT NULL CHECK (confidence BETWEEN 0 AND 1),
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS patches_pending_idx ON patches (created_at, id) WHERE status = 'pending'
    """,
    """
    CREATE TABLE IF NOT EXISTS decisions (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        patch_id bigint NOT NULL UNIQUE REFERENCES patches (id),
        decision text NOT NULL CHECK (decision IN ('approve', 'reject')),
        reason text NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
        decided_at timestamptz NOT NULL DEFAULT now(),
        color text NOT NULL,
        version text NOT NULL
    )
    """,
)

SEED_PATCHES: tuple[tuple[str, str, Decimal], ...] = (
    ("Raise the ingest worker connection ceiling from 20 to 40", "medium", Decimal("0.870")),
    ("Retry idempotent upstream calls once on connection reset", "high", Decimal("0.920")),
    ("Drop the debug payload logging on the scoring path", "low", Decimal("0.780")),
    ("Pin the TLS minimum version to 1.2 on the edge listener", "critical", Decimal("0.950")),
    ("Shorten the session cache TTL from 1 h to 15 min", "medium", Decimal("0.640")),
)

Decision = Literal["approve", "reject"]


class MigrationFailed(Exception):
    """The schema could not be migrated; the message says why."""


class PatchNotFound(Exception):
    pass


class PatchAlreadyDecided(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class PatchRow:
    id: int
    title: str
    severity: str
    confidence: Decimal
    created_at: datetime


@dataclass(frozen=True)
class DecisionRow:
    id: int
    patch_id: int
    decision: str
    reason: str
    decided_at: datetime
    color: str
    version: str


def connect_kwargs(config: Config) -> dict[str, Any]:
    """Connection parameters added to the URL: the password (never in the URL) and short timeouts."""
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "application_name": f"maximus-{config.service}-{config.color}",
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    }
    if config.database_password is not None:
        kwargs["password"] = config.database_password
    return kwargs


def _lock_key(service: str) -> int:
    """A stable advisory lock key per service, so blue and green never migrate at the same time."""
    return zlib.crc32(f"maximus:{service}:schema".encode())


async def _migrate_once(config: Config) -> bool:
    """Apply the schema and seed an empty table; return whether seeds were inserted."""
    connect = psycopg.AsyncConnection.connect(config.database_url, **connect_kwargs(config))
    async with await connect as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(config.service),))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current < SCHEMA_VERSION:
            for statement in SCHEMA_V1:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version) VALUES (%s) ON CONFLICT DO NOTHING",
                (SCHEMA_VERSION,),
            )
        cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM patches)")
        row = await cur.fetchone()
        if row and row[0]:
            return False
        async with conn.cursor() as seed:
            await seed.executemany(
                "INSERT INTO patches (title, severity, confidence) VALUES (%s, %s, %s)", SEED_PATCHES
            )
        return True


async def migrate(config: Config, deadline_s: float = MIGRATION_DEADLINE_S) -> None:
    """Migrate, retrying while PostgreSQL is unreachable for up to `deadline_s` seconds."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            seeded = await _migrate_once(config)
        except psycopg.OperationalError as exc:
            waited = time.monotonic() - started
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if waited + 1.0 >= deadline_s:
                raise MigrationFailed(
                    f"PostgreSQL unreachable after {attempt} attempts over {waited:.0f} s: {reason}"
                ) from exc
            log.warning("schema migration attempt %d failed (%s); retrying", attempt, reason)
            await asyncio.sleep(1.0)
        except psycopg.Error as exc:
            raise MigrationFailed(f"schema migration failed: {type(exc).__name__}: {exc}") from exc
        else:
            log.info("schema at version %d%s", SCHEMA_VERSION, "; seeded pending patches" if seeded else "")
            return


def open_pool(config: Config) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        config.database_url,
        kwargs={**connect_kwargs(config), "autocommit": True},
        min_size=1,
        max_size=10,
        timeout=3.0,
        max_idle=300.0,
        check=AsyncConnectionPool.check_connection,
        name=f"{config.service}-{config.color}",
        open=False,
    )


async def ping(pool: AsyncConnectionPool) -> None:
    async with pool.connection(timeout=1.0) as conn:
        await conn.execute("SELECT 1")


async def pending_patches(pool: AsyncConnectionPool, limit: int) -> list[PatchRow]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, title, severity, confidence, created_at FROM patches"
            " WHERE status = 'pending' ORDER BY created_at, id LIMIT %s",
            (limit,),
        )
        return [PatchRow(*row) for row in await cur.fetchall()]


async def decide(
    pool: AsyncConnectionPool, patch_id: int, decision: Decision, reason: str, *, color: str, version: str
) -> DecisionRow:
    """Record a decision and update the patch status in one transaction."""
    status = "approved" if decision == "approve" else "rejected"
    try:
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT status FROM patches WHERE id = %s FOR UPDATE", (patch_id,))
            row = await cur.fetchone()
            if row is None:
                raise PatchNotFound()
            if row[0] != "pending":
                raise PatchAlreadyDecided(str(row[0]))
            cur = await conn.execute(
                "INSERT INTO decisions (patch_id, decision, reason, color, version)"
                " VALUES (%s, %s, %s, %s, %s)"
                " RETURNING id, patch_id, decision, reason, decided_at, color, version",
                (patch_id, decision, reason, color, version),
            )
            inserted = await cur.fetchone()
            if inserted is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            await conn.execute("UPDATE patches SET status = %s WHERE id = %s", (status, patch_id))
            return DecisionRow(*inserted)
    except UniqueViolation:
        raise PatchAlreadyDecided("decided") from None


async def summary(pool: AsyncConnectionPool) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'pending'),"
            " count(*) FILTER (WHERE status = 'approved'),"
            " count(*) FILTER (WHERE status = 'rejected'),"
            " count(*) FROM patches"
        )
        row = await cur.fetchone()
    pending, approved, rejected, total = (int(v) for v in row) if row else (0, 0, 0, 0)
    decided = approved + rejected
    return {
        "pending": pending,
        "approved": approved,
        "rejected": rejected,
        "total": total,
        "approval_rate": round(approved / decided, 4) if decided else None,
    }
