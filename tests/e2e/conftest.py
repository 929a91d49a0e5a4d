"""End-to-end fixtures: the real platform (`hydraserve up`) with real vLLM workers.

Engine start dominates test time (~20-50 s per instance on 2 cores), so each platform is
started once per module and shared; the vLLM compile cache lives in the checkout
(`.cache/vllm`, ignored by git) so compiled engines start warm on re-runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_CACHE = REPO / ".cache" / "vllm"

MISSING_MODEL = """\
apiVersion: hydraserve.io/v1alpha1
kind: ServerlessModel
metadata: {name: missing}
spec:
  source: {uri: "file:///nonexistent/hydraserve-store/missing"}
"""


@dataclass
class Platform:
    url: str  # OpenAI base URL, ends with /v1
    state_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def checkpoint(self) -> Path:
        return self.state_dir / "checkpoints" / "demo-tiny"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CORRUPT_MODEL = """\
---
apiVersion: hydraserve.io/v1alpha1
kind: ServerlessModel
metadata: {{name: corrupt}}
spec:
  source: {{uri: "file://{uri}"}}
  resources: {{gpuMemoryGiB: 1}}
"""


def corrupt_store(root: Path) -> Path:
    """A model whose stored weights have one flipped byte (after the manifest was written)."""
    from hydraserve.store import ModelRef, ModelStore
    from hydraserve.store.demo import make_demo_model
    from hydraserve.store.manifest import WEIGHTS_NAME

    location = root / "corrupt"
    store = ModelStore(ModelRef(str(location)))
    store.push(make_demo_model(root / "corrupt-hf", "tiny", seed=1))
    victim = store.manifest().tensor("model.layers.2.self_attn.o_proj.weight")
    weights = location / "main" / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[victim.offset + 100] ^= 0x40
    weights.write_bytes(bytes(raw))
    return location


def start_platform(
    state_dir: Path,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    bad_models: bool = True,
    timeout: float = 120,
) -> Platform:
    """``hydraserve up`` in a subprocess; ``bad_models`` also registers a model missing from
    the store and a corrupted one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    models_args: list[str] = []
    if bad_models:
        models = state_dir / "models.yaml"
        corrupt = corrupt_store(state_dir / "bad")
        models.write_text(MISSING_MODEL + CORRUPT_MODEL.format(uri=corrupt))
        models_args = ["--models-file", str(models)]
    port = free_port()
    log = state_dir / "platform.log"
    full_env = {
        **os.environ,
        "HYDRASERVE_LOCAL_VLLM_CACHE_ROOT": str(VLLM_CACHE),
        "HYDRASERVE_SHM_DIR": f"/dev/shm/hydraserve-test-{port}",
        **(env or {}),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hydraserve.cli.main",
                "up",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                *models_args,
                "--keep-alive",
                "600",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    platform = Platform(f"http://127.0.0.1:{port}/v1", state_dir, process, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hydraserve up exited:\n{platform.log_tail()}")
        try:
            if httpx.get(f"{platform.url}/models", timeout=2).status_code == 200:
                return platform
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_platform(platform)
    raise RuntimeError(f"hydraserve up did not answer:\n{platform.log_tail()}")


def stop_platform(platform: Platform) -> None:
    """SIGTERM like Ctrl-C: the platform must stop its workers itself."""
    platform.process.send_signal(signal.SIGINT)
    try:
        platform.process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(platform.process.pid, signal.SIGKILL)
        platform.process.wait()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = start_platform(tmp_path_factory.mktemp("platform"))
    yield p
    stop_platform(p)
