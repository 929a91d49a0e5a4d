"""The local backend without engines: planning, store errors, stage configuration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from hydraserve.api.models import Condition, ModelPhase, ServerlessModel
from hydraserve.backends.base import ModelView
from hydraserve.backends.local import LocalBackend, LocalNode, LocalSettings
from hydraserve.backends.local.instance import LocalInstance
from hydraserve.backends.local.processes import split_cores
from hydraserve.control.placement import InstancePlan, StagePlan
from hydraserve.settings import CommonSettings
from hydraserve.store import ModelStore


def model(name: str, uri: str, gib: float = 1.0) -> ServerlessModel:
    return ServerlessModel.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"source": {"uri": uri}, "resources": {"gpuMemoryGiB": gib}},
        }
    )


def settings(tmp_path: Path, budget: int) -> LocalSettings:
    common = CommonSettings(state_dir=tmp_path / "state", shm_dir=tmp_path / "shm")
    # No workers start here: no warm runtime to start either.
    return LocalSettings(common=common, memory_budget_bytes=budget, warm_runtime=False)


async def scaled_view(
    backend: LocalBackend, name: str, done: Callable[[ModelView], bool]
) -> ModelView:
    """Scale the model to one replica and wait until its view satisfies ``done``."""
    await backend.start()
    try:
        await backend.scale(name, 1)
        for _ in range(100):
            await backend.wait_for_change(name, 0.2)
            view = backend.get_model(name)
            assert view is not None
            if done(view):
                return view
        raise AssertionError(f"{name}: the view never got there: {backend.get_model(name)}")
    finally:
        await backend.close()


def condition(view: ModelView, kind: str) -> Condition | None:
    return next((c for c in view.conditions if c.type == kind), None)


def test_a_model_larger_than_the_machine_is_unschedulable_with_the_planners_reason(
    tmp_path: Path, local_store: ModelStore
) -> None:
    backend = LocalBackend([model("big", local_store.ref.uri, gib=64)], settings(tmp_path, 8 << 30))

    def refused(view: ModelView) -> bool:
        scheduled = condition(view, "Scheduled")
        return scheduled is not None and scheduled.status == "False"

    view = asyncio.run(scaled_view(backend, "big", refused))
    scheduled = condition(view, "Scheduled")
    assert scheduled is not None and scheduled.reason == "Unschedulable"
    assert "cannot place big" in scheduled.message and "GiB" in scheduled.message
    assert view.instances == () and view.effective_phase == ModelPhase.STARTING


def test_a_model_missing_from_the_store_says_how_to_fix_it(tmp_path: Path) -> None:
    backend = LocalBackend([model("gone", str(tmp_path / "nothing"))], settings(tmp_path, 8 << 30))
    view = asyncio.run(scaled_view(backend, "gone", lambda v: v.error is not None))
    assert view.error is not None and "hydraserve model push" in view.error
    assert view.effective_phase == ModelPhase.FAILED
    valid = condition(view, "Valid")
    assert valid is not None and valid.reason == "ModelNotFound"


def plan(pp: int, nodes: tuple[str, ...] = ("local",)) -> InstancePlan:
    return InstancePlan(
        pp=pp,
        stages=[
            StagePlan(rank=r, node=nodes[r % len(nodes)], gpu=0, start_layer=r, end_layer=r + 1,
                      memory_bytes=1, all_card=r == 0, fetch_bytes=1)
            for r in range(pp)
        ],
    )  # fmt: skip


def instance(tmp_path: Path, pp: int) -> LocalInstance:
    return LocalInstance(
        name="m-1", model="m", plan=plan(pp), requested_at=0.0, dir=tmp_path, host="h", port=1
    )


def test_every_stage_is_asked_to_run_eager_by_default(tmp_path: Path) -> None:
    # A CPU pipeline stage asked for eager runs eager with HydraServe's worker class
    # (launcher.with_execution_mode, tests/worker/test_launcher.py): vLLM's own CPU worker
    # fails on the first step of an eager pipeline (decision 0105).
    from hydraserve.backends.local.backend import _ModelState

    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30))
    assert backend.settings.enforce_eager
    state = _ModelState(model=model("m", "file:///nowhere"))

    def eager(pp: int, override: bool | None = None) -> bool:
        inst = instance(tmp_path, pp)
        return backend._worker_config(state, inst, 0, 29500, override).enforce_eager

    assert eager(1) is True
    assert eager(2) is True and eager(4) is True
    assert eager(1, override=False) is False  # a standalone's own setting still wins


def test_cores_split_between_stages() -> None:
    assert split_cores([0, 1], 2) == ["0", "1"]
    assert split_cores([0, 1, 2, 3, 4], 2) == ["0,1,2", "3,4"]
    assert split_cores(list(range(16)), 4) == ["0,1,2,3", "4,5,6,7", "8,9,10,11", "12,13,14,15"]
    assert split_cores([0, 1], 4) == ["0", "1", "0", "1"]  # more stages than cores: shared
    # Every core in exactly one group when there are enough.
    groups = split_cores(list(range(7)), 3)
    assert sorted(int(c) for g in groups for c in g.split(",")) == list(range(7))


def test_pipeline_stages_get_their_own_cores_and_the_standalone_gets_them_all(
    tmp_path: Path,
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30))
    pipeline = instance(tmp_path, 2)
    assert backend._cpu_bind(plan(1), 0) is None  # a single stage: vLLM chooses
    stage_binds = [backend._cpu_bind(plan(2), r) for r in range(2)]
    if len(cores) >= 2:
        assert stage_binds[0] and stage_binds[1]
        assert not set(stage_binds[0].split(",")) & set(stage_binds[1].split(","))
    standalone = backend._cpu_bind(plan(1), 0, pipeline)
    assert standalone is not None
    assert sorted(int(c) for c in standalone.split(",")) == cores
    # Configured binds win.
    backend.settings.cpu_binds = ["3", "5"]
    assert [backend._cpu_bind(plan(2), r) for r in range(2)] == ["3", "5"]
    assert backend._cpu_bind(plan(1), 0, pipeline) == "3,5"


def test_stages_on_different_nodes_each_use_their_nodes_cores(tmp_path: Path) -> None:
    nodes = [
        LocalNode(name=f"n{i}", host=f"10.0.0.{i}", shm_dir=tmp_path / f"n{i}",
                  memory_bytes=1 << 30, nic_bytes_per_s=1e7, cpus=(2 * i, 2 * i + 1))
        for i in range(2)
    ]  # fmt: skip
    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30), nodes)
    two = plan(2, ("n0", "n1"))
    assert [backend._cpu_bind(two, r) for r in range(2)] == ["0,1", "2,3"]
    both_on_n1 = plan(2, ("n1", "n1"))
    assert [backend._cpu_bind(both_on_n1, r) for r in range(2)] == ["2", "3"]


def test_tensor_parallel_ranks_get_their_own_cores_and_the_worker_its_tp(tmp_path: Path) -> None:
    from hydraserve.backends.local.backend import _ModelState
    from hydraserve.backends.local.processes import parse_cores

    nodes = [
        LocalNode(name=f"n{i}", host=f"10.0.0.{i}", shm_dir=tmp_path / f"n{i}",
                  memory_bytes=1 << 30, nic_bytes_per_s=1e7, cpus=tuple(range(4 * i, 4 * i + 4)))
        for i in range(2)
    ]  # fmt: skip
    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30), nodes)
    tp2 = plan(2, ("n0", "n1")).model_copy(update={"tp": 2})
    # Each stage's cores, split between its two ranks (VLLM_CPU_OMP_THREADS_BIND "a|b").
    assert [backend._cpu_bind(tp2, r) for r in range(2)] == ["0,1|2,3", "4,5|6,7"]
    assert parse_cores("0-2,5|7") == [0, 1, 2, 5, 7]
    inst = LocalInstance(name="m-1", model="m", plan=tp2, requested_at=0.0, dir=tmp_path,
                         host="10.0.0.0", port=1)  # fmt: skip
    state = _ModelState(model=model("m", "file:///nowhere"))
    assert backend._worker_config(state, inst, 1, 29500, None).tp == 2


def test_a_nodes_memory_is_one_pool_for_a_models_tensor_parallel_ranks(tmp_path: Path) -> None:
    from hydraserve.backends.local.nodes import node_state
    from hydraserve.planner import SLO, ClusterState, ModelProfile, Plan, PlanRequest
    from hydraserve.planner import plan as plan_placement

    node = LocalNode(name="n", host="h", shm_dir=tmp_path, memory_bytes=8 << 30,
                     nic_bytes_per_s=1e9)  # fmt: skip
    state = node_state(node, 2 << 30, None, 0.0, devices=2)
    assert [(g.total_bytes, g.free_bytes) for g in state.gpus] == [(4 << 30, 3 << 30)] * 2
    profile = ModelProfile("m", 5 << 30, 6 << 30, {1: ((0, 4, 5 << 30),)})
    result = plan_placement(PlanRequest(profile, SLO(60, 1), tp=2), ClusterState((state,)))
    assert isinstance(result, Plan) and result.stages[0].devices == (0, 1)
    too_big = ModelProfile("m", 5 << 30, 7 << 30, {1: ((0, 4, 5 << 30),)})
    assert not isinstance(
        plan_placement(PlanRequest(too_big, SLO(60, 1), tp=2), ClusterState((state,))), Plan
    )
