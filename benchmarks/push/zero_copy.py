"""Zero-copy share by architecture, pipeline-only (tp 1) and tensor-parallel (tp 2).

For each architecture the installed engine is probed (``hydraserve.worker.layout_probe``:
its own model code on the meta device). tp 1: the share of the model's bytes the store
layout holds as engine parameters (adopted without a copy). tp 2: the share of each rank's
parameter bytes that are checkpoint slices laid end to end (column-parallel shards,
replicated norms), i.e. what a store laid out per (tp, rank) could hand over without a
copy; row-parallel shards are strided and always copied.

Checkpoints: the tiny random ones of ``hydraserve model make-demo --arch`` and, at real
sizes, sparse files (a safetensors header, zero pages never written: no disk, no memory)
shaped like Llama-3-8B, Qwen2-7B and Mixtral-8x7B: the probe reads shapes, never bytes.

``.venv/bin/python -m benchmarks.push.zero_copy`` → ``benchmarks/results/zero_copy.json``.
Deterministic (no timing): one run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from hydraserve.store.architectures import ARCHITECTURES, build_checkpoint
from hydraserve.store.demo import build_tokenizer
from hydraserve.store.engine_layout import (
    ITEMSIZE,
    EngineProbe,
    RankProbe,
    adoptable_bytes,
    plan_units,
)
from hydraserve.store.safetensors_format import encode_header, read_file_header

REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama-3-8B shape": (
        "LlamaConfig",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 128256,
            "max_position_embeddings": 8192,
        },
    ),
    "Qwen2-7B shape": (
        "Qwen2Config",
        {
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
        },
    ),
    "Mixtral-8x7B shape": (
        "MixtralConfig",
        {
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32000,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    ),
}


def sparse_checkpoint(config_class: str, fields: dict[str, Any], dest: Path) -> Path:
    """config.json and a full-size safetensors file whose data pages are never written."""
    import torch
    import transformers

    config = getattr(transformers, config_class)(**fields)
    config.torch_dtype = "bfloat16"
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(dest)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = []
    for name, tensor in model.state_dict().items():
        tensors += [
            (n, "BF16", shape, 2 * math.prod(shape)) for n, shape in _as_on_hub(name, tensor)
        ]
    header = encode_header(tensors)
    path = dest / "model.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(size for *_, size in tensors))
    build_tokenizer(dest, 512)
    return dest


def _as_on_hub(name: str, tensor: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint names as published (transformers keeps MoE experts fused in memory and
    splits them per expert when it saves: w1/w3 = gate/up, w2 = down)."""
    shape = tuple(tensor.shape)
    if name.endswith("mlp.gate.weight"):
        return [(name.replace("mlp.gate", "block_sparse_moe.gate"), shape)]
    prefix = name.rsplit("mlp.experts.", 1)[0] + "block_sparse_moe.experts"
    if name.endswith("mlp.experts.gate_up_proj"):
        experts, rows, cols = shape
        half = (rows // 2, cols)
        return [(f"{prefix}.{e}.{w}.weight", half) for e in range(experts) for w in ("w1", "w3")]
    if name.endswith("mlp.experts.down_proj"):
        return [(f"{prefix}.{e}.w2.weight", shape[1:]) for e in range(shape[0])]
    return [(name, shape)]


def probe(checkpoint: Path, out: Path, tp: int = 1) -> Any:
    cmd = [sys.executable, "-m", "hydraserve.worker.layout_probe", str(checkpoint), str(out)]
    if tp > 1:
        cmd += ["--tp", str(tp)]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())


def shares(checkpoint: Path, work: Path) -> dict[str, Any]:
    whole = EngineProbe.model_validate(probe(checkpoint, work / "tp1.json")).rank(1, 0)
    sizes: dict[str, tuple[int, str]] = {}
    for path in checkpoint.glob("*.safetensors"):
        for slot in read_file_header(path)[1]:
            sizes[slot.name] = (slot.size // ITEMSIZE.get(slot.dtype, 2), slot.dtype)
    units = plan_units(whole, sizes)
    total = sum(n * ITEMSIZE.get(d, 2) for n, d in sizes.values())
    adopted = sum(
        sizes[s.checkpoint][0] * ITEMSIZE.get(sizes[s.checkpoint][1], 2)
        for u in units
        if u.param is not None
        for s in u.sources
    )
    ranks = [RankProbe.model_validate(r) for r in probe(checkpoint, work / "tp2.json", tp=2)]
    per_rank = [adoptable_bytes(r) for r in ranks]
    return {
        "model_bytes": total,
        "tp1_zero_copy_share": adopted / total,
        "tp2_adoptable_share_per_rank": [a / t for a, t in per_rank],
        "tp2_rank_bytes": [t for _, t in per_rank],
    }


def main() -> None:
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hydraserve-zero-copy-") as tmp:
        root = Path(tmp)
        checkpoints = {
            f"{arch} (tiny)": build_checkpoint(arch, root / arch) for arch in ARCHITECTURES
        }
        for name, (config_class, fields) in REAL_SHAPES.items():
            checkpoints[name] = sparse_checkpoint(config_class, fields, root / name)
        for name, path in checkpoints.items():
            work = root / f"{name}-probe"
            work.mkdir()
            rows[name] = shares(path, work)
    print(f"{'model':<24} {'size':>10} {'tp 1 (pp only)':>15} {'tp 2 (per rank)':>18}")
    for name, row in rows.items():
        tp2 = " / ".join(f"{s:.0%}" for s in row["tp2_adoptable_share_per_rank"])
        size = f"{row['model_bytes'] / 1e6:.1f} MB"
        print(f"{name:<24} {size:>10} {row['tp1_zero_copy_share']:>15.0%} {tp2:>18}")
    write_result("zero_copy", {"machine": machine_info(), "models": rows})


if __name__ == "__main__":
    main()
