"""The base-backup stream's tar scan: sizes and CRC32C of every member however the stream is cut, the
sparse copy and the kept WAL and manifest, and the streams it refuses (the real pg_basebackup stream and
its checks against the manifest are in test_backup.py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import crc32c
import pytest

from opskit import basebackup
from opskit.errors import OperationFailed

CONTENT = {
    "PG_VERSION": b"15\n",
    "global/pg_control": bytes(range(256)) * 32,
    "base/5/16384": b"\x01" * 512,
    "base/5/16385": b"page" * 25_001,  # not a whole number of tar blocks
    "base/5/empty": b"",
    "pg_wal/000000010000000000000003": b"w" * 70_000,
    "backup_manifest": b'{"PostgreSQL-Backup-Manifest-Version": 1}\n',
}


def _tar(members: dict[str, bytes], *, extra: tarfile.TarInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("global", "base", "base/5", "pg_wal"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra)
    return buffer.getvalue()


def _scan(data: bytes, tmp_path: Path, step: int) -> basebackup.TarScan:
    scan = basebackup.TarScan(tmp_path / f"sparse-{step}", tmp_path / f"kept-{step}")
    for start in range(0, len(data), step):
        scan.feed(data[start : start + step])
    scan.close()
    return scan


@pytest.mark.parametrize("step", [1, 511, 7919, 1 << 20])
def test_every_member_counted_however_the_stream_is_cut(tmp_path: Path, step: int) -> None:
    data = _tar(CONTENT)
    if step == 1:
        data = data[:40_000]  # byte by byte through the headers and the first members only
        scan = basebackup.TarScan(tmp_path / "sparse", tmp_path / "kept")
        for at in range(len(data)):
            scan.feed(data[at : at + 1])
        assert scan.files["PG_VERSION"] == (3, crc32c.crc32c(b"15\n"))
        return
    scan = _scan(data, tmp_path, step)
    assert scan.files == {name: (len(body), crc32c.crc32c(body)) for name, body in CONTENT.items()}
    for name, body in CONTENT.items():
        if name.startswith(basebackup.WRITTEN_OUT):  # the WAL and the manifest, written out in full
            assert (scan.kept / name).read_bytes() == body
            assert not (scan.sparse / name).exists()
        else:  # every other file: its size and none of its data
            assert (scan.sparse / name).stat().st_size == len(body)
            assert (scan.sparse / name).read_bytes() == bytes(len(body))


def test_a_stream_cut_short_is_refused(tmp_path: Path) -> None:
    data = _tar(CONTENT)
    scan = basebackup.TarScan(tmp_path / "sparse", tmp_path / "kept")
    scan.feed(data[: len(data) - 2 * tarfile.BLOCKSIZE - 10_000])  # inside the manifest's member
    with pytest.raises(OperationFailed, match="ended early"):
        scan.close()


def test_data_after_the_end_of_the_archive_is_refused(tmp_path: Path) -> None:
    data = _tar(CONTENT) + _tar({"extra": b"x"})
    with pytest.raises(OperationFailed, match="after the end"):
        _scan(data, tmp_path, 7919)


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [("../outside", tarfile.REGTYPE, "leave the target"), ("pg_tblspc/1", tarfile.SYMTYPE, "not a file")],
)
def test_a_member_outside_the_tree_or_not_a_file_is_refused(
    tmp_path: Path, name: str, kind: bytes, problem: str
) -> None:
    extra = tarfile.TarInfo(name)
    extra.type = kind
    extra.linkname = "/elsewhere" if kind == tarfile.SYMTYPE else ""
    with pytest.raises(OperationFailed, match=problem):
        _scan(_tar(CONTENT, extra=extra), tmp_path, 7919)
    assert not (tmp_path / "outside").exists()


def test_checksum_mismatches_name_the_file() -> None:
    files = {name: (len(body), crc32c.crc32c(body)) for name, body in CONTENT.items()}
    good = crc32c.crc32c(b"15\n").to_bytes(4, "little").hex()
    manifest = {
        "Files": [
            {"Path": "PG_VERSION", "Size": 3, "Checksum-Algorithm": "CRC32C", "Checksum": good},
            {
                "Encoded-Path": b"global/pg_control".hex(),
                "Size": 8192,
                "Checksum-Algorithm": "CRC32C",
                "Checksum": "00000000",
            },
            {"Path": "base/5/empty", "Size": 0, "Checksum-Algorithm": "NONE"},
        ]
    }
    wrong = basebackup.checksum_mismatches(manifest, files)
    assert len(wrong) == 1 and wrong[0].startswith("global/pg_control: CRC32C ")


def test_a_sparse_copy_left_by_a_killed_backup_is_removed_by_the_next(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = basebackup.MEMORY_BACKED if os.access(basebackup.MEMORY_BACKED, os.W_OK) else tmp_path
    left = parent / f"{basebackup.SPARSE_PREFIX}{gone.pid}-left"
    (left / "base").mkdir(parents=True)
    ours_meanwhile = Path(tempfile.mkdtemp(prefix=f"{basebackup.SPARSE_PREFIX}{os.getpid()}-", dir=parent))
    try:
        with basebackup._sparse_dir(tmp_path) as sparse:
            assert sparse.parent == parent and sparse.is_dir()
            assert not left.exists()  # its process is gone
            assert ours_meanwhile.exists()  # a running backup's copy is left alone
        assert not sparse.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(ours_meanwhile, ignore_errors=True)
