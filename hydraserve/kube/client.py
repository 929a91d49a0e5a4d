"""A small asynchronous Kubernetes REST client (httpx), shared by the operator and gateway.

Objects stay plain JSON dicts: the operator's plan code compares and builds manifests as
data, and the few calls needed (get, list, create, merge-patch, delete, watch) do not
justify a generated client. Credentials come from the pod's service account in a cluster,
otherwise from a kubeconfig (token or client certificate; exec plugins are not supported).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeConfigError(Exception):
    pass


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    token_file: Path | None = None  # re-read per request: projected tokens rotate
    ca_file: Path | None = None
    insecure: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    namespace: str = "default"

    def bearer_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token


def _materialise(data_b64: str, suffix: str) -> Path:
    """kubeconfig *-data fields hold base64 PEM; httpx wants files."""
    fd, name = tempfile.mkstemp(prefix="hydraserve-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data_b64))
    return Path(name)


def load_incluster_config() -> KubeConfig:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SERVICE_ACCOUNT_DIR / "token").exists():
        raise KubeConfigError("not running in a cluster (no service account token)")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
    return KubeConfig(
        server=f"https://{host}:{port}",
        token_file=SERVICE_ACCOUNT_DIR / "token",
        ca_file=SERVICE_ACCOUNT_DIR / "ca.crt",
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
    )


def load_kubeconfig(path: Path | None = None, context: str | None = None) -> KubeConfig:
    if path is None:
        env = os.environ.get("KUBECONFIG", "")
        path = Path(env.split(os.pathsep)[0]) if env else Path.home() / ".kube" / "config"
    if not path.exists():
        raise KubeConfigError(f"no kubeconfig at {path} (set KUBECONFIG)")
    doc = yaml.safe_load(path.read_text()) or {}
    context_name = context or doc.get("current-context")

    def pick(section: str, name: str | None) -> dict[str, Any]:
        for item in doc.get(section) or []:
            if item.get("name") == name:
                return dict(item.get(section[:-1]) or {})
        raise KubeConfigError(f"{path}: no {section[:-1]} named {name!r}")

    ctx = pick("contexts", context_name)
    cluster = pick("clusters", ctx.get("cluster"))
    user = pick("users", ctx.get("user")) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(
            f"{path}: user {ctx.get('user')!r} uses an exec/auth-provider plugin, which "
            "HydraServe does not run; use a token or client certificate"
        )
    base = path.parent

    def file_of(key: str, data_key: str, section: dict[str, Any], suffix: str) -> Path | None:
        if section.get(data_key):
            return _materialise(str(section[data_key]), suffix)
        if section.get(key):
            return (base / str(section[key])).resolve()
        return None

    token_file = user.get("tokenFile")
    return KubeConfig(
        server=str(cluster["server"]).rstrip("/"),
        token=user.get("token"),
        token_file=(base / token_file).resolve() if token_file else None,
        ca_file=file_of("certificate-authority", "certificate-authority-data", cluster, ".crt"),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        cert_file=file_of("client-certificate", "client-certificate-data", user, ".crt"),
        key_file=file_of("client-key", "client-key-data", user, ".key"),
        namespace=ctx.get("namespace") or "default",
    )


def load_config(kubeconfig: Path | None = None) -> KubeConfig:
    """In-cluster credentials when there are some, unless a kubeconfig is named."""
    if kubeconfig is None and "KUBECONFIG" not in os.environ:
        try:
            return load_incluster_config()
        except KubeConfigError:
            pass
    return load_kubeconfig(kubeconfig)


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def matches(obj: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in (labels or {}).items())


def path_of(
    api: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``api`` is ``v1`` (core) or ``group/version``."""
    parts = ["/api/v1" if api == "v1" else f"/apis/{api}"]
    if namespace is not None:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name))
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    """Async calls to the API server; objects in and out as dicts."""

    def __init__(self, config: KubeConfig, timeout: float = 30.0) -> None:
        self.config = config
        verify: Any = (
            False if config.insecure else (str(config.ca_file) if config.ca_file else True)
        )
        cert = (str(config.cert_file), str(config.key_file)) if config.cert_file else None
        self._http = httpx.AsyncClient(
            base_url=config.server, verify=verify, cert=cert, timeout=timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        resp = await self._http.request(
            method,
            path,
            params=params,
            content=None if body is None else json.dumps(body),
            headers=self._headers(content_type if body is not None else None),
        )
        if resp.status_code >= 400:
            raise _error_of(resp)
        return resp.json() if resp.content else None

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return dict(await self._request("GET", path))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, path: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": selector_string(labels)} if labels else None
        doc = await self._request("GET", path, params=params)
        # Filter here too: a server (or test double) may ignore the selector.
        return [item for item in (doc or {}).get("items") or [] if matches(item, labels)]

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(await self._request("POST", path, body=body))

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return dict(
            await self._request(
                "PATCH", path, body=patch, content_type="application/merge-patch+json"
            )
        )

    async def delete(self, path: str) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self._request("DELETE", path, body={"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def watch(
        self, path: str, resource_version: str | None = None, timeout_seconds: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """Events (``{"type", "object"}``) of a watch stream until the server ends it."""
        params = {"watch": "true", "timeoutSeconds": str(timeout_seconds)}
        if resource_version:
            params["resourceVersion"] = resource_version
        async with self._http.stream(
            "GET",
            path,
            params=params,
            headers=self._headers(),
            timeout=httpx.Timeout(10.0, read=timeout_seconds + 30),
        ) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise _error_of(resp)
            async for line in resp.aiter_lines():
                if line.strip():
                    yield json.loads(line)


def _error_of(resp: httpx.Response) -> KubeError:
    try:
        doc = resp.json()
        return KubeError(resp.status_code, str(doc.get("reason", "")), str(doc.get("message", "")))
    except ValueError:
        return KubeError(resp.status_code, resp.reason_phrase, resp.text[:200])
