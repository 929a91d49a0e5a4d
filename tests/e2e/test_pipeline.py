"""Pipelined instances (pp = 2 and 4 stage processes, one vLLM engine) through the gateway.

Greedy outputs must equal `transformers` (and therefore each other and pp = 1, which
test_platform checks against the same reference). Stages rendezvous over loopback here;
benchmarks/cold_start runs them across network namespaces with shaped links.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.conftest import start_platform, stop_platform
from tests.e2e.reference import greedy_reference

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, world! The cluster", "def add(a, b):"]
STEPS = 12


@pytest.mark.parametrize("pp", [2, 4])
def test_pipelined_greedy_output_equals_transformers(pp: int, tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    binds = [str(i % cores) for i in range(pp)]
    platform = start_platform(
        tmp_path / f"pp{pp}",
        env={
            "HYDRASERVE_LOCAL_PIPELINE_SIZE": str(pp),
            # vLLM 0.32 on CPU needs compiled mode for pp > 1.
            "HYDRASERVE_LOCAL_ENFORCE_EAGER": "false",
            "HYDRASERVE_LOCAL_CPU_BINDS": '["' + '","'.join(binds) + '"]',
            # This test is about pipelines; test_consolidation covers what follows them.
            "HYDRASERVE_LOCAL_CONSOLIDATION": "false",
        },
    )
    try:
        openai = OpenAI(base_url=platform.url, api_key="unused", max_retries=0, timeout=600)
        reference = greedy_reference(platform.checkpoint, PROMPTS, STEPS)
        for prompt, ref in zip(PROMPTS, reference, strict=True):
            out = openai.completions.create(
                model="demo",
                prompt=prompt,
                max_tokens=STEPS,
                temperature=0,
                logprobs=1,
                extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
            )
            logprobs = out.choices[0].logprobs
            assert logprobs is not None and logprobs.tokens
            assert [int(t.split(":")[1]) for t in logprobs.tokens] == ref.token_ids, (pp, prompt)
        status = platform.log.read_text()
        assert f"pp={pp}" in status or f'"pp": {pp}' in status
    finally:
        stop_platform(platform)
