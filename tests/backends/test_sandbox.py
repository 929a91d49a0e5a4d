"""A worker's view of its node's shared memory (the local backend's sandbox, the same view
the operator's claims give on Kubernetes): its own model read-only, its instance's KV
area, nothing of another model; a write through its mapping never reaches the node's
copy. Real prefetcher, real fetched bytes, a real mount namespace."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hydraserve.backends.local.sandbox import sandbox_available, sandbox_prefix, worker_view
from hydraserve.prefetcher.fetcher import FetchOptions
from hydraserve.prefetcher.node import Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import ModelShm
from hydraserve.store import ModelRef, ModelStore

pytestmark = pytest.mark.skipif(
    not sandbox_available(), reason="needs root and unshare (mount namespaces)"
)

# Runs inside the sandbox as the worker would: map its model with the loader's own
# mapping, then try what a hostile tenant's code would.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from hydraserve.prefetcher.shm import ModelShm
    from hydraserve.store.manifest import Manifest
    from hydraserve.worker.source import StageSource

    shm_dir, uri_a, uri_b, kv_dir = sys.argv[1:5]
    a = ModelShm(Path(shm_dir), uri_a, "main")
    b = ModelShm(Path(shm_dir), uri_b, "main")
    out = {}
    source = StageSource(a, Manifest.model_validate_json(a.manifest_path.read_bytes()), None, None)
    buffer = source.buffer()
    out["read_own"] = bytes(buffer[-8:]).hex()
    buffer[-8:] = b"tampered"   # private: the engine may write, the node's copy must not see it
    out["own_after_write"] = bytes(buffer[-8:]).decode()
    for what, path, flags in (
        ("open_other", b.weights_path, os.O_RDONLY),
        ("write_own", a.weights_path, os.O_WRONLY),
        ("create_beside", Path(shm_dir) / "planted", os.O_WRONLY | os.O_CREAT),
        ("list_root", None, None),
    ):
        try:
            if path is None:
                out[what] = sorted(os.listdir(shm_dir))
            else:
                os.close(os.open(path, flags, 0o644))
                out[what] = "ok"
        except OSError as exc:
            out[what] = exc.__class__.__name__
    (Path(kv_dir) / "saved").write_bytes(b"kv")
    out["kv_write"] = "ok"
    print(json.dumps(out))
    """
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_worker_sees_only_its_own_model_read_only(tmp_path: Path, demo_checkpoint: Path) -> None:
    uris = []
    for name in ("team-a-model", "team-b-model"):
        store = ModelStore(ModelRef(str(tmp_path / "store" / name)))
        store.push(demo_checkpoint)
        uris.append(store.ref.uri)
    shm_dir = tmp_path / "shm"
    prefetcher = Prefetcher("node-a", shm_dir, 1 << 30, options=FetchOptions(concurrency=2))
    for uri in uris:
        prefetcher.preload(PreloadRequest(uri=uri))
        prefetcher.wait(uri, "main", timeout=60)
    a, b = (ModelShm(shm_dir, uri, "main") for uri in uris)
    before = {p: _sha(p) for p in (a.weights_path, b.weights_path)}

    read_only, read_write = worker_view(shm_dir, uris[0], "main", "team-a.inst-1")
    for path in read_write:
        path.mkdir(parents=True)
    result = subprocess.run(
        [
            *sandbox_prefix(shm_dir, read_only, read_write),
            sys.executable,
            "-c",
            PROBE,
            str(shm_dir),
            uris[0],
            uris[1],
            str(read_write[0]),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    assert seen["read_own"] == a.weights_path.read_bytes()[-8:].hex()  # its bytes, mapped
    assert seen["own_after_write"] == "tampered"  # the engine's private page ...
    assert {p: _sha(p) for p in before} == before  # ... never the node's copy
    assert seen["open_other"] == "FileNotFoundError"  # model B is not there at all
    assert seen["write_own"] == "OSError"  # read-only file system
    assert seen["create_beside"] == "OSError"
    assert seen["list_root"] == ["kv", a.dir.name]
    assert seen["kv_write"] == "ok" and (read_write[0] / "saved").read_bytes() == b"kv"
    # Outside the sandbox nothing changed: B is still there, nothing was planted.
    assert b.weights_path.exists() and not (shm_dir / "planted").exists()
