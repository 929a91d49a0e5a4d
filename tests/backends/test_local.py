"""The local backend's decisions that need no engine: planning and store errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hydraserve.api.models import ServerlessModel
from hydraserve.backends.local import LocalBackend, LocalSettings
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
    return LocalSettings(common=common, memory_budget_bytes=budget)


async def scaled_error(backend: LocalBackend, name: str) -> str | None:
    await backend.start()
    try:
        await backend.scale(name, 1)
        for _ in range(50):
            await backend.wait_for_change(name, 0.2)
            view = backend.get_model(name)
            assert view is not None
            if view.error:
                return view.error
        return None
    finally:
        await backend.close()


def test_a_model_larger_than_the_machine_is_refused_with_the_planners_reason(
    tmp_path: Path, local_store: ModelStore
) -> None:
    backend = LocalBackend([model("big", local_store.ref.uri, gib=64)], settings(tmp_path, 8 << 30))
    error = asyncio.run(scaled_error(backend, "big"))
    assert error is not None and "cannot place big" in error and "GiB" in error
    assert backend.get_model("big").instances == ()  # type: ignore[union-attr]


def test_a_model_missing_from_the_store_says_how_to_fix_it(tmp_path: Path) -> None:
    backend = LocalBackend([model("gone", str(tmp_path / "nothing"))], settings(tmp_path, 8 << 30))
    error = asyncio.run(scaled_error(backend, "gone"))
    assert error is not None and "hydraserve model push" in error


def test_pipelines_run_compiled_even_when_single_stage_engines_run_eager(tmp_path: Path) -> None:
    # vLLM's CPU backend fails on the first step of an eager pipeline (decision 0004), so a
    # default `hydraserve up` with a forced pp = 2 must not start one.
    from hydraserve.backends.local import _Instance, _ModelState

    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30))
    assert backend.settings.enforce_eager
    state = _ModelState(model=model("m", "file:///nowhere"))

    def eager(pp: int, override: bool | None = None) -> bool:
        inst = _Instance(name="m-1", model="m", pp=pp, started_at=0.0, dir=tmp_path, port=1)
        return backend._worker_config(state, inst, 0, 29500, override).enforce_eager

    assert eager(1) is True
    assert eager(2) is False and eager(4) is False
    assert eager(1, override=False) is False  # a standalone's own setting still wins


def test_cores_split_between_stages() -> None:
    from hydraserve.backends.local import split_cores

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
    import os

    from hydraserve.backends.local import _Instance

    cores = sorted(os.sched_getaffinity(0))
    backend = LocalBackend([model("m", "file:///nowhere")], settings(tmp_path, 8 << 30))
    pipeline = _Instance(name="m-1", model="m", pp=2, started_at=0.0, dir=tmp_path, port=1)
    assert backend._cpu_bind(0, 1, None) is None  # a single stage: vLLM chooses
    stage_binds = [backend._cpu_bind(r, 2, None) for r in range(2)]
    if len(cores) >= 2:
        assert stage_binds[0] and stage_binds[1]
        assert not set(stage_binds[0].split(",")) & set(stage_binds[1].split(","))
    standalone = backend._cpu_bind(0, 1, pipeline)
    assert standalone is not None
    assert sorted(int(c) for c in standalone.split(",")) == cores
    # Configured binds win.
    backend.settings.cpu_binds = ["3", "5"]
    assert [backend._cpu_bind(r, 2, None) for r in range(2)] == ["3", "5"]
    assert backend._cpu_bind(0, 1, pipeline) == "3,5"
