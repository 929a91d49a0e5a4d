"""The embedded backend (``hydraserve up``): instances as local worker processes."""

from hydraserve.backends.local.backend import LocalBackend
from hydraserve.backends.local.nodes import LocalNode
from hydraserve.backends.local.settings import LocalSettings

__all__ = ["LocalBackend", "LocalNode", "LocalSettings"]
