"""Locust users for the HITL patch service: list pending patches, decide one, analytics, health.

Run through `invoke loadtest --env E --profile P`, which reads loadtests/profiles.yaml and passes the
profile here in environment variables:

  MAXIMUS_LOAD_PER_USER_RPS  requests per second each user paces itself at (constant_throughput)
  MAXIMUS_LOAD_DECISIONS     `real`: approve or reject a pending patch; `probe`: decide a patch that
                             cannot exist and expect 404 (no data changes)
  MAXIMUS_LOAD_STAGES        stress only: a JSON list of {until_s, users, spawn_rate}; when set, the
                             ramp below (a LoadTestShape) drives the run instead of --users/--run-time
  MAXIMUS_LOAD_API_KEY       sent as X-API-Key when set (the gateway of staging and production)

Request names are the threshold keys of profiles.yaml: pending, decide, analytics, health.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from locust import LoadTestShape, constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

PER_USER_RPS = float(os.environ.get("MAXIMUS_LOAD_PER_USER_RPS", "1"))
DECISIONS = os.environ.get("MAXIMUS_LOAD_DECISIONS", "probe")
STAGES: list[dict[str, Any]] = json.loads(os.environ.get("MAXIMUS_LOAD_STAGES") or "[]")
API_KEY = os.environ.get("MAXIMUS_LOAD_API_KEY", "")
# The largest id PostgreSQL's bigint holds: a patch that never exists, for `probe` decisions.
PROBE_PATCH_ID = 2**63 - 1
PENDING_PAGE = 100


class HitlUser(FastHttpUser):
    """One reviewer: mostly reads the queue, sometimes decides, looks at the summary, and health."""

    wait_time = constant_throughput(PER_USER_RPS)
    default_headers = {"X-API-Key": API_KEY} if API_KEY else None

    def _pending_ids(self) -> list[int]:
        with self.client.get(
            f"/hitl/patches/pending?limit={PENDING_PAGE}", name="pending", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return []
            try:
                return [int(p["id"]) for p in response.json()]
            except (ValueError, KeyError, TypeError):
                response.failure("the body is not a list of patches")
                return []

    @task(4)
    def pending(self) -> None:
        self._pending_ids()

    @task(2)
    def decide(self) -> None:
        if DECISIONS == "probe":
            self._decide(PROBE_PATCH_ID, expected=(404,))
            return
        ids = self._pending_ids()
        if ids:
            # 409: another user decided it first; the service answered that race correctly.
            self._decide(random.choice(ids), expected=(201, 409))  # noqa: S311 - not cryptographic

    def _decide(self, patch_id: int, expected: tuple[int, ...]) -> None:
        body = {
            "decision": random.choice(("approve", "reject")),  # noqa: S311 - not cryptographic
            "reason": "load test decision",
        }
        with self.client.post(
            f"/hitl/patches/{patch_id}/decision", json=body, name="decide", catch_response=True
        ) as response:
            if response.status_code in expected:
                response.success()
            else:
                response.failure(f"status {response.status_code}, expected {expected}")

    @task(2)
    def analytics(self) -> None:
        self.client.get("/hitl/analytics/summary", name="analytics")

    @task(1)
    def health(self) -> None:
        self.client.get("/healthz", name="health")


if STAGES:

    class Ramp(LoadTestShape):
        """Stress: hold each stage's user count until its `until_s`, then stop after the last one."""

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            for stage in STAGES:
                if elapsed < stage["until_s"]:
                    return int(stage["users"]), float(stage["spawn_rate"])
            return None
