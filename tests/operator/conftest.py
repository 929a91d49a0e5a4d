"""A Kubernetes API (kmock's emulator), GPU nodes, recording prefetchers, fake engines
and the operator.

kmock keeps objects, serves lists, watches and merge patches, but runs no controllers and
validates nothing: the tests play the scheduler and kubelet by patching pods, and give
objects the uid/resourceVersion a real API server would assign (kopf's finalizer patches
test ``resourceVersion``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import pytest

from hydraserve.api.models import GROUP, KIND, PLURAL, VERSION
from hydraserve.control.policy import NamespacePolicy
from hydraserve.kube.client import KubeClient, KubeConfig, path_of
from hydraserve.operator.handlers import OperatorApp
from hydraserve.operator.planning import Planner
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner.types import ClusterState, Plan, PlanRequest, Unschedulable
from hydraserve.prefetcher.api import KVAreaRequest
from hydraserve.prefetcher.node import ModelHolding, NodeStatus, PreloadRequest
from hydraserve.prefetcher.shm import FetchState, FetchStatus, fetch_name
from hydraserve.store import ModelRef, ModelStore

NAMESPACE = "team-a"
SYSTEM_NAMESPACE = "hydraserve-system"
# Where the tests keep local stores: the policy allows sources under it.
TMP = tempfile.gettempdir()
MODELS = f"{GROUP}/{VERSION}"
GIB = 1 << 30


def now_rfc3339(offset: float = 0.0) -> str:
    when = dt.datetime.now(tz=dt.UTC) + dt.timedelta(seconds=offset)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator plus what a real API server assigns on create: a name from
    ``generateName`` (kopf's Events use it), a uid, a resourceVersion and a timestamp."""

    async def _handle(self, request: Any) -> Any:
        create = request.action == kmock.action.CREATE
        if request.resource is not None and create and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
            meta.setdefault("creationTimestamp", now_rfc3339())
        return await super()._handle(request)


