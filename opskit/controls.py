"""The controls matrix as data: `governance/controls.yaml`, validated and rendered into controls.md.

Each control names the framework requirements it answers, the files that enforce it (they must exist)
and the `invoke` command that prints its evidence. Tests run every evidence command on a real
single-machine environment; governance/controls.md embeds the table rendered here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from opskit.errors import BadInput
from opskit.model import ROOT

CONTROLS_PATH = ROOT / "governance" / "controls.yaml"


class Control(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Z]{2,5}-\d{1,3}$")
    title: str = Field(min_length=1)
    frameworks: list[str] = Field(min_length=1)
    enforced_by: list[str] = Field(min_length=1)
    evidence: str = Field(pattern=r"^invoke \S")
    also: list[str] = []

    @field_validator("enforced_by")
    @classmethod
    def _exist(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if path.startswith("/") or ".." in Path(path).parts:
                raise ValueError(f"{path!r}: accepted: a path inside the repository")
            if not (ROOT / path).exists():
                raise ValueError(f"{path!r} does not exist; accepted: a file or directory of the repository")
        return paths

    @field_validator("also")
    @classmethod
    def _commands(cls, commands: list[str]) -> list[str]:
        for command in commands:
            if not command.startswith("invoke "):
                raise ValueError(f"{command!r}: accepted: an `invoke ...` command")
        return commands


class Controls(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    controls: list[Control] = Field(min_length=1)

    @field_validator("controls")
    @classmethod
    def _unique(cls, controls: list[Control]) -> list[Control]:
        seen: set[str] = set()
        for control in controls:
            if control.id in seen:
                raise ValueError(f"control {control.id} is declared twice; accepted: unique ids")
            seen.add(control.id)
        return controls


def parse_controls(data: Any, source: str = "governance/controls.yaml") -> Controls:
    try:
        return Controls.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            message = f"unknown key; accepted keys: {', '.join(Control.model_fields)}"
        elif error["type"] == "missing":
            message = "missing; this key is required"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        raise BadInput(f"{source}: {where}: {message}") from None


def load_controls(path: Path = CONTROLS_PATH) -> Controls:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BadInput(f"{path.name}: unreadable ({exc.strerror})") from None
    except yaml.YAMLError:
        raise BadInput(f"{path.name}: not valid YAML; fix the file and run again") from None
    return parse_controls(data, f"governance/{path.name}")


@cache
def controls() -> Controls:
    return load_controls()


def render(matrix: Controls) -> str:
    """The controls table of governance/controls.md."""
    lines = [
        "| control | what it ensures | frameworks | enforced by | evidence |",
        "|---|---|---|---|---|",
    ]
    for c in matrix.controls:
        enforced = ", ".join(f"`{p}`" for p in c.enforced_by)
        evidence = "<br>".join(f"`{cmd}`" for cmd in (c.evidence, *c.also))
        lines.append(f"| {c.id} | {c.title} | {', '.join(c.frameworks)} | {enforced} | {evidence} |")
    return "\n".join(lines) + "\n"
