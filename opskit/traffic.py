"""Real requests through an environment's edge, counted by outcome, version and color."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

READ_PATHS = ("/hitl/patches/pending", "/hitl/analytics/summary", "/healthz", "/version")
REQUEST_TIMEOUT_S = 5.0


@dataclass
class TrafficReport:
    total: int = 0
    failed: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    colors: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, response: httpx.Response | None, error: str | None, elapsed_ms: float) -> None:
        self.total += 1
        if response is None:
            self.failed += 1
            self.errors[error or "no response"] += 1
            return
        self.latencies_ms.append(elapsed_ms)
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.failed += 1
        self.versions[response.headers.get("X-App-Version", "missing")] += 1
        self.colors[response.headers.get("X-App-Color", "missing")] += 1

    def percentile_ms(self, q: float) -> float | None:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else None
        return round(statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1], 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "versions": dict(self.versions),
            "colors": dict(self.colors),
            "errors": dict(self.errors),
            "p50_ms": self.percentile_ms(50),
            "p95_ms": self.percentile_ms(95),
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.total / self.seconds, 1) if self.seconds else None,
        }


async def _burst(base_url: str, count: int, concurrency: int, tick: Callable[[], None]) -> TrafficReport:
    report = TrafficReport()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(READ_PATHS[i % len(READ_PATHS)])
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            started = time.perf_counter()
            try:
                response = await client.get(path)
                report.record(response, None, (time.perf_counter() - started) * 1000)
            except httpx.HTTPError as exc:
                report.record(None, type(exc).__name__, 0.0)
            tick()

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report


def served_version(base_url: str) -> str | None:
    """The version that answers a request at `base_url` now (its X-App-Version), or None if none does."""
    try:
        value = httpx.get(base_url + "/version", timeout=REQUEST_TIMEOUT_S).headers.get("X-App-Version")
    except httpx.HTTPError:
        return None
    return None if value is None else str(value)


def burst(
    base_url: str, count: int = 200, concurrency: int = 8, tick: Callable[[], None] = lambda: None
) -> TrafficReport:
    """Send `count` read requests spread over the service's routes; a 5xx or no answer is a failure."""
    return asyncio.run(_burst(base_url, count, concurrency, tick))


class SteadyLoad:
    """Requests at a fixed rate from a background thread until the block ends; every outcome counted.

    with SteadyLoad(edge_url, rps=200) as load:
        ...  # cutovers, rollbacks
    assert load.report.failed == 0
    """

    def __init__(
        self, base_url: str, rps: float = 200, concurrency: int = 32, paths: tuple[str, ...] = READ_PATHS
    ) -> None:
        self.base_url = base_url
        self.rps = rps
        self.concurrency = concurrency
        self.paths = paths
        self.report = TrafficReport()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        started = time.perf_counter()
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=REQUEST_TIMEOUT_S
        ) as client:

            async def one(path: str) -> None:
                begun = time.perf_counter()
                try:
                    response = await client.get(path)
                    self.report.record(response, None, (time.perf_counter() - begun) * 1000)
                except httpx.HTTPError as exc:
                    self.report.record(None, type(exc).__name__, 0.0)
                finally:
                    slots.release()

            pending: set[asyncio.Task[None]] = set()
            sent = 0
            while not self._stop.is_set():
                due = started + sent / self.rps
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await slots.acquire()
                task = asyncio.create_task(one(self.paths[sent % len(self.paths)]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.gather(*pending)
        self.report.seconds = time.perf_counter() - started
