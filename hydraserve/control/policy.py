"""Admin policy over tenants' ``ServerlessModel`` specs (pure: spec in, violations out).

The CRD schema rejects what a schema can say (path traversal, image reference syntax,
bounds); this is the rest, which depends on who asks: which images may run, which engine
arguments a tenant may pass, where its weights may come from, and how much it may use.
A spec that breaks a rule gets the ``PolicyViolation`` condition naming the rule, and the
backend creates nothing for it (decision 0501).

Rules are per namespace: ``namespaces`` maps a namespace (or ``"*"``, the default for all
others) to a :class:`NamespacePolicy`. The defaults are safe for a shared cluster: only
the platform's own worker image, S3 sources only, engine arguments from a short allowlist,
and nothing that runs code from the model repository or overrides what HydraServe
manages.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from hydraserve.api.models import ServerlessModelSpec, engine_flags

# Rule names: what a PolicyViolation message starts with, one per rule.
RULE_IMAGE: Final = "allowedImages"
RULE_ENGINE_ARG: Final = "engineArgs"
RULE_SOURCE: Final = "allowedSources"
RULE_MAX_REPLICAS: Final = "maxReplicasPerModel"
RULE_MAX_GPU_MEMORY: Final = "maxGpuMemoryGiBPerModel"
RULE_MAX_MODELS: Final = "maxModels"

# Engine arguments a tenant may pass by default: tuning that changes neither what code
# runs nor what HydraServe manages (model, loading, parallelism, addresses, KV transfer).
DEFAULT_ALLOWED_ENGINE_ARGS: Final = (
    "--max-model-len",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--max-seq-len-to-capture",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--dtype",
    "--seed",
    "--gpu-memory-utilization",
    "--kv-cache-dtype",
    "--enforce-eager",
    "--max-logprobs",
    "--disable-log-stats",
    "--generation-config",
    "--override-generation-config",
    "--tokenizer-mode",
    "--swap-space",
    "--guided-decoding-backend",
)

# Never allowed unless an admin lists them for a namespace: they run code from the model
# repository or take over what HydraServe decides. Listed so the message can say why.
MANAGED_ENGINE_ARGS: Final = {
    "--trust-remote-code": "runs Python code from the model repository inside the worker",
    "--load-format": "HydraServe loads the weights (zero-copy from the node's memory)",
    "--model-loader-extra-config": "HydraServe configures its loader",
    "--model": "the model is spec.source",
    "--tokenizer": "the tokenizer comes with spec.source",
    "--revision": "the revision is spec.source.revision",
    "--download-dir": "weights come from the node's prefetcher",
    "--host": "HydraServe chooses the worker's address",
    "--port": "HydraServe chooses the worker's port",
    "--pipeline-parallel-size": "the planner chooses the pipeline size",
    "-pp": "the planner chooses the pipeline size",
    "--tensor-parallel-size": "the planner chooses the parallelism",
    "-tp": "the planner chooses the parallelism",
    "--distributed-executor-backend": "HydraServe runs the stages",
    "--kv-transfer-config": "HydraServe configures KV hand-over",
    "--block-size": "HydraServe sets it when KV caches move between engines",
    "--served-model-name": "the gateway names the model",
    "--worker-cls": "selects code to run in the worker",
    "--worker-extension-cls": "selects code to run in the worker",
}


class NamespacePolicy(BaseModel):
    """What one namespace's models may do. Patterns are shell-style (``fnmatch``)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    allowed_images: list[str] | None = Field(
        default=None,
        description="Worker images a model may choose (spec.engine.image); None: only the "
        "platform's configured worker image.",
    )
    allowed_engine_args: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_ENGINE_ARGS),
        description="Engine flags a model may pass (spec.engine.args), e.g. '--max-model-len'.",
    )
    allowed_sources: list[str] = Field(
        default_factory=lambda: ["s3://*"],
        description="Source URIs a model may load (spec.source.uri): patterns such as "
        "'s3://models/team-a/*'. file:// and paths only where listed.",
    )
    max_models: int | None = Field(default=None, ge=0, description="Models per namespace.")
    max_replicas_per_model: int | None = Field(default=None, ge=0)
    max_gpu_memory_gib_per_model: float | None = Field(
        default=None, gt=0, alias="maxGpuMemoryGiBPerModel"
    )


