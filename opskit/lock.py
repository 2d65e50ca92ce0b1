"""The environment's lock: one mutating operation at a time, and everyone can see who holds it.

The lock is a file created exclusively, holding its holder (operation, pid, host, since). A second
operation gets exit code 3 naming the holder. A lock whose holder process is gone is stale: it is
reported as such and broken only when asked (`--break-stale-lock`), never silently.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from opskit.errors import LockHeld
from opskit.model import Environment

LOCK_FILE = "operation.lock"


def lock_path(env: Environment) -> Path:
    return env.state_path / LOCK_FILE


def holder(env: Environment) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(lock_path(env).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"operation": "unknown", "pid": None, "host": None, "since": None}
    return data


def is_stale(info: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (or the pid now belongs to someone else)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return info.get("pid") is None
    try:
        process = psutil.Process(info["pid"])
        started = process.create_time()
    except psutil.NoSuchProcess:
        return True
    since = info.get("since_epoch")
    return isinstance(since, int | float) and started > since + 1


def _describe(info: dict[str, Any]) -> str:
    return f"{info.get('operation')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


@contextmanager
def hold(env: Environment, operation: str, break_stale: bool = False) -> Iterator[dict[str, Any]]:
    """Take the lock for `operation`, or raise LockHeld (exit 3) naming the holder."""
    path = lock_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    mine = {
        "operation": operation,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": now.isoformat(timespec="seconds"),
        "since_epoch": now.timestamp(),
    }
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            current = holder(env) or {}
            if not is_stale(current):
                raise LockHeld(
                    f"environment {env.name} is locked by {_describe(current)}; wait for it to finish"
                ) from None
            if not break_stale:
                raise LockHeld(
                    f"environment {env.name} is locked by {_describe(current)}, which is no longer running: "
                    "a stale lock. Check `invoke status`, then run again with --break-stale-lock"
                ) from None
            path.unlink(missing_ok=True)
            break_stale = False  # break one stale lock, not a fresh one taken meanwhile
    with os.fdopen(fd, "w") as handle:
        json.dump(mine, handle)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        yield mine
    finally:
        if (holder(env) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
