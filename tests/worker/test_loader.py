"""The ``hydraserve`` load format against a tiny CPU module, no engine started.

A small bf16 module with vLLM's Llama parameter names (fused ``qkv_proj`` and
``gate_up_proj``); its checkpoint in Hugging Face names (separate q/k/v, gate/up), pushed
with the real store conversion; the bytes fetched into a shared-memory directory by the
real fetcher; the loader built and called through vLLM's own interface
(``LoadConfig``, ``ModelConfig``, ``load_weights``) as an engine would. Only the pipeline
rank, which vLLM reads from its distributed state, is given directly.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig

from hydraserve.prefetcher.fetcher import FetchOptions, RangeFetcher
from hydraserve.prefetcher.shm import (
    FetchState,
    FetchStatus,
    ModelShm,
    fetch_name,
    write_json_atomic,
)
from hydraserve.store import Manifest, ModelRef, ModelStore
from hydraserve.worker import loader as loader_module
from hydraserve.worker.config import WorkerConfig
from hydraserve.worker.loader import LOAD_FORMAT, HydraServeLoader
from hydraserve.worker.loader_config import loader_extra_config
from hydraserve.worker.plugin import register
from hydraserve.worker.source import StageSource, StageUnavailable
from hydraserve.worker.timeline import read_timeline

HIDDEN, KV, INTER, VOCAB, LAYERS = 64, 32, 128, 128, 4
FAST = FetchOptions(concurrency=2, chunk_bytes=4096, max_retries=1, backoff_seconds=0.01)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(HIDDEN, HIDDEN + 2 * KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(HIDDEN, 2 * INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(HIDDEN))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = Norm()
        self.self_attn = Attention()
        self.post_attention_layernorm = Norm()
        self.mlp = MLP()


class Body(nn.Module):
    def __init__(self, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        if first:
            self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        # vLLM keeps absolute layer indices on every rank (other ranks' layers hold nothing).
        self.layers = nn.ModuleList(
            Layer() if i in layers else nn.Identity() for i in range(LAYERS)
        )
        if last:
            self.norm = Norm()


class TinyLlama(nn.Module):
    """vLLM's parameter names and layout for a Llama stage (layers ``layers``), in bf16."""

    def __init__(self, layers: range = range(LAYERS), first: bool = True, last: bool = True):
        super().__init__()
        self.model = Body(layers, first, last)
        if last:
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.to(torch.bfloat16)
        for param in self.parameters():
            nn.init.zeros_(param)  # what the loader must overwrite


def hf_checkpoint(dest: Path) -> dict[str, torch.Tensor]:
    """A random checkpoint in Hugging Face names; returns what each vLLM parameter must
    hold (q/k/v and gate/up concatenated along dim 0)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    expected = dict(tensors)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        q, k, v = rand(HIDDEN, HIDDEN), rand(KV, HIDDEN), rand(KV, HIDDEN)
        gate, up = rand(INTER, HIDDEN), rand(INTER, HIDDEN)
        layer = {
            f"{p}.input_layernorm.weight": rand(HIDDEN),
            f"{p}.self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            f"{p}.post_attention_layernorm.weight": rand(HIDDEN),
            f"{p}.mlp.down_proj.weight": rand(HIDDEN, INTER),
        }
        tensors |= layer | {
            f"{p}.self_attn.q_proj.weight": q,
            f"{p}.self_attn.k_proj.weight": k,
            f"{p}.self_attn.v_proj.weight": v,
            f"{p}.mlp.gate_proj.weight": gate,
            f"{p}.mlp.up_proj.weight": up,
        }
        expected |= layer | {
            f"{p}.self_attn.qkv_proj.weight": torch.cat([q, k, v]),
            f"{p}.mlp.gate_up_proj.weight": torch.cat([gate, up]),
        }
    tail = {"model.norm.weight": rand(HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN)}
    tensors |= tail
    expected |= tail
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (dest / "config.json").write_text(json.dumps(config))
    return expected


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("tiny")
    expected = hf_checkpoint(root / "hf")
    store = ModelStore(ModelRef(str(root / "store" / "tiny")))
    store.push(root / "hf")
    register()  # the plugin, as vLLM loads it in every process
    return store, expected


class HeldStore(ModelStore):
    """The real store, with reads held until ``gate`` opens and, optionally, one byte of
    one tensor flipped on every read (a corrupted object)."""

    def __init__(self, inner: ModelStore, corrupt_at: int | None = None) -> None:
        super().__init__(inner.ref)
        self.gate = threading.Event()
        self.corrupt_at = corrupt_at

    def read_range(self, start: int, end: int) -> bytes:
        assert self.gate.wait(30), "the test never opened the store"
        data = super().read_range(start, end)
        if self.corrupt_at is not None and start <= self.corrupt_at < end:
            i = self.corrupt_at - start
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        return data


class Node:
    """A node's shared-memory directory and a fetch of one stage into it."""

    def __init__(self, root: Path, store: ModelStore) -> None:
        self.store = store
        self.manifest: Manifest = store.manifest()
        self.shm_dir = root / "shm"
        self.shm = ModelShm(self.shm_dir, store.ref.uri, store.ref.revision)
        self.shm.dir.mkdir(parents=True)
        write_json_atomic(self.shm.manifest_path, self.manifest.model_dump(mode="json"))
        self.thread: threading.Thread | None = None

    def fetch(self, pp: int, rank: int, via: ModelStore | None = None) -> RangeFetcher:
        stage = (pp, rank) if pp > 1 else (None, None)
        fetcher = RangeFetcher(
            via or self.store,
            self.manifest,
            self.shm,
            fetch_name(*stage),
            self.manifest.fetch_ranges(*stage),
            FAST,
        )
        # As the prefetcher does: the state file says FETCHING before the first byte.
        self.shm.write_status(
            fetcher.name, fetcher.status.model_copy(update={"state": FetchState.FETCHING})
        )
        self.thread = threading.Thread(target=self._run, args=(fetcher,), daemon=True)
        self.thread.start()
        return fetcher

    @staticmethod
    def _run(fetcher: RangeFetcher) -> None:
        try:
            fetcher.run()
        except Exception:  # published in the state file: FAILED with the reason
            return

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive()


