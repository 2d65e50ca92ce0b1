"""Encryption at rest for backups: compress, then AES-256-GCM in authenticated chunks.

The key is 32 bytes, given as 64 hex digits or base64, from the environment variable the model names
(`backup.encryption_key_env`, default MAXIMUS_BACKUP_KEY) or, on a single-machine environment, from the
secret file `<state>/secrets/backup_key` (mode 0600, created on the first backup when neither exists).
Its id is a short hash of the key: recorded in every manifest and in every sealed file's header, so a
wrong key is named as such before anything is decrypted.

Sealed file layout: a 32-byte header (magic `MXB1`, 12 bytes of key id, a 12-byte random base nonce and
4 reserved zero bytes), then chunks, each `length (4 bytes, big-endian) || ciphertext+tag`. Chunk i is
sealed with the nonce `base XOR i` and the associated data `header || i || last-flag`, so chunks cannot be
reordered, dropped, or the file truncated at a chunk boundary without the decryption failing.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from opskit.errors import BadInput, OperationFailed
from opskit.model import Environment

Compression = Literal["none", "gzip", "zstd"]
MAGIC = b"MXB1"
KEY_ID_BYTES = 12
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES + 4
CHUNK = 1 << 20
KEY_FILE = "backup_key"
SUFFIX: dict[str, str] = {"none": ".enc", "gzip": ".gz.enc", "zstd": ".zst.enc"}
ZSTD_LEVEL = 3
GZIP_LEVEL = 6


class WrongKey(BadInput):
    """The backup was sealed with another key (exit 2, nothing changed)."""


class Corrupt(OperationFailed):
    """A sealed file does not decrypt: changed, truncated or not a backup file (exit 1)."""


class BackupKey:
    """A 32-byte key and where it came from (never the key itself in any text)."""

    def __init__(self, key: bytes, source: str) -> None:
        if len(key) != 32:
            raise BadInput(
                f"{source}: the key is {len(key)} bytes; accepted: 32 bytes as 64 hex digits or base64"
            )
        self.key = key
        self.source = source
        self.id = key_id(key)

    def __repr__(self) -> str:
        return f"BackupKey(id={self.id}, source={self.source})"


def key_id(key: bytes) -> str:
    """A short, non-secret name of the key: 24 hex digits of a domain-separated sha256."""
    return hashlib.sha256(b"maximus-backup-key-id:" + key).hexdigest()[: KEY_ID_BYTES * 2]


def parse_key(text: str, source: str) -> BackupKey:
    value = text.strip()
    try:
        raw = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise BadInput(
            f"{source}: not a key; accepted: 32 bytes as 64 hex digits or base64 "
            "(make one with `openssl rand -hex 32`)"
        ) from None
    return BackupKey(raw, source)


def key_file(env: Environment) -> Path:
    return env.state_path / "secrets" / KEY_FILE


def load_key(env: Environment, *, create: bool = False) -> BackupKey:
    """The environment's backup key: its variable first, then (single-machine) the secret file."""
    variable = env.backup.encryption_key_env
    text = os.environ.get(variable)
    if text:
        return parse_key(text, f"${variable}")
    if env.kind != "local":
        raise BadInput(f"${variable}: not set; accepted: the backup key (32 bytes, hex or base64)")
    path = key_file(env)
    if not path.exists():
        if not create:
            raise BadInput(f"${variable} is not set and {KEY_FILE} does not exist; accepted: the backup key")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        owner = path.parent.stat()
        os.chown(path, owner.st_uid, owner.st_gid)  # like every secret: owned by the service account
    return parse_key(path.read_text(), f"secret {KEY_FILE}")


# --- streams --------------------------------------------------------------------------------------------


def _nonce(base: bytes, index: int) -> bytes:
    return (int.from_bytes(base, "big") ^ index).to_bytes(NONCE_BYTES, "big")


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


