"""The audit log: hash-chained JSON lines, one record per operation step.

Each record carries `seq`, the `prev` hash and its own `hash` (sha256 of the canonical JSON of everything
else), so a changed, inserted or deleted record breaks the chain at that point. When the audit store
cannot be written (a full disk, an unmounted volume), records wait in a local spool beside the
environment's state and are chained into the store, in order, by the next write or `sync()`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from opskit.errors import OperationFailed
from opskit.model import Environment

GENESIS = "0" * 64


class AuditSink(Protocol):
    """Where audit records are kept. Appends must be durable when they return."""

    def read_lines(self) -> list[str]: ...

    def append_lines(self, lines: list[str]) -> None: ...


class FileSink:
    """The audit store as one append-only file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return self.path.read_text().splitlines()

    def append_lines(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return os.environ.get("MAXIMUS_ACTOR") or f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class VerifyReport:
    records: int
    first_bad: int | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "ok": self.ok,
            "first_bad_line": self.first_bad,
            "reason": self.reason,
        }


class AuditLog:
    def __init__(self, sink: AuditSink, spool: Path) -> None:
        self.sink = sink
        self.spool = spool

    def write(self, environment: str, operation: str, **details: Any) -> dict[str, Any]:
        """Record one event; spooled locally when the store cannot take it."""
        event = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "environment": environment,
            "actor": actor(),
            "operation": operation,
            **details,
        }
        self._spool_append(event)
        self.sync()
        return event

    def sync(self) -> int:
        """Chain spooled events into the store; return how many went in (0 when the store is away)."""
        pending = self._spooled()
        if not pending:
            return 0
        try:
            lines = self.sink.read_lines()
            last = json.loads(lines[-1]) if lines else None
            seq = last["seq"] + 1 if last else 1
            prev = last["hash"] if last else GENESIS
            chained = []
            for event in pending:
                record = {"seq": seq, **event, "prev": prev}
                record["hash"] = prev = record_hash(record)
                chained.append(json.dumps(record, sort_keys=True, separators=(",", ":")))
                seq += 1
            self.sink.append_lines(chained)
        except OSError:
            return 0
        self.spool.unlink(missing_ok=True)
        return len(pending)

    def _spool_append(self, event: dict[str, Any]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.spool, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _spooled(self) -> list[dict[str, Any]]:
        if not self.spool.exists():
            return []
        events = []
        for line in self.spool.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash mid-write never reached the store; drop it
        return events

    def records(self) -> Iterator[dict[str, Any]]:
        for line in self.sink.read_lines():
            yield json.loads(line)

    def verify(self) -> VerifyReport:
        prev, count = GENESIS, 0
        for number, line in enumerate(self.sink.read_lines(), start=1):
            count = number
            try:
                record = json.loads(line)
            except ValueError:
                return VerifyReport(number, number, "not valid JSON")
            if record.get("seq") != number:
                return VerifyReport(
                    number,
                    number,
                    f"seq {record.get('seq')} where {number} was expected (a record was inserted or deleted)",
                )
            if record.get("prev") != prev:
                return VerifyReport(number, number, "prev does not match the hash of the record before it")
            if record.get("hash") != record_hash(record):
                return VerifyReport(number, number, "hash does not match the record's content (changed)")
            prev = record["hash"]
        return VerifyReport(count, None, None)


def for_environment(env: Environment) -> AuditLog:
    store = Path(os.environ.get("MAXIMUS_AUDIT_STORE", str(env.state_path / "audit" / "audit.jsonl")))
    return AuditLog(FileSink(store), env.state_path / "audit" / "spool.jsonl")


def require_intact(log: AuditLog) -> VerifyReport:
    report = log.verify()
    if not report.ok:
        raise OperationFailed(f"audit log: record {report.first_bad} is bad: {report.reason}")
    return report