def make_loader(node: Node, tmp_path: Path, timeout: float = 30.0) -> HydraServeLoader:
    """The loader as vLLM builds it from the worker's command line."""
    worker = WorkerConfig(
        model_name="tiny",
        uri=node.store.ref.uri,
        instance="tiny-1",
        shm_dir=node.shm_dir,
        timeline=tmp_path / "timeline.jsonl",
        fetch_timeout_seconds=timeout,
    )
    config = LoadConfig(
        load_format=LOAD_FORMAT, model_loader_extra_config=loader_extra_config(worker)
    )
    return HydraServeLoader(config)


def model_config(hf_dir: Path, eager: bool) -> ModelConfig:
    return ModelConfig(
        model=str(hf_dir), enforce_eager=eager, skip_tokenizer_init=True, dtype="bfloat16"
    )


@pytest.fixture
def stage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set the pipeline rank and size vLLM's distributed state would report."""

    def set_stage(rank: int, pp: int) -> None:
        monkeypatch.setattr(loader_module, "_pp_rank_and_size", lambda: (rank, pp))

    set_stage(0, 1)
    yield set_stage


def hf_dir(store: ModelStore, tmp_path: Path) -> Path:
    return store.download_side_files(tmp_path / "hf")


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (from /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def assert_adopted_in_place(model: nn.Module, node: Node) -> None:
    """Every parameter's storage lies inside a mapping of the node's weights file."""
    regions = mappings_of(node.shm.weights_path)
    assert regions, "the weights file is not mapped by this process"
    for name, param in model.named_parameters():
        start = param.data_ptr()
        end = start + param.numel() * param.element_size()
        assert any(lo <= start and end <= hi for lo, hi in regions), f"{name} is a copy"


def assert_values(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params, "the module has no parameters"
    for name, param in params.items():
        assert torch.equal(param.data, expected[name]), name


def events(tmp_path: Path, stage: str) -> list[dict[str, Any]]:
    return [e for e in read_timeline(tmp_path / "timeline.jsonl") if e["stage"] == stage]


def test_eager_load_adopts_every_parameter_from_shared_memory_without_a_copy(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    store, expected = pushed
    node = Node(tmp_path, store)
    node.fetch(1, 0)
    node.join()
    model = TinyLlama()
    make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), True))
    assert_values(model, expected)  # q/k/v and gate/up fused by the store, as vLLM keeps them
    assert_adopted_in_place(model, node)
    (load,) = events(tmp_path, "weight_load")
    assert load["adopted_zero_copy"] == len(list(model.parameters()))
    assert load["copied_bytes"] == 0 and load["remapped"] == 0


def test_a_pipeline_stage_adopts_its_own_tensors_from_its_own_fetch(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    store, expected = pushed
    node = Node(tmp_path, store)
    node.fetch(2, 1)  # this node fetched stage 1 of 2 only
    node.join()
    stage(1, 2)
    info = store.manifest().stage(2, 1)
    model = TinyLlama(range(info.start_layer, info.end_layer), first=False, last=True)
    make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), True))
    assert_values(model, expected)
    assert_adopted_in_place(model, node)


def test_eager_load_waits_for_verified_bytes_and_says_what_did_not_arrive(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    store, _ = pushed
    node = Node(tmp_path, store)
    held = HeldStore(store)
    node.fetch(1, 0, via=held)  # started, but no byte arrives
    model = TinyLlama()
    loader = make_loader(node, tmp_path, timeout=0.5)
    with pytest.raises(StageUnavailable, match=r"did not arrive within .*fetch fetching"):
        loader.load_weights(model, model_config(hf_dir(store, tmp_path), True))
    assert all(not p.any() for p in model.parameters())  # nothing unverified was adopted
    held.gate.set()
    node.join()


def test_eager_load_fails_with_the_reason_when_a_byte_is_corrupt(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    store, _ = pushed
    node = Node(tmp_path, store)
    victim = node.manifest.tensor("model.layers.1.mlp.down_proj.weight")
    corrupt = HeldStore(store, corrupt_at=victim.offset + 7)
    corrupt.gate.set()
    node.fetch(1, 0, via=corrupt)
    model = TinyLlama()
    with pytest.raises(StageUnavailable, match=r"failed: tensor model\.layers\.1\.mlp\.down_proj"):
        make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), True))
    node.join()
    assert node.shm.read_status("full").state == FetchState.FAILED  # type: ignore[union-attr]


