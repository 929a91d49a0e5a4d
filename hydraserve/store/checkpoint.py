"""What a checkpoint must be for HydraServe to serve it, checked before any byte is uploaded.

A refusal says what is wrong and what to do, so a user learns it from ``hydraserve model
push`` and never from a worker that fails at its first cold start.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from hydraserve.store.backends import StoreError

# Weight dtypes the loader maps as they are (no quantized or packed integer weights).
SERVABLE_DTYPES = frozenset({"BF16", "F16", "F32"})
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class UnservableCheckpoint(StoreError):
    """The checkpoint cannot be served by this platform; the message says why."""


@cache
def engine_architectures() -> frozenset[str] | None:
    """The architectures the installed vLLM can build (asked from vLLM itself); None
    where vLLM is not installed (then the worker's engine is the judge)."""
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        return None
    return frozenset(ModelRegistry.get_supported_archs())


def resolve_checkpoint_dir(src: Path, revision: str = "main") -> Path:
    """The checkpoint directory itself, also when ``src`` is a model's folder in a Hugging
    Face cache (``models--org--name``: ``refs/<revision>`` names the snapshot to use)."""
    snapshots = src / "snapshots"
    if (src / "config.json").is_file() or not snapshots.is_dir():
        return src
    ref = src / "refs" / revision
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
        raise UnservableCheckpoint(f"{ref} names {snapshot.name}, which is not in {snapshots}")
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise UnservableCheckpoint(
        f"{src} is a Hugging Face cache folder with {len(found)} snapshots and no "
        f"refs/{revision}: pass the snapshot directory you mean"
    )


def check_config(src: Path) -> dict[str, Any]:
    """The checkpoint's config.json, if the model is one HydraServe can serve."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise UnservableCheckpoint(
            f"{src}: missing config.json (is this a Hugging Face checkpoint?)"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise UnservableCheckpoint(
            f"{src}: quantized checkpoint ({method}): HydraServe loads unquantized bf16, fp16 "
            "or fp32 weights straight from memory; push the unquantized checkpoint"
        )
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnservableCheckpoint(f"{config_path}: no 'architectures' entry: which model is it?")
    known = engine_architectures()
    if known is not None and architectures[0] not in known:
        raise UnservableCheckpoint(
            f"{config_path}: architecture {architectures[0]} is not one the engine (vLLM) "
            "on this platform can build; a newer vLLM or a supported architecture is needed"
        )
    if int(config.get("num_hidden_layers", 0)) < 1:
        raise UnservableCheckpoint(f"{config_path}: num_hidden_layers must be >= 1")
    return config


def check_weight_files(src: Path) -> list[Path]:
    """The checkpoint's safetensors files (one, or the shards of an index)."""
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = [p.name for pattern in PICKLED_WEIGHTS for p in sorted(src.glob(pattern))]
        if pickled:
            raise UnservableCheckpoint(
                f"{src}: weights are pickled ({', '.join(pickled[:3])}): loading them runs "
                "code. Convert to safetensors first (transformers: "
                "model.save_pretrained(dir, safe_serialization=True))"
            )
        raise UnservableCheckpoint(f"{src}: no *.safetensors files")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (src / s).is_file())
        if missing:
            raise UnservableCheckpoint(f"{index}: shards missing from {src}: {missing[:3]}")
    return files


def check_dtypes(dtypes: set[str], src: Path) -> None:
    odd = sorted(dtypes - SERVABLE_DTYPES)
    if odd:
        raise UnservableCheckpoint(
            f"{src}: tensors of dtype {', '.join(odd)} (a quantized or packed format): "
            "HydraServe serves bf16, fp16 or fp32 weights"
        )
