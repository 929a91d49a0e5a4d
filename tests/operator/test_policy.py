"""Hostile ServerlessModels: each is refused by the CRD schema or gets a PolicyViolation
condition naming the rule, and no pod, Service or preload is made for it (kmock)."""

from __future__ import annotations

from typing import Any

import pytest

from hydraserve.api.models import API_VERSION, KIND, PLURAL, ServerlessModelSpec, engine_flags
from hydraserve.control.policy import (
    RULE_ENGINE_ARG,
    RULE_IMAGE,
    RULE_MAX_GPU_MEMORY,
    RULE_MAX_MODELS,
    RULE_MAX_REPLICAS,
    RULE_SOURCE,
    NamespacePolicy,
    check_spec,
)
from hydraserve.kube.client import path_of
from tests.deploy.test_crd import api_server_errors
from tests.operator.conftest import (
    MODELS,
    NAMESPACE,
    TMP,
    Cluster,
    OperatorRunner,
    eventually,
    now_rfc3339,
)
from tests.support.waits import operator_passes

PLATFORM_IMAGE = "registry.example/hydraserve/worker:test"


def _schema_errors(spec: dict[str, Any]) -> list[str]:
    """What the API server says about a ServerlessModel with this spec (offline)."""
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "m"}, "spec": spec}
    return api_server_errors(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("source", "uri"), "s3://models/../../etc"),
        (("source", "uri"), "s3://models/llama/.."),
        (("source", "uri"), "file:///srv/models/./../etc"),
        (("source", "uri"), "/"),
        (("source", "revision"), ".."),
        (("engine", "image"), "evil image; rm -rf /"),
        (("engine", "image"), "Registry.Example/Worker"),
        (("resources", "gpuMemoryGiB"), 100000),
        (("scaling", "keepAliveSeconds"), 10**9),
        (("engine", "args"), ["--max-num-seqs=1"] * 65),
    ],
)
def test_crd_schema_rejects_what_it_can_express(field: tuple[str, str], value: Any) -> None:
    spec: dict[str, Any] = {"source": {"uri": "s3://models/llama"}}
    spec.setdefault(field[0], {})
    if field == ("engine", "args"):
        spec["engine"]["args"] = value
    else:
        spec[field[0]][field[1]] = value
    assert _schema_errors(spec), spec
    # The pydantic model is the same schema: the operator's own check agrees.
    with pytest.raises(ValueError):
        ServerlessModelSpec.model_validate(spec)


def test_crd_schema_accepts_ordinary_sources_and_images() -> None:
    for uri in ("s3://models/llama-2/7b", "s3://models/..v2/x", "file:///srv/models/a.b"):
        assert _schema_errors({"source": {"uri": uri}}) == []
    for image in ("ghcr.io/org/worker:1.2", "localhost:5000/w@sha256:" + "a" * 64):
        assert (
            _schema_errors({"source": {"uri": "s3://models/x"}, "engine": {"image": image}}) == []
        )


def test_engine_flags_read_as_vllm_reads_them() -> None:
    assert engine_flags(["--trust_remote_code", "--max-model-len", "512", "-tp=2", "-1"]) == [
        "--trust-remote-code",
        "--max-model-len",
        "-tp",
    ]


def _spec(**overrides: Any) -> ServerlessModelSpec:
    body: dict[str, Any] = {"source": {"uri": "s3://models/team-a/llama"}} | overrides
    return ServerlessModelSpec.model_validate(body)


def test_defaults_allow_an_ordinary_model_and_name_each_broken_rule() -> None:
    policy = NamespacePolicy()
    ok = _spec(engine={"args": ["--max-model-len=512", "--enforce-eager"]})
    assert check_spec(ok, policy, PLATFORM_IMAGE) == []
    assert check_spec(_spec(engine={"image": PLATFORM_IMAGE}), policy, PLATFORM_IMAGE) == []
    bad = _spec(
        source={"uri": "file:///etc/shadow"},
        engine={"image": "docker.io/evil/miner:1", "args": ["--trust-remote-code", "--foo"]},
    )
    rules = [v.rule for v in check_spec(bad, policy, PLATFORM_IMAGE)]
    assert rules == [RULE_IMAGE, RULE_ENGINE_ARG, RULE_ENGINE_ARG, RULE_SOURCE]
    quotas = NamespacePolicy(
        max_models=1, max_replicas_per_model=2, max_gpu_memory_gib_per_model=24
    )
    over = _spec(scaling={"maxReplicas": 3}, resources={"gpuMemoryGiB": 48})
    rules = [v.rule for v in check_spec(over, quotas, PLATFORM_IMAGE, models_ahead=1)]
    assert rules == [RULE_MAX_REPLICAS, RULE_MAX_GPU_MEMORY, RULE_MAX_MODELS]


