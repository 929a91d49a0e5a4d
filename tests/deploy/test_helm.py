"""The Helm chart: lint, render with several value sets, validate every rendered object
against the official Kubernetes schemas (strict), and check what the templates promise.

helm comes from scripts/install-k8s-tools.sh (the npm package named in FIELD-NOTES).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hydraserve.api.models import ServerlessModelSpec
from hydraserve.control.placement import InstancePlan, StagePlan, standalone_plan
from hydraserve.control.policy import NamespacePolicy
from hydraserve.operator.manifests import (
    instance_network_policy,
    instance_service,
    kv_volume,
    model_volume,
    standalone_objects,
    worker_pod,
)
from hydraserve.operator.naming import APP_NAME, MANAGED_BY, kv_area_name, worker_labels
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner import PlannerConfig
from tests.support.pod_security import pod_of, violations

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "hydraserve"
HELM = ROOT / ".tools" / "bin" / "helm"
K8S_VERSION = "1.31.0"
NAMESPACE = "hydraserve-system"

VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "gpu-sharing": [
        "--set", "gpu.resourceName=aliyun.com/gpu-mem", "--set", "gpu.mode=memory",
        "--set", "prefetcher.hostPort=true", "--set", "prefetcher.cacheCapacityGiB=128",
    ],
    "ha-namespaced": [
        "--set", "operator.replicas=2", "--set", "operator.watchNamespaces={team-a,team-b}",
        "--set", "s3.endpointUrl=http://minio.storage:9000", "--set", "s3.createSecret=true",
        "--set", "s3.accessKeyId=AK", "--set", "s3.secretAccessKey=SK",
        "--set", "gateway.apiKeysSecret=hydraserve-keys",
        "--set", "operator.consolidation.enabled=false",
        "--set", "operator.consolidation.drainTimeoutSeconds=60",
        "--set", "operator.planner.config.engine_ready_floor_s=15",
        "--set", "operator.planner.storeBytesPerSecond=5000000000",
        "--set-json", 'operator.tenancy.team-a={"allowedSources":["s3://models/team-a/*"],'
        '"maxModels":3,"maxGpuMemoryGiBPerModel":80}',
    ],
    "no-gateway-standalone": [
        "--set", "gateway.enabled=false", "--set", "operator.leaderElection=false",
    ],
    "narrow-network": [
        "--set", "prefetcher.hostPort=true", "--set", "operator.watchNamespaces={team-a}",
        "--set-json", 'networkPolicy.gatewayIngressFrom=[{"ipBlock":{"cidr":"10.0.0.0/8"}},'
        '{"namespaceSelector":{"matchLabels":{"hydraserve.io/tenant":"true"}}}]',
        "--set-json", 'networkPolicy.apiServer={"cidrs":["172.20.0.1/32"],"ports":[6443]}',
        "--set-json", 'networkPolicy.s3={"cidrs":["10.1.0.0/16"],"ports":[9000]}',
        "--set", "podSecurity.runAsUser=2000", "--set", "podSecurity.runAsGroup=3000",
        "--set-json", 'networkPolicy.prefetcherMetricsFrom=[{"namespaceSelector":'
        '{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}},'
        '"podSelector":{"matchLabels":{"app":"prometheus"}}}]',
    ],
    "no-network-policy": ["--set", "networkPolicy.enabled=false"],
}  # fmt: skip


@pytest.fixture(scope="session")
def helm() -> Path:
    if not HELM.exists():
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-k8s-tools.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"scripts/install-k8s-tools.sh failed in CI:\n{result.stderr}")
            pytest.skip(f"helm unavailable: scripts/install-k8s-tools.sh failed: {result.stderr}")
    return HELM


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def run_helm(helm: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )


def render(helm: Path, env: dict[str, str], values: list[str]) -> list[dict[str, Any]]:
    result = run_helm(
        helm, env, "template", "hs", str(CHART), "--namespace", NAMESPACE, "--include-crds",
        *values,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm: Path, helm_env: dict[str, str]) -> Iterator[dict[str, list[dict[str, Any]]]]:
    yield {name: render(helm, helm_env, values) for name, values in VALUE_SETS.items()}


def find(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(matches) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in matches]}"
    return matches[0]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(helm: Path, helm_env: dict[str, str], name: str) -> None:
    result = run_helm(helm, helm_env, "lint", "--strict", str(CHART), *VALUE_SETS[name])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_manifests_pass_kubernetes_validate_strict(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    custom = {"kopf.dev/v1"}  # custom resources: no official schema (CRDs are validated)
    checked = 0
    for doc in rendered[name]:
        if doc["apiVersion"] in custom:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 8


def test_the_chart_renders_every_component(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "serverlessmodels.hydraserve.io") in kinds
    assert ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev") in kinds
    assert ("ClusterKopfPeering", "hydraserve") in kinds
    for kind, name in [
        ("Deployment", "hs-hydraserve-operator"),
        ("Deployment", "hs-hydraserve-gateway"),
        ("Service", "hs-hydraserve-gateway"),
        ("DaemonSet", "hs-hydraserve-prefetcher"),
    ]:
        assert (kind, name) in kinds


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_operator_env_is_read_by_its_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every HYDRASERVE_OPERATOR_* variable the chart sets is a settings field, and the
    rendered values parse into the intended settings (catches typos in env names)."""
    for name in ("defaults", "gpu-sharing", "ha-namespaced"):
        deployment = find(rendered[name], "Deployment", "-operator")
        env = {
            k: v for k, v in env_of(deployment["spec"]["template"]["spec"]["containers"][0]).items()
            if k.startswith("HYDRASERVE_OPERATOR_")
        }  # fmt: skip
        fields = {f"HYDRASERVE_OPERATOR_{f.upper()}" for f in OperatorSettings.model_fields}
        assert set(env) <= fields, set(env) - fields
        old = dict(os.environ)
        try:
            os.environ.update(env)
            settings = OperatorSettings()
        finally:
            os.environ.clear()
            os.environ.update(old)
        prefetcher = find(rendered[name], "DaemonSet", "-prefetcher")
        assert settings.prefetcher_labels == prefetcher["spec"]["selector"]["matchLabels"]
        assert settings.prefetcher_namespace == NAMESPACE
        if name == "gpu-sharing":
            assert settings.gpu_resource_name == "aliyun.com/gpu-mem"
            assert settings.gpu_resource_mode == "memory"
            assert settings.prefetcher_use_host_port is True
        if name == "ha-namespaced":
            assert settings.namespaces == ["team-a", "team-b"]
            assert settings.s3_endpoint_url == "http://minio.storage:9000"
            assert settings.standalone is False
            assert settings.consolidation is False
            assert settings.drain_timeout_seconds == 60
            assert settings.planner.engine_ready_floor_s == 15
            assert settings.store_bytes_per_s == 5e9
            team_a = settings.policy_for("team-a")
            assert team_a.allowed_sources == ["s3://models/team-a/*"]
            assert team_a.max_models == 3 and team_a.max_gpu_memory_gib_per_model == 80
            assert settings.policy_for("team-b") == NamespacePolicy()
        if name == "defaults":
            assert settings.worker_image == "ghcr.io/hydraserve/worker:0.1.0"
            assert settings.worker_tolerations[0]["key"] == "nvidia.com/gpu"
            assert settings.consolidation is True
            assert settings.consolidation_poll_seconds == 2
            assert settings.planner == PlannerConfig()
            assert settings.store_bytes_per_s is None
            assert settings.tenancy == {"*": NamespacePolicy()}
            # The per-instance NetworkPolicies admit exactly the chart's gateway and
            # operator pods.
            assert settings.network_policy is True
            assert settings.system_namespace == NAMESPACE
            gateway = find(rendered[name], "Deployment", "-gateway")
            labels = gateway["spec"]["template"]["metadata"]["labels"]
            assert settings.gateway_labels.items() <= labels.items()
            op_labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert settings.operator_labels.items() <= op_labels.items()


