"""Store round trips on both backends, partitions, and checksum detection."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from hydraserve.settings import S3Settings
from hydraserve.store import ChecksumError, ModelNotFound, ModelRef, ModelStore, list_models
from hydraserve.store.manifest import MANIFEST_NAME, WEIGHTS_NAME
from hydraserve.store.safetensors_format import read_file_header


def checkpoint_tensors(path: Path) -> dict[str, bytes]:
    data_file = path / "model.safetensors"
    _, slots, _ = read_file_header(data_file)
    raw = data_file.read_bytes()
    return {s.name: raw[s.start : s.end] for s in slots}


def expected_store_tensors(checkpoint: Path) -> dict[str, bytes]:
    """The checkpoint with q/k/v and gate/up concatenated, as vLLM's Llama fuses them."""
    src = checkpoint_tensors(checkpoint)
    out: dict[str, bytes] = {}
    for name, data in src.items():
        if ".q_proj." in name:
            out[name.replace("q_proj", "qkv_proj")] = (
                data + src[name.replace("q_proj", "k_proj")] + src[name.replace("q_proj", "v_proj")]
            )
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = (
                data + src[name.replace("gate_proj", "up_proj")]
            )
        elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = data
    return out


def assert_round_trip(store: ModelStore, checkpoint: Path) -> None:
    manifest = store.manifest()
    expected = expected_store_tensors(checkpoint)
    assert manifest.layout == "vllm"
    assert {t.name for t in manifest.tensors} == set(expected)
    for tensor in manifest.tensors:
        assert store.read_tensor(tensor.name) == expected[tensor.name], tensor.name


def test_local_round_trip(local_store: ModelStore, demo_checkpoint: Path) -> None:
    assert_round_trip(local_store, demo_checkpoint)


def test_s3_round_trip(s3_server: S3Settings, demo_checkpoint: Path, tmp_path: Path) -> None:
    store = ModelStore(ModelRef("s3://models/team-a/demo", "v1"), s3_server)
    store.push(demo_checkpoint)
    fresh = ModelStore(ModelRef("s3://models/team-a/demo", "v1"), s3_server)
    assert_round_trip(fresh, demo_checkpoint)
    side = fresh.download_side_files(tmp_path / "hf")
    assert json.loads((side / "config.json").read_text())["model_type"] == "llama"
    listed = list(list_models("s3://models", s3_server))
    assert [(m.uri, m.revision) for m in listed] == [("s3://models/team-a/demo", "v1")]


def test_ranged_reads_match_on_both_backends(
    s3_server: S3Settings, local_store: ModelStore, demo_checkpoint: Path
) -> None:
    s3 = ModelStore(ModelRef("s3://models/ranges", "main"), s3_server)
    s3.push(demo_checkpoint)
    for start, end in [(0, 8), (100, 4096), (1000, 1001)]:
        assert s3.read_range(start, end) == local_store.read_range(start, end)


def test_every_tensor_is_in_exactly_one_stage_of_each_partition(local_store: ModelStore) -> None:
    manifest = local_store.manifest()
    assert sorted(manifest.partitions) == [1, 2, 3, 4]
    for pp, stages in manifest.partitions.items():
        names = [n for stage in stages for n in stage.tensors]
        assert sorted(names) == sorted(t.name for t in manifest.tensors), pp
        assert next(s.start_layer for s in stages) == 0
        assert stages[-1].end_layer == manifest.num_layers
        for a, b in itertools.pairwise(stages):
            assert a.end_layer == b.start_layer
        assert "model.embed_tokens.weight" in stages[0].tensors
        assert {"model.norm.weight", "lm_head.weight"} <= set(stages[-1].tensors)
        # Each stage's tensors lie inside its byte ranges, so a fetch of them is enough.
        for stage in stages:
            for name in stage.tensors:
                t = manifest.tensor(name)
                assert any(s <= t.offset and t.end <= e for s, e in stage.ranges)
            assert stage.nbytes == sum(manifest.tensor(n).size for n in stage.tensors)


def test_layer_partition_matches_vllm_env_format(local_store: ModelStore) -> None:
    manifest = local_store.manifest()
    assert sum(manifest.layer_partition(2)) == manifest.num_layers
    assert all(n >= 1 for n in manifest.layer_partition(4))


def test_corrupted_byte_is_caught_naming_the_tensor(local_store: ModelStore) -> None:
    manifest = local_store.manifest()
    victim = manifest.tensor("model.layers.1.mlp.down_proj.weight")
    weights = Path(local_store.backend.uri.path) / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[victim.offset + 7] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        local_store.read_tensor(victim.name)
    # Its neighbours are still fine.
    local_store.read_tensor("model.layers.1.mlp.gate_up_proj.weight")


def test_missing_model_says_how_to_fix(tmp_path: Path) -> None:
    store = ModelStore(ModelRef(str(tmp_path / "nothing-here")))
    with pytest.raises(ModelNotFound, match="hydraserve model push"):
        store.manifest()


def test_manifest_is_written_last(local_store: ModelStore) -> None:
    keys = list(local_store.backend.list())
    assert MANIFEST_NAME in keys and WEIGHTS_NAME in keys


def test_checkpoint_without_safetensors_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2})
    )
    store = ModelStore(ModelRef(str(tmp_path / "store" / "x")))
    with pytest.raises(Exception, match="safetensors"):
        store.push(src)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_weights_stored_as_parts_read_back_across_boundaries(
    backend: str, s3_server: S3Settings, demo_checkpoint: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "parts" / "demo") if backend == "local" else "s3://models/parts-demo"
    store = ModelStore(ModelRef(uri), s3_server if backend == "s3" else None)
    manifest = store.push(demo_checkpoint, part_bytes=256 << 10)
    assert len(manifest.weights_parts) == -(-manifest.weights_size // (256 << 10))
    keys = set(store.backend.list())
    assert {manifest.part_key(i) for i in range(len(manifest.weights_parts))} <= keys
    assert_round_trip(store, demo_checkpoint)
    boundary = manifest.weights_parts[1][0]
    whole = ModelStore(ModelRef(str(tmp_path / "single" / "demo")))
    whole.push(demo_checkpoint, part_bytes=0)
    assert whole.manifest().weights_parts == []
    assert store.read_range(boundary - 10, boundary + 10) == whole.read_range(
        boundary - 10, boundary + 10
    )
    target = tmp_path / "downloaded.safetensors"
    store.download_weights(target)
    assert target.read_bytes() == whole.read_range(0, manifest.weights_size)


def test_the_warm_runtime_s3_preload_caches_no_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preload runs in a node's warm runtime before it forks tenants' workers: a
    child must sign with its own credentials, never ones the runtime resolved."""
    import boto3

    from hydraserve.store.backends import make_s3_client, preload_s3_client

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "runtime-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "runtime-secret")
    preload_s3_client()
    assert boto3.DEFAULT_SESSION is not None
    # Nothing resolved (asking would resolve them): the session holds no credentials.
    assert boto3.DEFAULT_SESSION._session._credentials is None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tenant-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "tenant-secret")
    client = make_s3_client(S3Settings(endpoint_url="http://127.0.0.1:9"))
    credentials = client._request_signer._credentials
    assert credentials.access_key == "tenant-key"
    assert credentials.secret_key == "tenant-secret"
