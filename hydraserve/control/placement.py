"""A placement plan as an instance records it, and the plan of its consolidation (pure).

The planner's :class:`~hydraserve.planner.types.Plan` is turned into an
:class:`InstancePlan` once and kept with the instance (JSON on its Service on Kubernetes;
in memory in the local backend), so every later decision about the instance (its stages,
nodes, the all-card worker a consolidation runs on) reads the same record.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from hydraserve.api.models import ColdStartPrediction
from hydraserve.planner.types import Plan, per_device_bytes


class StagePlan(BaseModel):
    rank: int
    node: str
    gpu: int  # its first GPU (the only one at tp = 1)
    start_layer: int
    end_layer: int
    memory_bytes: int  # in all, over its GPUs (each holds an equal share)
    all_card: bool
    fetch_bytes: int
    from_cache: bool = False
    gpu_type: str = "generic"
    # Its GPUs on the node, one per tensor-parallel rank; empty (a record written before
    # tensor parallelism) means ``[gpu]``.
    gpus: list[int] = Field(default_factory=list)

    @property
    def layers(self) -> str:
        return f"{self.start_layer}-{self.end_layer}"

    @property
    def devices(self) -> list[int]:
        return list(self.gpus) or [self.gpu]

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def memory_per_gpu_bytes(self) -> int:
        return per_device_bytes(self.memory_bytes, self.tp)


class InstancePlan(BaseModel):
    """A placement plan as it is recorded on the instance (JSON in an annotation)."""

    pp: int = Field(ge=1, le=4)
    tp: int = Field(default=1, ge=1, le=8)  # GPUs per stage, all on the stage's node
    stages: list[StagePlan]
    predicted_ttft_s: float = 0.0
    predicted_tpot_s: float = 0.0
    # The cost model's named terms (planner Prediction.terms): what calibration compares
    # the measured cold start with.
    terms: dict[str, float] = Field(default_factory=dict)
    reason: str = ""
    # Why this pipeline has no all-card stage, so cannot consolidate ("" when it has one).
    no_consolidation: str = ""

    @classmethod
    def from_plan(cls, plan: Plan) -> InstancePlan:
        return cls(
            pp=plan.pp,
            tp=plan.tp,
            stages=[
                StagePlan(
                    rank=s.rank,
                    node=s.node,
                    gpu=s.gpu,
                    start_layer=s.start_layer,
                    end_layer=s.end_layer,
                    memory_bytes=s.memory_bytes,
                    all_card=s.all_card,
                    fetch_bytes=s.fetch_bytes,
                    from_cache=s.from_cache,
                    gpu_type=s.gpu_type,
                    gpus=list(s.devices),
                )
                for s in sorted(plan.stages, key=lambda s: s.rank)
            ],
            predicted_ttft_s=plan.prediction.ttft_s,
            predicted_tpot_s=plan.prediction.tpot_s,
            terms={k: v for k, v in plan.prediction.terms.items() if math.isfinite(v)},
            reason=plan.reason,
            no_consolidation=plan.no_consolidation,
        )

    def prediction(self) -> ColdStartPrediction | None:
        """The prediction as status shows it; None for a plan made without the planner
        (forced pp, a standalone)."""
        if not self.terms:
            return None
        t = self.terms
        ready = t.get("startup_s", 0.0) + t.get("serial_load_s", 0.0) + t.get("post_fetch_s", 0.0)
        types = {s.gpu_type for s in self.stages}
        return ColdStartPrediction(
            gpu_type=types.pop() if len(types) == 1 else None,
            ttft_seconds=self.predicted_ttft_s,
            ready_seconds=ready,
            tpot_seconds=self.predicted_tpot_s,
            terms=dict(t),
        )

    def stage(self, rank: int) -> StagePlan:
        for s in self.stages:
            if s.rank == rank:
                return s
        raise KeyError(f"plan has no stage {rank}")


def all_card_stage(plan: InstancePlan | None) -> StagePlan | None:
    """The stage whose GPUs can hold the whole model: where the standalone engine runs
    (on the same node and GPUs). None for pp = 1, and for a pipeline planned without one
    (``InstancePlan.no_consolidation`` says why)."""
    if plan is None or plan.pp <= 1:
        return None
    return next((s for s in plan.stages if s.all_card), None)


def kv_hand_over(plan: InstancePlan, enabled: bool) -> bool:
    """Whether an instance's engines load the KV connector: only when every stage runs on
    one node, since saved KV moves through that node's shared memory (decision 0400). A
    pipeline across nodes hands its streams over by recompute."""
    return enabled and len({s.node for s in plan.stages}) == 1


def standalone_plan(pipeline: InstancePlan) -> InstancePlan:
    """pp = 1 on the all-card stage's node and GPUs (all ``tp`` of them), with one
    replica's memory (what the all-card stage holds; the pipeline's memory is given back
    when it is released)."""
    stage = all_card_stage(pipeline)
    if stage is None:
        why = pipeline.no_consolidation or "no stage holds a whole replica"
        raise ValueError(f"the pipeline has no all-card stage to consolidate on: {why}")
    last = max(s.end_layer for s in pipeline.stages)
    return InstancePlan(
        pp=1,
        tp=pipeline.tp,
        stages=[
            StagePlan(
                rank=0,
                node=stage.node,
                gpu=stage.gpu,
                gpus=list(stage.devices),
                start_layer=0,
                end_layer=last,
                memory_bytes=stage.memory_bytes,
                all_card=True,
                fetch_bytes=sum(s.fetch_bytes for s in pipeline.stages) - stage.fetch_bytes,
                from_cache=True,
            )
        ],
        predicted_ttft_s=pipeline.predicted_ttft_s,
        predicted_tpot_s=pipeline.predicted_tpot_s,
        reason=f"consolidates {pipeline.pp}-stage pipeline on {stage.node}",
    )
