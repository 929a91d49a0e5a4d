"""Structured logging: one event per line, with the model, instance and stage as fields.

Every component logs through :func:`get_logger`; events are short dotted names
(``coldstart.stage``) and everything else is a key-value field, so a log line can be
grepped by model or instance and parsed by a log pipeline without regexes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write, not at configuration:
    a caller that swaps stderr for a while (a CLI test runner, a daemoniser) and closes
    its stream must not leave every later log line failing on a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(level: str = "INFO", json_format: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``json_format=None`` picks JSON when stderr is not a terminal (containers, CI) and a
    readable key=value rendering otherwise.
    """
    global _configured
    if json_format is None:
        json_format = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_format
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    if not _configured:
        logging.basicConfig(level=level.upper(), stream=_CurrentStderr(), format="%(message)s")
        # Per-request client logs drown the events that matter.
        for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True


def is_configured() -> bool:
    return _configured


def get_logger(component: str, **fields: Any) -> Any:
    """A logger bound to a component name (and optional fields such as model/instance).

    Lazy: module-level loggers created before :func:`configure_logging` still render with
    the configuration in force when they log.
    """
    return structlog.get_logger(component=component, **fields)
