"""Configuration of the workload, read only from MAXIMUS_* environment variables.

A bad value stops the start with one line naming the variable and what it accepts (exit code 2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ENVIRONMENT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
VERSION_TEXT = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
MAX_LATENCY_MS = 60_000

Color = Literal["blue", "green"]


class ConfigError(Exception):
    """One bad variable: its name and what is accepted."""

    def __init__(self, variable: str, accepted: str, value: str | None = None) -> None:
        self.variable = variable
        self.accepted = accepted
        shown = "" if value is None else f"={value!r}"
        super().__init__(f"{variable}{shown} is not valid: accepted: {accepted}")


@dataclass(frozen=True)
class Config:
    service: str
    environment: str
    color: Color
    version: str
    database_url: str
    database_password: str | None
    redis_url: str
    redis_password: str | None
    fault_error_rate: float
    fault_latency_ms: int
    fault_crash: bool
    fault_never_ready: bool

    @property
    def metric_prefix(self) -> str:
        return f"maximus_{self.service}_"

    @property
    def cache_key(self) -> str:
        return f"maximus:{self.service}:analytics:summary"


def _required(env: Mapping[str, str], name: str, accepted: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(name, f"{accepted} (the variable is required)")
    return value


def _matching(
    env: Mapping[str, str], name: str, pattern: re.Pattern[str], accepted: str, default: str | None = None
) -> str:
    value = env.get(name, "").strip() or default
    if value is None:
        raise ConfigError(name, f"{accepted} (the variable is required)")
    if not pattern.match(value):
        raise ConfigError(name, accepted, value)
    return value


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...], password_var: str) -> str:
    prefixes = " or ".join(f"{scheme}://" for scheme in schemes)
    accepted = f"a {prefixes} URL without a password (put it in {password_var})"
    value = _required(env, name, accepted)
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise ConfigError(name, accepted) from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(name, accepted)
    if parts.password is not None:  # never echo the value: it holds a secret
        raise ConfigError(name, accepted)
    return value


def _password_file(env: Mapping[str, str], name: str) -> str | None:
    path = env.get(name, "").strip()
    if not path:
        return None
    accepted = "the path of a readable file holding the password on its first line"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(name, accepted, path) from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise ConfigError(name, accepted + " (the file is empty)", path)
    return password


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ConfigError(name, "one of 1, true, yes, on (set) or 0, false, no, off, empty (unset)", value)


def _error_rate(env: Mapping[str, str]) -> float:
    name = "MAXIMUS_FAULT_ERROR_RATE"
    value = env.get(name, "").strip()
    if not value:
        return 0.0
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:  # also rejects NaN
        raise ConfigError(name, "a number from 0 to 1 (the fraction of /hitl requests answering 500)", value)
    return rate


def _latency_ms(env: Mapping[str, str]) -> int:
    name = "MAXIMUS_FAULT_LATENCY_MS"
    value = env.get(name, "").strip()
    if not value:
        return 0
    accepted = f"a whole number of milliseconds from 0 to {MAX_LATENCY_MS}"
    if not value.isdigit() or int(value) > MAX_LATENCY_MS:
        raise ConfigError(name, accepted, value)
    return int(value)


def load_config(env: Mapping[str, str]) -> Config:
    """Read and validate every variable; raise ConfigError at the first bad one."""
    service = _matching(
        env,
        "MAXIMUS_SERVICE",
        SERVICE_NAME,
        "a lower-case name: a letter, then letters, digits or _ (at most 32)",
        default="hitl",
    )
    environment = _matching(
        env,
        "MAXIMUS_ENVIRONMENT",
        ENVIRONMENT_NAME,
        "a lower-case name: a letter, then letters, digits or - (at most 40)",
    )
    color_text = _required(env, "MAXIMUS_COLOR", "blue or green")
    if color_text == "blue":
        color: Color = "blue"
    elif color_text == "green":
        color = "green"
    else:
        raise ConfigError("MAXIMUS_COLOR", "blue or green", color_text)
    version = _matching(
        env, "MAXIMUS_VERSION", VERSION_TEXT, "a version such as 1.0.0 (letters, digits, . + _ -; at most 64)"
    )
    database_url = _url(
        env, "MAXIMUS_DATABASE_URL", ("postgresql", "postgres"), "MAXIMUS_DATABASE_PASSWORD_FILE"
    )
    database_password = _password_file(env, "MAXIMUS_DATABASE_PASSWORD_FILE")
    redis_url = _url(env, "MAXIMUS_REDIS_URL", ("redis", "rediss"), "MAXIMUS_REDIS_PASSWORD_FILE")
    redis_password = _password_file(env, "MAXIMUS_REDIS_PASSWORD_FILE")
    return Config(
        service=service,
        environment=environment,
        color=color,
        version=version,
        database_url=database_url,
        database_password=database_password,
        redis_url=redis_url,
        redis_password=redis_password,
        fault_error_rate=_error_rate(env),
        fault_latency_ms=_latency_ms(env),
        fault_crash=_flag(env, "MAXIMUS_FAULT_CRASH"),
        fault_never_ready=_flag(env, "MAXIMUS_FAULT_NEVER_READY"),
    )
