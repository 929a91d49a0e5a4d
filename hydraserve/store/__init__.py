"""Model store: checkpoint layout, manifest with checksums and stage partitions, backends."""

from hydraserve.store.backends import ObjectNotFound, StoreBackend, StoreError, open_backend
from hydraserve.store.manifest import Manifest, StageInfo, TensorInfo
from hydraserve.store.model_store import (
    ChecksumError,
    ModelNotFound,
    ModelRef,
    ModelStore,
    list_models,
    verify_tensor,
)

__all__ = [
    "ChecksumError",
    "Manifest",
    "ModelNotFound",
    "ModelRef",
    "ModelStore",
    "ObjectNotFound",
    "StageInfo",
    "StoreBackend",
    "StoreError",
    "TensorInfo",
    "list_models",
    "open_backend",
    "verify_tensor",
]
