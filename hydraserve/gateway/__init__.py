"""The OpenAI-compatible gateway: scale-from-zero queueing, autoscaling, routing, API keys
and metrics in front of whatever ``ClusterBackend`` runs the model instances."""

from hydraserve.gateway.app import create_app
from hydraserve.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
