"""Reading a user's spec: what is wrong with it, and the replicas it asks for (pure)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from hydraserve.api.models import ServerlessModelSpec


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field (``spec.slo.ttftSeconds: ...``)."""
    problems = []
    for err in exc.errors():
        where = "spec." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "spec"
        given = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        problems.append(f"{where}: {err['msg']}{given}")
    return "; ".join(problems) + ". Fix the spec and apply it again."


def spec_errors(raw_spec: Any) -> str | None:
    """None when the spec is valid, else what to fix."""
    try:
        ServerlessModelSpec.model_validate(raw_spec)
    except ValidationError as exc:
        return format_validation_error(exc)
    return None


def desired_replicas(spec: ServerlessModelSpec) -> int:
    """spec.replicas (the gateway's ask), bounded by the scaling limits."""
    scaling = spec.scaling
    asked = scaling.min_replicas if spec.replicas is None else spec.replicas
    return max(scaling.min_replicas, min(asked, scaling.max_replicas))
