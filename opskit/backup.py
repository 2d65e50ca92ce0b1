"""A verified backup of the application database: pg_dump in custom format, checked by pg_restore.

Written under a temporary name and renamed only when complete and verified, so a killed backup is never
taken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from opskit import localenv
from opskit.errors import OperationFailed
from opskit.model import Environment

DUMP = "database.dump"
MANIFEST = "manifest.json"


def backups_dir(env: Environment) -> Path:
    return env.state_path / "backups"


def _pg(env: Environment, tool: str) -> str:
    return f"/usr/lib/postgresql/{env.components['postgres'].version}/bin/{tool}"


def backup_and_verify(env: Environment) -> str:
    """Dump the application database, verify the dump, and return the backup's id."""
    backup_id = "b-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = backups_dir(env) / backup_id
    partial = backups_dir(env) / f".partial-{backup_id}"
    partial.mkdir(parents=True, mode=0o700)
    database = localenv.database_name(env)
    connection = {**os.environ, "PGPASSWORD": localenv.read_secret(env, localenv.POSTGRES_PASSWORD)}
    try:
        dump = partial / DUMP
        subprocess.run(
            [
                _pg(env, "pg_dump"),
                "-h",
                "127.0.0.1",
                "-p",
                str(env.local_ports.postgres),
                "-U",
                "postgres",
                "-Fc",
                "-f",
                str(dump),
                database,
            ],
            env=connection,
            check=True,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        listing = subprocess.run(
            [_pg(env, "pg_restore"), "--list", str(dump)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        manifest = {
            "id": backup_id,
            "database": database,
            "file": DUMP,
            "sha256": hashlib.sha256(dump.read_bytes()).hexdigest(),
            "size": dump.stat().st_size,
            "entries": sum(1 for line in listing.stdout.splitlines() if line and not line.startswith(";")),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(partial, final)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        detail = getattr(exc, "stderr", None) or str(exc)
        raise OperationFailed(
            f"backup of {database} failed: {str(detail).strip()[:300]}; nothing deployed"
        ) from exc
    return backup_id
