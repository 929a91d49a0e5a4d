"""The engine's own model code decides the store layout and each rank's stage (real vLLM,
on the meta device, in a child process; probes are cached per engine and shape)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.architectures import ARCHITECTURES, build_checkpoint
from hydraserve.store.manifest import Manifest
from hydraserve.store.probing import installed_engine
from hydraserve.worker.loader import AdoptionPlan, checkpoint_tensors
from hydraserve.worker.views import tensor_view


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Manifest]]:
    root = tmp_path_factory.mktemp("probe")
    out = {}
    for arch in ARCHITECTURES:
        src = build_checkpoint(arch, root / "hf" / arch)
        location = root / "store" / arch
        manifest = ModelStore(ModelRef(str(location))).push(src, name=arch)
        out[arch] = (src, location / "main" / manifest.weights_file, manifest)
    return out


def stage(manifest: Manifest, pp: int, rank: int) -> set[str]:
    return set(manifest.stage(pp, rank).tensors)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_dense_and_moe_model_is_almost_all_zero_copy(
    pushed: dict[str, tuple[Path, Path, Manifest]], arch: str
) -> None:
    _, _, manifest = pushed[arch]
    assert manifest.engine == installed_engine()
    assert manifest.layout == "vllm" and sorted(manifest.partitions) == [1, 2, 3, 4]
    assert manifest.zero_copy_share >= 0.95, (arch, manifest.zero_copy_share)
    for pp, stages in manifest.partitions.items():
        assert [s.num_layers for s in stages] == manifest.layer_partition(pp)
        assert all(not s.unfilled for s in stages)  # every parameter it builds is loaded


def test_stages_hold_what_each_rank_of_the_engine_builds(
    pushed: dict[str, tuple[Path, Path, Manifest]],
) -> None:
    gemma = pushed["gemma"][2]
    # vLLM's Gemma builds its final norm and (tied) embedding on every rank.
    for rank in (0, 1):
        assert {"model.norm.weight", "model.embed_tokens.weight"} <= stage(gemma, 2, rank)
    mixtral = pushed["mixtral"][2]
    assert "model.embed_tokens.weight" in stage(mixtral, 4, 3)
    llama = pushed["llama"][2]
    # Llama builds the embedding on the first rank only, the head on the last only.
    assert "model.embed_tokens.weight" not in stage(llama, 2, 1)
    assert "lm_head.weight" not in stage(llama, 2, 0) and "lm_head.weight" in stage(llama, 2, 1)
    qwen2 = pushed["qwen2"][2]  # tied: the last rank needs the embedding for its head
    assert "model.embed_tokens.weight" in stage(qwen2, 2, 1)
    for manifest in (gemma, mixtral, llama, qwen2):
        layers = [t.layer for t in manifest.tensors if t.name in stage(manifest, 2, 0)]
        assert max(x for x in layers if x is not None) < manifest.stage(2, 0).end_layer


def test_fused_parameters_are_the_checkpoint_bytes_end_to_end(
    pushed: dict[str, tuple[Path, Path, Manifest]],
) -> None:
    src, weights, manifest = pushed["mixtral"]
    checkpoint = load_file(src / "model.safetensors")
    stack = next(
        t
        for t in manifest.tensors
        if t.name.endswith("layers.0.block_sparse_moe.experts.routed_experts.w13_weight")
    )
    assert stack.param == stack.name and stack.parts is not None and len(stack.parts) == 8
    import mmap

    with open(weights, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        stored = tensor_view(buf, stack).clone()  # type: ignore[arg-type]
    pieces = [checkpoint[p.name] for p in stack.parts]
    assert torch.equal(stored.reshape(-1), torch.cat([p.reshape(-1) for p in pieces]))
    # The copy path gets the checkpoint's own tensors back, as views of the stored bytes.
    back = dict(checkpoint_tensors(stack, stored))
    assert all(torch.equal(back[p.name], checkpoint[p.name]) for p in stack.parts)
    phi3 = pushed["phi3"][2]  # q/k/v fused in the checkpoint already: stored as it is
    qkv = phi3.tensor("model.layers.0.self_attn.qkv_proj.weight")
    assert qkv.param == qkv.name and qkv.parts is None


def test_another_engine_version_takes_the_copy_path(
    pushed: dict[str, tuple[Path, Path, Manifest]],
) -> None:
    manifest = pushed["llama"][2]
    same = AdoptionPlan.for_engine(manifest, manifest.stage(2, 0), str(manifest.engine))
    other = AdoptionPlan.for_engine(manifest, manifest.stage(2, 0), "vllm 0.0.1")
    fused = manifest.tensor("model.layers.0.self_attn.qkv_proj.weight")
    assert same.target(fused) == fused.name
    assert other.target(fused) is None  # never adopted by a name another version may repack


def test_without_the_engine_only_one_stage_is_offered(tmp_path: Path) -> None:
    src = build_checkpoint("gemma", tmp_path / "hf")
    store = ModelStore(ModelRef(str(tmp_path / "store")))
    manifest = store.push(src, name="gemma", use_engine=False)
    assert manifest.engine is None and manifest.layout == "hf"
    assert sorted(manifest.partitions) == [1] and manifest.zero_copy_bytes == 0
    assert store.last_push is not None and store.last_push.engine_note


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_checkpoint_comes_back_as_it_was_for_stock_engines(
    pushed: dict[str, tuple[Path, Path, Manifest]], arch: str, tmp_path: Path
) -> None:
    """What a serverless-vLLM baseline downloads: the checkpoint's own tensors (names,
    shapes, bytes), fused stacks split back, so stock vLLM's loader reads any of them."""
    src, weights, manifest = pushed[arch]
    store = ModelStore(ModelRef(str(weights.parent.parent)))
    store.download_checkpoint(tmp_path / "model.safetensors")
    original = load_file(src / "model.safetensors")
    back = load_file(tmp_path / "model.safetensors")
    assert list(back) == [
        n for t in manifest.tensors for n in ([p.name for p in t.parts] if t.parts else [t.name])
    ]
    assert set(back) == set(original)
    assert all(torch.equal(back[name], original[name]) for name in original)
