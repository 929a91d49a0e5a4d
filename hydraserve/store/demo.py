"""Random-weight Llama checkpoints and a byte-level BPE tokenizer, built offline.

Used by tests (a few MB) and benchmarks (1–4 GB). Deterministic for a given size and
seed. Written in Hugging Face format (``config.json``, ``model.safetensors``, tokenizer),
so ``transformers`` loads it as a reference and ``hydraserve model push`` converts it.
head_dim stays >= 32 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hydraserve.store.safetensors_format import encode_header


@dataclass(frozen=True)
class DemoSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def param_count(self) -> int:
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
        return 2 * self.vocab * h + self.layers * per_layer + h


DEMO_SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256),
    "small": DemoSize(hidden=256, layers=8, heads=8, kv_heads=4, intermediate=768),
    "100m": DemoSize(hidden=1024, layers=8, heads=8, kv_heads=4, intermediate=2816),
    "1g": DemoSize(hidden=2048, layers=11, heads=16, kv_heads=8, intermediate=5632),
    "2g": DemoSize(hidden=2048, layers=22, heads=16, kv_heads=8, intermediate=5632),
    "4g": DemoSize(hidden=2560, layers=28, heads=20, kv_heads=10, intermediate=6912),
}

_CORPUS = [
    "HydraServe starts large language models from zero in a few seconds.",
    "Pipeline parallel fetch splits a model across servers so every network card helps.",
    "The quick brown fox jumps over the lazy dog while the cluster scales to zero.",
    "Cold starts are slow because weights travel over one network interface.",
    "A worker adopts each tensor from shared memory as soon as its bytes arrive.",
    "Hello, world! How are you today? I am a tiny random language model.",
    "Once upon a time there was a serverless platform that never dropped a request.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ! ? @ # $ % ^ & _",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# Weight scales, chosen by measurement (see the comment in make_demo_model): greedy margins
# of ~17 nats, bf16-vs-fp32 top-5 logprob noise ~0.2, and zeroing one layer's down_proj
# moves the top-5 logprobs by 2.6-4.5.
LAYER_SCALE = 0.7
HEAD_GAIN = 4.0
HEAD_NOISE = 0.5


def _bf16_bytes(values: np.ndarray) -> bytes:
    """float32 → bfloat16 (round to nearest even), as raw little-endian bytes."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def build_tokenizer(dest: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on a fixed corpus; returns the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": UNK,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=1,
        )
    )
    (dest / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    )
    return int(tokenizer.get_vocab_size())


def make_demo_model(
    dest: Path,
    size: str = "tiny",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random-weight Llama checkpoint (bf16) with a tokenizer into ``dest``."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(DEMO_SIZES)}")
    spec = DEMO_SIZES[size]
    dest.mkdir(parents=True, exist_ok=True)
    token_count = build_tokenizer(dest, spec.vocab)
    vocab = max(spec.vocab, ((token_count + 63) // 64) * 64)
    h, i, hd = spec.hidden, spec.intermediate, spec.head_dim
    kv = spec.kv_heads * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]

    def numel(shape: tuple[int, ...]) -> int:
        return int(np.prod(shape))

    header = encode_header([(n, "BF16", s, 2 * numel(s)) for n, s in shapes])
    total = sum(2 * numel(s) for _, s in shapes)
    rng = np.random.default_rng(seed)
    # The LM head maps each token's embedding to a fixed successor (a random permutation)
    # with a wide logit margin, and the decoder layers perturb the residual stream only
    # moderately. Greedy output is then varied text whose argmax is robust to bf16
    # rounding differences between kernels, while every layer still moves the logprobs.
    successor = rng.permutation(vocab)
    embed = rng.standard_normal((vocab, h), dtype=np.float32)
    done = 0
    with open(dest / "model.safetensors", "wb") as out:
        out.write(header)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                values = np.ones(shape, dtype=np.float32)
            elif name == "model.embed_tokens.weight":
                values = embed
            elif name == "lm_head.weight":
                head = np.empty_like(embed)
                head[successor] = embed
                noise = rng.standard_normal(shape, dtype=np.float32)
                values = (head + noise * np.float32(HEAD_NOISE)) * np.float32(
                    HEAD_GAIN / np.sqrt(h)
                )
            else:
                std = LAYER_SCALE / np.sqrt(shape[-1])
                values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            out.write(_bf16_bytes(values))
            done += 2 * numel(shape)
            if progress:
                progress(done, total)

    bos_id, eos_id = 0, 1  # the trainer puts the special tokens first, in order
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": hd,
        "num_hidden_layers": spec.layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
        "hydraserve_demo": {"size": size, "seed": seed, **asdict(spec)},
    }
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    (dest / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_id})
    )
    return dest