def test_an_admin_can_allow_per_namespace() -> None:
    trusted = NamespacePolicy(
        allowed_images=["ghcr.io/team-a/*"],
        allowed_engine_args=["--trust-remote-code", "--max-model-len"],
        allowed_sources=["s3://models/team-a/*", "/srv/models/*"],
    )
    spec = _spec(
        source={"uri": "/srv/models/llama"},
        engine={"image": "ghcr.io/team-a/worker:2", "args": ["--trust-remote-code"]},
    )
    assert check_spec(spec, trusted, PLATFORM_IMAGE) == []
    other_bucket = _spec(source={"uri": "s3://models/team-b/llama"})
    assert [v.rule for v in check_spec(other_bucket, trusted, PLATFORM_IMAGE)] == [RULE_SOURCE]


# Every hostile spec and the rule it must be refused under (default policy for the
# namespace except the store path the tests' models live in, and the quotas below).
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "shadow": ({"source": {"uri": "file:///etc/shadow"}}, RULE_SOURCE),
    "bare-path": ({"source": {"uri": "/etc"}}, RULE_SOURCE),
    "other-bucket": ({"source": {"uri": "s3://other-team/llama"}}, RULE_SOURCE),
    "miner": ({"engine": {"image": "docker.io/evil/miner:latest"}}, RULE_IMAGE),
    "remote-code": ({"engine": {"args": ["--trust-remote-code"]}}, RULE_ENGINE_ARG),
    "load-format": ({"engine": {"args": ["--load-format", "dummy"]}}, RULE_ENGINE_ARG),
    "port": ({"engine": {"args": ["--port=22"]}}, RULE_ENGINE_ARG),
    "replicas": ({"scaling": {"maxReplicas": 5}}, RULE_MAX_REPLICAS),
    "greedy": ({"resources": {"gpuMemoryGiB": 64}}, RULE_MAX_GPU_MEMORY),
}


async def test_hostile_models_get_a_policy_violation_and_nothing_runs(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a")
    await cluster.add_prefetcher("gpu-a")
    policy = NamespacePolicy(
        allowed_sources=["s3://models/*", f"{TMP}/*"],
        max_models=len(HOSTILE) + 1,
        max_replicas_per_model=4,
        max_gpu_memory_gib_per_model=32,
    )
    await operators.start(tenancy={NAMESPACE: policy})
    for name, (spec, _) in HOSTILE.items():
        await cluster.apply_model(name, replicas=1, **spec)
    # The quota counts every model of the namespace, hostile ones too: the last is over.
    await cluster.apply_model("ok", replicas=0)
    # Created a minute later (timestamps have one-second resolution): it is the one over.
    late = cluster.model_body("one-too-many", replicas=1)
    late["metadata"]["creationTimestamp"] = now_rfc3339(60)
    await cluster.client.create(path_of(MODELS, PLURAL, NAMESPACE), late)
    expected = {name: rule for name, (_, rule) in HOSTILE.items()} | {
        "one-too-many": RULE_MAX_MODELS
    }

    for name, rule in expected.items():

        async def violated(name: str = name) -> dict[str, Any] | None:
            model = await cluster.model(name)
            for cond in ((model or {}).get("status") or {}).get("conditions") or []:
                if cond["type"] == "Valid" and cond["reason"] == "PolicyViolation":
                    return cond
            return None

        cond = await eventually(violated, what=f"{name}: PolicyViolation")
        assert cond["status"] == "False"
        assert cond["message"].startswith(f"{rule}:"), (name, cond["message"])
    ok = await cluster.model("ok")
    assert ok is not None
    assert all(c["reason"] != "PolicyViolation" for c in ok["status"]["conditions"])

    (app,) = [app for app, _, _ in operators.apps]
    for name in expected:
        await operator_passes(app.reconciler, NAMESPACE, name)
    assert await cluster.pods() == [] and await cluster.services() == []
    assert not cluster.prefetchers["gpu-a"].calls
    events = await cluster.events()
    assert sum(e.get("reason") == "PolicyViolation" for e in events) >= len(expected)
