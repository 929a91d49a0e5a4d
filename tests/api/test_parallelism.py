"""spec.parallelism.tensor: its values, its default, and engine arguments that would fight it."""

from __future__ import annotations

import pytest

from hydraserve.api.models import ServerlessModelSpec, platform_engine_flags
from hydraserve.api.validation import spec_errors
from hydraserve.planner.profile import plan_request_for
from hydraserve.planner.types import ModelProfile

SOURCE = {"uri": "s3://models/llama-2-70b-chat"}


def test_tensor_defaults_to_one_and_takes_powers_of_two_up_to_eight() -> None:
    assert ServerlessModelSpec.model_validate({"source": SOURCE}).parallelism.tensor == 1
    for tp in (1, 2, 4, 8):
        spec = ServerlessModelSpec.model_validate({"source": SOURCE, "parallelism": {"tensor": tp}})
        assert spec.parallelism.tensor == tp
    for bad in (0, 3, 16):
        errors = spec_errors({"source": SOURCE, "parallelism": {"tensor": bad}})
        assert errors is not None and "spec.parallelism.tensor" in errors


@pytest.mark.parametrize(
    "args",
    [
        ["--tensor-parallel-size=2"],
        ["--tensor-parallel-size", "2"],
        ["-tp", "4"],
        ["--tensor_parallel_size=2"],
        ["--pipeline-parallel-size=2"],
        ["--distributed-executor-backend=ray"],
    ],
)
def test_engine_args_may_not_set_the_parallelism(args: list[str]) -> None:
    errors = spec_errors({"source": SOURCE, "engine": {"args": args}})
    assert errors is not None and "parallelism.tensor" in errors
    assert platform_engine_flags(args)


def test_other_engine_args_pass() -> None:
    args = ["--max-model-len=4096", "--dtype", "bfloat16", "--enable-prefix-caching"]
    assert spec_errors({"source": SOURCE, "engine": {"args": args}}) is None
    assert platform_engine_flags(args) == []


def test_plan_request_carries_tp_and_pipeline_cap() -> None:
    spec = ServerlessModelSpec.model_validate(
        {"source": SOURCE, "parallelism": {"tensor": 4}, "pipeline": {"maxSize": 2}}
    )
    profile = ModelProfile("m", 10, 20, {1: ((0, 2, 10),), 2: ((0, 1, 5), (1, 2, 5))})
    request = plan_request_for(spec, profile)
    assert (request.tp, request.max_pp) == (4, 2)
