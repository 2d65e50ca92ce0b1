"""`python -m workload --host H --port N`: validate, migrate, then serve until SIGTERM.

Exit codes: 0 after a graceful shutdown, 1 when the start fails (injected crash, schema migration
impossible, port taken), 2 on a bad configuration value or argument.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from workload import db
from workload.app import Metrics, Runtime, create_app
from workload.config import Config, ConfigError, load_config

GRACEFUL_SHUTDOWN_S = 30
log = logging.getLogger("workload")


class GracefulServer(uvicorn.Server):
    """A uvicorn server that tells the application it is shutting down as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.shutting_down = True
        super().handle_exit(sig, frame)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("a port number from 1 to 65535")
    return int(text)


def _ignore_signal(sig: int, frame: FrameType | None) -> None:
    """Installed under uvicorn's own handlers: uvicorn re-raises the signal once it has shut down."""


async def _run(config: Config, host: str, port: int) -> int:
    try:
        await db.migrate(config)
    except db.MigrationFailed as exc:
        print(f"workload: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    runtime = Runtime(config=config, metrics=Metrics(config))
    app = create_app(config, runtime)
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            workers=1,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            server_header=False,
            log_level="info",
        ),
        runtime,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_signal)
    await server.serve()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workload", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, required=True, help="TCP port to listen on")
    args = parser.parse_args(argv)
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        print(f"workload: bad configuration: {exc}", file=sys.stderr, flush=True)
        return 2
    if config.fault_crash:
        print(
            "workload: MAXIMUS_FAULT_CRASH is set: exiting with status 1 before listening (injected fault)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(config, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
