"""Model-level operations on a store: push a checkpoint, list models, read verified bytes."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydraserve.settings import S3Settings
from hydraserve.store.backends import (
    ObjectNotFound,
    S3Backend,
    StoreBackend,
    StoreError,
    open_backend,
)
from hydraserve.store.layout import plan_layout
from hydraserve.store.manifest import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    FileInfo,
    Manifest,
    TensorInfo,
    build_partitions,
    layer_of,
    split_parts,
)
from hydraserve.store.safetensors_format import (
    TensorSlot,
    encode_header,
    read_file_header,
)
from hydraserve.store.uri import StoreURI

# Files copied next to the weights: what vLLM needs to build the model and tokenizer.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

# (phase, bytes done in this phase, phase total)
PushProgress = Callable[[str, int, int], None]


class ChecksumError(StoreError):
    """Bytes did not match the manifest's sha256; the message names the tensor."""


class ModelNotFound(StoreError):
    pass


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_tensor(tensor: TensorInfo, data: bytes | memoryview, where: str) -> None:
    if len(data) != tensor.size:
        raise ChecksumError(
            f"{where}: tensor {tensor.name} has {len(data)} bytes, expected {tensor.size}"
        )
    digest = sha256_hex(data)
    if digest != tensor.sha256:
        raise ChecksumError(
            f"{where}: tensor {tensor.name} failed its sha256 check "
            f"(bytes [{tensor.offset}, {tensor.end}) of the weights file): "
            f"got {digest[:12]}…, manifest says {tensor.sha256[:12]}…"
        )


@dataclass(frozen=True)
class ModelRef:
    """A model in a store: its location URI and revision."""

    uri: str
    revision: str = "main"

    @property
    def store_uri(self) -> StoreURI:
        return StoreURI.parse(self.uri).join(self.revision)


def _load_checkpoint_slots(src: Path) -> tuple[list[TensorSlot], dict[str, Path]]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise StoreError(f"{src}: no *.safetensors files (save with safe_serialization=True)")
    slots: list[TensorSlot] = []
    owner: dict[str, Path] = {}
    for path in files:
        _, file_slots, _ = read_file_header(path)
        for slot in file_slots:
            if slot.name in owner:
                raise StoreError(f"{src}: tensor {slot.name} appears in two files")
            owner[slot.name] = path
            slots.append(slot)
    return slots, owner


DEFAULT_PART_BYTES = 64 << 20


