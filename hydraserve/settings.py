"""Typed settings for every component, read from ``HYDRASERVE_*`` environment variables.

One class per component; nested fields use ``__`` (``HYDRASERVE_STORE__ENDPOINT_URL``).
Environment variables are the transport (containers, child processes); code reads the
typed objects, never ``os.environ`` directly.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_state_dir() -> Path:
    return Path.home() / ".hydraserve"


class S3Settings(BaseModel):
    """How to reach an S3-compatible store. Credentials come from the usual AWS chain."""

    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (None = AWS). Any S3-compatible server works."
    )
    region: str = "us-east-1"
    max_pool_connections: int = Field(default=32, ge=1)
    addressing_style: str = Field(default="path", description="'path' or 'virtual'")


class _Base(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HYDRASERVE_", env_nested_delimiter="__", extra="ignore"
    )


class CommonSettings(_Base):
    log_level: str = "INFO"
    log_json: bool | None = None
    state_dir: Path = Field(default_factory=default_state_dir)
    s3: S3Settings = Field(default_factory=S3Settings)
    shm_dir: Path = Field(
        default=Path("/dev/shm/hydraserve"),
        description="Where stage files live in shared memory (a tmpfs).",
    )


def component_config(prefix: str) -> SettingsConfigDict:
    """Settings config for one component's own fields (``HYDRASERVE_<COMPONENT>_*``).

    Shared fields (store, shared memory, state, logs) are not repeated per component: a
    component's settings carry them as ``common``, read from ``HYDRASERVE_*``.
    """
    return SettingsConfigDict(
        env_prefix=f"HYDRASERVE_{prefix.upper()}_", env_nested_delimiter="__", extra="ignore"
    )
