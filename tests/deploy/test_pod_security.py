"""The Pod Security Standards checker (tests/support/pod_security.py): it fails pods that
break a level's rules, naming the rule, the container or volume and the field, and passes a
minimal restricted pod. The chart's pods are checked with it in test_helm.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.support.pod_security import pod_of, violations


def restricted_pod() -> dict[str, Any]:
    """The smallest pod that passes restricted."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ok", "namespace": "team-a"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "app",
                    "image": "busybox",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def container(pod: dict[str, Any], index: int = 0) -> dict[str, Any]:
    c: dict[str, Any] = pod["spec"]["containers"][index]
    return c


def test_a_minimal_restricted_pod_passes_both_levels() -> None:
    pod = restricted_pod()
    assert violations(pod, "restricted") == []
    assert violations(pod, "baseline") == []


def test_a_default_pod_passes_baseline_but_not_restricted() -> None:
    pod = {"kind": "Pod", "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
    assert violations(pod, "baseline") == []
    found = violations(pod, "restricted")
    rules = {line.split(":", 1)[0] for line in found}
    assert rules == {"Privilege escalation", "Running as non-root", "Seccomp", "Capabilities"}
    assert all("containers[app]" in line for line in found)


def test_host_path_volume_fails_baseline() -> None:
    pod = restricted_pod()
    pod["spec"]["volumes"].append({"name": "shm", "hostPath": {"path": "/dev/shm"}})
    for level in ("baseline", "restricted"):
        found = violations(pod, level)  # type: ignore[arg-type]
        assert found == ["HostPath volumes: volume shm sets hostPath.path=/dev/shm"]


def test_privileged_container_fails_baseline() -> None:
    pod = restricted_pod()
    container(pod)["securityContext"]["privileged"] = True
    assert violations(pod, "baseline") == [
        "Privileged containers: containers[app] sets securityContext.privileged=true"
    ]


def test_host_port_fails_baseline() -> None:
    pod = restricted_pod()
    container(pod)["ports"] = [{"containerPort": 8300, "hostPort": 8300}]
    assert violations(pod, "baseline") == ["Host ports: containers[app] sets ports[].hostPort=8300"]
    container(pod)["ports"] = [{"containerPort": 8300, "hostPort": 0}]
    assert violations(pod, "restricted") == []


@pytest.mark.parametrize("field", ["hostNetwork", "hostPID", "hostIPC"])
def test_host_namespaces_fail_baseline(field: str) -> None:
    pod = restricted_pod()
    pod["spec"][field] = True
    assert violations(pod, "baseline") == [f"Host namespaces: pod sets spec.{field}=true"]
    pod["spec"][field] = False
    assert violations(pod, "baseline") == []


def test_missing_run_as_non_root_fails_restricted_only() -> None:
    pod = restricted_pod()
    del pod["spec"]["securityContext"]["runAsNonRoot"]
    assert violations(pod, "baseline") == []
    (line,) = violations(pod, "restricted")
    assert line.startswith("Running as non-root: containers[app] must set")
    assert "runAsNonRoot=true" in line
    # Set on every container instead of the pod: passes.
    container(pod)["securityContext"]["runAsNonRoot"] = True
    assert violations(pod, "restricted") == []
    # The pod says true but a container says false: fails.
    pod["spec"]["securityContext"]["runAsNonRoot"] = True
    container(pod)["securityContext"]["runAsNonRoot"] = False
    assert violations(pod, "restricted") == [
        "Running as non-root: containers[app] sets securityContext.runAsNonRoot=false"
    ]


def test_run_as_user_zero_fails_restricted() -> None:
    pod = restricted_pod()
    pod["spec"]["securityContext"]["runAsUser"] = 0
    container(pod)["securityContext"]["runAsUser"] = 0
    assert violations(pod, "baseline") == []
    assert violations(pod, "restricted") == [
        "Running as non-root user: pod sets spec.securityContext.runAsUser=0",
        "Running as non-root user: containers[app] sets securityContext.runAsUser=0",
    ]


def test_capability_sys_admin_fails_baseline() -> None:
    pod = restricted_pod()
    container(pod)["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    expected = ["Capabilities: containers[app] sets securityContext.capabilities.add=SYS_ADMIN"]
    assert violations(pod, "baseline") == expected
    assert violations(pod, "restricted") == expected


def test_capabilities_restricted_drops_all_and_adds_net_bind_service_at_most() -> None:
    pod = restricted_pod()
    container(pod)["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["CHOWN"]}
    assert violations(pod, "baseline") == []
    (line,) = violations(pod, "restricted")
    assert "capabilities.add=CHOWN" in line and "only NET_BIND_SERVICE" in line
    container(pod)["securityContext"]["capabilities"] = {
        "drop": ["ALL"],
        "add": ["NET_BIND_SERVICE"],
    }
    assert violations(pod, "restricted") == []
    container(pod)["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    assert violations(pod, "restricted") == [
        "Capabilities: containers[app] must set securityContext.capabilities.drop=[ALL]"
    ]


def test_init_and_ephemeral_containers_are_checked() -> None:
    pod = restricted_pod()
    pod["spec"]["initContainers"] = [{"name": "init", "image": "busybox"}]
    pod["spec"]["ephemeralContainers"] = [
        {"name": "debug", "image": "busybox", "securityContext": {"privileged": True}}
    ]
    baseline = violations(pod, "baseline")
    assert baseline == [
        "Privileged containers: ephemeralContainers[debug] sets securityContext.privileged=true"
    ]
    restricted = violations(pod, "restricted")
    assert any("initContainers[init]" in line and "allowPrivilegeEscalation" in line
               for line in restricted)  # fmt: skip
    assert any("ephemeralContainers[debug]" in line and "drop=[ALL]" in line
               for line in restricted)  # fmt: skip


def test_allow_privilege_escalation_must_be_false_not_unset() -> None:
    pod = restricted_pod()
    del container(pod)["securityContext"]["allowPrivilegeEscalation"]
    assert violations(pod, "restricted") == [
        "Privilege escalation: containers[app] must set "
        "securityContext.allowPrivilegeEscalation=false (is unset)"
    ]
    container(pod)["securityContext"]["allowPrivilegeEscalation"] = True
    assert "(is True)" in violations(pod, "restricted")[0]


def test_seccomp_unconfined_fails_baseline_and_unset_fails_restricted() -> None:
    pod = restricted_pod()
    pod["spec"]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    assert violations(pod, "baseline") == [
        "Seccomp: pod sets spec.securityContext.seccompProfile.type=Unconfined"
    ]
    del pod["spec"]["securityContext"]["seccompProfile"]
    assert violations(pod, "baseline") == []
    (line,) = violations(pod, "restricted")
    assert line.startswith("Seccomp: containers[app] must set")
    profile = {"type": "Localhost", "localhostProfile": "p.json"}
    container(pod)["securityContext"]["seccompProfile"] = profile
    assert violations(pod, "restricted") == []
    container(pod)["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    assert violations(pod, "restricted") == [
        "Seccomp: containers[app] sets securityContext.seccompProfile.type=Unconfined"
    ]


def test_apparmor_field_and_annotation() -> None:
    pod = restricted_pod()
    pod["spec"]["securityContext"]["appArmorProfile"] = {"type": "RuntimeDefault"}
    pod["metadata"]["annotations"] = {
        "container.apparmor.security.beta.kubernetes.io/app": "localhost/my-profile"
    }
    assert violations(pod, "baseline") == []
    container(pod)["securityContext"]["appArmorProfile"] = {"type": "Unconfined"}
    pod["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/app"] = (
        "unconfined"
    )
    assert violations(pod, "baseline") == [
        "AppArmor: containers[app] sets securityContext.appArmorProfile.type=Unconfined",
        "AppArmor: pod sets metadata.annotations"
        "[container.apparmor.security.beta.kubernetes.io/app]=unconfined",
    ]


def test_selinux_type_user_and_role() -> None:
    pod = restricted_pod()
    pod["spec"]["securityContext"]["seLinuxOptions"] = {"type": "container_t", "level": "s0:c1"}
    assert violations(pod, "baseline") == []
    container(pod)["securityContext"]["seLinuxOptions"] = {"type": "spc_t", "user": "root"}
    pod["spec"]["securityContext"]["seLinuxOptions"]["role"] = "sysadm_r"
    assert violations(pod, "baseline") == [
        "SELinux: pod sets spec.securityContext.seLinuxOptions.role=sysadm_r",
        "SELinux: containers[app] sets securityContext.seLinuxOptions.type=spc_t",
        "SELinux: containers[app] sets securityContext.seLinuxOptions.user=root",
    ]


def test_proc_mount_sysctls_and_host_process() -> None:
    pod = restricted_pod()
    container(pod)["securityContext"]["procMount"] = "Default"
    pod["spec"]["securityContext"]["sysctls"] = [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]
    assert violations(pod, "baseline") == []
    container(pod)["securityContext"]["procMount"] = "Unmasked"
    pod["spec"]["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "1"})
    container(pod)["securityContext"]["windowsOptions"] = {"hostProcess": True}
    assert violations(pod, "baseline") == [
        "HostProcess: containers[app] sets securityContext.windowsOptions.hostProcess=true",
        "/proc mount type: containers[app] sets securityContext.procMount=Unmasked",
        "Sysctls: pod sets spec.securityContext.sysctls[].name=kernel.msgmax",
    ]


def test_restricted_volume_types() -> None:
    pod = restricted_pod()
    pod["spec"]["volumes"] += [
        {"name": "cfg", "configMap": {"name": "c"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
        {"name": "tok", "projected": {"sources": []}},
        {"name": "nfs", "nfs": {"server": "s", "path": "/"}},
    ]
    assert violations(pod, "baseline") == []
    assert violations(pod, "restricted") == ["Volume types: volume nfs is a nfs volume"]


def test_windows_pods_skip_the_linux_only_restricted_rules() -> None:
    pod = {
        "kind": "Pod",
        "spec": {
            "os": {"name": "windows"},
            "securityContext": {"runAsNonRoot": True},
            "containers": [{"name": "app", "image": "w"}],
        },
    }
    assert violations(pod, "restricted") == []


@pytest.mark.parametrize(
    "kind", ["Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet", "CronJob"]
)
def test_workloads_are_checked_through_their_pod_template(kind: str) -> None:
    pod = restricted_pod()
    template = {"metadata": {"labels": {"a": "b"}}, "spec": pod["spec"]}
    spec: dict[str, Any] = {"template": template}
    if kind == "CronJob":
        spec = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    workload = {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "w"}, "spec": spec}
    assert violations(workload, "restricted") == []
    bad = copy.deepcopy(workload)
    _, bad_spec = pod_of(bad)
    bad_spec["hostNetwork"] = True  # type: ignore[index]
    assert violations(bad, "baseline") == ["Host namespaces: pod sets spec.hostNetwork=true"]


def test_a_bare_pod_spec_is_accepted_and_other_kinds_are_not() -> None:
    assert violations(restricted_pod()["spec"], "restricted") == []
    with pytest.raises(ValueError, match="Service"):
        violations({"kind": "Service", "spec": {}}, "baseline")
    with pytest.raises(ValueError, match="level"):
        violations(restricted_pod(), "privileged")  # type: ignore[arg-type]