def test_a_source_maps_only_once_the_file_exists_and_reports_a_fetch_failed_first(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """A fetch publishes its state before it creates the weights file (CI caught a loader
    mapping in between: FileNotFoundError instead of the fetch's reason)."""
    store, _ = pushed
    node = Node(tmp_path, store)
    name = fetch_name(None, None)
    ranges = node.manifest.fetch_ranges(None, None)
    node.shm.write_status(name, FetchStatus(state=FetchState.FETCHING, ranges=ranges))
    source = StageSource(node.shm, node.manifest, None, None, timeout_seconds=0.2)
    with pytest.raises(StageUnavailable, match="no fetch of tiny started"):
        source.wait_started()  # a state without a file is not started yet
    node.shm.create_weights_file(node.manifest.weights_size)
    source.wait_started()
    assert len(source.buffer()) == node.manifest.weights_size
    node.shm.weights_path.unlink()
    node.shm.write_status(
        name, FetchStatus(state=FetchState.FAILED, ranges=ranges, error="the store is gone")
    )
    again = StageSource(node.shm, node.manifest, None, None, timeout_seconds=30)
    with pytest.raises(StageUnavailable, match=r"\(full\) failed: the store is gone"):
        again.wait_started()


def test_compiled_mode_adopts_the_stage_before_its_bytes_arrive_and_verifies_after(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    store, expected = pushed
    node = Node(tmp_path, store)
    held = HeldStore(store)
    fetcher = node.fetch(1, 0, via=held)
    model = TinyLlama()
    # Returns while not one byte has arrived: compilation may start on the mapping.
    make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), False))
    assert fetcher.status.verified == 0
    assert_adopted_in_place(model, node)
    (load,) = events(tmp_path, "weight_load")
    assert load["adopted_early"] == len(list(model.parameters()))
    assert not events(tmp_path, "weights_verified")
    held.gate.set()
    node.join()
    # The shared mapping shows the bytes that landed after adoption, and they were verified.
    assert_values(model, expected)
    verified = read_verified(tmp_path)
    assert verified["end"] >= load["end"]


def test_an_eager_pipeline_stage_adopts_early_too(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]], tmp_path: Path, stage: Any
) -> None:
    """A pipeline is ready only once every stage's fetch is verified, so an eager stage
    (no warm-up on CPU) also starts its engine on bytes still arriving."""
    store, expected = pushed
    node = Node(tmp_path, store)
    held = HeldStore(store)
    fetcher = node.fetch(2, 1, via=held)
    stage(1, 2)
    info = store.manifest().stage(2, 1)
    model = TinyLlama(range(info.start_layer, info.end_layer), first=False, last=True)
    make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), True))
    assert fetcher.status.verified == 0
    (load,) = events(tmp_path, "weight_load")
    assert load["adopted_early"] == len(list(model.parameters()))
    held.gate.set()
    node.join()
    assert_values(model, expected)
    assert read_verified(tmp_path)["end"] >= load["end"]


def read_verified(tmp_path: Path, timeout: float = 30.0) -> dict[str, Any]:
    """The loader's ``weights_verified`` event, written by its verifying thread once the
    last byte passed its check (polled: an event to wait on, not a time)."""
    deadline = time.monotonic() + timeout
    while not (found := events(tmp_path, "weights_verified")):
        assert time.monotonic() < deadline, f"no weights_verified event within {timeout} s"
        time.sleep(0.01)
    return found[0]


def test_compiled_mode_exits_rather_than_serve_an_unverified_byte(
    pushed: tuple[ModelStore, dict[str, torch.Tensor]],
    tmp_path: Path,
    stage: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, _ = pushed
    node = Node(tmp_path, store)
    victim = node.manifest.tensor("model.layers.3.self_attn.qkv_proj.weight")
    corrupt = HeldStore(store, corrupt_at=victim.end - 1)
    node.fetch(1, 0, via=corrupt)
    exits: list[int] = []
    exited = threading.Event()

    def exit_process(code: int) -> None:
        """os._exit, minus ending pytest: record the code; like an exit, never return."""
        exits.append(code)
        exited.set()
        threading.Event().wait()

    monkeypatch.setattr(os, "_exit", exit_process)
    model = TinyLlama()
    make_loader(node, tmp_path).load_weights(model, model_config(hf_dir(store, tmp_path), False))
    assert not exited.is_set()  # adopted early: the engine goes on compiling meanwhile
    corrupt.gate.set()
    node.join()
    assert exited.wait(30), "the loader did not stop the process"
    assert exits == [3]
    assert not events(tmp_path, "weights_verified")
