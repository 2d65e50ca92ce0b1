"""The `local` router: HAProxy's runtime API on its unix socket.

The edge picks its backend from one map entry (`active -> app_<color>`), so a switch is one `set map`
command: every new request goes to the new color at once, requests in flight finish where they started,
and traffic is never split. The map file is rewritten first, so a reload or restart keeps the choice.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from opskit.routers import RouterError, Routing

MAP_KEY = "active"
SOCKET_TIMEOUT_S = 2.0
SERVER_RUNNING = "2"  # srv_op_state in `show servers state`


class HAProxyRouter:
    def __init__(
        self, socket_path: Path, map_path: Path, backend_prefix: str, colors: tuple[str, ...]
    ) -> None:
        self.socket_path = socket_path
        self.map_path = map_path
        self.backend_prefix = backend_prefix
        self.colors = colors

    def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(SOCKET_TIMEOUT_S)
                conn.connect(str(self.socket_path))
                conn.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise RouterError(
                f"HAProxy runtime API {self.socket_path}: {exc}; is the edge running? `invoke health` tells"
            ) from exc
        return b"".join(chunks).decode()

    def _backend(self, color: str) -> str:
        return f"{self.backend_prefix}_{color}"

    def routing(self) -> Routing:
        entries = {}
        for line in self.command(f"show map {self.map_path}").splitlines():
            parts = line.split()
            if len(parts) == 3:
                entries[parts[1]] = parts[2]
        backend = entries.get(MAP_KEY)
        color = next((c for c in self.colors if self._backend(c) == backend), None)
        if color is None:
            raise RouterError(f"HAProxy map {self.map_path} has no usable '{MAP_KEY}' entry ({backend!r})")
        return Routing({c: 100 if c == color else 0 for c in self.colors})

    def server_up(self, color: str) -> bool:
        """Whether HAProxy's own health check sees the color's server running."""
        answer = self.command(f"show servers state {self._backend(color)}")
        for line in answer.splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[3] == color:
                return fields[5] == SERVER_RUNNING
        return False

    def switch(self, color: str) -> Routing:
        if color not in self.colors:
            raise RouterError(f"unknown color {color!r}; accepted: {', '.join(self.colors)}")
        if not self.server_up(color):
            raise RouterError(f"{color} is not UP in HAProxy's health checks; not switching to it")
        before = self.routing().active
        self._write_map(color)
        if before != color:
            answer = self.command(f"set map {self.map_path} {MAP_KEY} {self._backend(color)}").strip()
            if answer:
                if before is not None:
                    self._write_map(before)  # the file must keep saying what HAProxy does
                raise RouterError(f"HAProxy refused the switch to {color}: {answer}")
        after = self.routing()
        if after.active != color:
            raise RouterError(f"HAProxy still routes to {after.active} after the switch to {color}")
        return after

    def _write_map(self, color: str) -> None:
        """Persist the choice for the next reload, with the file's owner and mode kept."""
        stat = self.map_path.stat()
        lines = [
            line for line in self.map_path.read_text().splitlines() if not line.startswith(MAP_KEY + " ")
        ]
        lines.append(f"{MAP_KEY} {self._backend(color)}")
        fd, tmp = tempfile.mkstemp(prefix=".edge-map-", dir=self.map_path.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, stat.st_mode & 0o777)
        os.chown(tmp, stat.st_uid, stat.st_gid)
        os.replace(tmp, self.map_path)
