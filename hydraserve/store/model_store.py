"""Model-level operations on a store: push a checkpoint, list models, read verified bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydraserve.logs import get_logger
from hydraserve.settings import S3Settings
from hydraserve.store.backends import (
    ObjectNotFound,
    S3Backend,
    StoreBackend,
    StoreError,
    open_backend,
)
from hydraserve.store.checkpoint import (
    check_config,
    check_dtypes,
    check_weight_files,
    resolve_checkpoint_dir,
)
from hydraserve.store.engine_layout import (
    EngineProbe,
    Unit,
    engine_partitions,
    order_units,
    plan_units,
)
from hydraserve.store.layout import (
    LayoutError,
    OutputTensor,
    checkpoint_layout,
    engine_layout,
)
from hydraserve.store.manifest import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointPart,
    FileInfo,
    Manifest,
    TensorInfo,
    build_partitions,
    layer_of,
    split_parts,
)
from hydraserve.store.probing import ProbeFailed, probe_engine
from hydraserve.store.safetensors_format import (
    DTYPE_BYTES,
    TensorSlot,
    encode_header,
    numel,
    read_file_header,
)
from hydraserve.store.uri import StoreURI

log = get_logger("store.model_store")

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
    "chat_template.json",
    "added_tokens.json",
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
    slots: list[TensorSlot] = []
    owner: dict[str, Path] = {}
    for path in check_weight_files(src):
        _, file_slots, _ = read_file_header(path)
        for slot in file_slots:
            if slot.name in owner:
                raise StoreError(f"{src}: tensor {slot.name} appears in two files")
            owner[slot.name] = path
            slots.append(slot)
    return slots, owner


DEFAULT_PART_BYTES = 64 << 20
UPLOAD_CONCURRENCY = 4  # parts in flight: the push holds at most this many in memory


class ConvertedCheckpoint:
    """A Hugging Face checkpoint in the store layout, produced as a stream of bytes.

    Nothing is written to disk: :meth:`chunks` reads the checkpoint's tensors (memory
    mapped) in the store file's order and hashes them on the way, so a push needs no
    scratch space whatever the model's size; :meth:`manifest` is complete once the stream
    has been read to its end.
    """

    def __init__(
        self,
        src: Path,
        name: str,
        revision: str,
        probe_cache: Path | None = None,
        use_engine: bool = True,
    ) -> None:
        src = resolve_checkpoint_dir(src)
        self.src = src
        self.name = name
        self.revision = revision
        self.config = check_config(src)
        self.architecture = self.config["architectures"][0]
        self.num_layers = int(self.config["num_hidden_layers"])
        slots, self._owner = _load_checkpoint_slots(src)
        check_dtypes({s.dtype for s in slots}, src)
        # Why the layout is not the engine's (None: it is): push says it.
        self.engine_note: str | None = None
        self.probe: EngineProbe | None = None
        self._units: list[Unit] = []
        self.outputs: list[OutputTensor]
        if use_engine:
            try:
                self.probe = probe_engine(src, slots, probe_cache)
                whole = self.probe.rank(1, 0)
                sizes = {s.name: (numel(s.shape), s.dtype) for s in slots}
                self._units = order_units(whole, plan_units(whole, sizes))
                self.outputs = engine_layout(self._units, whole, {s.name: s for s in slots})
            except (ProbeFailed, LayoutError, KeyError) as exc:
                self.probe, self._units = None, []
                self.engine_note = str(exc)
        else:
            self.engine_note = "the engine was not asked (use_engine=False)"
        if self.probe is None:
            self.outputs = checkpoint_layout(slots)
            log.warning("push.no_engine_layout", model=name, reason=self.engine_note)
        self.layout: Literal["vllm", "hf"] = "vllm" if self.probe is not None else "hf"
        self.header = encode_header([(o.name, o.dtype, o.shape, o.nbytes) for o in self.outputs])
        self.size = len(self.header) + sum(o.nbytes for o in self.outputs)
        self._tensors: list[TensorInfo] | None = None
        self._file_sha256: str | None = None

    @property
    def zero_copy_bytes(self) -> int:
        """Bytes the engine adopts as they are (parameters made of checkpoint bytes)."""
        return sum(o.nbytes for o in self.outputs if o.param is not None)

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The store file's bytes in order (views into the mapped checkpoint)."""
        file_hash = hashlib.sha256(self.header)
        tensors: list[TensorInfo] = []
        maps: dict[Path, mmap.mmap] = {}
        try:
            for path in set(self._owner.values()):
                with open(path, "rb") as f:
                    maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            yield self.header
            offset = len(self.header)
            for o in self.outputs:
                digest = hashlib.sha256()
                for slot in o.sources:
                    chunk = memoryview(maps[self._owner[slot.name]])[slot.start : slot.end]
                    try:
                        digest.update(chunk)
                        file_hash.update(chunk)
                        yield chunk
                    finally:  # also when the push stops early: the map must close
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
                        param=o.param,
                        parts=[CheckpointPart(name=s.name, shape=list(s.shape)) for s in o.sources]
                        if o.fused
                        else None,
                    )
                )
                offset += o.nbytes
        finally:
            for m in maps.values():
                # A consumer that stopped early may still hold a view of a chunk: then the
                # map closes when that view goes.
                with contextlib.suppress(BufferError):
                    m.close()
        self._tensors = tensors
        self._file_sha256 = file_hash.hexdigest()

    def side_files(self) -> list[tuple[FileInfo, bytes]]:
        out = []
        for fname in SIDE_FILES:
            path = self.src / fname
            if path.is_file():
                data = path.read_bytes()
                out.append((FileInfo(name=fname, size=len(data), sha256=sha256_hex(data)), data))
        return out

    def manifest(self, part_bytes: int, files: list[FileInfo]) -> Manifest:
        if self._tensors is None or self._file_sha256 is None:
            raise RuntimeError("read every chunk before asking for the manifest")
        dtypes = sorted({t.dtype for t in self._tensors})
        tie = bool(self.config.get("tie_word_embeddings", False))
        return Manifest(
            name=self.name,
            revision=self.revision,
            architecture=self.architecture,
            layout=self.layout,
            dtype=dtypes[0] if len(dtypes) == 1 else "mixed",
            num_layers=self.num_layers,
            tie_word_embeddings=tie,
            weights_size=self.size,
            weights_sha256=self._file_sha256,
            header_size=len(self.header),
            header_sha256=sha256_hex(self.header),
            weights_parts=split_parts(self.size, part_bytes),
            files=files,
            tensors=self._tensors,
            engine=self.probe.engine if self.probe is not None else None,
            partitions=engine_partitions(self.probe, self._units, self._tensors)
            if self.probe is not None
            # Without the engine nobody knows what a rank builds: one stage only.
            else build_partitions(self._tensors, self.num_layers, tie, max_pp=1),
        )


