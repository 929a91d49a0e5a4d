"""``hydraserve up``: the whole platform on one machine.

Gateway + local process backend + a local model store holding the demo model, registered
at zero replicas so the first request shows a real cold start. Same planner, loader and
gateway code as the cluster; only the backend differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.api.models import ServerlessModel
from hydraserve.logs import get_logger
from hydraserve.settings import CommonSettings, component_config
from hydraserve.store import ModelNotFound, ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model

if TYPE_CHECKING:
    from hydraserve.backends.base import ClusterBackend

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
    demo_ttft_slo_seconds: float | None = Field(
        default=None, gt=0, description="The demo model's TTFT SLO (None: the spec default)."
    )
    keep_alive_seconds: float = Field(default=60.0, ge=0)
    models_file: Path | None = Field(
        default=None, description="YAML with more ServerlessModel documents to register."
    )
    auth_enabled: bool = False
    emulated_nodes: int = Field(
        default=0,
        ge=0,
        le=8,
        description="Run on an emulated cluster of this many nodes (network namespaces with "
        "shaped links, an S3 store, a prefetcher each; needs root): the planner places "
        "instances and pipelines over them. 0 = this machine as one node.",
    )
    link_mbit: float = Field(
        default=100.0, gt=0, description="Each emulated node's link to the store, Mbit/s."
    )

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
                **(
                    {"slo": {"ttftSeconds": settings.demo_ttft_slo_seconds}}
                    if settings.demo_ttft_slo_seconds
                    else {}
                ),
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
    if settings.emulated_nodes:
        run_emulated(settings)
        return
    from hydraserve.backends.local import LocalBackend, LocalSettings

    models = platform_models(settings)
    serve(settings, LocalBackend(models, LocalSettings(common=settings.common)), models)


def run_emulated(settings: PlatformSettings) -> None:
    """The platform on an emulated cluster: the store is an S3 server in its own namespace,
    every node fetches over its own shaped link, and workers run inside their node."""
    from hydraserve.backends.local import LocalBackend, LocalSettings
    from hydraserve.backends.local.nodes import default_memory_budget
    from hydraserve.emulation.netns import EmulatedCluster
    from hydraserve.emulation.nodes import emulated_local_nodes

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    log_dir = settings.common.state_dir / "emulated"
    with EmulatedCluster(
        nodes=settings.emulated_nodes, rate_mbit=settings.link_mbit, log_dir=log_dir
    ) as cluster:
        settings.common.s3.endpoint_url = cluster.s3_endpoint
        settings.store_uri = settings.store_uri or "s3://hydraserve"
        models = platform_models(settings)
        local = LocalSettings(common=settings.common)
        budget = local.memory_budget_bytes or default_memory_budget()
        # A tensor-parallel stage needs a core per rank on its node (nodes share cores
        # when the machine has too few to give each its own).
        widest = max((m.spec.parallelism.tensor for m in models), default=1)
        nodes = emulated_local_nodes(cluster, budget, cores_per_node=widest)
        log.info(
            "platform.emulated",
            nodes=[f"{n.name}@{n.host} cores={','.join(map(str, n.cpus))}" for n in nodes],
            link_mbit=settings.link_mbit,
            store=cluster.s3_endpoint,
        )
        serve(settings, LocalBackend(models, local, nodes), models)


def serve(
    settings: PlatformSettings, backend: ClusterBackend, models: list[ServerlessModel]
) -> None:
    from hydraserve.gateway.server import gateway_server
    from hydraserve.gateway.settings import GatewaySettings

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
