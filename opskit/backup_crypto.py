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
import hmac
import json
import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

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
ZSTD_LEVEL = 1  # as small as level 3 on table data within a few per cent, at about twice the speed
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


def manifest_mac(manifest: dict[str, Any], key: BackupKey) -> str:
    """The HMAC-SHA256 of a manifest (all but its `mac`) under the backup key, over canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key.key, b"maximus-backup-manifest:" + canonical, hashlib.sha256).hexdigest()


# --- streams --------------------------------------------------------------------------------------------


def _nonce(base: bytes, index: int) -> bytes:
    return (int.from_bytes(base, "big") ^ index).to_bytes(NONCE_BYTES, "big")


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


class _Sealer:
    """A writable stream that encrypts what it is given in CHUNK-sized, authenticated chunks into `target`,
    hashing the sealed bytes as they are written; `close()` seals the last chunk."""

    def __init__(self, target: IO[bytes], key: BackupKey) -> None:
        self.target = target
        self.aead = AESGCM(key.key)
        self.header = MAGIC + bytes.fromhex(key.id) + secrets.token_bytes(NONCE_BYTES) + b"\0\0\0\0"
        self.base = self.header[len(MAGIC) + KEY_ID_BYTES : len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES]
        self.digest = hashlib.sha256(self.header)
        self.buffer = bytearray()
        self.index = 0
        target.write(self.header)
        self.written = len(self.header)

    def _emit(self, block: bytes | memoryview, last: bool) -> None:
        sealed = self.aead.encrypt(_nonce(self.base, self.index), block, _aad(self.header, self.index, last))
        prefix = len(sealed).to_bytes(4, "big")
        self.target.write(prefix)
        self.target.write(sealed)
        self.digest.update(prefix)
        self.digest.update(sealed)
        self.written += len(prefix) + len(sealed)
        self.index += 1

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) > CHUNK:  # a full chunk is sealed once more data follows it: it is not the last
            whole = (len(self.buffer) - 1) // CHUNK * CHUNK
            view = memoryview(self.buffer)
            for start in range(0, whole, CHUNK):
                self._emit(view[start : start + CHUNK], last=False)
            view.release()
            del self.buffer[:whole]
        return len(data)

    def close(self) -> tuple[int, str]:
        self._emit(bytes(self.buffer), last=True)
        self.buffer.clear()
        return self.written, self.digest.hexdigest()


class SealWriter:
    """A writable stream: what is written to it is compressed and sealed into `target` (for writers such as
    tarfile that produce a stream themselves). `finish()` seals the end: the bytes written and their sha256.

    `threads` > 1 compresses with that many zstd workers (for a single large stream)."""

    def __init__(
        self,
        target: IO[bytes],
        key: BackupKey,
        compression: Compression,
        *,
        threads: int = 0,
        tick: Callable[[int], None] | None = None,
    ) -> None:
        self.sealer = _Sealer(target, key)
        self.tick = tick
        self.position = 0
        self.compress: Callable[[bytes], bytes] | None
        self.flush: Callable[[], bytes] | None
        if compression == "zstd":
            zstd = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, threads=threads if threads > 1 else 0
            ).compressobj()
            self.compress, self.flush = zstd.compress, zstd.flush
        elif compression == "gzip":
            packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            self.compress, self.flush = packer.compress, packer.flush
        else:
            self.compress = self.flush = None

    def write(self, data: bytes) -> int:
        size = len(data)
        self.position += size
        if self.tick is not None and size:
            self.tick(size)
        out = self.compress(data) if self.compress is not None else data
        if out:
            self.sealer.write(out)
        return size

    def tell(self) -> int:
        """The plaintext bytes written so far."""
        return self.position

    def finish(self) -> tuple[int, str]:
        if self.flush is not None:
            self.sealer.write(self.flush())
        return self.sealer.close()


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
    writer = SealWriter(target, key, compression, threads=threads, tick=tick)
    while block := source.read(CHUNK):
        writer.write(block)
    return writer.finish()


def header_key_id(source: IO[bytes], name: str) -> str:
    header = source.read(HEADER_BYTES)
    if len(header) != HEADER_BYTES or not header.startswith(MAGIC):
        raise Corrupt(f"{name}: not a sealed backup file (bad header)")
    return header[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()


def _opened(
    source: IO[bytes], key: BackupKey, name: str, observe: Callable[[bytes], None] | None = None
) -> Iterator[bytes]:
    """The plaintext chunks, each authenticated before it is yielded; `observe` sees every byte read."""
    header = source.read(HEADER_BYTES)
    if observe is not None:
        observe(header)
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
        if observe is not None:
            observe(prefix)
            observe(sealed)
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
    observe: Callable[[bytes], None] | None = None,
) -> int:
    """Decrypt and decompress `source` into `target`; the plaintext bytes written. `observe` is given
    every sealed byte read (to hash the file in the same pass)."""
    written = 0
    blocks = _opened(source, key, name, observe)
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
