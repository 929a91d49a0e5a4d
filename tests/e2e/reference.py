"""Greedy reference decoding with ``transformers`` (the ground truth for engine outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    token_ids: list[int]
    top_logprobs: list[dict[int, float]]  # per generated position: token id -> logprob


def greedy_reference(checkpoint: Path, prompts: list[str], steps: int) -> list[Reference]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        seq = list(ids)
        tops = []
        with torch.no_grad():
            for _ in range(steps):
                logits = model(torch.tensor([seq])).logits[0, -1].float()
                logprobs = torch.log_softmax(logits, -1)
                values, indices = logprobs.topk(5)
                tops.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
                seq.append(int(indices[0]))
        out.append(Reference(ids, seq[len(ids) :], tops))
    return out
