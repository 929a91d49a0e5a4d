"""Stock vLLM as the reference: the same checkpoint, dtype and execution mode, no HydraServe.

Runs vLLM's offline ``LLM`` in a child process (its global state must not leak into the
test process) and returns, per prompt, the greedy token ids with each step's logprob and
its margin over the runner-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

def main():
    args = json.loads(sys.argv[1])
    llm = LLM(
        model=args["checkpoint"],
        dtype="bfloat16",
        enforce_eager=args["eager"],
        compilation_config=args["compilation"],
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(
        temperature=0, max_tokens=args["steps"], ignore_eos=True, logprobs=2
    )
    # One prompt at a time, as requests reach a server one by one: a batch of several
    # changes the kernels' shapes, and with them bf16 rounding.
    result = []
    for prompt in args["prompts"]:
        [output] = llm.generate([prompt], params, use_tqdm=False)
        steps = output.outputs[0]
        chosen, margins = [], []
        for token, top in zip(steps.token_ids, steps.logprobs):
            values = sorted((p.logprob for p in top.values()), reverse=True)
            chosen.append(top[token].logprob)
            margins.append(values[0] - values[1] if len(values) > 1 else float("inf"))
        result.append(
            {"token_ids": list(steps.token_ids), "logprobs": chosen, "margins": margins}
        )
    print("RESULT " + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
"""


@dataclass(frozen=True)
class Greedy:
    prompt: str
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    margins: list[float]  # each step's top-1 minus top-2 logprob

    @property
    def decisive(self) -> float:
        """The smallest margin on the way: below bf16's noise, another engine's arithmetic
        may rightly pick the runner-up."""
        return min(self.margins)


def stock_greedy(
    checkpoint: Path,
    prompts: list[str],
    steps: int,
    *,
    eager: bool,
    compilation: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[Greedy]:
    """What stock vLLM generates greedily for each prompt (``ignore_eos``);
    ``compilation``: vLLM's compilation config (compiled mode only)."""
    request = {
        "checkpoint": str(checkpoint),
        "prompts": prompts,
        "steps": steps,
        "eager": eager,
        "compilation": compilation or {},
    }
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            rows = json.loads(line.removeprefix("RESULT "))
            return [Greedy(prompt, **row) for prompt, row in zip(prompts, rows, strict=True)]
    raise RuntimeError(f"stock vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
