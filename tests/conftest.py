"""Fixtures shared by the whole suite: demo checkpoints, stores, a local S3 server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydraserve.settings import S3Settings
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model

# Throwaway credentials for the local S3 servers the tests start (never real AWS).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint in Hugging Face format (built once per session)."""
    return make_demo_model(tmp_path_factory.mktemp("demo") / "hf", "tiny", seed=0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Settings]:
    """A real S3 endpoint (moto's server) on loopback, with throwaway credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Settings(endpoint_url=f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def local_store(tmp_path: Path, demo_checkpoint: Path) -> ModelStore:
    store = ModelStore(ModelRef(str(tmp_path / "store" / "demo")))
    store.push(demo_checkpoint)
    return store


@pytest.fixture(autouse=True)
def _network_namespaces(request: pytest.FixtureRequest) -> None:
    """Tests marked ``netns`` need root and iproute2: skip them, with the reason, where
    network namespaces cannot be made."""
    if request.node.get_closest_marker("netns") is None:
        return
    from hydraserve.emulation.netns import EmulationUnavailable, check_available

    try:
        check_available()
    except EmulationUnavailable as exc:
        pytest.skip(str(exc))