class TenancySettings(BaseModel):
    """Admin policy, per namespace (``"*"``: every namespace not listed)."""

    tenancy: dict[str, NamespacePolicy] = Field(
        default_factory=lambda: {"*": NamespacePolicy()},
        description="Namespace (or '*') -> policy; an exact namespace entry wins over '*'.",
    )

    def policy_for(self, namespace: str) -> NamespacePolicy:
        found = self.tenancy.get(namespace) or self.tenancy.get("*")
        return found if found is not None else NamespacePolicy()


@dataclass(frozen=True)
class Violation:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def check_spec(
    spec: ServerlessModelSpec,
    policy: NamespacePolicy,
    platform_image: str,
    models_ahead: int = 0,
) -> list[Violation]:
    """Every rule ``spec`` breaks under ``policy``; empty when it may run.

    ``models_ahead``: models of the same namespace that come before this one (older, or
    the same age and a smaller name), so that a quota keeps the first ones running.
    """
    violations: list[Violation] = []
    image = spec.engine.image
    if image is not None and image != platform_image:
        allowed = policy.allowed_images or []
        if not _matches(image, allowed):
            violations.append(
                Violation(
                    RULE_IMAGE,
                    f"image {image!r} is not allowed in this namespace (allowed: "
                    f"{[platform_image, *allowed]}); remove spec.engine.image or ask an "
                    "admin to allow it.",
                )
            )
    for flag in engine_flags(spec.engine.args):
        if flag in policy.allowed_engine_args:
            continue
        why = MANAGED_ENGINE_ARGS.get(flag, "it is not on the namespace's allowlist")
        violations.append(
            Violation(
                RULE_ENGINE_ARG,
                f"engine argument {flag} is not allowed ({why}); remove it from "
                "spec.engine.args or ask an admin to allow it for this namespace.",
            )
        )
    uri = spec.source.uri
    if not _matches(uri, policy.allowed_sources):
        violations.append(
            Violation(
                RULE_SOURCE,
                f"source {uri!r} is outside what this namespace may load "
                f"(allowed: {policy.allowed_sources}).",
            )
        )
    limit = policy.max_replicas_per_model
    if limit is not None and max(spec.scaling.max_replicas, spec.scaling.min_replicas) > limit:
        violations.append(
            Violation(
                RULE_MAX_REPLICAS,
                f"scaling.maxReplicas {spec.scaling.max_replicas} exceeds the namespace's "
                f"limit of {limit}.",
            )
        )
    gib = policy.max_gpu_memory_gib_per_model
    if gib is not None and spec.resources.gpu_memory_gi_b > gib:
        violations.append(
            Violation(
                RULE_MAX_GPU_MEMORY,
                f"resources.gpuMemoryGiB {spec.resources.gpu_memory_gi_b:g} exceeds the "
                f"namespace's limit of {gib:g} GiB per model.",
            )
        )
    if policy.max_models is not None and models_ahead >= policy.max_models:
        violations.append(
            Violation(
                RULE_MAX_MODELS,
                f"the namespace already has {models_ahead} models and may have "
                f"{policy.max_models}; delete one to serve this one.",
            )
        )
    return violations


def describe(violations: Sequence[Violation]) -> str:
    """One message for the condition: every broken rule, by name."""
    return "; ".join(str(v) for v in violations)


def models_ahead(name: str, created: str | None, others: Sequence[tuple[str, str | None]]) -> int:
    """How many of a namespace's other models (name, creationTimestamp) come before this
    one: older first, then by name (a model without a timestamp sorts last)."""
    key = (created or "~", name)
    return sum(1 for n, c in others if n != name and (c or "~", n) < key)
