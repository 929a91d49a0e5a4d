"""ModelProfile from a store manifest: stage ranges come from the manifest's partitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydraserve.planner import SLO, Plan, PlanRequest, plan, profile_from_manifest
from hydraserve.sim.catalog import LLAMA2_13B
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model
from tests.planner.helpers import CONFIG, cluster, node


def test_profile_of_a_pushed_demo_model(tmp_path: Path) -> None:
    checkpoint = make_demo_model(tmp_path / "hf", "tiny", seed=0)
    manifest = ModelStore(ModelRef(str(tmp_path / "store" / "tiny"))).push(checkpoint)
    profile = profile_from_manifest(
        manifest, manifest.total_bytes + 1000, "tiny@main", tpot_s={"gpu": 0.01}
    )
    assert profile.key == "tiny@main"
    assert profile.total_bytes == manifest.total_bytes
    assert profile.kv_bytes == 1000
    assert profile.num_layers == manifest.num_layers
    assert sorted(profile.partitions) == sorted(manifest.partitions)
    for pp, stages in manifest.partitions.items():
        assert profile.partitions[pp] == tuple(
            (s.start_layer, s.end_layer, s.nbytes) for s in stages
        )
    # A plan's stages carry exactly the manifest's ranges for its pp.
    nodes = [node(f"n{i}", (1,), total_gb=1) for i in range(4)]
    result = plan(PlanRequest(profile, SLO(60.0, 1.0), max_pp=2), cluster(*nodes), CONFIG)
    assert isinstance(result, Plan)
    expected = manifest.partitions[result.pp]
    assert [(s.start_layer, s.end_layer) for s in result.stages] == [
        (s.start_layer, s.end_layer) for s in expected
    ]


def test_stage_bytes_include_embeddings_and_head() -> None:
    manifest = LLAMA2_13B.manifest
    profile = profile_from_manifest(manifest, manifest.total_bytes, "13b")
    for stages in profile.partitions.values():
        assert sum(b for _, _, b in stages) == manifest.total_bytes
    first, *_, _last = profile.partitions[4]
    assert first[2] > profile.partitions[4][1][2]  # stage 0 also holds the embeddings


def test_replica_smaller_than_weights_is_rejected() -> None:
    manifest = LLAMA2_13B.manifest
    with pytest.raises(ValueError, match="less than its weights"):
        profile_from_manifest(manifest, manifest.total_bytes - 1, "13b")


def test_plan_request_from_a_serverless_model() -> None:
    from hydraserve.api.models import ServerlessModel
    from hydraserve.planner import model_key, plan_request_for, replica_bytes

    model = ServerlessModel.model_validate(
        {
            "metadata": {"name": "llama2-13b"},
            "spec": {
                "source": {"uri": "s3://models/llama-2-13b", "revision": "main"},
                "slo": {"ttftSeconds": 12, "tpotMilliseconds": 116},
                "resources": {"gpuMemoryGiB": 29},
                "pipeline": {"maxSize": 2},
            },
        }
    )
    assert model_key(model.spec) == "s3://models/llama-2-13b@main"
    assert replica_bytes(model.spec) == 29 * 2**30
    manifest = LLAMA2_13B.manifest
    profile = profile_from_manifest(manifest, replica_bytes(model.spec), model_key(model.spec))
    request = plan_request_for(model.spec, profile, waited_s=1.5)
    assert (request.slo.ttft_s, request.slo.tpot_s) == (12.0, 0.116)
    assert request.max_pp == 2 and request.waited_s == 1.5
