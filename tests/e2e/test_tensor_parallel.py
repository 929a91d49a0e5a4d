"""Tensor parallelism through the gateway on an emulated cluster equals stock vLLM.

Two network-namespace nodes with 10 Mbit/s links to the store; each node shows the
machine's two cores (nodes share cores when there are fewer than tp per node), split
between a stage's two tensor ranks as ``VLLM_CPU_OMP_THREADS_BIND="0|1"``. Two models on
the demo checkpoint (``small``, ~13 MB), both ``spec.parallelism.tensor: 2``:

* ``tp2pp1``: ``pipeline.maxSize: 1``, one worker with two tensor ranks, eager (the
  platform's default for a single stage);
* ``tp2pp2``: ``pipeline.maxSize: 2`` and an 11 s TTFT SLO that one 10 Mbit/s link cannot
  meet, so the planner itself chooses two stages on two nodes, each with two tensor
  ranks (vLLM's multi-node ``mp`` executor); eager too, each stage with HydraServe's
  worker class (decision 0105).

The reference for both is stock vLLM (``vllm.entrypoints.openai.api_server``, no HydraServe
code) on the same checkpoint with ``--tensor-parallel-size 2``, eager, the same dtype (the
checkpoint's bf16), batch and KV sizes, and the same per-rank cores. (Stock vLLM cannot run
an eager pipeline on CPU; a pipeline hands hidden states between the same kernels.) Greedy
token ids must be equal, and so must the top-5 logprobs at every step (up to bf16
rounding): the demo model's logit margins keep greedy ids robust, so the logprobs are what
would show a stage computing with wrong or misplaced shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import VLLM_CACHE, start_platform, stop_platform
from tests.e2e.reference import Completion, greedy_completions, stock_vllm_completions

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PROMPTS = ["Hello, world! The cluster", "def add(a, b):"]
STEPS = 8
# bf16 rounding between two runs of the same kernels on the same shapes; a wrong shard
# moves logprobs by far more.
LOGPROB_TOLERANCE = 0.02

MODELS = """\
---
apiVersion: hydraserve.io/v1alpha1
kind: ServerlessModel
metadata: {name: tp2pp2}
spec:
  source: {uri: "s3://hydraserve/demo"}
  resources: {gpuMemoryGiB: 1}
  parallelism: {tensor: 2}
  pipeline: {maxSize: 2}
  slo: {ttftSeconds: 11}
  scaling: {minReplicas: 0, keepAliveSeconds: 2}
---
apiVersion: hydraserve.io/v1alpha1
kind: ServerlessModel
metadata: {name: tp2pp1}
spec:
  source: {uri: "s3://hydraserve/demo"}
  resources: {gpuMemoryGiB: 1}
  parallelism: {tensor: 2}
  pipeline: {maxSize: 1}
  scaling: {minReplicas: 0, keepAliveSeconds: 600}
"""


def stages_of(state_dir: Path, model: str) -> list[dict[str, object]]:
    """The worker configs the backend started for ``model`` (one per stage), the same for
    every instance it started: a replacement for an instance that failed must match too
    (CI once saw a second tp2pp1 instance, after the warm runtime's watchdog had killed a
    worker of the first; ``warm.server.wait_for_client_exit`` says why)."""
    instances = sorted((state_dir / "instances").glob(f"{model}-*"))
    assert instances, f"no instance of {model}"
    shapes = [
        [json.loads(p.read_text()) for p in sorted(instance.glob("stage*.json"))]
        for instance in instances
    ]
    first = shapes[0]
    for other in shapes[1:]:
        assert [(s["rank"], s["pp"], s["tp"]) for s in other] == [
            (s["rank"], s["pp"], s["tp"]) for s in first
        ], (model, shapes)
    return first


def assert_same(served: list[Completion], stock: list[Completion], case: str) -> None:
    for prompt, ours, theirs in zip(PROMPTS, served, stock, strict=True):
        assert ours.token_ids == theirs.token_ids, (case, prompt)
        for step, (a, b) in enumerate(zip(ours.top_logprobs, theirs.top_logprobs, strict=True)):
            assert a.keys() == b.keys(), (case, prompt, step, a, b)
            worst = max(abs(a[t] - b[t]) for t in a)
            assert worst <= LOGPROB_TOLERANCE, (case, prompt, step, a, b)


def test_tensor_parallel_stages_through_the_gateway_equal_stock_vllm(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    platform = start_platform(
        tmp_path / "platform",
        # One engine per case: no consolidation (it would start another).
        # A tp 2 x pp 2 engine (four ranks, compiled) starts slowly on two cores: let the gateway
        # hold the requests for as long as the client waits.
        env={
            "HYDRASERVE_LOCAL_CONSOLIDATION": "false",
            "HYDRASERVE_GATEWAY_QUEUE_TIMEOUT_SECONDS": "600",
        },
        args=[
            "--emulated-nodes", "2", "--link-mbit", "10", "--demo-size", "small",
            "--models-file", str(models),
        ],
        bad_models=False,
        timeout=300,
    )  # fmt: skip
    try:
        served = {
            model: greedy_completions(platform.url, model, PROMPTS, STEPS)
            # The pipeline first: once a node has the whole model in its host cache, one
            # stage there meets the SLO and the planner rightly stops splitting.
            for model in ("tp2pp2", "tp2pp1")
        }
        single = stages_of(platform.state_dir, "tp2pp1")
        assert [(s["pp"], s["tp"], s["enforce_eager"]) for s in single] == [(1, 2, True)]
        pipeline = stages_of(platform.state_dir, "tp2pp2")
        assert [(s["rank"], s["pp"], s["tp"]) for s in pipeline] == [(0, 2, 2), (1, 2, 2)]
        # Asked eager; a CPU pipeline stage then runs eager with HydraServe's worker class
        # (launcher.with_execution_mode).
        assert all(s["enforce_eager"] for s in pipeline)
        # The planner put the stages on the two nodes (their own addresses).
        hosts = {str(s["host"]) for s in pipeline}
        assert len(hosts) == 2 and all(h.startswith("10.") for h in hosts), hosts
    finally:
        stop_platform(platform)
    checkpoint = platform.state_dir / "checkpoints" / "demo-small"
    a, b = (sorted(os.sched_getaffinity(0)) * 2)[:2]  # a core per tensor rank, as ours had
    # Stock vLLM cannot run an eager pipeline on CPU (its CPU worker lacks the later stage's
    # input buffers), so both are checked against its eager tp 2 engine: a pipeline passes
    # hidden states between the same kernels, it does not change what they compute.
    stock = stock_vllm_completions(
        checkpoint, PROMPTS, STEPS, tp=2, pp=1, eager=True, cpu_bind=f"{a}|{b}",
        cache_root=VLLM_CACHE, log=tmp_path / "stock-tp2.log",
    )  # fmt: skip
    for case in ("tp2pp1", "tp2pp2"):
        assert_same(served[case], stock, case)
