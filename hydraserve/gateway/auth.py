"""API keys: hashed storage, namespace and model scopes, per-key rate limits.

Keys live in a YAML file (a mounted Kubernetes Secret is such a file) as SHA-256 digests,
never in plain text; the gateway hashes the presented key and compares it with every
stored digest in constant time. A plain SHA-256 is enough because keys are 256-bit
random tokens, not passwords: there is nothing to brute-force, and a slow hash would
cost every request. Keys are never logged; logs and metrics name the key's ``name``.

File format::

    keys:
      - name: team-a                  # shown in logs, never the key
        sha256: 5e88489...            # hash_key(key)
        namespaces: ["team-a"]        # shell patterns over namespaces; default ["*"]
        models: ["llama2-7b", "demo-*"]   # shell patterns; default ["*"]
        requestsPerMinute: 600        # optional rate limit
        burst: 20                     # optional, default requestsPerMinute / 6

A model's id is ``<namespace>/<name>`` (decision 0502). A key *sees* a model when one of
its ``namespaces`` patterns matches the model's namespace **and** one of its ``models``
patterns matches either the id (``team-a/llama2-7b``) or, as before ids had namespaces,
the bare name (``llama2-7b``). Note that ``*`` also matches ``/``: ``models: ["*"]``
is every model of the key's namespaces. A model a key does not see answers exactly as a
missing one (404), so keys cannot probe other tenants' models.

``python -m hydraserve.gateway.auth --name team-a --namespaces team-a --models 'demo*'``
makes a new key and prints it once, with the entry to add to the file.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import hmac
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from hydraserve.gateway import errors
from hydraserve.gateway.errors import GatewayError
from hydraserve.logs import get_logger

log = get_logger("gateway.auth")

KEY_PREFIX = "hs-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyEntry(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=128)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="hash_key(key)")]
    namespaces: list[str] = Field(default_factory=lambda: ["*"])
    models: list[str] = Field(default_factory=lambda: ["*"])
    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[int, Field(ge=1)] | None = None


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        if len({k.sha256 for k in self.keys}) != len(self.keys):
            raise ValueError("the same key appears twice")
        return self


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and the models it sees (``None``: auth is off).

    Its scope is the namespaces it may use and, within them, the models: see the module
    docstring for the matching rule."""

    name: str | None
    models: tuple[str, ...] = ("*",)
    namespaces: tuple[str, ...] = ("*",)

    @property
    def sees_everything(self) -> bool:
        """Whether this caller's scope is every namespace and every model (an operator)."""
        return "*" in self.namespaces and "*" in self.models

    def sees(self, namespace: str, name: str) -> bool:
        """Whether the model ``name`` of ``namespace`` is in this caller's scope."""
        if not any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.namespaces):
            return False
        qualified = f"{namespace}/{name}"
        return any(
            fnmatch.fnmatchcase(qualified, pattern) or fnmatch.fnmatchcase(name, pattern)
            for pattern in self.models
        )


