"""The operator's one door to the planner, and the model profile it plans with.

``plan_instance`` is the only function the operator calls to place an instance.

TEMPORARY: until ``hydraserve.controller.plan(request, cluster, config=None)`` lands,
``plan_instance`` uses ``standin_plan`` below (pp = 1, best-fit GPU). Switching is a
one-line change in ``plan_instance``; nothing else in the operator depends on the stand-in.
"""

from __future__ import annotations

from collections.abc import Callable

from hydraserve.api.models import ServerlessModelSpec
from hydraserve.controller.types import (
    SLO,
    ClusterState,
    ModelProfile,
    Plan,
    PlanRequest,
    Prediction,
    StagePlacement,
    Unschedulable,
)
from hydraserve.store import Manifest

GIB = 1 << 30
Planner = Callable[[PlanRequest, ClusterState], Plan | Unschedulable]

# Start-up constant of the stand-in's TTFT estimate (container start, imports, engine init).
_STANDIN_STARTUP_S = 20.0


def model_key(uri: str, revision: str) -> str:
    return f"{uri}@{revision}"


def model_profile(spec: ServerlessModelSpec, manifest: Manifest) -> ModelProfile:
    """Sizes from the store's manifest, replica memory from the spec."""
    return ModelProfile(
        key=model_key(spec.source.uri, spec.source.revision),
        total_bytes=manifest.total_bytes,
        replica_bytes=int(spec.resources.gpu_memory_gi_b * GIB),
        partitions={
            pp: tuple((s.start_layer, s.end_layer, s.nbytes) for s in stages)
            for pp, stages in manifest.partitions.items()
        },
    )


def plan_request(spec: ServerlessModelSpec, profile: ModelProfile) -> PlanRequest:
    return PlanRequest(
        model=profile,
        slo=SLO(ttft_s=spec.slo.ttft_seconds, tpot_s=spec.slo.tpot_milliseconds / 1000.0),
        max_pp=min(spec.pipeline.max_size, max(profile.partitions, default=1)),
    )


def standin_plan(request: PlanRequest, cluster: ClusterState) -> Plan | Unschedulable:
    """TEMPORARY stand-in for the controller: one stage on the best-fitting GPU.

    Best fit = the GPU with the least free memory that still holds a whole replica, so
    large free GPUs stay available for large models. Ties go to the faster NIC.
    """
    need = request.model.replica_bytes
    candidates = [
        (gpu.free_bytes, -node.nic_bytes_per_s, node.name, gpu.index, node.nic_bytes_per_s)
        for node in cluster.nodes
        for gpu in node.gpus
        if gpu.free_bytes >= need
    ]
    if not candidates:
        largest = max(
            ((gpu.free_bytes, node.name) for node in cluster.nodes for gpu in node.gpus),
            default=None,
        )
        where = (
            f"the largest free GPU has {largest[0] / GIB:.1f} GiB (node {largest[1]})"
            if largest
            else "no node offers a GPU"
        )
        return Unschedulable(
            reason=f"no GPU has {need / GIB:.1f} GiB free for a whole replica; {where}"
        )
    _, _, node_name, gpu_index, nic = min(candidates)
    layers = request.model.partitions.get(1, ((0, 0, request.model.total_bytes),))[0]
    fetch_s = request.model.total_bytes / nic
    return Plan(
        pp=1,
        stages=(
            StagePlacement(
                rank=0,
                node=node_name,
                gpu=gpu_index,
                start_layer=layers[0],
                end_layer=layers[1],
                memory_bytes=need,
                all_card=True,
                fetch_bytes=request.model.total_bytes,
            ),
        ),
        prediction=Prediction(
            ttft_s=fetch_s + _STANDIN_STARTUP_S,
            tpot_s=request.slo.tpot_s,
            terms={"fetch": fetch_s, "startup": _STANDIN_STARTUP_S},
        ),
        reason="stand-in planner: pp=1 on the best-fitting GPU",
    )


def plan_instance(request: PlanRequest, cluster: ClusterState) -> Plan | Unschedulable:
    """Place one instance. TEMPORARY: the stand-in until the controller's planner lands."""
    return standin_plan(request, cluster)
