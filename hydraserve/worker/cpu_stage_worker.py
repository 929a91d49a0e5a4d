"""vLLM's CPU worker for an eager pipeline stage (named with vLLM's ``--worker-cls``).

A pipeline rank after the first receives the previous stage's hidden states into buffers
that vLLM allocates during its warm-up forward (``_dummy_run``). vLLM's CPU worker runs
that forward only in compiled mode, so a stage of an eager CPU pipeline reached its first
request without them (``assert self.intermediate_tensors is not None``). This worker
allocates the same buffers, the same way (the model's own
``make_empty_intermediate_tensors`` at the runner's token budget), once the engine has
built its KV cache: the stage then runs truly eager, with no graph capture and no dummy
forward on the cold-start path (decision 0105, last addendum). Everything else is vLLM's.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.parallel_state import get_pp_group
from vllm.v1.worker.cpu_worker import CPUWorker

from hydraserve.logs import get_logger

log = get_logger("worker")


class EagerPipelineStageWorker(CPUWorker):
    """A CPU worker whose eager pipeline rank has its intermediate-tensor buffers before
    its first step."""

    def compile_or_warm_up_model(self) -> Any:
        times = super().compile_or_warm_up_model()
        runner = self.model_runner
        if not get_pp_group().is_first_rank and runner.intermediate_tensors is None:
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens,
                dtype=self.model_config.dtype,
                device=runner.device,
            )
            log.info(
                "worker.intermediate_buffers",
                stage="engine_init",
                rank=get_pp_group().rank_in_group,
                tokens=runner.max_num_tokens,
            )
        return times
