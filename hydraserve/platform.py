"""``hydraserve up``: the whole platform on one machine.

Gateway + local process backend + a local model store holding the demo model, registered
at zero replicas so the first request shows a real cold start. Same planner, loader and
gateway code as the cluster; only the backend differs.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.api.models import ServerlessModel
from hydraserve.logs import get_logger
from hydraserve.settings import CommonSettings, component_config
from hydraserve.store import ModelNotFound, ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model

log = get_logger("platform")


class PlatformSettings(BaseSettings):
    model_config = component_config("platform")
    common: CommonSettings = Field(default_factory=CommonSettings)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    store_uri: str | None = Field(
        default=None, description="Model store root (default: <state_dir>/store)."
    )
    demo_model: str = Field(default="demo", description="Name of the demo model ('' = none).")
    demo_size: str = "tiny"
    keep_alive_seconds: float = Field(default=60.0, ge=0)
    models_file: Path | None = Field(
        default=None, description="YAML with more ServerlessModel documents to register."
    )
    auth_enabled: bool = False

    @property
    def store_root(self) -> str:
        return self.store_uri or str(self.common.state_dir / "store")


def ensure_demo_model(settings: PlatformSettings) -> ServerlessModel:
    """Build and push the demo model once; later runs reuse it."""
    uri = f"{settings.store_root.rstrip('/')}/{settings.demo_model}"
    store = ModelStore(ModelRef(uri), settings.common.s3)
    try:
        store.manifest()
    except ModelNotFound:
        checkpoint = settings.common.state_dir / "checkpoints" / f"demo-{settings.demo_size}"
        if not (checkpoint / "config.json").exists():
            log.info("demo.build", size=settings.demo_size, path=str(checkpoint))
            make_demo_model(checkpoint, settings.demo_size)
        log.info("demo.push", uri=uri)
        store.push(checkpoint, name=settings.demo_model)
    return ServerlessModel.model_validate(
        {
            "metadata": {"name": settings.demo_model},
            "spec": {
                "source": {"uri": uri if "://" in uri else f"file://{uri}"},
                "resources": {"gpuMemoryGiB": 1},
                "scaling": {"minReplicas": 0, "keepAliveSeconds": settings.keep_alive_seconds},
            },
        }
    )


def load_models_file(path: Path) -> list[ServerlessModel]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [ServerlessModel.model_validate(d) for d in docs]


def platform_models(settings: PlatformSettings) -> list[ServerlessModel]:
    models = [ensure_demo_model(settings)] if settings.demo_model else []
    if settings.models_file:
        models += load_models_file(settings.models_file)
    return models


def run_platform(settings: PlatformSettings) -> None:
    from hydraserve.backends.local import LocalBackend, LocalSettings
    from hydraserve.gateway.server import gateway_server
    from hydraserve.gateway.settings import GatewaySettings

    models = platform_models(settings)
    backend = LocalBackend(models, LocalSettings(common=settings.common))
    gateway_settings = GatewaySettings(
        host=settings.host, port=settings.port, auth_enabled=settings.auth_enabled
    )
    log.info(
        "platform.up",
        url=f"http://{settings.host}:{settings.port}/v1",
        models=[m.name for m in models],
    )
    # The app's lifespan starts the backend and, on shutdown, stops every worker it began.
    gateway_server(backend, gateway_settings, manage_backend=True).run()