ANONYMOUS = Principal(None)


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each request takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be available."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def load_keys(path: Path) -> list[KeyEntry]:
    """Read and validate a keys file; errors name the file and the problem."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ValueError(f"cannot read API keys file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"API keys file {path} is not valid YAML: {exc}") from exc
    try:
        return KeysFile.model_validate(raw).keys
    except ValidationError as exc:
        # Field paths and messages only: the input values could be keys pasted by mistake.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"API keys file {path} is invalid: {problems}") from None


class Authenticator:
    """Checks ``Authorization: Bearer <key>`` and the key's rate limit."""

    def __init__(
        self,
        entries: list[KeyEntry],
        *,
        path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._clock = clock
        self._stat: tuple[int, int, int] | None = None
        self._entries: list[tuple[bytes, KeyEntry, Principal]] = []
        self._buckets: dict[str, TokenBucket] = {}
        self._install(entries)

    @classmethod
    def from_file(cls, path: Path, clock: Callable[[], float] = time.monotonic) -> Authenticator:
        auth = cls(load_keys(path), path=path, clock=clock)
        auth._stat = _file_stat(path)
        return auth

    @property
    def key_names(self) -> list[str]:
        return [entry.name for _, entry, _ in self._entries]

    def _install(self, entries: list[KeyEntry]) -> None:
        now = self._clock()
        installed = []
        buckets: dict[str, TokenBucket] = {}
        for entry in entries:
            installed.append(
                (
                    bytes.fromhex(entry.sha256),
                    entry,
                    Principal(entry.name, tuple(entry.models), tuple(entry.namespaces)),
                )
            )
            if entry.requests_per_minute is not None:
                rate = entry.requests_per_minute / 60.0
                burst = entry.burst or max(1, math.ceil(entry.requests_per_minute / 6))
                old = self._buckets.get(entry.name)
                keep = old is not None and old.rate == rate and old.burst == burst
                buckets[entry.name] = old if keep and old else TokenBucket(rate, burst, now)
        self._entries = installed
        self._buckets = buckets

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller's principal, or 401/429 as a :class:`GatewayError`."""
        if not authorization:
            raise _unauthorized(
                "missing_api_key",
                "No API key provided. Send it as 'Authorization: Bearer <key>'.",
            )
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise _unauthorized(
                "invalid_authorization_header",
                "The Authorization header must be 'Bearer <key>'.",
            )
        digest = hashlib.sha256(presented.encode()).digest()
        match: tuple[KeyEntry, Principal] | None = None
        # Compare with every key (no early exit) so timing says nothing about the keys.
        for stored, entry, principal in self._entries:
            if hmac.compare_digest(digest, stored):
                match = (entry, principal)
        if match is None:
            raise _unauthorized("invalid_api_key", "Incorrect API key provided.")
        entry, principal = match
        bucket = self._buckets.get(entry.name)
        if bucket is not None:
            wait = bucket.take(self._clock())
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                raise GatewayError(
                    429,
                    f"Rate limit of {entry.requests_per_minute:g} requests per minute reached "
                    f"for key '{entry.name}'. Retry after {retry_after} s.",
                    type=errors.RATE_LIMIT,
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)},
                )
        return principal

    def reload_if_changed(self) -> bool:
        """Re-read the keys file if it changed (Secret rotation); keep the old keys if the
        new file is broken. Returns whether new keys were installed."""
        if self._path is None:
            return False
        stat = _file_stat(self._path)
        if stat == self._stat:
            return False
        try:
            entries = load_keys(self._path)
        except ValueError as exc:
            log.error("auth.reload_failed", path=str(self._path), error=str(exc))
            self._stat = stat  # do not retry a broken file every tick; wait for a change
            return False
        self._install(entries)
        self._stat = stat
        log.info("auth.keys_reloaded", path=str(self._path), keys=len(entries))
        return True

    async def run_reload(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception as exc:
                log.error("auth.reload_failed", path=str(self._path), error=repr(exc))


def _file_stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the symlinks a Secret volume swaps on update
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _unauthorized(code: str, message: str) -> GatewayError:
    return GatewayError(
        401,
        message,
        type=errors.AUTHENTICATION,
        code=code,
        headers={"WWW-Authenticate": "Bearer"},
    )


def new_key_entry(
    name: str,
    models: list[str],
    requests_per_minute: float | None = None,
    namespaces: list[str] | None = None,
) -> tuple[str, KeyEntry]:
    """A fresh key and the entry (hash only) to store for it."""
    key = new_api_key()
    entry = KeyEntry(
        name=name,
        sha256=hash_key(key),
        namespaces=namespaces if namespaces is not None else ["*"],
        models=models,
        requests_per_minute=requests_per_minute,
    )
    return key, entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make a HydraServe gateway API key.")
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--namespaces", nargs="*", default=["*"], help="namespace patterns the key may use"
    )
    parser.add_argument(
        "--models", nargs="*", default=["*"], help="model patterns (namespace/name or name)"
    )
    parser.add_argument("--requests-per-minute", type=float, default=None)
    args = parser.parse_args(argv)
    key, entry = new_key_entry(
        args.name, args.models, args.requests_per_minute, namespaces=args.namespaces
    )
    document = yaml.safe_dump(
        {"keys": [entry.model_dump(by_alias=True, exclude_none=True)]}, sort_keys=False
    )
    sys.stdout.write(f"# the key (shown once; give it to the client):\n# {key}\n{document}")


if __name__ == "__main__":
    main()
