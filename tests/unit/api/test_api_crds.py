"""CRD generation: crds/ is current, generation is deterministic, schemas are structural and every
rule, column and description a user sees is wired to a real field.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

import secondsite.api
from secondsite.api import (
    KINDS,
    VIRTUAL_PROTECTION_GROUP,
    ApiModel,
    Kind,
    VirtualProtectionGroupSpec,
)
from secondsite.api.crd import (
    KUSTOMIZATION,
    SchemaError,
    check_crds,
    crd_file_name,
    crd_manifest,
    render_crds,
    structural_schema,
    write_crds,
)
from secondsite.cli import REPO_CRDS, main

REPO = Path(__file__).resolve().parents[3]
API_DIR = REPO / "secondsite" / "api"

# Keywords of apiextensions.k8s.io/v1 JSONSchemaProps that the generated schemas may use.
ALLOWED = {
    "type", "format", "description", "properties", "required", "items", "additionalProperties",
    "enum", "default", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
    "maxItems", "minProperties", "maxProperties", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations",
}  # fmt: skip


def schema_of(kind: Kind) -> dict[str, Any]:
    schema: dict[str, Any] = crd_manifest(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, e.g. `.spec.volumes.names[]`."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from nodes(schema[key], f"{path}[]")


_NODES = [(kind, path, node) for kind in KINDS for path, node in nodes(schema_of(kind))]
ALL_NODES = [pytest.param(*node, id=f"{node[0].kind}{node[1]}") for node in _NODES]
SPEC_NODES = [
    pytest.param(*node, id=f"{node[0].kind}{node[1]}")
    for node in _NODES
    if node[1].startswith(".spec")
]


# --- crds/ and the command ----------------------------------------------------------------------


def test_committed_crds_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert REPO_CRDS == REPO / "crds"
    assert main(["crds", "--check"]) == 0, capsys.readouterr().err


def test_check_fails_after_a_model_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CRDs generated before a model change are stale for `crds --check`."""

    class Edited(VirtualProtectionGroupSpec):
        """What is protected, where to, and how."""

        replicas: int = Field(default=1, ge=1)
        """How many recovery sites (a field added by the change)."""

    before = [
        dataclasses.replace(kind, spec=Edited) if kind is VIRTUAL_PROTECTION_GROUP else kind
        for kind in KINDS
    ]
    write_crds(tmp_path, before)
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"stale: {crd_file_name(VIRTUAL_PROTECTION_GROUP)}" in err
    assert err.count("stale:") == 1
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0


def test_check_reports_missing_and_extra_files(tmp_path: Path) -> None:
    write_crds(tmp_path)
    assert check_crds(tmp_path) == []
    (tmp_path / crd_file_name(KINDS[0])).unlink()
    (tmp_path / "notes.yaml").write_text("kind: Something\n")
    assert sorted(check_crds(tmp_path)) == [
        "extra (not generated): notes.yaml",
        f"missing: {crd_file_name(KINDS[0])}",
    ]
    assert check_crds(tmp_path / "absent") == [f"missing: {name}" for name in sorted(render_crds())]


def test_write_removes_crds_of_kinds_that_are_gone_and_nothing_else(tmp_path: Path) -> None:
    write_crds(tmp_path)
    write_crds(tmp_path, KINDS[1:])
    (tmp_path / "README.md").write_text("hand-written\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [*(crd_file_name(kind) for kind in KINDS[1:]), KUSTOMIZATION, "README.md"]
    )
    listed = yaml.safe_load((tmp_path / KUSTOMIZATION).read_text())["resources"]
    assert listed == sorted(crd_file_name(kind) for kind in KINDS[1:])