def build_store_layout(
    src: Path,
    out_dir: Path,
    name: str,
    revision: str,
    progress: PushProgress | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> Manifest:
    """Convert a Hugging Face checkpoint directory into the store layout under ``out_dir``."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise StoreError(f"{src}: missing config.json (is this a Hugging Face checkpoint?)")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or ["unknown"]
    num_layers = int(config.get("num_hidden_layers", 0))
    if num_layers < 1:
        raise StoreError(f"{config_path}: num_hidden_layers must be >= 1")
    slots, owner = _load_checkpoint_slots(src)
    layout, outputs = plan_layout(slots, architectures[0])
    dtypes = sorted({o.dtype for o in outputs})

    out_dir.mkdir(parents=True, exist_ok=True)
    header = encode_header([(o.name, o.dtype, o.shape, o.nbytes) for o in outputs])
    total = sum(o.nbytes for o in outputs)
    tensors: list[TensorInfo] = []
    file_hash = hashlib.sha256(header)
    done = 0
    maps: dict[Path, mmap.mmap] = {}
    try:
        for path in set(owner.values()):
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with open(out_dir / WEIGHTS_NAME, "wb") as out:
            out.write(header)
            offset = len(header)
            for o in outputs:
                digest = hashlib.sha256()
                for slot in o.sources:
                    chunk = memoryview(maps[owner[slot.name]])[slot.start : slot.end]
                    out.write(chunk)
                    digest.update(chunk)
                    file_hash.update(chunk)
                    chunk.release()
                tensors.append(
                    TensorInfo(
                        name=o.name,
                        dtype=o.dtype,
                        shape=list(o.shape),
                        offset=offset,
                        size=o.nbytes,
                        sha256=digest.hexdigest(),
                        layer=layer_of(o.name),
                    )
                )
                offset += o.nbytes
                done += o.nbytes
                if progress:
                    progress("convert", done, total)
    finally:
        for m in maps.values():
            m.close()

    side = []
    for fname in SIDE_FILES:
        path = src / fname
        if path.is_file():
            data = path.read_bytes()
            (out_dir / fname).write_bytes(data)
            side.append(FileInfo(name=fname, size=len(data), sha256=sha256_hex(data)))
    tie = bool(config.get("tie_word_embeddings", False))
    manifest = Manifest(
        name=name,
        revision=revision,
        architecture=architectures[0],
        layout=layout,
        dtype=dtypes[0] if len(dtypes) == 1 else "mixed",
        num_layers=num_layers,
        tie_word_embeddings=tie,
        weights_size=len(header) + total,
        weights_sha256=file_hash.hexdigest(),
        header_size=len(header),
        header_sha256=sha256_hex(header),
        weights_parts=split_parts(len(header) + total, part_bytes),
        files=side,
        tensors=tensors,
        partitions=build_partitions(tensors, num_layers, tie),
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1))
    return manifest


class ModelStore:
    """One model location (``<uri>/<revision>/``) in a store."""

    def __init__(self, ref: ModelRef, s3: S3Settings | None = None) -> None:
        self.ref = ref
        self.backend: StoreBackend = open_backend(ref.store_uri, s3)
        self._manifest: Manifest | None = None

    def __repr__(self) -> str:
        return f"ModelStore({self.ref.uri}@{self.ref.revision})"

    def manifest(self) -> Manifest:
        if self._manifest is None:
            try:
                raw = self._read_small(MANIFEST_NAME)
            except ObjectNotFound as exc:
                raise ModelNotFound(
                    f"no model at {self.ref.uri} revision {self.ref.revision}: "
                    f"{self.backend.describe(MANIFEST_NAME)} does not exist "
                    f"(push it with `hydraserve model push`)"
                ) from exc
            self._manifest = Manifest.model_validate_json(raw)
        return self._manifest

    def _read_small(self, key: str, attempts: int = 4) -> bytes:
        """A whole small object (manifest, config), retried across transient errors."""
        delay = 0.2
        for attempt in range(attempts):
            try:
                return self.backend.read(key)
            except ObjectNotFound:
                raise
            except StoreError:
                if attempt == attempts - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the weights file, from whichever objects hold them."""
        pieces = [
            self.backend.read_range(key, lo, hi)
            for key, lo, hi in self.manifest().parts_overlapping(start, end)
        ]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def download_weights(self, dest: Path, concurrency: int = 8) -> None:
        """The whole weights file into ``dest`` (parallel reads of its parts), verified."""
        manifest = self.manifest()
        parts = manifest.weights_parts or [(0, manifest.weights_size)]
        with open(dest, "wb") as out:
            out.truncate(manifest.weights_size)
            fd = out.fileno()

            def fetch(part: tuple[int, int]) -> None:
                os.pwrite(fd, self.read_range(*part), part[0])

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(fetch, parts))
        digest = hashlib.sha256()
        with open(dest, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
        if digest.hexdigest() != manifest.weights_sha256:
            raise ChecksumError(f"{self.ref.uri}: the downloaded weights failed their sha256")

    def read_config(self) -> dict[str, Any]:
        """The checkpoint's ``config.json`` (architecture sizes), verified."""
        info = next((f for f in self.manifest().files if f.name == "config.json"), None)
        if info is None:
            raise ModelNotFound(f"{self.ref.uri}: the model has no config.json")
        data = self._read_small(info.name)
        if sha256_hex(data) != info.sha256:
            raise ChecksumError(f"{self.ref.uri}: config.json failed its sha256 check")
        config: dict[str, Any] = json.loads(data)
        return config

    def read_tensor(self, name: str) -> bytes:
        """Bytes of one tensor, verified against its sha256."""
        tensor = self.manifest().tensor(name)
        data = self.read_range(tensor.offset, tensor.end)
        verify_tensor(tensor, data, str(self.ref.uri))
        return data

    def download_side_files(self, dest: Path) -> Path:
        """Config and tokenizer files (what vLLM needs besides weights) into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for info in self.manifest().files:
            target = dest / info.name
            if target.is_file() and sha256_hex(target.read_bytes()) == info.sha256:
                continue
            data = self._read_small(info.name)
            if sha256_hex(data) != info.sha256:
                raise ChecksumError(f"{self.ref.uri}: {info.name} failed its sha256 check")
            target.write_bytes(data)
        return dest

    def push(
        self,
        src: Path,
        name: str | None = None,
        progress: PushProgress | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> Manifest:
        """Convert and upload a Hugging Face checkpoint; the manifest is written last."""
        name = name or Path(StoreURI.parse(self.ref.uri).path).name
        if isinstance(self.backend, S3Backend):
            self.backend.ensure_bucket()
        with tempfile.TemporaryDirectory(prefix="hydraserve-push-") as tmp:
            manifest = build_store_layout(
                src, Path(tmp), name, self.ref.revision, progress, part_bytes
            )
            for info in manifest.files:
                self.backend.upload_file(info.name, Path(tmp) / info.name)
            uploaded = 0

            def on_bytes(n: int) -> None:
                nonlocal uploaded
                uploaded += n
                if progress:
                    progress("upload", uploaded, manifest.weights_size)

            weights = Path(tmp) / WEIGHTS_NAME
            if not manifest.weights_parts:
                self.backend.upload_file(WEIGHTS_NAME, weights, on_bytes)
            with open(weights, "rb") as f:
                for index, (start, end) in enumerate(manifest.weights_parts):
                    f.seek(start)
                    self.backend.write(manifest.part_key(index), f.read(end - start))
                    on_bytes(end - start)
            # The manifest last: its presence means the model is complete.
            self.backend.write(MANIFEST_NAME, (Path(tmp) / MANIFEST_NAME).read_bytes())
        self._manifest = manifest
        return manifest


@dataclass(frozen=True)
class ListedModel:
    uri: str
    revision: str
    manifest: Manifest


def list_models(root: str, s3: S3Settings | None = None) -> Iterator[ListedModel]:
    """Every complete model (one with a manifest) under a store root."""
    backend = open_backend(root, s3)
    for key in backend.list():
        parts = key.split("/")
        if parts[-1] != MANIFEST_NAME or len(parts) < 3:
            continue
        manifest = Manifest.model_validate_json(backend.read(key))
        model_uri = str(backend.uri.join("/".join(parts[:-2])))
        yield ListedModel(model_uri, parts[-2], manifest)
