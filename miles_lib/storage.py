"""Artifact storage through fsspec: a local folder or an object store (``s3://bucket/prefix``).

Every artifact path is a URI. Writes are atomic for readers:
  * local: write ``<name>.tmp-<random>`` in the target folder, then ``os.replace`` (atomic rename);
  * object stores: a single PUT of the whole object (S3 makes an object visible only once the
    upload completes), so a reader never sees half an object. Multi-file artifacts (checkpoints)
    additionally write a manifest LAST; readers require it.
S3 endpoint/credentials come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY) or Flyte's (FLYTE_AWS_ENDPOINT, FLYTE_AWS_ACCESS_KEY_ID,
FLYTE_AWS_SECRET_ACCESS_KEY); they are never logged. Connection attempts are short and few, so an
unreachable store fails in seconds with a StorageError naming the URI, not after minutes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager

import fsspec

from miles_lib.errors import StorageError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_options() -> dict:
    endpoint = os.environ.get("FLYTE_AWS_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    key = os.environ.get("FLYTE_AWS_ACCESS_KEY_ID") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("FLYTE_AWS_SECRET_ACCESS_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    opts: dict = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30,
                                    "retries": {"max_attempts": 2, "mode": "standard"}}}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if key and secret:
        opts.update(key=key, secret=secret)
    return opts


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or local path."""
    protocol = uri.split("://", 1)[0] if is_remote(uri) else "file"
    opts = _s3_options() if protocol in ("s3", "s3a") else {}
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts) if opts else fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{uri}: no filesystem for protocol {protocol!r} ({e})") from None
    path = uri.split("://", 1)[1] if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


@contextmanager
def storage_errors(uri: str, action: str):
    """Turn connection / permission / missing-bucket failures into StorageError naming the URI."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise StorageError(f"cannot {action} {uri}: permission denied ({e}); check credentials") from None
    except Exception as e:  # botocore / aiohttp / OSError flavours of "cannot reach the store"
        name = type(e).__name__
        if isinstance(e, OSError) or any(s in name for s in ("Endpoint", "Connect", "Client", "Timeout", "NoCredentials")):
            hint = (" (check FLYTE_AWS_ENDPOINT / AWS_ENDPOINT_URL and credentials)" if is_remote(uri) else "")
            raise StorageError(f"cannot {action} {uri}: {name}: {e}{hint}") from None
        raise


def exists(uri: str) -> bool:
    fs, path = open_fs(uri)
    with storage_errors(uri, "check"):
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = open_fs(uri)
    with storage_errors(uri, "read"):
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} does not exist") from None


def makedirs(uri: str) -> None:
    fs, path = open_fs(uri)
    with storage_errors(uri, "create"):
        fs.makedirs(path, exist_ok=True)


def atomic_write_bytes(uri: str, data: bytes) -> None:
    fs, path = open_fs(uri)
    with storage_errors(uri, "write"):
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)  # one PUT: visible only when complete


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode())


def listdir(uri: str) -> list[str]:
    fs, path = open_fs(uri)
    with storage_errors(uri, "list"):
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = open_fs(uri)
    with storage_errors(uri, "remove"):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def swap_in_dir(staged: str, target: str) -> None:
    """Move the fully written local folder ``staged`` (same filesystem) to ``target`` by renames: a
    reader sees the old folder or the new one, never a partial one; an old target is removed after."""
    if os.path.exists(target):
        old = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)
