"""A Pod Security Standards checker for tests: which rules of a level a pod breaks.

`violations(obj, level)` takes a Pod, a bare PodSpec, or a workload (Deployment,
DaemonSet, StatefulSet, ReplicaSet, ReplicationController, Job: `spec.template`; CronJob:
`spec.jobTemplate.spec.template`; PodTemplate: `template`) and returns one line per broken
rule, naming the rule, the container or volume and the field. An empty list means the pod
would be admitted by Pod Security Admission at that level.

The rules are those of https://kubernetes.io/docs/concepts/security/pod-security-standards/
for policy version v1.31, as the admission plugin (k8s.io/pod-security-admission) applies
them: containers, initContainers and ephemeralContainers are all checked; the restricted
rules on privilege escalation, seccomp and capabilities are Linux-only (skipped for pods
with `spec.os.name: windows`, as since v1.25). Later policy versions differ in details this
checker does not follow: v1.32 adds `net.ipv4.tcp_rmem`/`tcp_wmem` to the safe sysctls,
v1.34 forbids `host` in probes and lifecycle hooks.

Level "privileged" has no rules; callers assert that a pod *fails* baseline to say it needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

Level = Literal["baseline", "restricted"]

# Capabilities baseline lets a container add (Docker's default set).
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",  # v1.27+
        "net.ipv4.tcp_keepalive_time",  # v1.29+
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION_PREFIX = "container.apparmor.security.beta.kubernetes.io/"
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
        "projected", "secret",
    }
)  # fmt: skip
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
_TEMPLATED = {
    "Deployment",
    "DaemonSet",
    "StatefulSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
}


def pod_of(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(pod metadata, pod spec) of a Pod, a workload, a PodTemplate or a bare PodSpec."""
    kind = obj.get("kind")
    if kind is None and "containers" in obj:
        return {}, obj
    if kind == "Pod":
        template: Mapping[str, Any] = obj
    elif kind in _TEMPLATED:
        template = obj["spec"]["template"]
    elif kind == "CronJob":
        template = obj["spec"]["jobTemplate"]["spec"]["template"]
    elif kind == "PodTemplate":
        template = obj["template"]
    else:
        raise ValueError(f"not a pod, a pod spec or a workload with a pod template: {kind!r}")
    return template.get("metadata") or {}, template["spec"]


