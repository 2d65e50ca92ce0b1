"""The persisted runtime state of a single-machine environment: which color serves, which run.

`<state_dir>/state.json` is written atomically (temporary file, fsync, rename), so a killed writer
leaves either the old state or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opskit.errors import OperationFailed
from opskit.model import COLORS, Environment

STATE_FILE = "state.json"


@dataclass
class EnvState:
    active: str
    colors: dict[str, dict[str, Any]]
    previous: dict[str, Any] | None = None
    deploy: dict[str, Any] = field(default_factory=lambda: {"state": "idle"})
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def initial_state(env: Environment) -> EnvState:
    """Blue serves the model's version with the model's fault knobs."""
    return EnvState(
        active="blue", colors={"blue": {"version": env.service.version, "faults": env.faults.model_dump()}}
    )


def state_path(env: Environment) -> Path:
    return env.state_path / STATE_FILE


def read_state(env: Environment) -> EnvState:
    path = state_path(env)
    if not path.exists():
        return initial_state(env)
    try:
        data = json.loads(path.read_text())
        state = EnvState(**data)
    except (ValueError, TypeError) as exc:
        raise OperationFailed(f"{path}: unreadable state ({exc}); restore it from the audit log") from exc
    if state.active not in COLORS or state.active not in state.colors:
        raise OperationFailed(f"{path}: active color {state.active!r} is not deployed; fix the file")
    return state


def write_state(env: Environment, state: EnvState) -> None:
    path = state_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(state.as_dict(), handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
