"""Small helpers shared by the benchmarks: timing and printing figures."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def summary(label: str, seconds: list[float]) -> str:
    return (
        f"{label:<44} median {statistics.median(seconds):7.3f} s   min {min(seconds):7.3f} s   "
        f"max {max(seconds):7.3f} s   runs {len(seconds)}"
    )
