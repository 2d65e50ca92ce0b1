"""The environment model: every shipped definition loads; every bad field stops with one line naming it."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from opskit import model
from opskit.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
LOCAL = yaml.safe_load((ROOT / "environments" / "local.yaml").read_text())
PRODUCTION = yaml.safe_load((ROOT / "stacks" / "Pulumi.production.yaml").read_text())["config"][
    model.PULUMI_CONFIG_KEY
]


def rejected(name: str, data: dict[str, Any]) -> str:
    with pytest.raises(BadInput) as caught:
        model.parse_environment(name, data)
    message = str(caught.value)
    assert "\n" not in message
    return message


def changed(base: dict[str, Any], *path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(base)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize("name", ["local", "staging", "production"])
def test_shipped_environments_load(name: str) -> None:
    env = model.load_environment(name)
    assert env.name == name
    assert env.kind == ("local" if name == "local" else "kubernetes")


def test_production_differs_from_staging_in_what_the_model_says() -> None:
    staging, production = model.load_environment("staging"), model.load_environment("production")
    assert production.service.replicas.min >= model.PRODUCTION_MIN_REPLICAS
    assert production.components["postgres"].instances == 3
    assert staging.components["postgres"].instances == 1
    assert production.deploy.ticket_required and not staging.deploy.ticket_required


def test_unknown_key_names_it_and_lists_the_accepted_keys() -> None:
    message = rejected("local", {**LOCAL, "colour": "blue"})
    assert message.startswith("environment local: colour: unknown key; accepted keys: backup, components")


def test_unknown_nested_key_names_its_full_path() -> None:
    data = changed(LOCAL, "deploy", "analysis", "windw_s", value=3)
    message = rejected("local", data)
    assert "deploy.analysis.windw_s: unknown key" in message
    assert "window_s" in message


def test_unknown_key_in_a_dict_value_or_list_item_lists_that_item_keys() -> None:
    component = changed(LOCAL, "components", "postgres", "colour", value="blue")
    assert (
        "environment local: components.postgres.colour: unknown key; "
        "accepted keys: instances, storage_gi, version"
    ) in rejected("local", component)
    topic = copy.deepcopy(PRODUCTION)
    topic["platform"]["kafka"]["topics"][1]["colour"] = "blue"
    assert rejected("production", topic) == (
        "environment production: platform.kafka.topics.1.colour: unknown key; "
        "accepted keys: name, partitions, retention_hours"
    )


def test_wrong_type_names_field() -> None:
    message = rejected("local", changed(LOCAL, "ports", "redis", value="six"))
    assert message.startswith("environment local: ports.redis: 'six'")
    assert "integer" in message


def test_two_services_on_one_port() -> None:
    message = rejected("local", changed(LOCAL, "ports", "green", value=LOCAL["ports"]["blue"]))
    assert "ports.green" in message and "already used by ports.blue" in message


def test_port_out_of_range() -> None:
    assert "ports.edge: 80" in rejected("local", changed(LOCAL, "ports", "edge", value=80))


def test_production_replicas_below_minimum() -> None:
    data = changed(PRODUCTION, "service", "replicas", "min", value=1)
    message = rejected("production", data)
    assert message == (
        "environment production: service.replicas.min: 1 is below the production minimum; accepted: 2 or more"
    )


def test_malformed_version() -> None:
    message = rejected("local", changed(LOCAL, "service", "version", value="v1"))
    assert message.startswith("environment local: service.version: 'v1' does not match the version pattern")


def test_unknown_component_and_literal_choices() -> None:
    assert "components.mongodb: 'mongodb' is not accepted" in rejected(
        "local", changed(LOCAL, "components", "mongodb", value={"version": "7"})
    )
    assert "backup.compression: 'lz4' is not accepted; accepted: 'none', 'gzip' or 'zstd'" in rejected(
        "local", changed(LOCAL, "backup", "compression", value="lz4")
    )


def test_slo_objective_must_be_a_fraction() -> None:
    assert "service.slo.availability: 1.5" in rejected(
        "local", changed(LOCAL, "service", "slo", "availability", value=1.5)
    )


def test_missing_required_key() -> None:
    data = copy.deepcopy(LOCAL)
    del data["ports"]
    assert "ports: missing" in rejected("local", data)


def test_faults_only_on_local() -> None:
    data = changed(PRODUCTION, "faults", value={"error_rate": 0.5})
    assert "faults: fault injection is accepted on local environments only" in rejected("production", data)


def test_unknown_environment_lists_the_known_ones() -> None:
    with pytest.raises(
        BadInput, match=r"--env: unknown environment 'qa'; accepted: local, production, staging"
    ):
        model.load_environment("qa")


def test_path_as_environment_name_is_refused() -> None:
    with pytest.raises(BadInput, match="is not an environment name"):
        model.load_environment("../etc/passwd")


def test_kubernetes_environment_is_not_local() -> None:
    with pytest.raises(BadInput, match="staging is a kubernetes environment"):
        model.load_environment("staging").require_local()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["status", "--env", "qa"], "error: --env: unknown environment 'qa'"),
        (["health", "--env", "local", "--color", "purple"], "error: --color: 'purple' is not a color"),
        (["local.up", "--env", "production"], "error: --env: production is a kubernetes environment"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