def test_kustomization_lists_every_crd_and_is_checked(tmp_path: Path) -> None:
    """crds/ is a kustomize base (manifests/base uses it) that `kubectl apply -f` does not read."""
    write_crds(tmp_path)
    kustomization = yaml.safe_load((tmp_path / KUSTOMIZATION).read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == sorted(crd_file_name(kind) for kind in KINDS)
    assert not KUSTOMIZATION.endswith((".yaml", ".yml", ".json"))
    (tmp_path / KUSTOMIZATION).write_text("resources: []\n")
    assert check_crds(tmp_path) == [f"stale: {KUSTOMIZATION}"]
    (tmp_path / KUSTOMIZATION).unlink()
    (tmp_path / "kustomization.yaml").write_text("resources: []\n")
    assert sorted(check_crds(tmp_path)) == [
        "extra (not generated): kustomization.yaml",
        f"missing: {KUSTOMIZATION}",
    ]


def test_generation_is_deterministic_and_parses_back() -> None:
    first, second = render_crds(), render_crds()
    assert first == second
    for kind in KINDS:
        assert yaml.safe_load(first[crd_file_name(kind)]) == crd_manifest(kind)


def test_crds_command_does_not_load_kopf_or_the_kubernetes_client() -> None:
    code = (
        "import sys\n"
        "from secondsite.cli import main\n"
        "status = main(['crds', '--check'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kopf', 'kubernetes'}))\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main([])
    assert exit.value.code == 2
    assert "crds" in capsys.readouterr().err


# --- the CRDs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_crd_names_scope_and_subresources(kind: Kind) -> None:
    spec = crd_manifest(kind)["spec"]
    assert spec["group"] == "secondsite.io"
    assert spec["names"]["categories"] == ["secondsite"]
    assert spec["names"]["plural"] == kind.plural == kind.singular + "s"
    assert [version["name"] for version in spec["versions"]] == ["v1alpha1"]
    assert spec["versions"][0]["subresources"] == {"status": {}}
    assert schema_of(kind)["required"] == ["spec"]


def test_short_names_scopes_and_columns_of_the_issue() -> None:
    expected = {
        "Site": ((), "Cluster", None),
        "ReplicationAppliance": (("vra",), "Cluster", ["Site", "Node", "Ready", "Endpoint"]),
        "VirtualProtectionGroup": (
            ("vpg",),
            "Namespaced",
            ["State", "RPO", "History", "Journal", "Age"],
        ),
        "Journal": ((), "Namespaced", ["VPG", "Used", "History", "Checkpoints"]),
        "Checkpoint": (("ckpt",), "Namespaced", None),
        "RecoveryRequest": (
            ("rr",),
            "Namespaced",
            ["VPG", "Operation", "Phase", "Checkpoint", "RTO", "Age"],
        ),
    }
    for kind in KINDS:
        short_names, scope, columns = expected[kind.kind]
        assert (kind.short_names, kind.scope) == (short_names, scope)
        if columns is not None:
            assert [column.name for column in kind.printer_columns] == columns


@pytest.mark.parametrize(("kind", "path", "node"), ALL_NODES)
def test_schema_is_structural(kind: Kind, path: str, node: dict[str, Any]) -> None:
    assert set(node) <= ALLOWED
    if node.get("x-kubernetes-int-or-string"):
        assert "type" not in node
        assert node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) == [
            {"type": "integer"},
            {"type": "string"},
        ]
    else:
        assert node["type"] in {"object", "array", "string", "integer", "number", "boolean"}
        assert "anyOf" not in node
    if "properties" in node:
        assert "additionalProperties" not in node
        assert set(node.get("required", [])) <= set(node["properties"])
    if node.get("type") == "array":
        assert isinstance(node["items"], dict)


@pytest.mark.parametrize(("kind", "path", "node"), ALL_NODES)
def test_every_field_is_described(kind: Kind, path: str, node: dict[str, Any]) -> None:
    if path.count(".") >= 2 and not path.endswith("[]"):  # below spec and status
        assert node.get("description"), f"{kind.kind}{path} has no docstring"


@pytest.mark.parametrize(("kind", "path", "node"), SPEC_NODES)
def test_spec_sizes_are_bounded_for_cel_costs(kind: Kind, path: str, node: dict[str, Any]) -> None:
    """The API server estimates a rule's cost from the sizes of what it reads: bound them all."""
    if node.get("type") == "string":
        assert "maxLength" in node or "enum" in node or node.get("format") == "date-time"
    if node.get("type") == "array":
        assert "maxItems" in node
    if node.get("type") == "object" and "additionalProperties" in node:
        assert "maxProperties" in node


@pytest.mark.parametrize(("kind", "path", "node"), ALL_NODES)
def test_list_maps_are_keyed_by_required_fields(
    kind: Kind, path: str, node: dict[str, Any]
) -> None:
    if node.get("x-kubernetes-list-type") == "map":
        item = node["items"]
        for key in node["x-kubernetes-list-map-keys"]:
            assert key in item.get("required", []) or "default" in item["properties"][key]
    if node.get("x-kubernetes-list-type") == "set":
        assert node["items"]["type"] in {"string", "integer", "number", "boolean"}


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    for kind in KINDS:
        conditions = schema_of(kind)["properties"]["status"]["properties"].get("conditions")
        if conditions is not None:
            assert conditions["x-kubernetes-list-type"] == "map"
            assert conditions["x-kubernetes-list-map-keys"] == ["type"]
            assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
            assert conditions["items"]["properties"]["status"]["enum"] == [
                "True",
                "False",
                "Unknown",
            ]


@pytest.mark.parametrize(("kind", "path", "node"), ALL_NODES)
def test_rules_name_their_field(kind: Kind, path: str, node: dict[str, Any]) -> None:
    for rule in node.get("x-kubernetes-validations", []):
        assert path.startswith(".spec"), "status is written by the operator, not validated by CEL"
        field_path = rule.get("fieldPath")
        if field_path is not None:
            field = field_path.removeprefix(".")
            assert field in node["properties"], f"{field_path} is not a field of {path}"
            assert field in rule["message"]
        else:
            assert path.rsplit(".", 1)[-1] in rule["message"]


def test_defaults_of_the_issue_are_in_the_crds() -> None:
    spec = schema_of(VIRTUAL_PROTECTION_GROUP)["properties"]["spec"]["properties"]
    assert (spec["checkpointIntervalSeconds"]["default"], spec["rpoAlertSeconds"]["default"]) == (
        5,
        300,
    )
    assert (
        spec["checkpointIntervalSeconds"]["minimum"],
        spec["checkpointIntervalSeconds"]["maximum"],
    ) == (1, 3600)
    assert (spec["rpoAlertSeconds"]["minimum"], spec["rpoAlertSeconds"]["maximum"]) == (10, 86400)
    assert spec["priority"]["default"] == "Medium"
    assert spec["priority"]["enum"] == ["High", "Medium", "Low"]
    journal = spec["journal"]
    assert journal["default"] == {"history": "24h", "hardLimit": "150Gi", "warningPercent": 75}
    assert journal["properties"]["hardLimit"]["x-kubernetes-int-or-string"] is True
    assert "default" not in str(schema_of(VIRTUAL_PROTECTION_GROUP)["properties"]["status"])


@pytest.mark.parametrize("kind", KINDS, ids=[kind.kind for kind in KINDS])
def test_printer_columns_show_existing_fields(kind: Kind) -> None:
    schema = schema_of(kind)
    for column in kind.printer_columns:
        if column.json_path == ".metadata.creationTimestamp":
            assert column.type == "date"
            continue
        # Paths are plain (.status.rpoSeconds) or pick a condition's status by type (Ready).
        path, _, condition = column.json_path.partition('.conditions[?(@.type=="Ready")]')
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]
        if condition:
            node = node["properties"]["conditions"]["items"]["properties"]["status"]
        if node.get("x-kubernetes-int-or-string") or node.get("format") == "date-time":
            assert column.type == "string", column
        else:
            assert column.type == node["type"], column


class _Union(ApiModel):
    value: int | str = 1
    """A plain union."""


class _Exclusive(ApiModel):
    value: int = Field(default=1, gt=0)
    """A draft-2020 exclusive minimum."""


@pytest.mark.parametrize("model", [_Union, _Exclusive])
def test_unconvertible_schemas_are_refused(model: type[ApiModel]) -> None:
    with pytest.raises(SchemaError, match="value"):
        structural_schema(model.model_json_schema(by_alias=True))


# --- the package --------------------------------------------------------------------------------


def test_api_imports_nothing_else_of_secondsite() -> None:
    for path in API_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("secondsite"):
                    assert name.startswith("secondsite.api"), f"{path.name} imports {name}"


def test_every_model_is_exported() -> None:
    exported = set(secondsite.api.__all__)
    for module in ("site", "appliance", "vpg", "journal", "checkpoint", "recovery", "common"):
        namespace = vars(__import__(f"secondsite.api.{module}", fromlist=["_"]))
        for name, value in namespace.items():
            defined_here = getattr(value, "__module__", None) == f"secondsite.api.{module}"
            if isinstance(value, type) and issubclass(value, ApiModel) and defined_here:
                assert name in exported, name
    assert all(hasattr(secondsite.api, name) for name in exported)