def violations(pod_spec_or_object: Mapping[str, Any], level: Level) -> list[str]:
    """The rules of `level` the pod breaks, one line each (empty: it passes)."""
    if level not in ("baseline", "restricted"):
        raise ValueError(f"level must be 'baseline' or 'restricted', not {level!r}")
    metadata, spec = pod_of(pod_spec_or_object)
    found = list(_baseline(metadata, spec))
    if level == "restricted":
        found += _restricted(spec)
    return found


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(`containers[name]`-style label, container) for every container of every kind."""
    for field in CONTAINER_LISTS:
        for container in spec.get(field) or []:
            yield f"{field}[{container.get('name', '?')}]", container


def _sc(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def _baseline(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> Iterator[str]:
    pod_sc = _sc(spec)
    containers = list(_containers(spec))

    # HostProcess (Windows).
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess") is True:
        yield "HostProcess: pod sets spec.securityContext.windowsOptions.hostProcess=true"
    for where, c in containers:
        if (_sc(c).get("windowsOptions") or {}).get("hostProcess") is True:
            yield f"HostProcess: {where} sets securityContext.windowsOptions.hostProcess=true"

    # Host namespaces.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field) is True:
            yield f"Host namespaces: pod sets spec.{field}=true"

    # Privileged containers.
    for where, c in containers:
        if _sc(c).get("privileged") is True:
            yield f"Privileged containers: {where} sets securityContext.privileged=true"

    # Capabilities beyond the default set.
    for where, c in containers:
        for cap in (_sc(c).get("capabilities") or {}).get("add") or []:
            if cap not in BASELINE_CAPABILITIES:
                yield f"Capabilities: {where} sets securityContext.capabilities.add={cap}"

    # HostPath volumes.
    for volume in spec.get("volumes") or []:
        if volume.get("hostPath") is not None:
            path = volume["hostPath"].get("path", "?")
            yield f"HostPath volumes: volume {volume.get('name', '?')} sets hostPath.path={path}"

    # Host ports.
    for where, c in containers:
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                yield f"Host ports: {where} sets ports[].hostPort={port['hostPort']}"

    # AppArmor: the field (pod and containers) and the beta annotations.
    apparmor = (pod_sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in APPARMOR_TYPES:
        yield f"AppArmor: pod sets spec.securityContext.appArmorProfile.type={apparmor}"
    for where, c in containers:
        apparmor = (_sc(c).get("appArmorProfile") or {}).get("type")
        if apparmor is not None and apparmor not in APPARMOR_TYPES:
            yield f"AppArmor: {where} sets securityContext.appArmorProfile.type={apparmor}"
    for key, value in (metadata.get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION_PREFIX) and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            yield f"AppArmor: pod sets metadata.annotations[{key}]={value}"

    # SELinux: type from a short list, no user or role.
    for where, sc in [("pod", pod_sc), *((w, _sc(c)) for w, c in containers)]:
        options = sc.get("seLinuxOptions") or {}
        prefix = "spec.securityContext" if where == "pod" else "securityContext"
        if options.get("type", "") not in SELINUX_TYPES:
            yield f"SELinux: {where} sets {prefix}.seLinuxOptions.type={options['type']}"
        for field in ("user", "role"):
            if options.get(field, ""):
                yield f"SELinux: {where} sets {prefix}.seLinuxOptions.{field}={options[field]}"

    # /proc mount type.
    for where, c in containers:
        proc_mount = _sc(c).get("procMount")
        if proc_mount is not None and proc_mount != "Default":
            yield f"/proc mount type: {where} sets securityContext.procMount={proc_mount}"

    # Seccomp: never Unconfined (nor anything but RuntimeDefault or Localhost).
    seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_TYPES:
        yield f"Seccomp: pod sets spec.securityContext.seccompProfile.type={seccomp}"
    for where, c in containers:
        seccomp = (_sc(c).get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in SECCOMP_TYPES:
            yield f"Seccomp: {where} sets securityContext.seccompProfile.type={seccomp}"

    # Sysctls: the safe set only.
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"Sysctls: pod sets spec.securityContext.sysctls[].name={sysctl.get('name')}"


def _restricted(spec: Mapping[str, Any]) -> Iterator[str]:
    pod_sc = _sc(spec)
    containers = list(_containers(spec))
    linux = (spec.get("os") or {}).get("name") != "windows"

    # Volume types (hostPath is baseline's).
    for volume in spec.get("volumes") or []:
        for source in volume:
            if source not in ("name", "hostPath") and source not in RESTRICTED_VOLUME_TYPES:
                yield f"Volume types: volume {volume.get('name', '?')} is a {source} volume"

    # Privilege escalation: explicitly false on every container.
    if linux:
        for where, c in containers:
            if _sc(c).get("allowPrivilegeEscalation") is not False:
                value = _sc(c).get("allowPrivilegeEscalation", "unset")
                yield (
                    f"Privilege escalation: {where} must set "
                    f"securityContext.allowPrivilegeEscalation=false (is {value})"
                )

    # Running as non-root: true on the pod, or on every container; never false.
    pod_non_root = pod_sc.get("runAsNonRoot")
    if pod_non_root is False:
        yield "Running as non-root: pod sets spec.securityContext.runAsNonRoot=false"
    for where, c in containers:
        value = _sc(c).get("runAsNonRoot")
        if value is False:
            yield f"Running as non-root: {where} sets securityContext.runAsNonRoot=false"
        elif value is None and pod_non_root is not True:
            yield (
                f"Running as non-root: {where} must set securityContext.runAsNonRoot=true "
                "(or the pod spec.securityContext.runAsNonRoot=true)"
            )

    # Running as a non-root user: runAsUser never 0.
    if pod_sc.get("runAsUser") == 0:
        yield "Running as non-root user: pod sets spec.securityContext.runAsUser=0"
    for where, c in containers:
        if _sc(c).get("runAsUser") == 0:
            yield f"Running as non-root user: {where} sets securityContext.runAsUser=0"

    if not linux:
        return

    # Seccomp: RuntimeDefault or Localhost on the pod, or on every container (values other
    # than those are baseline's).
    if (pod_sc.get("seccompProfile") or {}).get("type") is None:
        for where, c in containers:
            if (_sc(c).get("seccompProfile") or {}).get("type") is None:
                yield (
                    f"Seccomp: {where} must set securityContext.seccompProfile.type to "
                    "RuntimeDefault or Localhost (or the pod spec.securityContext.seccompProfile)"
                )

    # Capabilities: drop ALL, add NET_BIND_SERVICE at most (adds beyond the default set
    # are baseline's).
    for where, c in containers:
        capabilities = _sc(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"Capabilities: {where} must set securityContext.capabilities.drop=[ALL]"
        for cap in capabilities.get("add") or []:
            if cap in BASELINE_CAPABILITIES and cap not in RESTRICTED_CAPABILITIES:
                yield (
                    f"Capabilities: {where} sets securityContext.capabilities.add={cap} "
                    "(restricted allows only NET_BIND_SERVICE)"
                )
