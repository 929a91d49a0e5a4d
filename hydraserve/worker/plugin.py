"""vLLM general plugin (entry point ``vllm.general_plugins``): registers the loader.

vLLM calls :func:`register` in every process it starts; it must be cheap and idempotent.
"""

from __future__ import annotations


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader

    from hydraserve.logs import configure_logging, is_configured
    from hydraserve.settings import CommonSettings

    if not is_configured():  # a process vLLM started: log like the worker that started it
        settings = CommonSettings()
        configure_logging(settings.log_level, settings.log_json)

    from hydraserve.worker.loader import LOAD_FORMAT, HydraServeLoader

    register_model_loader(LOAD_FORMAT)(HydraServeLoader)
