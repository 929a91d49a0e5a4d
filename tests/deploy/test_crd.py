"""The ServerlessModel CRD: generated from the models, structural, and it accepts the examples
and rejects invalid objects with messages that say what is wrong.

The API server's checks are reproduced offline: the OpenAPI v3.0 schema with jsonschema
(draft 4 semantics, ``nullable``, strict field validation as ``kubectl`` does by default)
and the CEL rules (``x-kubernetes-validations``) with cel-python.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from hydraserve.api.crd import CRD_PATH, build_crd, render_crd
from hydraserve.api.models import ServerlessModel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
CHART_CRD = ROOT / "deploy" / "helm" / "hydraserve" / "crds" / "serverlessmodel.yaml"

# What a structural schema may carry (apiextensions v1 JSONSchemaProps, minus what the
# structural rules forbid at these positions).
ALLOWED_KEYWORDS = {
    "type", "description", "nullable", "default", "required", "properties", "items",
    "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "format", "additionalProperties",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
}  # fmt: skip


def schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def to_json_schema(node: Any, strict: bool = True) -> Any:
    """OpenAPI v3.0 (as the API server reads it) -> draft-4 JSON Schema for jsonschema."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if "properties" in out:
        out["properties"] = {
            # metadata is ObjectMeta, checked by the server itself beyond name.
            k: to_json_schema(v, strict=k != "metadata")
            for k, v in node["properties"].items()
        }
        # Strict field validation (kubectl's default): unknown fields are errors.
        if strict and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def with_defaults(node: dict[str, Any], value: Any) -> Any:
    """The object after the API server's defaulting (defaults apply inside existing objects)."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for name, sub in (node.get("properties") or {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = with_defaults(sub, out[name])
    return out


def cel_errors(node: dict[str, Any], value: Any, where: str) -> list[str]:
    """Evaluate every x-kubernetes-validations rule as the API server would."""
    errors: list[str] = []
    if value is None:
        return errors
    for rule in node.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{where}: {rule.get('message', rule['rule'])}")
    for name, sub in (node.get("properties") or {}).items():
        if isinstance(value, dict):
            errors += cel_errors(sub, value.get(name), f"{where}.{name}".lstrip("."))
    return errors


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(to_json_schema(schema()))
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]
    if errors:  # the server stops before CEL when the schema already fails
        return errors
    return cel_errors(schema(), with_defaults(schema(), obj), "")


def test_committed_crd_is_generated_from_the_models() -> None:
    assert CRD_PATH.read_text() == render_crd(), (
        "crds/serverlessmodel.yaml is stale: python -m hydraserve.api.crd --write"
    )
    assert CHART_CRD.read_text() == render_crd(), (
        "the chart's CRD copy differs: cp crds/serverlessmodel.yaml deploy/helm/hydraserve/crds/"
    )


def test_crd_is_a_valid_customresourcedefinition() -> None:
    kubernetes_validate.validate(build_crd(), "1.31.0", strict=True)


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        found += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    return found


def test_crd_schema_is_structural() -> None:
    for path, node in _walk(schema()):
        assert set(node) <= ALLOWED_KEYWORDS, f"{path}: {set(node) - ALLOWED_KEYWORDS}"
        assert "type" in node, f"{path}: every node needs a type"
        if "properties" in node:
            assert node["type"] == "object" and "additionalProperties" not in node, path
        if node.get("exclusiveMinimum") is not None:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            # A default must itself be valid (the API server checks them).
            jsonschema.Draft4Validator(to_json_schema(node)).validate(node["default"])
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), path


def test_crd_subresources_and_columns() -> None:
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Replicas"] == ".status.replicas"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Last-Cold-Start"] == ".status.lastColdStartSeconds"
    assert columns["Age"] == ".metadata.creationTimestamp"
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["pipeline"]["properties"]["maxSize"]["maximum"] == 4
    assert spec["pipeline"]["properties"]["maxSize"]["minimum"] == 1
    assert spec["parallelism"]["properties"]["tensor"]["enum"] == [1, 2, 4, 8]
    assert spec["parallelism"]["properties"]["tensor"]["default"] == 1
    assert columns["TP"] == ".spec.parallelism.tensor"
    assert (
        spec["slo"]["default"] == {} and spec["slo"]["properties"]["ttftSeconds"]["default"] == 10
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd_schema_and_the_models(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert api_server_errors(obj) == []
    ServerlessModel.model_validate(obj)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_fail_with_the_expected_message(path: Path) -> None:
    expected = next(
        line.split("expect:", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    )
    errors = api_server_errors(yaml.safe_load(path.read_text()))
    assert any(expected in e for e in errors), f"{path.name}: want {expected!r} in {errors}"


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 3 and len(INVALID) >= 6
