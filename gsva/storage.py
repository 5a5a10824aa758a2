"""Object storage through fsspec: local paths, file:// and s3:// (AWS or any S3-compatible endpoint).

The model package reads and writes checkpoints through this module alone, so it needs nothing from the jobs.

Credentials come only from the environment / AWS profile / instance profile (botocore's chain);
`--s3-endpoint` (or AWS_ENDPOINT_URL) points at S3-compatible stores. Nothing here logs a secret.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage; never holds credentials."""

    s3_endpoint: str | None = None

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        endpoint = self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["endpoint_url"] = endpoint
            # S3-compatible stores (SeaweedFS, MinIO) want path-style addressing.
            opts["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        return opts


def protocol_of(uri: str) -> str:
    return fsspec.utils.get_protocol(uri)


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path, file:// or s3:// URI."""
    protocol = protocol_of(uri)
    fs = fsspec.filesystem(protocol, **(options or StorageOptions()).for_protocol(protocol))
    return fs, fs._strip_protocol(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def describe_error(uri: str, exc: BaseException) -> str:
    """A one-line, credential-free explanation of a storage failure."""
    text = str(exc)
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text or "Forbidden" in text:
        return (f"access to {uri} was refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS "
                f"profile) and the endpoint ({type(exc).__name__})")
    if isinstance(exc, FileNotFoundError):
        return f"{uri} does not exist"
    return f"cannot access {uri}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class StorageError(RuntimeError):
    """Raised with a clear message when object storage cannot be reached or refuses access."""


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file://`` stripped)."""
    return uri[len("file://"):] if uri.startswith("file://") else uri
