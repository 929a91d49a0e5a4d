"""Store locations: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class StoreURIError(ValueError):
    pass


@dataclass(frozen=True)
class StoreURI:
    scheme: str  # "s3" or "file"
    bucket: str  # s3 bucket; "" for file
    path: str  # s3 key prefix (no leading/trailing '/') or absolute local path

    @classmethod
    def parse(cls, uri: str) -> StoreURI:
        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            if not parsed.netloc:
                raise StoreURIError(f"{uri!r}: an S3 URI needs a bucket: s3://BUCKET/prefix")
            return cls("s3", parsed.netloc, parsed.path.strip("/"))
        if uri.startswith("file://"):
            path = urlparse(uri).path
            if not path.startswith("/"):
                raise StoreURIError(f"{uri!r}: a file URI needs an absolute path: file:///abs/path")
            return cls("file", "", str(Path(path)))
        if "://" in uri:
            raise StoreURIError(
                f"{uri!r}: unsupported scheme; use s3://bucket/prefix, file:///path or a path"
            )
        return cls("file", "", str(Path(uri).expanduser().resolve()))

    def join(self, *parts: str) -> StoreURI:
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if self.scheme == "s3":
            path = f"{self.path}/{tail}".strip("/") if self.path else tail
        else:
            path = str(Path(self.path, tail)) if tail else self.path
        return StoreURI(self.scheme, self.bucket, path)

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return f"file://{self.path}"
