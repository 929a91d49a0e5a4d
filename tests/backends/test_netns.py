"""The emulated cluster: namespaces, shaped links, per-node prefetchers, cleanup."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hydraserve.emulation.netns import EmulatedCluster
from hydraserve.settings import S3Settings
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model

pytestmark = pytest.mark.netns

# Slow enough that fixed costs (HTTP, polling, manifest) are small next to the transfer.
RATE_MBIT = 12.0


def owned(cluster: EmulatedCluster) -> set[str]:
    """This cluster's namespaces (other runs on the machine may have their own)."""
    return {n for n in namespaces() if n.startswith(f"hs{cluster.run_id}")}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def fetch_seconds(cluster: EmulatedCluster, uri: str, pp: int) -> float:
    started = time.time()
    for rank in range(pp):
        node = cluster.node_list[rank]
        body = {"uri": uri, "pp": pp if pp > 1 else None, "rank": rank if pp > 1 else None}
        httpx.post(f"{node.prefetcher_url}/v1/preload", json=body).raise_for_status()
    names = ["full" if pp == 1 else f"pp{pp}-rank{r}" for r in range(pp)]
    while True:
        done = 0
        for rank in range(pp):
            status = httpx.get(f"{cluster.node_list[rank].prefetcher_url}/v1/status").json()
            fetch = status["models"][0]["fetches"][names[rank]] if status["models"] else {}
            assert fetch.get("state") != "failed", fetch
            done += fetch.get("state") == "done"
        if done == pp:
            return time.time() - started
        time.sleep(0.05)


def test_links_are_shaped_and_stages_fetch_in_parallel(tmp_path: Path) -> None:
    checkpoint = make_demo_model(tmp_path / "hf", "small")
    with EmulatedCluster(nodes=2, rate_mbit=RATE_MBIT, log_dir=tmp_path / "logs") as cluster:
        assert len(owned(cluster)) == 3  # store + 2 nodes
        store = ModelStore(
            ModelRef("s3://models/small"), S3Settings(endpoint_url=cluster.s3_endpoint)
        )
        store.push(checkpoint)
        total = store.manifest().total_bytes
        single = fetch_seconds(cluster, "s3://models/small", 1)
        for node in cluster.node_list:
            httpx.post(f"{node.prefetcher_url}/v1/evict", json={"uri": "s3://models/small"})
        parallel = fetch_seconds(cluster, "s3://models/small", 2)
        # One node cannot beat its link; two nodes each pulling half nearly halve the time.
        # (tbf lets a 256 KB burst through at line rate: allow a little over the rate.)
        assert total * 8 / single / 1e6 < RATE_MBIT * 1.1, (total, single)
        # Ideal 2.0; a single link could not exceed 1.0. Margin for a loaded CI machine.
        assert single / parallel > 1.5, (single, parallel)
        # Each node's bytes stay in its own shared-memory directory.
        assert all(node.shm_dir.exists() for node in cluster.node_list)
        shm_root = cluster.shm_root / cluster.run_id
    assert owned(cluster) == set()
    assert not shm_root.exists()


def test_cleanup_happens_on_failure_too() -> None:
    cluster = EmulatedCluster(nodes=1, rate_mbit=RATE_MBIT, start_prefetchers=False)
    with pytest.raises(RuntimeError, match="boom"), cluster:
        assert len(owned(cluster)) == 2
        raise RuntimeError("boom")
    assert owned(cluster) == set()