def test_prefetcher_daemonset_shm_capacity_and_nodes(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    ds = find(rendered["gpu-sharing"], "DaemonSet", "-prefetcher")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert env_of(container)["HYDRASERVE_PREFETCHER_CACHE_CAPACITY_BYTES"] == str(128 << 30)
    assert env_of(container)["HYDRASERVE_PREFETCHER_NODE_NAME"] == {
        "fieldRef": {"fieldPath": "spec.nodeName"}
    }
    assert container["ports"][0]["hostPort"] == 8300
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["automountServiceAccountToken"] is False
    assert "limits" not in container["resources"]  # tmpfs pages count against a limit


def test_prefetcher_env_is_read_by_its_settings(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    from hydraserve.prefetcher.api import PrefetcherSettings

    ds = find(rendered["defaults"], "DaemonSet", "-prefetcher")
    env = env_of(ds["spec"]["template"]["spec"]["containers"][0])
    own = {k for k in env if k.startswith("HYDRASERVE_PREFETCHER_")}
    fields = {f"HYDRASERVE_PREFETCHER_{f.upper()}" for f in PrefetcherSettings.model_fields}
    assert own <= fields, own - fields
    assert env["HYDRASERVE_SHM_DIR"] == "/dev/shm/hydraserve"


def test_security_contexts_non_root(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for doc in rendered["defaults"]:
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True


def test_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["defaults"]
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role
            assert "secrets" not in rule["resources"], "no component reads Secrets via the API"
    gateway = find(docs, "ClusterRole", "-gateway")
    writes = {
        r for rule in gateway["rules"] for r in rule["resources"]
        if set(rule["verbs"]) & {"create", "update", "patch", "delete"}
    }  # fmt: skip
    # The autoscaler's replicas, and status.sloAttainment.
    assert writes == {"serverlessmodels/scale", "serverlessmodels/status"}
    operator = find(docs, "ClusterRole", "-operator")
    deletable = {
        r for rule in operator["rules"] for r in rule["resources"] if "delete" in rule["verbs"]
    }
    # Instances, and the volume/claim pairs that show workers their model (decision 0500).
    assert deletable == {
        "pods",
        "services",
        "persistentvolumes",
        "persistentvolumeclaims",
        "networkpolicies",
    }
    patchable = {
        r for rule in operator["rules"] for r in rule["resources"] if "patch" in rule["verbs"]
    }
    assert "services" in patchable and "pods" not in patchable  # consolidation's records


def test_s3_secret_and_api_keys(
    rendered: dict[str, list[dict[str, Any]]], helm: Path, helm_env: dict[str, str]
) -> None:
    secret = find(rendered["ha-namespaced"], "Secret", "hydraserve-s3")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    gateway = find(rendered["ha-namespaced"], "Deployment", "-gateway")
    pod = gateway["spec"]["template"]["spec"]
    assert "--api-keys-file=/etc/hydraserve/api-keys/keys.yaml" in pod["containers"][0]["args"]
    (keys,) = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert keys["secret"]["secretName"] == "hydraserve-keys"
    env = env_of(pod["containers"][0])
    assert env["HYDRASERVE_GATEWAY_NAMESPACES"] == '["team-a","team-b"]'
    # Without a keys Secret the gateway is open, and says so in its arguments.
    open_gateway = find(rendered["defaults"], "Deployment", "-gateway")
    assert "--no-auth" in open_gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    peerings = [d for d in rendered["ha-namespaced"] if d["kind"] == "KopfPeering"]
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert not [
        d
        for d in rendered["no-gateway-standalone"]
        if "Kopf" in d["kind"] and d["kind"] != "CustomResourceDefinition"
    ]
    result = run_helm(helm, helm_env, "template", "hs", str(CHART), "--set", "s3.createSecret=true")
    assert result.returncode != 0
    assert "s3.createSecret needs s3.accessKeyId and s3.secretAccessKey" in result.stderr


def test_notes_say_how_to_send_the_first_request(helm: Path, helm_env: dict[str, str]) -> None:
    result = run_helm(
        helm, helm_env, "install", "hs", str(CHART), "--dry-run=client", "--namespace", NAMESPACE
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f examples/llama2-7b.yaml" in notes
    assert "kubectl get serverlessmodels" in notes
    assert "port-forward svc/hs-hydraserve-gateway 8000:80" in notes
    assert "/v1/completions" in notes and '"model": "llama2-7b"' in notes


def test_operator_made_objects_pass_kubernetes_validate_strict() -> None:
    """What the operator creates at run time is as valid as what the chart renders."""
    settings = OperatorSettings(s3_credentials_secret="hydraserve-s3", worker_priority_class="hi")
    model = {
        "apiVersion": "hydraserve.io/v1alpha1",
        "kind": "ServerlessModel",
        "metadata": {"name": "llama", "namespace": "team-a", "uid": "1234"},
    }
    spec = ServerlessModelSpec.model_validate(
        {"source": {"uri": "s3://models/llama"}, "engine": {"args": ["--dtype=half"]}}
    )
    plan = InstancePlan(
        pp=2,
        stages=[
            StagePlan(rank=r, node=f"gpu-{r}", gpu=0, start_layer=16 * r, end_layer=16 * r + 16,
                      memory_bytes=8 << 30, all_card=r == 0, fetch_bytes=1 << 30)
            for r in range(2)
        ],
    )  # fmt: skip
    objects = [instance_service(model, "llama-abcde", plan, "t", 1.0, 2.0, settings)]
    objects += [
        worker_pod(model, spec, "llama-abcde", plan, r, "t", "http://10.0.0.1:8300", 3.0, settings)
        for r in range(2)
    ]
    # The standalone engine that consolidates it (pp = 1 on the all-card node), loading the
    # KV its pipeline saved (that instance's KV area).
    area = kv_area_name("team-a", "llama-abcde")
    objects += standalone_objects(
        model, spec, "llama-abcde", standalone_plan(plan), "t", None, 4.0, settings, area
    )
    objects += [*model_volume(model, spec, "gpu-0", 1 << 30, settings)]
    objects += [*kv_volume(model, area, "gpu-0", settings)]
    objects.append(instance_network_policy(model, "llama-abcde", settings))
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    pods = [o for o in objects if o["kind"] == "Pod"]
    assert len(pods) == 3
    for pod in pods:
        # Tenant namespaces can enforce "restricted": no hostPath, root or privilege.
        assert violations(pod, "restricted") == [], pod["metadata"]["name"]


def test_container_build_dirs_are_not_python_packages() -> None:
    """A top-level `operator` package would shadow the standard library's `operator`."""
    for directory in ("operator", "worker"):
        files = [p.name for p in (ROOT / directory).iterdir()]
        assert "Dockerfile" in files
        assert not [f for f in files if f.endswith(".py")], files
    dockerfile = (ROOT / "operator" / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile and '".[operator]"' in dockerfile
    assert "USER 10001" in (ROOT / "worker" / "Dockerfile").read_text()


def test_gateway_env_is_read_by_its_settings(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydraserve.gateway.settings import GatewaySettings

    gateway = find(rendered["ha-namespaced"], "Deployment", "-gateway")
    env = env_of(gateway["spec"]["template"]["spec"]["containers"][0])
    prefix = "HYDRASERVE_GATEWAY_"
    for name, value in env.items():
        if name.startswith(prefix):
            assert name.removeprefix(prefix).lower() in GatewaySettings.model_fields, name
            monkeypatch.setenv(name, value)
    assert GatewaySettings().namespaces == ["team-a", "team-b"]


# --- Pod Security levels (docs/security.md) --------------------------------------------

POD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_pod_runs_restricted_but_the_prefetcher(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """Every pod template of the release passes the restricted Pod Security level, except
    the prefetcher DaemonSet in the release namespace, whose hostPath to the node's
    /dev/shm (and hostPort, when set) forces the privileged level."""
    docs = [d for d in rendered[name] if d["kind"] in POD_KINDS]
    failing = {
        (d["kind"], d["metadata"]["name"]): violations(d, "restricted")
        for d in docs
        if violations(d, "restricted")
    }
    prefetcher = ("DaemonSet", "hs-hydraserve-prefetcher")
    assert set(failing) == {prefetcher}, failing
    (ds,) = [d for d in docs if (d["kind"], d["metadata"]["name"]) == prefetcher]
    assert ds["metadata"]["namespace"] == NAMESPACE
    # Everything but the host access is restricted, and the host access breaks baseline.
    expected = ["HostPath volumes: volume shm sets hostPath.path=/dev/shm"]
    if "prefetcher.hostPort=true" in VALUE_SETS[name]:
        expected.append("Host ports: containers[prefetcher] sets ports[].hostPort=8300")
    assert failing[prefetcher] == expected
    assert violations(ds, "baseline") == expected
    checked = {d["metadata"]["name"] for d in docs} - {prefetcher[1]}
    assert "hs-hydraserve-operator" in checked
    assert ("hs-hydraserve-gateway" in checked) == ("gateway.enabled=false" not in VALUE_SETS[name])
    # The only hostPath in the release, and the template says why.
    template = (CHART / "templates" / "prefetcher.yaml").read_text()
    assert '"privileged"' in template and "hostPath" in template


def test_pod_user_comes_from_values_and_is_never_root(
    rendered: dict[str, list[dict[str, Any]]], helm: Path, helm_env: dict[str, str]
) -> None:
    for name, user, group in [("defaults", 10001, 10001), ("narrow-network", 2000, 3000)]:
        for suffix in ("-operator", "-gateway"):
            pod = find(rendered[name], "Deployment", suffix)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == user
            assert pod["securityContext"]["runAsGroup"] == group
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert "/tmp" in mounts  # the one writable path, an emptyDir
    result = run_helm(
        helm, helm_env, "template", "hs", str(CHART), "--set", "podSecurity.runAsUser=0"
    )
    assert result.returncode != 0
    assert "podSecurity.runAsUser must be a non-zero user id" in result.stderr


# --- Network policies (docs/security.md) -----------------------------------------------

GATEWAY = {"app.kubernetes.io/name": "hydraserve", "app.kubernetes.io/instance": "hs",
           "app.kubernetes.io/component": "gateway"}  # fmt: skip
OPERATOR = {**GATEWAY, "app.kubernetes.io/component": "operator"}
PREFETCHER = {**GATEWAY, "app.kubernetes.io/component": "prefetcher"}
WORKER = worker_labels("llama", "llama-abcde", 0)
DNS = {"k8s-app": "kube-dns"}


def pod(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod as a NetworkPolicy peer sees it."""
    return {"namespace": namespace, "labels": labels, "ip": "100.64.1.7"}


def outside(ip: str) -> dict[str, Any]:
    return {"namespace": None, "labels": {}, "ip": ip}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        assert expr["operator"] in ("In", "NotIn", "Exists", "DoesNotExist")
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
        if expr["operator"] == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_ns: str, other: dict[str, Any]) -> bool:
    import ipaddress

    if "ipBlock" in peer:
        net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        excluded = [ipaddress.ip_network(c) for c in peer["ipBlock"].get("except", [])]
        ip = ipaddress.ip_address(other["ip"])
        return ip in net and not any(ip in e for e in excluded)
    if other["namespace"] is None:  # not a pod: only ipBlocks match
        return False
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": other["namespace"]}
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif other["namespace"] != policy_ns:
        return False
    return selects(peer.get("podSelector") or {}, other["labels"])


def allows(
    policy: dict[str, Any], direction: str, other: dict[str, Any], port: int, proto: str = "TCP"
) -> bool:
    """Whether `policy` lets traffic in from (Ingress) / out to (Egress) `other` on port."""
    spec = policy["spec"]
    assert direction in spec["policyTypes"]
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for rule in spec.get(key) or []:
        ports = rule.get("ports")
        if ports and not any(
            p.get("protocol", "TCP") == proto and p.get("port") in (None, port) for p in ports
        ):
            continue
        peers = rule.get(peers_key)
        if not peers or any(peer_matches(p, policy["metadata"]["namespace"], other) for p in peers):
            return True
    return False


def policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            assert doc["metadata"]["namespace"] == NAMESPACE
            found[doc["metadata"]["name"].removeprefix("hs-hydraserve-")] = doc
    return found


def test_network_policies_select_the_release_pods(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name, values in VALUE_SETS.items():
        found = policies(rendered[name])
        if name == "no-network-policy":
            assert found == {}
            continue
        gateway = "gateway.enabled=false" not in values
        assert set(found) == {"operator", "prefetcher"} | ({"gateway"} if gateway else set())
        for component, policy in found.items():
            assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
            kind = "DaemonSet" if component == "prefetcher" else "Deployment"
            template_metadata, _ = pod_of(find(rendered[name], kind, f"-{component}"))
            assert selects(policy["spec"]["podSelector"], dict(template_metadata["labels"]))
            # No policy selects another component's pods.
            for other in ({"gateway", "operator", "prefetcher"} & set(found)) - {component}:
                labels = {**GATEWAY, "app.kubernetes.io/component": other}
                assert not selects(policy["spec"]["podSelector"], labels)


def test_network_policies_use_the_operators_worker_labels() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for key in (MANAGED_BY, APP_NAME):
        assert f"{key}: {WORKER[key]}" in helpers


def test_gateway_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gw = policies(rendered["defaults"])["gateway"]
    # In: its HTTP port, from any pod in any namespace (the default), nothing else.
    assert allows(gw, "Ingress", pod("team-a", {"app": "client"}), 8000)
    assert allows(gw, "Ingress", pod(NAMESPACE, {}), 8000)
    assert not allows(gw, "Ingress", pod("team-a", {"app": "client"}), 9090)
    assert not allows(gw, "Ingress", outside("203.0.113.9"), 8000)
    # Out: DNS, the API server, worker pods' HTTP port in any namespace.
    assert allows(gw, "Egress", pod("kube-system", DNS), 53, "UDP")
    assert allows(gw, "Egress", pod("kube-system", DNS), 53, "TCP")
    assert not allows(gw, "Egress", pod("team-a", DNS), 53, "UDP")
    assert allows(gw, "Egress", outside("10.96.0.1"), 443)
    assert allows(gw, "Egress", outside("172.18.0.2"), 6443)
    assert allows(gw, "Egress", pod("team-a", WORKER), 8000)
    assert allows(gw, "Egress", pod("team-b", WORKER), 8000)
    assert not allows(gw, "Egress", pod("team-a", WORKER), 29500)  # stages' rendezvous
    assert not allows(gw, "Egress", pod(NAMESPACE, PREFETCHER), 8300)
    assert not allows(gw, "Egress", pod("team-a", {"app": "other"}), 8000)
    assert not allows(gw, "Egress", outside("198.51.100.1"), 9000)  # the store
    # Narrowed by values.
    narrow = policies(rendered["narrow-network"])["gateway"]
    assert allows(narrow, "Ingress", outside("10.3.4.5"), 8000)
    assert not allows(narrow, "Ingress", outside("203.0.113.9"), 8000)
    assert not allows(narrow, "Ingress", pod("team-a", {}), 8000)  # not a tenant namespace
    assert allows(narrow, "Egress", outside("172.20.0.1"), 6443)
    assert not allows(narrow, "Egress", outside("172.20.0.2"), 6443)
    assert not allows(narrow, "Egress", outside("172.20.0.1"), 443)
    assert allows(narrow, "Egress", pod("team-a", WORKER), 8000)
    assert not allows(narrow, "Egress", pod("team-b", WORKER), 8000)  # not watched


def test_operator_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    op = policies(rendered["defaults"])["operator"]
    assert op["spec"]["ingress"] == []  # no metrics endpoint; probes come from the node
    for port in (8080, 8000, 443):
        assert not allows(op, "Ingress", pod(NAMESPACE, GATEWAY), port)
    assert allows(op, "Egress", pod("kube-system", DNS), 53, "UDP")
    assert allows(op, "Egress", outside("10.96.0.1"), 443)
    assert allows(op, "Egress", outside("172.18.0.2"), 6443)
    assert allows(op, "Egress", pod(NAMESPACE, PREFETCHER), 8300)
    assert not allows(op, "Egress", pod("other", PREFETCHER), 8300)
    for port in (443, 9000, 80):  # the store, anywhere by default
        assert allows(op, "Egress", outside("198.51.100.1"), port)
    assert allows(op, "Egress", pod("team-a", WORKER), 8000)  # consolidation's drain
    assert not allows(op, "Egress", pod("team-a", WORKER), 29500)
    assert not allows(op, "Egress", outside("198.51.100.1"), 22)
    narrow = policies(rendered["narrow-network"])["operator"]
    assert allows(narrow, "Egress", outside("10.1.2.3"), 9000)
    assert not allows(narrow, "Egress", outside("10.2.2.3"), 9000)
    assert not allows(narrow, "Egress", outside("10.1.2.3"), 443)
    # prefetcher.hostPort: prefetchers are reached at node addresses.
    assert allows(narrow, "Egress", outside("192.168.1.20"), 8300)
    assert not allows(op, "Egress", outside("192.168.1.20"), 8300)


def test_prefetcher_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pf = policies(rendered["defaults"])["prefetcher"]
    assert allows(pf, "Ingress", pod(NAMESPACE, OPERATOR), 8300)
    assert allows(pf, "Ingress", pod("team-a", WORKER), 8300)
    assert not allows(pf, "Ingress", pod("other", OPERATOR), 8300)
    assert not allows(pf, "Ingress", pod(NAMESPACE, GATEWAY), 8300)
    assert not allows(pf, "Ingress", pod("team-a", {"app": "x"}), 8300)
    assert not allows(pf, "Ingress", pod("team-a", WORKER), 22)
    assert allows(pf, "Egress", pod("kube-system", DNS), 53, "UDP")
    for port in (443, 9000, 80):
        assert allows(pf, "Egress", outside("198.51.100.1"), port)
    assert not allows(pf, "Egress", outside("10.96.0.1"), 6443)  # no API server
    assert not allows(pf, "Egress", pod("team-a", WORKER), 8000)
    assert not allows(pf, "Ingress", pod("monitoring", {"app": "prometheus"}), 8300)
    narrow = policies(rendered["narrow-network"])["prefetcher"]
    assert allows(narrow, "Ingress", pod("team-a", WORKER), 8300)
    assert not allows(narrow, "Ingress", pod("team-b", WORKER), 8300)
    assert allows(narrow, "Ingress", pod("monitoring", {"app": "prometheus"}), 8300)
    assert not allows(narrow, "Ingress", pod("monitoring", {"app": "grafana"}), 8300)


def test_network_policies_pass_kubernetes_validate_cli(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The rendered NetworkPolicies, through the kubernetes-validate command (strict, 1.31),
    which also rejects a misspelt field."""
    cli = Path(sys.executable).parent / "kubernetes-validate"
    docs = [d for n in ("defaults", "narrow-network") for d in policies(rendered[n]).values()]
    assert len(docs) == 6
    good = tmp_path / "policies.yaml"
    good.write_text(yaml.safe_dump_all(docs))
    args = [str(cli), "--strict", "-k", K8S_VERSION]
    result = subprocess.run([*args, str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource networkpolicy/") == 6, result.stdout
    bad_doc = {**docs[0], "spec": {**docs[0]["spec"], "podSelectors": {}}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_doc))
    result = subprocess.run([*args, str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "'podSelectors' was unexpected" in result.stdout + result.stderr


def test_the_worker_image_is_pulled_onto_every_worker_node_ahead_of_cold_starts(
    rendered: dict[str, list[dict[str, Any]]], helm: Path, helm_env: dict[str, str]
) -> None:
    """A DaemonSet on the prefetchers' nodes pulls the worker image (its init container
    runs the image and exits) and holds it there; it is restricted and optional."""
    docs = rendered["defaults"]
    prepull = find(docs, "DaemonSet", "-image-prepull")
    prefetcher = find(docs, "DaemonSet", "-prefetcher")
    spec = prepull["spec"]["template"]["spec"]
    (pull,) = spec["initContainers"]
    worker_image = "ghcr.io/hydraserve/worker:"
    assert pull["image"].startswith(worker_image) and pull["command"] == ["python", "-c", "pass"]
    assert [c["image"] for c in spec["containers"]] == ["registry.k8s.io/pause:3.10"]
    assert spec["nodeSelector"] == prefetcher["spec"]["template"]["spec"]["nodeSelector"]
    assert spec["tolerations"] == prefetcher["spec"]["template"]["spec"]["tolerations"]
    assert violations(prepull, "restricted") == []
    off = render(helm, helm_env, ["--set", "worker.prePull.enabled=false"])
    assert not [d for d in off if d["metadata"]["name"].endswith("-image-prepull")]
