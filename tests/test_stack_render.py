"""`invoke stack.render` and `stack.check` as plain functions: deterministic manifests, real validators."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import pytest
import yaml

from opskit import stack
from opskit.errors import BadInput


@pytest.fixture(scope="module")
def checks() -> dict[str, stack.CheckReport]:
    """One full check (kubernetes-validate, policies, checkov) per stack for the whole module."""
    return {name: stack.check(name) for name in stack.STACKS}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize("name", stack.STACKS)
def test_render_writes_one_file_per_object_deterministically(tmp_path: Path, name: str) -> None:
    first = stack.render(name, tmp_path / "a")
    second = stack.render(name, tmp_path / "b")
    assert first.objects == second.objects == len(first.files) > 100
    assert sorted(
        p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.yaml")
    ) == sorted([*first.files, *(f"_helm/{r['name']}.yaml" for r in first.helm_releases)])
    for relative in first.files:
        assert filecmp.cmp(tmp_path / "a" / relative, tmp_path / "b" / relative, shallow=False), relative
    again = stack.render(name, tmp_path / "a")  # a previous render is replaced, byte for byte
    assert again.files == first.files


def test_rendered_objects_carry_cluster_names_and_integers(tmp_path: Path) -> None:
    stack.render("production", tmp_path)
    deployment = load(tmp_path / "maximus-production" / "deployment-hitl-blue.yaml")
    assert deployment["metadata"] == {
        **deployment["metadata"],
        "name": "hitl-blue",
        "namespace": "maximus-production",
    }
    assert deployment["spec"]["replicas"] == 2 and isinstance(deployment["spec"]["replicas"], int)
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert port == 8000 and isinstance(port, int)
    secret = load(tmp_path / "maximus-production-data" / "secret-maximus-redis-auth.yaml")
    assert secret["stringData"] == {
        "password": "(secret)",
        "auth.conf": "(secret)",
        "exporter-auth.json": "(secret)",
    }
    cluster = load(tmp_path / "maximus-production-data" / "cluster-maximus-postgres.yaml")
    assert cluster["spec"]["instances"] == 3 and isinstance(cluster["spec"]["instances"], int)
    namespace = load(tmp_path / "_cluster" / "namespace-maximus-production.yaml")
    assert "namespace" not in namespace["metadata"]
    release = load(tmp_path / "_helm" / "maximus-monitoring.yaml")
    assert (
        release["version"] == "65.1.1"
        and release["values"]["prometheus"]["prometheusSpec"]["retention"] == "30d"
    )
    text = "".join(p.read_text() for p in tmp_path.rglob("*.yaml"))
    assert stack.PLACEHOLDER not in text


def test_render_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match=r"^--out: .* is not empty; accepted: a new or empty directory"):
        stack.render("staging", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_render_and_check_refuse_an_unknown_stack(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^--stack: 'dev' is not a stack; accepted: staging, production$"):
        stack.render("dev", tmp_path)
    with pytest.raises(BadInput, match=r"accepted: staging, production$"):
        stack.check("dev")


@pytest.mark.parametrize("name", stack.STACKS)
def test_check_passes_with_zero_failures(checks: dict[str, stack.CheckReport], name: str) -> None:
    report = checks[name]
    assert report.failures == []
    assert report.ok
    assert report.schema_validated > 80 and report.custom_objects > 20
    assert report.checkov_passed > 400
    assert report.helm_releases == 7 and report.policies == 11
    summary = report.as_dict()
    assert summary["ok"] is True and summary["stack"] == name
    assert set(summary["seconds"]) == {"render", "schema", "policy", "checkov", "total"}


@pytest.mark.parametrize("name", stack.STACKS)
def test_every_checkov_skip_is_an_annotation_with_a_reason(
    checks: dict[str, stack.CheckReport], name: str
) -> None:
    skipped = checks[name].checkov_skipped
    assert skipped, "the image-digest skips are expected"
    for skip in skipped:
        assert skip["reason"].strip(), skip
    assert {s["check"] for s in skipped} == {"CKV_K8S_43"}


def test_check_stops_on_a_stack_file_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (stack.STACKS_DIR / "Pulumi.production.yaml").read_text()
    broken = text.replace("  maximus:redisPassword:\n    secure:", "  maximus:redisPasswrd:\n    secure:")
    assert broken != text
    (tmp_path / "Pulumi.production.yaml").write_text(broken)
    monkeypatch.setattr(stack, "STACKS_DIR", tmp_path)
    with pytest.raises(BadInput, match=r"^config maximus:redisPassword: missing secret"):
        stack.check("production")
    with pytest.raises(BadInput, match=r"^config maximus:redisPassword: missing secret"):
        stack.render("production", tmp_path / "out")


def test_kubernetes_validate_catches_an_unknown_field() -> None:
    report = stack.CheckReport(stack="staging")
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "y"},
        "data": {"a": "b"},
        "dta": {},
    }
    stack.validate_schemas([bad], report)
    assert [f.rule for f in report.failures] == ["kubernetes-validate"]


def test_checkov_catches_an_unbounded_privileged_pod(tmp_path: Path) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "maximus-staging"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    (tmp_path / "pod-bad.yaml").write_text(yaml.safe_dump(pod))
    report = stack.CheckReport(stack="staging")
    stack.run_checkov(tmp_path, report)
    failed = {f.rule for f in report.failures}
    assert {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_8"} <= failed
