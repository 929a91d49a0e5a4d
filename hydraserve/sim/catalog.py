"""Model classes of the simulator: real sizes, partitioned by the store's own code.

A simulated model has no weights, but its manifest is built exactly as ``hydraserve model
push`` builds one (same tensor order, same :func:`build_partitions`), so the stage layer
ranges and bytes the planner sees are those a real Llama-2 checkpoint of that shape gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from hydraserve.planner import ModelProfile, profile_from_manifest
from hydraserve.store.manifest import Manifest, TensorInfo, build_partitions

GB = 1e9


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 32000
    dtype_bytes: int = 2  # fp16
    heads: int = 32
    kv_heads: int | None = None  # grouped-query attention (Llama-2-70B: 8); None = heads

    def tensors(self) -> list[tuple[str, list[int]]]:
        h, i = self.hidden, self.intermediate
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        names: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [self.vocab, h])]
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}."
            names += [
                (prefix + "input_layernorm.weight", [h]),
                (prefix + "self_attn.qkv_proj.weight", [h + 2 * kv, h]),
                (prefix + "self_attn.o_proj.weight", [h, h]),
                (prefix + "post_attention_layernorm.weight", [h]),
                (prefix + "mlp.gate_up_proj.weight", [2 * i, h]),
                (prefix + "mlp.down_proj.weight", [h, i]),
            ]
        names += [("model.norm.weight", [h]), ("lm_head.weight", [self.vocab, h])]
        return names


@dataclass(frozen=True)
class ModelClass:
    """A model size class with its speeds per GPU type (profiled figures)."""

    name: str
    shape: LlamaShape
    kv_bytes: int  # KV cache and activations of one replica
    # Per GPU type, pp = 1 on one GPU (for a model larger than a GPU: what one GPU would
    # take if it fitted; the planner divides by the tensor-parallel speed-up).
    tpot_s: dict[str, float] = field(default_factory=dict)
    prefill_s_per_token: dict[str, float] = field(default_factory=dict)
    tp: int = 1  # GPUs per worker it is served with (spec.parallelism.tensor)

    @property
    def manifest(self) -> Manifest:
        return synthetic_manifest(self.name, self.shape)

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def replica_bytes(self) -> int:
        return self.total_bytes + self.kv_bytes

    def profile(self, key: str, mean_prompt_tokens: float) -> ModelProfile:
        prefill = {gpu: mean_prompt_tokens * s for gpu, s in self.prefill_s_per_token.items()}
        return profile_from_manifest(
            self.manifest, self.replica_bytes, key, prefill_s=prefill, tpot_s=self.tpot_s
        )


@cache
def synthetic_manifest(name: str, shape: LlamaShape) -> Manifest:
    """A manifest for a checkpoint of ``shape`` (no weights; hashes are placeholders)."""
    tensors: list[TensorInfo] = []
    offset = 0
    for tensor_name, dims in shape.tensors():
        size = shape.dtype_bytes
        for d in dims:
            size *= d
        layer = _layer_of(tensor_name)
        tensors.append(
            TensorInfo(
                name=tensor_name,
                dtype="F16",
                shape=dims,
                offset=offset,
                size=size,
                sha256="0" * 64,
                layer=layer,
            )
        )
        offset += size
    return Manifest(
        name=name,
        revision="sim",
        architecture="LlamaForCausalLM",
        layout="vllm",
        dtype="float16",
        num_layers=shape.layers,
        weights_size=offset,
        weights_sha256="0" * 64,
        header_size=0,
        header_sha256="0" * 64,
        files=[],
        tensors=tensors,
        partitions=build_partitions(tensors, shape.layers, tie_word_embeddings=False),
    )


def _layer_of(tensor_name: str) -> int | None:
    from hydraserve.store.manifest import layer_of

    return layer_of(tensor_name)


# Llama-2 shapes. Speeds: TPOT at batch 1 from the paper artifact's profiles (7B 42 ms,
# 13B 58 ms, whose doubles are its code/summarisation TPOT SLOs), A10 decoding ~1.4x
# slower than V100 (600 vs 900 GB/s of memory bandwidth); prefill per prompt token.
LLAMA2_7B = ModelClass(
    name="llama-2-7b",
    shape=LlamaShape(hidden=4096, layers=32, intermediate=11008),
    kv_bytes=int(5 * GB),
    tpot_s={"V100": 0.035, "A10": 0.042},
    prefill_s_per_token={"V100": 0.00018, "A10": 0.0002},
)
LLAMA2_13B = ModelClass(
    name="llama-2-13b",
    shape=LlamaShape(hidden=5120, layers=40, intermediate=13824),
    kv_bytes=int(5 * GB),
    tpot_s={"V100": 0.050, "A10": 0.070},
    prefill_s_per_token={"V100": 0.00033, "A10": 0.00037},
)
MODEL_CLASSES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B}

# Models larger than one GPU, served with tensor parallelism inside a node: Llama-2-70B
# (80 layers, GQA with 8 KV heads; 138 GB in fp16) on 4 GPUs per worker. Speeds on
# 80 GB GPUs as if one GPU held it, from memory bandwidth for decoding (138 GB at ~2.0 and
# ~3.35 TB/s, ~70 % achieved) and ~2 x 69 GFLOP per prompt token at ~40 % of dense bf16.
LLAMA2_70B = ModelClass(
    name="llama-2-70b",
    shape=LlamaShape(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8),
    kv_bytes=int(20 * GB),
    tpot_s={"A100": 0.100, "H100": 0.060},
    prefill_s_per_token={"A100": 0.0011, "H100": 0.00045},
    tp=4,
)
# Not in MODEL_CLASSES: the reference workload (the paper's 7B/13B mix) stays as it was;
# the large-model benchmark asks for these by name.
LARGE_MODEL_CLASSES = {"70b": LLAMA2_70B}
CATALOG = MODEL_CLASSES | LARGE_MODEL_CLASSES
