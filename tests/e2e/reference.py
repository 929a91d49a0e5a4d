"""Greedy completions from OpenAI-compatible servers: HydraServe's gateway and stock vLLM's
own API server (vLLM's tensor and pipeline parallelism in one process group)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    top_logprobs: list[dict[int, float]]  # per generated position: token id -> logprob


def _token_id(token: str) -> int:
    return int(token.split(":")[1])  # "token_id:N" (return_tokens_as_token_ids)


def greedy_completions(
    base_url: str, model: str, prompts: list[str], steps: int
) -> list[Completion]:
    """Greedy completions (token ids and their logprobs) from an OpenAI-compatible server."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    out = []
    for prompt in prompts:
        choice = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=steps,
            temperature=0,
            logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        ).choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        assert choice.logprobs.top_logprobs is not None
        out.append(
            Completion(
                [_token_id(t) for t in choice.logprobs.tokens],
                [
                    {_token_id(t): float(lp) for t, lp in top.items()}
                    for top in choice.logprobs.top_logprobs
                ],
            )
        )
    return out


def stock_vllm_completions(
    checkpoint: Path,
    prompts: list[str],
    steps: int,
    *,
    tp: int,
    pp: int,
    eager: bool,
    cpu_bind: str,
    cache_root: Path,
    log: Path,
    timeout: float = 600,
    extra_args: Sequence[str] = (),
) -> list[Completion]:
    """Greedy completions from stock vLLM (``vllm.entrypoints.openai.api_server``, no
    HydraServe code in it) on ``checkpoint``, with the engine arguments a HydraServe worker
    gives vLLM (decision 0003's sizes) and vLLM's own tensor / pipeline parallelism in one
    process group on this machine (the ``mp`` executor, one process per rank)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.e2e.conftest import free_port

    port = free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(checkpoint), "--served-model-name", "reference",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--max-num-batched-tokens", "256", "--max-num-seqs", "16",
        "--kv-cache-memory-bytes", str(256 << 20), "--disable-log-stats",
        "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
        "--distributed-executor-backend", "mp",
    ]  # fmt: skip
    if eager:
        args.append("--enforce-eager")
    args += list(extra_args)
    env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": cpu_bind,
        "VLLM_CACHE_ROOT": str(cache_root),
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    with open(log, "wb") as out:
        server = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.time() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"stock vLLM exited ({server.returncode}); see {log}")
            if time.time() > deadline:
                raise RuntimeError(f"stock vLLM not ready after {timeout:.0f} s; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return greedy_completions(f"http://127.0.0.1:{port}/v1", "reference", prompts, steps)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
