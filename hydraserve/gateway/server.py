"""Running the gateway app under uvicorn (the standalone gateway and `hydraserve up`)."""

from __future__ import annotations

from typing import Any

from hydraserve.backends.base import ClusterBackend
from hydraserve.gateway.settings import GatewaySettings

# Keep-alive on client connections: longer than the usual load-balancer idle timeout (60 s),
# so the balancer, not the gateway, closes idle connections (no reset races).
CLIENT_KEEPALIVE_SECONDS = 65


def gateway_server(
    backend: ClusterBackend, settings: GatewaySettings, *, manage_backend: bool = True
) -> Any:
    """A uvicorn server running the gateway app; ``await server.serve()`` runs it in the
    caller's event loop (``hydraserve up`` does so next to the local backend)."""
    import uvicorn

    from hydraserve.gateway import create_app

    app = create_app(backend, settings, manage_backend=manage_backend)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our structured logging, not uvicorn's
        access_log=False,  # the gateway logs one request.done event per request
        timeout_keep_alive=CLIENT_KEEPALIVE_SECONDS,
        lifespan="on",
    )
    return uvicorn.Server(config)
