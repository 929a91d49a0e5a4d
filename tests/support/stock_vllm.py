"""Stock vLLM as the reference: the same checkpoint, dtype and execution mode, no HydraServe.

Runs vLLM's offline ``LLM`` in a child process (its global state must not leak into the
test process) and returns greedy token ids per prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    params = SamplingParams(temperature=0, max_tokens=args["steps"], ignore_eos=True)
    outputs = llm.generate(args["prompts"], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)

if __name__ == "__main__":
    main()
"""


def stock_greedy(
    checkpoint: Path,
    prompts: list[str],
    steps: int,
    *,
    eager: bool,
    compilation: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> list[list[int]]:
    """Greedy token ids stock vLLM generates for each prompt (``ignore_eos``);
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
            result: list[list[int]] = json.loads(line.removeprefix("RESULT "))
            return result
    raise RuntimeError(f"stock vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
