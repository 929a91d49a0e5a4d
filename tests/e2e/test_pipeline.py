"""Pipelined instances (pp = 2 and 4 stage processes, one vLLM engine) through the gateway,
in the platform's default mode: every stage asked to run eager, which a CPU pipeline stage
runs as Dynamo's graph under torch.compile's ``eager`` backend (decision 0105, addendum).

Reference: stock vLLM on the same checkpoint, one engine, the same compilation config and
dtype (``tests.support.stock_vllm``). Greedy token ids must be equal. Stages rendezvous over
loopback here; benchmarks/cold_start runs them across network namespaces with shaped links.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from openai import OpenAI

from hydraserve.worker.launcher import EAGER_COMPILATION
from tests.e2e.conftest import VLLM_CACHE, start_platform, stop_platform
from tests.support.stock_vllm import Greedy, stock_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, world! The cluster", "def add(a, b):"]
STEPS = 12


@pytest.fixture(scope="module")
def reference(demo_checkpoint: Path) -> list[Greedy]:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(VLLM_CACHE)}
    return stock_greedy(
        demo_checkpoint, PROMPTS, STEPS, eager=False, compilation=EAGER_COMPILATION, env=env
    )


@pytest.mark.parametrize("pp", [2, 4])
def test_pipelined_greedy_tokens_equal_stock_vllm(
    pp: int, reference: list[Greedy], demo_checkpoint: Path, tmp_path: Path
) -> None:
    cores = os.cpu_count() or 1
    binds = [str(i % cores) for i in range(pp)]
    platform = start_platform(
        tmp_path / f"pp{pp}",
        env={
            "HYDRASERVE_LOCAL_PIPELINE_SIZE": str(pp),
            "HYDRASERVE_LOCAL_CPU_BINDS": json.dumps(binds),
            # This test is about pipelines; test_consolidation covers what follows them.
            "HYDRASERVE_LOCAL_CONSOLIDATION": "false",
        },
    )
    try:
        # The platform built its own demo (same seed): the reference ran on these weights.
        weights = "model.safetensors"
        assert (platform.checkpoint / weights).read_bytes() == (
            demo_checkpoint / weights
        ).read_bytes()
        openai = OpenAI(base_url=platform.url, api_key="unused", max_retries=0, timeout=600)
        for ref in reference:
            out = openai.completions.create(
                model="demo",
                prompt=ref.prompt,
                max_tokens=STEPS,
                temperature=0,
                logprobs=1,
                extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
            )
            logprobs = out.choices[0].logprobs
            assert logprobs is not None and logprobs.tokens
            tokens = [int(t.split(":")[1]) for t in logprobs.tokens]
            assert tokens == ref.token_ids, (pp, ref.prompt, ref.margins)
        status = platform.log.read_text()
        assert f"pp={pp}" in status or f'"pp": {pp}' in status
    finally:
        stop_platform(platform)