def _read_chunks(source: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    while block := source.read(size):
        yield block


def _rechunk(blocks: Iterator[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Blocks of exactly CHUNK bytes (the last one shorter), each with 'is it the last one'."""
    buffer = bytearray()
    pending: bytes | None = None
    for block in blocks:
        buffer += block
        while len(buffer) >= CHUNK:
            if pending is not None:
                yield pending, False
            pending = bytes(buffer[:CHUNK])
            del buffer[:CHUNK]
    if buffer:
        if pending is not None:
            yield pending, False
        yield bytes(buffer), True
    else:
        yield (pending if pending is not None else b""), True


def seal(
    source: IO[bytes],
    target: IO[bytes],
    key: BackupKey,
    compression: Compression,
    tick: Callable[[int], None] | None = None,
    *,
    threads: int = 0,
) -> tuple[int, str]:
    """Compress and encrypt `source` into `target`; the bytes written and their sha256.

    `threads` > 1 compresses one stream with that many zstd workers (for a single large stream)."""
    aead = AESGCM(key.key)
    header = MAGIC + bytes.fromhex(key.id) + secrets.token_bytes(NONCE_BYTES) + b"\0\0\0\0"
    base = header[len(MAGIC) + KEY_ID_BYTES : len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES]
    digest = hashlib.sha256(header)
    target.write(header)
    written = len(header)
    position = 0

    def counted() -> Iterator[bytes]:
        nonlocal position
        for block in _read_chunks(source):
            position += len(block)
            if tick is not None:
                tick(len(block))
            yield block

    plain = _compressed_stream(counted(), compression, threads)
    for index, (block, last) in enumerate(_rechunk(plain)):
        sealed = aead.encrypt(_nonce(base, index), block, _aad(header, index, last))
        frame = len(sealed).to_bytes(4, "big") + sealed
        target.write(frame)
        digest.update(frame)
        written += len(frame)
    return written, digest.hexdigest()


def _compressed_stream(
    blocks: Iterator[bytes], compression: Compression, threads: int = 0
) -> Iterator[bytes]:
    if compression == "none":
        yield from blocks
    elif compression == "zstd":
        workers = threads if threads > 1 else 0
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=workers).compressobj()
        for block in blocks:
            if out := compressor.compress(block):
                yield out
        yield compressor.flush()
    else:
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        for block in blocks:
            if out := packer.compress(block):
                yield out
        yield packer.flush()


def header_key_id(source: IO[bytes], name: str) -> str:
    header = source.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES or not header.startswith(MAGIC):
        raise Corrupt(f"{name}: not a sealed backup file (bad header)")
    return header[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()


def _opened(source: IO[bytes], key: BackupKey, name: str) -> Iterator[bytes]:
    header = source.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES or not header.startswith(MAGIC):
        raise Corrupt(f"{name}: not a sealed backup file (bad header)")
    found = header[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()
    if found != key.id:
        raise WrongKey(
            f"{name}: sealed with key id {found}, but the key from {key.source} has id {key.id}; "
            "accepted: the key this backup was made with"
        )
    aead = AESGCM(key.key)
    base = header[len(MAGIC) + KEY_ID_BYTES : len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES]
    index = 0
    while True:
        prefix = source.read(4)
        if len(prefix) != 4:
            raise Corrupt(f"{name}: truncated (chunk {index} missing)")
        sealed = source.read(int.from_bytes(prefix, "big"))
        last = source.peek(1)[:1] == b"" if hasattr(source, "peek") else _at_end(source)
        try:
            yield aead.decrypt(_nonce(base, index), sealed, _aad(header, index, last))
        except InvalidTag:
            raise Corrupt(f"{name}: chunk {index} fails authentication (changed or truncated)") from None
        if last:
            return
        index += 1


def _at_end(source: IO[bytes]) -> bool:
    here = source.tell()
    end = source.seek(0, os.SEEK_END)
    source.seek(here)
    return here == end


def unseal(
    source: IO[bytes],
    target: IO[bytes],
    key: BackupKey,
    compression: Compression,
    name: str,
    *,
    tick: Callable[[int], None] | None = None,
) -> int:
    """Decrypt and decompress `source` into `target`; the plaintext bytes written."""
    written = 0
    blocks = _opened(source, key, name)
    try:
        if compression == "zstd":
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            for block in blocks:
                out = decompressor.decompress(block)
                target.write(out)
                written += len(out)
                if tick is not None:
                    tick(len(block))
        elif compression == "gzip":
            unpacker = zlib.decompressobj(31)
            for block in blocks:
                out = unpacker.decompress(block)
                target.write(out)
                written += len(out)
                if tick is not None:
                    tick(len(block))
            tail = unpacker.flush()
            target.write(tail)
            written += len(tail)
        else:
            for block in blocks:
                target.write(block)
                written += len(block)
                if tick is not None:
                    tick(len(block))
    except (zstandard.ZstdError, zlib.error, gzip.BadGzipFile) as exc:
        raise Corrupt(f"{name}: decrypted but does not decompress ({exc})") from None
    return written


def seal_file(
    path: Path,
    target: Path,
    key: BackupKey,
    compression: Compression,
    tick: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    with path.open("rb") as src, target.open("wb") as dst:
        result = seal(src, dst, key, compression, tick)
        dst.flush()
        os.fsync(dst.fileno())
    return result


def unseal_file(
    path: Path,
    target: Path,
    key: BackupKey,
    compression: Compression,
    name: str,
    *,
    tick: Callable[[int], None] | None = None,
) -> int:
    with path.open("rb") as src, target.open("wb") as dst:
        return unseal(src, dst, key, compression, name, tick=tick)
