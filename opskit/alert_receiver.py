"""The local environment's alert receiver: where Alertmanager's webhook delivers.

`python -m opskit.alert_receiver --port N --out FILE` listens on 127.0.0.1. Every POST body (an
Alertmanager webhook payload) is appended to FILE as one JSON line and answered 200. GET /alerts returns
everything recorded so far as a JSON list; GET /-/ready answers 200 once the server listens.
Standard library only, so it runs under any interpreter without the project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY = 1 << 20


class AlertLog:
    """An append-only JSON-lines file of received webhook payloads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    def append(self, payload: Any) -> None:
        line = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    def read(self) -> list[Any]:
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


class Handler(BaseHTTPRequestHandler):
    server_version = "maximus-alert-receiver"
    log: AlertLog

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/alerts":
            self._reply(HTTPStatus.OK, self.log.read())
        elif path in ("/-/ready", "/-/healthy"):
            self._reply(HTTPStatus.OK, {"status": "ready"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}; accepted: /alerts, /-/ready"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": f"body of {length} bytes; accepted: 1..{MAX_BODY}"})
            return
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
            return
        self.log.append(payload)
        self._reply(HTTPStatus.OK, {"status": "recorded"})

    def _reply(self, status: HTTPStatus, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


def make_server(port: int, out: Path, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"log": AlertLog(out)})
    return ThreadingHTTPServer((host, port), handler)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m opskit.alert_receiver", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append payloads to")
    args = parser.parse_args(argv)
    server = make_server(args.port, args.out)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
