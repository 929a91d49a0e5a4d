"""Random-weight checkpoints of real architectures, built offline from ``transformers``'
config classes (tiny shapes), with the demo tokenizer: ``hydraserve model make-demo --arch``.

Not our demo model: vLLM builds each with its own model code, so they exercise what the store,
the probe and the loader must learn from the engine (fused q/k/v and gate/up, tied
embeddings, q/k/v bias, modules built on every rank, MoE expert stacks, checkpoints whose
q/k/v are already fused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydraserve.store.demo import build_tokenizer

ARCHITECTURES = ("llama", "qwen2", "gemma", "mixtral", "phi3")
VOCAB = 512

# head_dim 32: vLLM's CPU attention rejects smaller heads. A wide initialisation keeps
# greedy margins large, so bf16 rounding differences between engines cannot flip tokens.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def _config(arch: str) -> Any:
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen2":  # tied embeddings, q/k/v bias
        return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    if arch == "gemma":  # norms built on every rank, embeddings tied
        return transformers.GemmaConfig(**_COMMON, head_dim=32)
    if arch == "mixtral":  # MoE: expert stacks, and modules on every rank
        return transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "phi3":  # q/k/v and gate/up already fused in the checkpoint
        return transformers.Phi3Config(**_COMMON, pad_token_id=2)
    raise ValueError(f"unknown architecture {arch}; choose from {ARCHITECTURES}")


def build_checkpoint(arch: str, dest: Path, seed: int = 0) -> Path:
    """A bf16 safetensors checkpoint of ``arch`` with random weights and a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch)
    config.torch_dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    build_tokenizer(dest, VOCAB)
    return dest
