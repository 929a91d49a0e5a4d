"""Generate the ``ServerlessModel`` CustomResourceDefinition from the pydantic models.

The pydantic classes in :mod:`hydraserve.api.models` are the one source of truth; this
module turns their JSON Schema (draft 2020-12, with ``$ref``/``anyOf``) into the
*structural* OpenAPI v3.0 subset that the API server accepts: references inlined,
``Optional`` as ``nullable``, numeric exclusive bounds in their boolean form, no titles,
``default: {}`` on optional sub-objects so the server fills in their defaults.

``python -m hydraserve.api.crd > crds/serverlessmodel.yaml`` regenerates the committed file
(``--check`` says whether it is current); ``tests/deploy`` fails when they disagree.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from hydraserve.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    MODEL_NAME_PATTERN,
    PLURAL,
    VERSION,
    ServerlessModelSpec,
    ServerlessModelStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
SINGULAR = "serverlessmodel"
SHORT_NAMES = ["sm", "smodel"]
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "serverlessmodel.yaml"

# Keywords of JSON Schema that a structural CRD schema must not carry (or that mean
# nothing to the API server); ``$defs``/``$ref`` are inlined before this filter runs.
_DROPPED_KEYWORDS = {"title", "$defs", "examples", "const", "discriminator"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {
        "name": "Desired",
        "type": "integer",
        "jsonPath": ".spec.replicas",
        "description": "Replicas asked for (by the gateway through the scale subresource).",
    },
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {
        "name": "Last-Cold-Start",
        "type": "number",
        "jsonPath": ".status.lastColdStartSeconds",
        "description": "Seconds from request to ready of the latest cold start.",
    },
    {
        "name": "TP",
        "type": "integer",
        "jsonPath": ".spec.parallelism.tensor",
        "description": "GPUs of one node each worker uses (tensor parallelism).",
        "priority": 1,
    },
    {"name": "Source", "type": "string", "jsonPath": ".spec.source.uri", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve_refs({**target, **siblings}, defs)
    return {key: _resolve_refs(value, defs) for key, value in node.items()}


def _structural(node: Any) -> Any:
    """Rewrite one (ref-free) JSON Schema node into the OpenAPI v3.0 structural subset."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    # Optional[X] -> X + nullable; pydantic writes it as anyOf [X, {type: null}].
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {any_of!r} in a structural schema")
        node = {**non_null[0], **node, "nullable": True}
        if node.get("default", 0) is None:
            del node["default"]
    # allOf with one member is how older pydantic wraps a described $ref.
    all_of = node.pop("allOf", None)
    if all_of is not None:
        if len(all_of) != 1:
            raise ValueError(f"cannot express allOf {all_of!r} in a structural schema")
        node = {**all_of[0], **node}
    for bound, keyword in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[keyword] = node[bound]
            node[bound] = True
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    # Unknown fields are pruned (and rejected by strict field validation) by the server;
    # additionalProperties: false is not allowed next to properties.
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, sub in out["properties"].items():
            # Let the server default a missing optional sub-object, so its fields' defaults
            # apply too (defaults only apply inside objects that exist).
            if (
                name not in required
                and sub.get("type") == "object"
                and "properties" in sub
                and not sub.get("required")
                and "default" not in sub
            ):
                sub["default"] = {}
    return out


_KEY_ORDER = ("type", "description", "nullable", "default", "required", "properties", "items")


def _ordered(node: Any) -> Any:
    """Readable, stable key order: type and description first, the rest alphabetically."""
    if isinstance(node, list):
        return [_ordered(item) for item in node]
    if not isinstance(node, dict):
        return node

    def rank(key: str) -> tuple[int, str]:
        return (_KEY_ORDER.index(key), "") if key in _KEY_ORDER else (len(_KEY_ORDER), key)

    out: dict[str, Any] = {}
    for key in sorted(node, key=rank):
        value = node[key]
        if key == "properties":  # field order as declared in the models
            out[key] = {name: _ordered(sub) for name, sub in value.items()}
        else:
            out[key] = _ordered(value)
    return out


def _strip_defaults(node: Any) -> Any:
    """Status is written by the operator only: defaults there would be noise."""
    if isinstance(node, list):
        return [_strip_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}


def model_schema(model: type[BaseModel], *, defaults: bool = True) -> dict[str, Any]:
    """The structural OpenAPI schema of one pydantic model (wire names, i.e. camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _ordered(_structural(_resolve_refs(raw, defs)))
    return schema if defaults else dict(_strip_defaults(schema))


def open_api_schema() -> dict[str, Any]:
    spec = model_schema(ServerlessModelSpec)
    status = model_schema(ServerlessModelStatus, defaults=False)
    return {
        "type": "object",
        "description": "A large language model served from zero replicas with fast cold starts.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only name/generateName may be restricted; names become pod and Service names.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 63, "pattern": MODEL_NAME_PATTERN}
                },
            },
            "spec": spec,
            "status": status,
        },
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "hydraserve"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["hydraserve"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render_crd() -> str:
    header = (
        f"# {KIND} ({API_VERSION}). GENERATED from hydraserve/api/models.py by\n"
        "# `python -m hydraserve.api.crd --write`: edit the models, not this file.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_crd()
    if "--check" in args:
        current = CRD_PATH.read_text() if CRD_PATH.exists() else ""
        if current != text:
            sys.stderr.write(f"{CRD_PATH} is stale: run python -m hydraserve.api.crd --write\n")
            return 1
        return 0
    if "--write" in args:
        CRD_PATH.parent.mkdir(parents=True, exist_ok=True)
        CRD_PATH.write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
