"""A physical base backup streamed from pg_basebackup and checked as it passes.

pg_basebackup writes its tar to a pipe (`--pgdata=- --format=tar`): the WAL the backup needs is fetched into
its `pg_wal/` and the backup manifest is added at its end. Every block goes on to the caller unchanged, so
the archive is pg_basebackup's own. No plain copy of the data directory is written: while the tar passes,
each member's CRC32C is counted, and at its end

- the manifest's checksum of every file is compared with the one counted (pg_verifybackup's checksum pass,
  done on the stream instead of on a copy), and
- pg_verifybackup --skip-checksums checks the manifest itself, the file list, every size and the WAL, on a
  sparse copy of the tree: the WAL and the manifest written out, every other file only its size.

A temporary replication slot holds the WAL from before the backup starts until its end, so the WAL that
`--wal-method=fetch` collects at the end cannot have been recycled meanwhile; it goes with the session.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import crc32c
import psutil
import psycopg

from opskit import pgtools
from opskit.errors import OperationFailed
from opskit.model import Environment

READ_BYTES = 1 << 20
QUEUED_CHUNKS = 8
BLOCK = tarfile.BLOCKSIZE
MANIFEST = "backup_manifest"
MEMORY_BACKED = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory in it
SPARSE_PREFIX = "maximus-basebackup-"
WRITTEN_OUT = ("pg_wal/", MANIFEST)  # kept with their content: pg_verifybackup reads them


def check_member(archive: str, member: tarfile.TarInfo) -> None:
    """A base-backup member must stay inside the target (no absolute path, no '..') and be a file or a
    directory."""
    name = Path(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise OperationFailed(f"{archive}: member {member.name!r} would leave the target directory")
    if not (member.isfile() or member.isdir()):
        raise OperationFailed(f"{archive}: member {member.name!r} is not a file or directory")


class TarScan:
    """Reads a tar stream block by block as it passes: each file's size and CRC32C; a sparse copy of the
    tree under `sparse` (directories, every file at its size and without its data), and the members in
    WRITTEN_OUT with their content under `kept`."""

    def __init__(self, sparse: Path, kept: Path) -> None:
        self.sparse, self.kept = sparse, kept
        self.files: dict[str, tuple[int, int]] = {}  # name -> (size, crc32c)
        self.header = bytearray()
        self.member: tarfile.TarInfo | None = None
        self.out: IO[bytes] | None = None
        self.crc = 0
        self.data_left = 0  # bytes of the current member's data still to come
        self.padding_left = 0  # then its padding to the next block
        self.ended = False
        sparse.mkdir(parents=True, exist_ok=True)
        kept.mkdir(parents=True, exist_ok=True)

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self.data_left:
                take = view[: self.data_left]
                self.crc = crc32c.crc32c(take, self.crc)
                if self.out is not None:
                    self.out.write(take)
                self.data_left -= len(take)
                view = view[len(take) :]
                if not self.data_left:
                    self._close_member()
            elif self.padding_left:
                skipped = min(self.padding_left, len(view))
                self.padding_left -= skipped
                view = view[skipped:]
            else:
                wanted = BLOCK - len(self.header)
                self.header += view[:wanted]
                view = view[wanted:]
                if len(self.header) == BLOCK:
                    self._start_member(bytes(self.header))
                    self.header.clear()

    def _start_member(self, block: bytes) -> None:
        if block == bytes(BLOCK):  # the end of the archive, and what pads it
            self.ended = True
            return
        if self.ended:
            raise OperationFailed("pg_basebackup's tar: data after the end of the archive")
        try:
            member = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise OperationFailed(f"pg_basebackup's tar: a broken header ({exc})") from exc
        check_member("pg_basebackup's tar", member)
        kept = member.name.startswith(WRITTEN_OUT)
        path = (self.kept if kept else self.sparse) / member.name
        if member.isdir():
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.member, self.crc = member, 0
        self.out = path.open("wb")
        if not kept:
            self.out.truncate(member.size)
            self.out.close()
            self.out = None
        self.data_left = member.size
        self.padding_left = -member.size % BLOCK
        if not member.size:
            self._close_member()

    def _close_member(self) -> None:
        assert self.member is not None  # noqa: S101
        if self.out is not None:
            self.out.close()
            self.out = None
        self.files[self.member.name] = (self.member.size, self.crc)
        self.member = None

    def close(self) -> None:
        """Check the stream ended where a tar ends (not inside a member or before its end blocks)."""
        if self.out is not None:
            self.out.close()
        if not self.ended or self.member is not None:
            raise OperationFailed("pg_basebackup's tar ended early (truncated)")


def checksum_mismatches(manifest: dict[str, Any], files: dict[str, tuple[int, int]]) -> list[str]:
    """Files whose CRC32C in the manifest differs from the one counted (pg_verifybackup names the
    missing, the extra and the wrong-sized ones)."""
    wrong = []
    for entry in manifest["Files"]:
        name = entry.get("Path") or bytes.fromhex(entry["Encoded-Path"]).decode("utf-8", "surrogateescape")
        if entry.get("Checksum-Algorithm") != "CRC32C" or name not in files:
            continue
        counted = files[name][1].to_bytes(4, "little").hex()  # stored in the server's byte order
        if counted != entry["Checksum"].lower():
            wrong.append(f"{name}: CRC32C {counted}, the manifest says {entry['Checksum']}")
    return wrong


def _read_into(pipe: IO[bytes], chunks: queue.Queue[bytes | None]) -> None:
    """Move the pipe's bytes into `chunks`, then None (a read that fails ends the stream early, which the
    tar check reports)."""
    try:
        while chunk := pipe.read(READ_BYTES):
            chunks.put(chunk)
    except OSError:
        pass
    finally:
        chunks.put(None)


def _grow_pipe(pipe: IO[bytes]) -> None:
    """Fewer, larger reads: a pipe of READ_BYTES where the system allows it (64 KiB otherwise)."""
    with suppress(OSError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, READ_BYTES)


@contextmanager
def _sparse_dir(fallback: Path) -> Iterator[Path]:
    """A directory for the sparse copy: memory-backed where there is one (its files hold no data, so they
    take no memory, and creating a thousand files on a busy disk can take a second), else under `fallback`.
    One a killed backup left is removed by the next."""
    parent = MEMORY_BACKED if os.access(MEMORY_BACKED, os.W_OK) else fallback
    for left in parent.glob(f"{SPARSE_PREFIX}*"):
        pid = left.name.removeprefix(SPARSE_PREFIX).split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{SPARSE_PREFIX}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stream(
    env: Environment, sink: Callable[[bytes], object], *, work: Path, tick: Callable[[int], None]
) -> int:
    """Run pg_basebackup of the environment's cluster into `sink`, checked as described above, the WAL and
    the manifest kept under `work` for the check; the bytes streamed. OperationFailed when it fails or
    does not check."""
    with _sparse_dir(work) as sparse:
        scan = TarScan(sparse, work)
        streamed = _run(env, sink, scan=scan, tick=tick)
        check(env, scan)
    return streamed


def _run(
    env: Environment, sink: Callable[[bytes], object], *, scan: TarScan, tick: Callable[[int], None]
) -> int:
    """pg_basebackup's tar through `scan` into `sink`; the bytes streamed."""
    streamed = 0
    slot = f"maximus_backup_{secrets.token_hex(4)}"
    with (
        pgtools.connect(env, "postgres") as session,
        tempfile.TemporaryFile() as errors,
    ):
        try:
            session.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
        except psycopg.Error as exc:
            raise OperationFailed(
                f"a temporary replication slot to hold the backup's WAL: {exc.diag.message_primary or exc}; "
                "free one (see the view pg_replication_slots) or raise max_replication_slots"
            ) from exc
        process = subprocess.Popen(
            [
                pgtools.pg_bin(env, "pg_basebackup"),
                *pgtools.connect_args(env),
                "--pgdata=-",
                "--format=tar",
                "--wal-method=fetch",
                "--checkpoint=fast",
                "--manifest-checksums=CRC32C",
                "--no-password",
            ],
            env=pgtools.tool_env(env),
            stdout=subprocess.PIPE,
            stderr=errors,
            preexec_fn=pgtools.die_with_parent,  # noqa: PLW1509 - one prctl call
        )
        assert process.stdout is not None  # noqa: S101
        _grow_pipe(process.stdout)
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUED_CHUNKS)
        reader = threading.Thread(target=_read_into, args=(process.stdout, chunks), name="base-backup-reader")
        reader.start()
        try:  # the reader keeps pg_basebackup going while a chunk is checked and sealed here
            while (chunk := chunks.get()) is not None:
                scan.feed(chunk)
                sink(chunk)
                streamed += len(chunk)
                tick(len(chunk))
        except BaseException:
            process.kill()
            while chunks.get() is not None:  # lets the reader finish
                pass
            raise
        finally:
            reader.join()
        returncode = process.wait()
        if returncode != 0:
            errors.seek(0)
            detail = " ".join(errors.read().decode(errors="replace").split())[:500]
            raise OperationFailed(
                f"pg_basebackup (needs a `replication` line for postgres in pg_hba.conf) failed "
                f"(exit {returncode}): {detail}"
            )
    return streamed


def check(env: Environment, scan: TarScan) -> None:
    """The scanned tar against its manifest: CRC32C here, the rest by pg_verifybackup (OperationFailed)."""
    scan.close()
    try:
        manifest = json.loads((scan.kept / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise OperationFailed(f"pg_basebackup's tar: no readable {MANIFEST} ({exc})") from exc
    wrong = checksum_mismatches(manifest, scan.files)
    if wrong:
        raise OperationFailed(f"the base backup does not match its manifest: {'; '.join(wrong[:5])}")
    pgtools.run_tool(
        [
            pgtools.pg_bin(env, "pg_verifybackup"),
            "--quiet",
            "--skip-checksums",
            f"--manifest-path={scan.kept / MANIFEST}",
            f"--wal-directory={scan.kept / 'pg_wal'}",
            str(scan.sparse),
        ],
        what="pg_verifybackup of the new backup",
    )
