"""vLLM general plugin (entry point ``vllm.general_plugins``): registers the loader.

vLLM calls :func:`register` in every process it starts; it must be cheap and idempotent.
"""

from __future__ import annotations


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    from hydraserve.worker.loader import LOAD_FORMAT, HydraServeLoader

    register_model_loader(LOAD_FORMAT)(HydraServeLoader)