def _parts(chunks: Iterator[memoryview | bytes], bounds: list[tuple[int, int]]) -> Iterator[bytes]:
    """The stream cut at ``bounds`` (each part's bytes, in order)."""
    index, buffer = 0, bytearray()
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            want = (bounds[index][1] - bounds[index][0]) - len(buffer)
            buffer += view[:want]
            view = view[want:]
            if len(buffer) == bounds[index][1] - bounds[index][0]:
                yield bytes(buffer)
                index, buffer = index + 1, bytearray()
        view.release()


class ModelStore:
    """One model location (``<uri>/<revision>/``) in a store."""

    def __init__(self, ref: ModelRef, s3: S3Settings | None = None) -> None:
        self.ref = ref
        self.backend: StoreBackend = open_backend(ref.store_uri, s3)
        self._manifest: Manifest | None = None
        self.last_push: PushReport | None = None

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

    def download_checkpoint(self, dest: Path, concurrency: int = 8) -> None:
        """The model as its checkpoint was (one safetensors file, the checkpoint's own tensor
        names and shapes, fused tensors split back into their parts) into ``dest``, every
        tensor verified: what stock engines load, e.g. a serverless-vLLM baseline."""
        manifest = self.manifest()
        entries: list[tuple[str, str, tuple[int, ...], int]] = []
        for tensor in manifest.tensors:
            itemsize = DTYPE_BYTES[tensor.dtype]
            pieces = tensor.parts or [CheckpointPart(name=tensor.name, shape=tensor.shape)]
            for piece in pieces:
                nbytes = numel(piece.shape) * itemsize
                entries.append((piece.name, tensor.dtype, tuple(piece.shape), nbytes))
        header = encode_header(entries, {"format": "pt"})
        where: dict[str, int] = {}  # stored tensor -> its first byte in dest
        position = len(header)
        for tensor in manifest.tensors:
            where[tensor.name] = position
            position += tensor.size
        ordered = sorted(manifest.tensors, key=lambda t: t.offset)

        # The stored parts, whole (as the weights are stored: one read each); a stored
        # tensor's checkpoint parts are its bytes end to end, so each overlap is one write.
        def fetch(part: tuple[int, int]) -> None:
            start, end = part
            data = memoryview(self.read_range(start, end))
            for tensor in ordered:
                low, high = max(start, tensor.offset), min(end, tensor.end)
                if low < high:
                    os.pwrite(
                        fd,
                        data[low - start : high - start],
                        where[tensor.name] + low - tensor.offset,
                    )

        with open(dest, "wb") as out:
            out.write(header)
            out.truncate(position)
            fd = out.fileno()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(fetch, manifest.weights_parts or [(0, manifest.weights_size)]))
        with open(dest, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for tensor in manifest.tensors:
                at = where[tensor.name]
                verify_tensor(tensor, memoryview(buf)[at : at + tensor.size], str(dest))

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
        concurrency: int = UPLOAD_CONCURRENCY,
        probe_cache: Path | None = None,
        use_engine: bool = True,
    ) -> Manifest:
        """Convert and upload a Hugging Face checkpoint; the manifest is written last.

        The layout and each rank's stage come from the installed engine's own model code
        (``use_engine``; probes cached in ``probe_cache``); without it only pp 1 is offered.

        Streams part by part (no scratch copy; at most ``concurrency`` parts in memory),
        uploads parts in parallel, and resumes: a part already in the store whose recorded
        sha256 matches is not sent again. A checkpoint that cannot be served is refused
        before anything is uploaded. ``part_bytes`` 0 stores one object (held in memory).
        """
        name = name or Path(StoreURI.parse(self.ref.uri).path).name
        converted = ConvertedCheckpoint(  # refuses first
            src, name, self.ref.revision, probe_cache=probe_cache, use_engine=use_engine
        )
        if isinstance(self.backend, S3Backend):
            self.backend.ensure_bucket()
        # Incomplete from here until the new manifest is written.
        if self.backend.exists(MANIFEST_NAME):
            self.backend.delete_prefix(MANIFEST_NAME)
        # No parts: one object, the whole file.
        bounds = split_parts(converted.size, part_bytes) or [(0, converted.size)]
        keys = (
            [WEIGHTS_NAME]
            if len(bounds) == 1
            else [Manifest.part_key_for(WEIGHTS_NAME, i) for i in range(len(bounds))]
        )
        done = skipped = 0
        total = converted.size

        def upload(key: str, data: bytes) -> int:
            digest = sha256_hex(data)
            marker = f"{key}.sha256"
            if (
                self.backend.exists(marker)
                and self.backend.read(marker).decode() == digest
                and self.backend.exists(key)
                and self.backend.size(key) == len(data)
            ):
                return 0  # already there: an earlier, interrupted push sent it
            self.backend.write(key, data)
            self.backend.write(marker, digest.encode())
            return len(data)

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            pending: list[tuple[Future[int], int]] = []

            def settle(keep: int) -> None:
                nonlocal done, skipped
                while len(pending) > keep:
                    future, size = pending.pop(0)
                    sent = future.result()
                    done += size
                    skipped += size - sent
                    if progress:
                        progress("upload", done, total)

            for key, data in zip(keys, _parts(converted.chunks(), bounds), strict=True):
                settle(max(0, concurrency - 1))
                pending.append((pool.submit(upload, key, data), len(data)))
            settle(0)
        side = converted.side_files()
        for info, data in side:
            self.backend.write(info.name, data)
        manifest = converted.manifest(part_bytes, [info for info, _ in side])
        # The manifest last: its presence means the model is complete.
        self.backend.write(MANIFEST_NAME, manifest.model_dump_json(indent=1).encode())
        self._manifest = manifest
        self.last_push = PushReport(
            uploaded_bytes=total - skipped, skipped_bytes=skipped, engine_note=converted.engine_note
        )
        return manifest


@dataclass(frozen=True)
class PushReport:
    uploaded_bytes: int
    skipped_bytes: int  # parts an earlier push had sent already
    engine_note: str | None = None  # why the layout is not the engine's (None: it is)


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
