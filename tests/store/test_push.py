"""``hydraserve model push`` with checkpoints as users have them: refusals before any
upload, sharded checkpoints, other dtypes, resuming an interrupted push, no scratch copy."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.backends import StoreBackend
from hydraserve.store.checkpoint import UnservableCheckpoint


def _copy(demo_checkpoint: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dest = tmp_path / name
    shutil.copytree(demo_checkpoint, dest)
    return dest


def _edit_config(src: Path, **changes: object) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


def _nothing_uploaded(store_root: Path) -> bool:
    return not store_root.exists() or not any(p.is_file() for p in store_root.rglob("*"))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("quantized", r"quantized checkpoint \(awq\)"),
        ("pickled", "weights are pickled"),
        ("unknown-architecture", "not one the engine"),
        ("int8-tensors", "dtype I8"),
    ],
)
def test_unservable_checkpoints_are_refused_before_any_upload(
    demo_checkpoint: Path, tmp_path: Path, breakage: str, message: str
) -> None:
    src = _copy(demo_checkpoint, tmp_path)
    if breakage == "quantized":
        _edit_config(src, quantization_config={"quant_method": "awq", "bits": 4})
    elif breakage == "pickled":
        (src / "model.safetensors").unlink()
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    elif breakage == "unknown-architecture":
        _edit_config(src, architectures=["TotallyNewForCausalLM"])
    else:
        tensors = load_file(src / "model.safetensors")
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].to(torch.int8)
        save_file(tensors, src / "model.safetensors")
    root = tmp_path / "store"
    with pytest.raises(UnservableCheckpoint, match=message):
        ModelStore(ModelRef(str(root / "m"))).push(src)
    assert _nothing_uploaded(root)


def test_a_sharded_checkpoint_in_fp16_pushes_as_the_same_model(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    tensors = load_file(demo_checkpoint / "model.safetensors")
    half = {k: v.to(torch.float16) for k, v in tensors.items()}
    whole = _copy(demo_checkpoint, tmp_path, "whole")
    save_file(half, whole / "model.safetensors")
    sharded = _copy(demo_checkpoint, tmp_path, "sharded")
    (sharded / "model.safetensors").unlink()
    names = sorted(half)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for shard, members in shards.items():
        save_file({k: half[k] for k in members}, sharded / shard)
    index = {"weight_map": {k: s for s, members in shards.items() for k in members}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    one = ModelStore(ModelRef(str(tmp_path / "store" / "one"))).push(whole, name="m")
    two = ModelStore(ModelRef(str(tmp_path / "store" / "two"))).push(sharded, name="m")
    assert one.dtype == "F16" == two.dtype
    assert one.weights_sha256 == two.weights_sha256
    assert [t.name for t in one.tensors] == [t.name for t in two.tensors]

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UnservableCheckpoint, match="shards missing"):
        ModelStore(ModelRef(str(tmp_path / "store" / "three"))).push(sharded)


class _Interrupted(RuntimeError):
    pass


def _count_part_writes(store: ModelStore, fail_after: int | None) -> list[str]:
    """Record the parts ``store`` writes; raise once ``fail_after`` were written."""
    written: list[str] = []
    backend: StoreBackend = store.backend
    original = backend.write

    def write(key: str, data: bytes) -> None:
        if ".parts/" in key and not key.endswith(".sha256"):
            if fail_after is not None and len(written) >= fail_after:
                raise _Interrupted(key)
            written.append(key)
        original(key, data)

    backend.write = write  # type: ignore[method-assign]
    return written


def test_an_interrupted_push_resumes_without_resending_finished_parts(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    ref = ModelRef(str(tmp_path / "store" / "m"))
    part = 64 << 10
    first = ModelStore(ref)
    sent_before = _count_part_writes(first, fail_after=5)
    with pytest.raises(_Interrupted):
        first.push(demo_checkpoint, part_bytes=part, concurrency=1)
    assert len(sent_before) == 5
    assert not first.backend.exists("manifest.json")  # incomplete: not listed, not served

    second = ModelStore(ref)
    sent_after = _count_part_writes(second, fail_after=None)
    manifest = second.push(demo_checkpoint, part_bytes=part, concurrency=3)
    assert set(sent_after).isdisjoint(sent_before)
    assert len(sent_after) + len(sent_before) == len(manifest.weights_parts)
    assert second.last_push is not None
    assert second.last_push.skipped_bytes == 5 * part
    # What was resumed reads back whole and verified.
    fresh = ModelStore(ref)
    for tensor in manifest.tensors:
        fresh.read_tensor(tensor.name)


def test_push_needs_no_scratch_space(
    demo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    store = ModelStore(ModelRef(str(tmp_path / "store" / "m")))
    seen: list[int] = []
    original = store.backend.write

    def write(key: str, data: bytes) -> None:
        seen.append(sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()))
        original(key, data)

    store.backend.write = write  # type: ignore[method-assign]
    store.push(demo_checkpoint, part_bytes=64 << 10)
    assert seen and max(seen) == 0


def test_a_hugging_face_cache_folder_pushes_its_snapshot(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    # The cache's own layout: blobs named by hash, a snapshot of symlinks, refs/main.
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(demo_checkpoint.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    direct = ModelStore(ModelRef(str(tmp_path / "store" / "a"))).push(demo_checkpoint, name="m")
    cached = ModelStore(ModelRef(str(tmp_path / "store" / "b"))).push(repo, name="m")
    assert cached.weights_sha256 == direct.weights_sha256
    assert {f.name for f in cached.files} == {f.name for f in direct.files}
    (repo / "refs" / "main").write_text("fedcba9")
    with pytest.raises(UnservableCheckpoint, match="fedcba9"):
        ModelStore(ModelRef(str(tmp_path / "store" / "c"))).push(repo)
