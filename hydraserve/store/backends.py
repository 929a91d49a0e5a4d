"""Byte-level access to a model store: a local directory or any S3-compatible endpoint.

Both backends address objects by a key relative to their root, support ranged reads
(``[start, end)``) and uploads with a progress callback. Nothing here knows about models.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydraserve.settings import S3Settings
from hydraserve.store.uri import StoreURI

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ProgressCallback = Callable[[int], None]  # called with the number of new bytes


class StoreError(RuntimeError):
    """A store operation failed; the message says which object and why."""


class ObjectNotFound(StoreError):
    pass


class StoreBackend(ABC):
    """Objects under one root. Keys use '/' separators."""

    uri: StoreURI

    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(
        self, key: str, path: Path, progress: ProgressCallback | None = None
    ) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (recursive)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def describe(self, key: str) -> str:
        return str(self.uri.join(key))


class LocalBackend(StoreBackend):
    def __init__(self, uri: StoreURI) -> None:
        self.uri = uri
        self.root = Path(uri.path)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.describe(key)} does not exist") from exc

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.describe(key)} does not exist") from exc
        if len(data) != end - start:
            raise StoreError(
                f"{self.describe(key)}: short read at [{start}, {end}) ({len(data)} bytes)"
            )
        return data

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.describe(key)} does not exist") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload_file(self, key: str, path: Path, progress: ProgressCallback | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                if progress:
                    progress(len(chunk))
        os.replace(tmp, dest)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                yield path.relative_to(self.root).as_posix()

    def delete_prefix(self, prefix: str) -> None:
        target = self._path(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def preload_s3_client() -> None:
    """Load the S3 service model and endpoint rules into boto3's default session.

    A warm runtime calls this before it forks: a child's first client then takes ~5 ms
    instead of ~0.1 s of CPU, which four pipeline stages starting on two cores paid at
    once. The throwaway client gets placeholder credentials, so the session resolves and
    caches none: every child still resolves its own tenant's credentials.
    """
    import boto3

    boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="preload", aws_secret_access_key="preload"
    )


def make_s3_client(settings: S3Settings | None = None) -> S3Client:
    import boto3
    from botocore.config import Config

    settings = settings or S3Settings()
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=Config(
            max_pool_connections=settings.max_pool_connections,
            s3={"addressing_style": settings.addressing_style},  # type: ignore[typeddict-item,arg-type]
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


class S3Backend(StoreBackend):
    def __init__(self, uri: StoreURI, settings: S3Settings | None = None) -> None:
        self.uri = uri
        self.bucket = uri.bucket
        self.prefix = uri.path
        self.client = make_s3_client(settings)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise ObjectNotFound(f"{self.describe(key)} does not exist ({code})") from exc
            raise StoreError(f"{self.describe(key)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"{self.describe(key)}: {exc}") from exc

    def _get(self, key: str, **kwargs: Any) -> bytes:
        # The body streams after the response headers: a connection lost while reading it
        # must surface as a StoreError too, so that callers retry it like any other.
        def fetch() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
            try:
                return bytes(resp["Body"].read())
            except OSError as exc:
                raise StoreError(f"{self.describe(key)}: reading the body failed: {exc}") from exc

        result: bytes = self._call(key, fetch)
        return result

    def read(self, key: str) -> bytes:
        return self._get(key)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        data = self._get(key, Range=f"bytes={start}-{end - 1}")
        if len(data) != end - start:
            raise StoreError(
                f"{self.describe(key)}: short read at [{start}, {end}) ({len(data)} bytes)"
            )
        return data

    def size(self, key: str) -> int:
        resp = self._call(
            key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        )
        return int(resp["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def write(self, key: str, data: bytes) -> None:
        self._call(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def upload_file(self, key: str, path: Path, progress: ProgressCallback | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
        self._call(
            key,
            lambda: self.client.upload_file(
                str(path), self.bucket, self._key(key), Callback=progress, Config=config
            ),
        )

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        strip = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(strip) :]

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})  # type: ignore[typeddict-item]

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def open_backend(uri: str | StoreURI, s3: S3Settings | None = None) -> StoreBackend:
    parsed = StoreURI.parse(uri) if isinstance(uri, str) else uri
    if parsed.scheme == "s3":
        return S3Backend(parsed, s3)
    return LocalBackend(parsed)