class LocalHttpServer:
    """A real HTTP server on a free loopback port, serving the routes ``routes()`` gives."""

    url: str = ""
    _runner: aiohttp.web.AppRunner | None = None

    def routes(self) -> list[aiohttp.web.RouteDef]:
        raise NotImplementedError

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.add_routes(self.routes())
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class RecordingPrefetcher(LocalHttpServer):
    """A real HTTP server that speaks the node prefetcher's API (its own request and
    status models, so the contract cannot drift) and records what it was asked.

    A stage's preload is verified at once unless ``verify`` is off (then it stays fetching
    until a test calls :meth:`finish`); a low-priority (consolidation) fetch stays fetching.
    ``full`` sets the whole-model fetch of a model (uri -> state), as consolidation tests
    drive it."""

    node: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set, preload waits on it (a slow prefetcher)
    verify: bool = True
    full: dict[str, str] = field(default_factory=dict)
    # (uri, revision) -> fetch name -> its status
    fetches: dict[tuple[str, str], dict[str, FetchStatus]] = field(default_factory=dict)
    cached: set[tuple[str, str]] = field(default_factory=set)  # whole models held
    kv_areas: dict[str, int | None] = field(default_factory=dict)  # open area -> owner uid
    url: str = ""
    _runner: aiohttp.web.AppRunner | None = None

    def routes(self) -> list[aiohttp.web.RouteDef]:
        return [
            aiohttp.web.post("/v1/preload", self._preload),
            aiohttp.web.get("/v1/status", self._status),
            aiohttp.web.get("/healthz", self._healthz),
            aiohttp.web.put("/v1/kv-areas/{area}", self._kv_area),
            aiohttp.web.delete("/v1/kv-areas/{area}", self._kv_area),
        ]

    async def _kv_area(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        area = request.match_info["area"]
        if request.method == "PUT":
            body = KVAreaRequest.model_validate(await request.json())
            self.kv_areas[area] = body.uid
            return aiohttp.web.json_response({"area": area, "path": f"/kv/{area}"})
        return aiohttp.web.json_response({"deleted": self.kv_areas.pop(area, None) is not None})

    async def _preload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        preload = PreloadRequest.model_validate(await request.json())
        self.calls.append({**preload.model_dump(), "at": time.time()})
        if self.hold is not None:
            await self.hold.wait()
        name = fetch_name(preload.pp, preload.rank)
        now = time.time()
        # A consolidation's background fetch runs until the test says (``full``).
        verify = self.verify and not preload.low_priority
        status = FetchStatus(
            state=FetchState.DONE if verify else FetchState.FETCHING,
            total=1,
            verified=1 if verify else 0,
            started_at=now,
            finished_at=now if verify else None,
            deadline=preload.deadline,
            low_priority=preload.low_priority,
        )
        model = self.fetches.setdefault((preload.uri, preload.revision), {})
        if name not in model or model[name].state == FetchState.FAILED:
            model[name] = status
        return aiohttp.web.json_response(status.model_dump(mode="json"), status=202)

    def finish(self) -> None:
        """Every fetch in flight is verified now."""
        now = time.time()
        for model in self.fetches.values():
            for name, status in list(model.items()):
                if status.state == FetchState.FETCHING:
                    model[name] = status.model_copy(
                        update={"state": FetchState.DONE, "verified": 1, "finished_at": now}
                    )

    async def _healthz(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok", "node": self.node})

    async def _status(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        now = time.time()
        keys = set(self.fetches) | {(uri, "main") for uri in self.full} | self.cached
        models = []
        for uri, revision in sorted(keys):
            fetches = dict(self.fetches.get((uri, revision), {}))
            if uri in self.full:
                state = FetchState(self.full[uri])
                fetches["full"] = FetchStatus(
                    state=state,
                    total=1,
                    started_at=now,
                    finished_at=now if state == FetchState.DONE else None,
                )
            if (uri, revision) in self.cached:
                fetches["full"] = FetchStatus(
                    state=FetchState.DONE, total=1, started_at=now, finished_at=now
                )
            full = fetches.get("full")
            models.append(
                ModelHolding(
                    uri=uri,
                    revision=revision,
                    name=uri.rsplit("/", 1)[-1],
                    key=uri.rsplit("/", 1)[-1],
                    memory_bytes=1,
                    complete=full is not None and full.state == FetchState.DONE,
                    last_used=now,
                    fetches=fetches,
                )
            )
        status = NodeStatus(
            node=self.node,
            capacity_bytes=1 << 30,
            used_bytes=0,
            bytes_from_store=0,
            models=models,
        )
        return aiohttp.web.json_response(status.model_dump(mode="json"))


@dataclass
class FakeEngine(LocalHttpServer):
    """Stage 0's in-flight endpoint (``GET /hydraserve/inflight``), as a draining
    pipeline's head answers it; ``in_flight`` is what it says."""

    in_flight: int = 1
    asked: int = 0
    url: str = ""
    _runner: aiohttp.web.AppRunner | None = None

    def routes(self) -> list[aiohttp.web.RouteDef]:
        return [aiohttp.web.get("/hydraserve/inflight", self._inflight)]

    async def _inflight(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.asked += 1
        return aiohttp.web.json_response({"in_flight": self.in_flight})


class Cluster:
    """The emulated API server plus helpers that act as kubectl, the scheduler and kubelet."""

    def __init__(self, emulator: Any, client: KubeClient, store_uri: str) -> None:
        self.emulator = emulator
        self.client = client
        self.store_uri = store_uri
        self.prefetchers: dict[str, RecordingPrefetcher] = {}
        self._rv = 0

    def meta(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        self._rv += 1
        meta: dict[str, Any] = {
            "name": name,
            "uid": str(uuid.uuid4()),
            "resourceVersion": str(self._rv),
            "creationTimestamp": now_rfc3339(),
        }
        if namespace is not None:
            meta["namespace"] = namespace
        return meta

    # -- kubectl -----------------------------------------------------------------------

    def model_body(self, name: str, **spec: Any) -> dict[str, Any]:
        body_spec: dict[str, Any] = {
            "source": {"uri": self.store_uri},
            "resources": {"gpuMemoryGiB": 8},
        }
        body_spec.update(spec)
        return {
            "apiVersion": MODELS,
            "kind": KIND,
            "metadata": self.meta(name, NAMESPACE),
            "spec": body_spec,
        }

    async def apply_model(self, name: str, **spec: Any) -> dict[str, Any]:
        return await self.client.create(
            path_of(MODELS, PLURAL, NAMESPACE), self.model_body(name, **spec)
        )

    async def model(self, name: str) -> dict[str, Any] | None:
        return await self.client.get(path_of(MODELS, PLURAL, NAMESPACE, name))

    async def scale(self, name: str, replicas: int) -> None:
        """What the gateway does: the scale subresource."""
        await self.client.merge_patch(
            path_of(MODELS, PLURAL, NAMESPACE, name, "scale"), {"spec": {"replicas": replicas}}
        )

    async def delete_model(self, name: str) -> None:
        await self.client.delete(path_of(MODELS, PLURAL, NAMESPACE, name))

    async def pods(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return await self.client.list(
            path_of("v1", "pods", namespace), {"app.kubernetes.io/name": "hydraserve-worker"}
        )

    async def services(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return await self.client.list(
            path_of("v1", "services", namespace), {"app.kubernetes.io/name": "hydraserve-worker"}
        )

    async def events(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return await self.client.list(path_of("v1", "events", namespace))

    # -- nodes and prefetchers -----------------------------------------------------------

    async def add_gpu_node(
        self, name: str, gpus: int = 1, gpu_memory_gib: float = 24, nic_gbps: float = 16
    ) -> None:
        meta = self.meta(name)
        meta["labels"] = {"nvidia.com/gpu.memory": str(int(gpu_memory_gib * 1024))}
        meta["annotations"] = {"hydraserve.io/nic-gbps": str(nic_gbps)}
        await self.client.create(
            path_of("v1", "nodes"),
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": meta,
                "spec": {},
                "status": {
                    "allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": str(gpus)},
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )

    async def add_prefetcher(self, node: str) -> RecordingPrefetcher:
        recorder = RecordingPrefetcher(node)
        await recorder.start()
        self.prefetchers[node] = recorder
        meta = self.meta(f"hydraserve-prefetcher-{node}", SYSTEM_NAMESPACE)
        meta["labels"] = {
            "app.kubernetes.io/name": "hydraserve",
            "app.kubernetes.io/component": "prefetcher",
        }
        await self.client.create(
            path_of("v1", "pods", SYSTEM_NAMESPACE),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": {
                    "nodeName": node,
                    "containers": [
                        {
                            "name": "prefetcher",
                            "ports": [{"name": "http", "containerPort": recorder.port}],
                        }
                    ],
                },
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )
        return recorder

    async def remove_prefetcher(self, node: str) -> None:
        """The node's prefetcher pod is gone (its server stops answering too)."""
        await self.client.delete(
            path_of("v1", "pods", SYSTEM_NAMESPACE, f"hydraserve-prefetcher-{node}")
        )
        await self.prefetchers.pop(node).stop()

    # -- scheduler and kubelet -----------------------------------------------------------

    async def run_pod(self, pod: dict[str, Any], ready: bool = True, ip: str = "10.1.0.7") -> None:
        """Schedule the pod where its affinity says, start it, and mark it Ready."""
        terms = pod["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        node = terms[0]["matchFields"][0]["values"][0]
        name = pod["metadata"]["name"]
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now_rfc3339()},
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "lastTransitionTime": now_rfc3339(),
            },
        ]
        path = path_of("v1", "pods", NAMESPACE, name)
        await self.client.merge_patch(path, {"spec": {"nodeName": node}})
        await self.client.merge_patch(
            f"{path}/status",
            {"status": {"phase": "Running", "podIP": ip, "hostIP": ip, "conditions": conditions}},
        )

    async def fail_pod(self, name: str, message: str) -> None:
        await self.client.merge_patch(
            path_of("v1", "pods", NAMESPACE, name, "status"),
            {"status": {"phase": "Failed", "reason": "Error", "message": message}},
        )


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy (and return it)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class OperatorRunner:
    """Starts and stops operator processes (kopf in this event loop) against the emulator."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.settings = OperatorSettings(
            standalone=True,
            liveness_endpoint=None,
            resync_seconds=3,
            retry_seconds=1,
            node_status_max_age_seconds=0.05,
            prefetcher_namespace=SYSTEM_NAMESPACE,
            worker_image="registry.example/hydraserve/worker:test",
            s3_endpoint_url="http://minio.storage:9000",
            s3_credentials_secret="hydraserve-s3",
            # Off unless a test is about it (tests/operator/test_consolidation.py): the
            # other tests check pipelines as they start and serve.
            consolidation=False,
            # The tests' store is a local directory under the temp dir: allowed as an admin
            # allows a path prefix (the default policy takes s3:// sources only).
            tenancy={
                "*": NamespacePolicy(allowed_sources=["s3://*", f"{tempfile.gettempdir()}/*"])
            },
        )
        self.apps: list[tuple[OperatorApp, asyncio.Event, asyncio.Task[None]]] = []

    async def start(self, plan_with: Planner | None = None, **overrides: Any) -> OperatorApp:
        # Validated, so a misspelt or mistyped override fails here, not deep in a pass.
        unknown = set(overrides) - set(OperatorSettings.model_fields)
        assert not unknown, f"not operator settings: {unknown}"
        settings = OperatorSettings.model_validate(self.settings.model_dump() | overrides)
        app = OperatorApp(settings, KubeConfig(server=self.server), planner=plan_with)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(app.run(stop_flag=stop, ready_flag=ready))
        await asyncio.wait_for(ready.wait(), 10)
        self.apps.append((app, stop, task))
        return app

    async def crash(self, app: OperatorApp) -> None:
        """Kill an operator as a SIGKILL would: no graceful stop, requests in flight lost."""
        for entry in self.apps:
            if entry[0] is app:
                entry[2].cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await entry[2]
                self.apps.remove(entry)
                return

    async def stop_all(self) -> None:
        for _app, stop, _task in self.apps:
            stop.set()
        for _app, _stop, task in self.apps:
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.apps.clear()


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> str:
    """A tiny demo model in a real local store (the operator reads its manifest)."""
    path = tmp_path_factory.mktemp("store") / "tiny"
    ModelStore(ModelRef(str(path))).push(demo_checkpoint)
    return str(path)


@pytest.fixture
async def emulator() -> AsyncIterator[Any]:
    async with ApiServerEmulator() as handler, kmock.Server(handler):
        yield handler


@pytest.fixture
async def cluster(emulator: Any, store_uri: str) -> AsyncIterator[Cluster]:
    kmock = emulator
    kmock.resources.load_bundled()
    kmock.resources[f"{MODELS}/{PLURAL}"] = kmock.ResourceInfo(
        kind=KIND,
        namespaced=True,
        singular="serverlessmodel",
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status", "scale"},
    )
    client = KubeClient(KubeConfig(server=str(kmock.url).rstrip("/")))
    c = Cluster(kmock, client, store_uri)
    yield c
    for recorder in c.prefetchers.values():
        await recorder.stop()
    await client.close()


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def operators(cluster: Cluster) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner(str(cluster.client.config.server))
    yield runner
    await runner.stop_all()


def two_stage_planner(nodes: tuple[str, str]) -> Planner:
    """A planner that always splits the model over two nodes (what the controller does when
    one NIC cannot meet the TTFT SLO), for testing pipelined instances."""

    def plan(request: PlanRequest, cluster: ClusterState) -> Plan | Unschedulable:
        from hydraserve.planner.types import Prediction, StagePlacement

        stages = request.model.partitions[2]
        return Plan(
            pp=2,
            stages=tuple(
                StagePlacement(
                    rank=rank,
                    node=nodes[rank],
                    gpu=0,
                    start_layer=lo,
                    end_layer=hi,
                    memory_bytes=request.model.replica_bytes // 2,
                    all_card=rank == 0,
                    fetch_bytes=nbytes,
                )
                for rank, (lo, hi, nbytes) in enumerate(stages)
            ),
            prediction=Prediction(ttft_s=3.0, tpot_s=0.05),
            reason="test: always pp=2",
        )

    return plan
