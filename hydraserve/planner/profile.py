"""Planner input from the model store: a :class:`ModelProfile` built from a manifest.

The stage layer ranges and byte counts come from the manifest's precomputed partitions,
the one source of truth the prefetcher and the workers also fetch and load by.
"""

from __future__ import annotations

from collections.abc import Mapping

from hydraserve.api.models import ServerlessModelSpec
from hydraserve.planner.types import SLO, ModelProfile, PlanRequest
from hydraserve.store.manifest import Manifest


def profile_from_manifest(
    manifest: Manifest,
    replica_bytes: int,
    key: str,
    *,
    prefill_s: Mapping[str, float] | None = None,
    tpot_s: Mapping[str, float] | None = None,
) -> ModelProfile:
    """Describe ``manifest``'s model for the planner.

    ``replica_bytes`` is the GPU memory of one whole replica (the spec's
    ``resources.gpuMemoryGiB``, weights plus KV cache); ``key`` identifies the model in the
    prefetchers' host caches (``"<uri>@<revision>"``). Profiled speeds per GPU type are
    optional; without them the planner's configured defaults apply.
    """
    if replica_bytes < manifest.total_bytes:
        raise ValueError(
            f"model {manifest.name}: replica memory {replica_bytes} B is less than its "
            f"weights ({manifest.total_bytes} B)"
        )
    partitions = {
        pp: tuple((s.start_layer, s.end_layer, s.nbytes) for s in stages)
        for pp, stages in sorted(manifest.partitions.items())
    }
    return ModelProfile(
        key=key,
        total_bytes=manifest.total_bytes,
        replica_bytes=replica_bytes,
        partitions=partitions,
        prefill_s=dict(prefill_s or {}),
        tpot_s=dict(tpot_s or {}),
    )


def weights_key(uri: str, revision: str) -> str:
    """Identity of a model's weights in the prefetchers' host caches (``NodeState``)."""
    return f"{uri}@{revision}"


def model_key(spec: ServerlessModelSpec) -> str:
    return weights_key(spec.source.uri, spec.source.revision)


def replica_bytes(spec: ServerlessModelSpec) -> int:
    """GPU memory of one whole replica (weights plus KV cache), from the spec."""
    return int(spec.resources.gpu_memory_gi_b * 2**30)


def plan_request_for(
    spec: ServerlessModelSpec,
    profile: ModelProfile,
    *,
    waited_s: float = 0.0,
    defer_when_busy: bool = False,
) -> PlanRequest:
    """The planner's request for one cold start of a model (SLOs and pipeline cap from its
    spec; ``profile`` from :func:`profile_from_manifest`)."""
    slo = spec.slo
    return PlanRequest(
        model=profile,
        slo=SLO(ttft_s=slo.ttft_seconds, tpot_s=slo.tpot_milliseconds / 1000.0),
        max_pp=min(spec.pipeline.max_size, max(profile.partitions, default=1)),
        waited_s=waited_s,
        defer_when_busy=defer_when_busy,
        tp=spec.parallelism.tensor,
    )


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def kv_bytes_per_token(config: Mapping[str, object]) -> int | None:
    """KV-cache bytes one token occupies in an engine serving this Hugging Face config:
    layers × 2 (K and V) × KV heads × head size × dtype bytes (the cache keeps the model's
    dtype). None when the config lacks what it takes (then only recompute is costed)."""

    def number(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and value > 0 else None

    layers = number("num_hidden_layers")
    heads = number("num_attention_heads")
    hidden = number("hidden_size")
    if layers is None or heads is None or hidden is None:
        return None
    kv_heads = number("num_key_value_heads") or heads
    head_dim = number("head_dim") or hidden // heads
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    size = DTYPE_BYTES.get(str(dtype).removeprefix("torch."))
    if size is None:
        return None
    return layers * 2 * kv_heads * head_dim * size
