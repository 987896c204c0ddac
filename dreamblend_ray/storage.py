"""One URI API over local paths and ``s3://`` (through ``pyarrow.fs``).

Why pyarrow.fs: Ray Data already reads and writes Parquet through it, so one filesystem object
serves both our own files and Ray Data's, with the same endpoint override and credentials.

Credentials come from the standard AWS chain. An S3-compatible endpoint (MinIO, moto, ...) is
taken from ``DREAMBLEND_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.
Writes are atomic: local files are written to a temporary name and renamed; an S3 PUT is
atomic by nature. Transient errors are retried with exponential backoff for a bounded time;
permanent ones (no such bucket, access denied, not found) fail at once with the URI.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("DREAMBLEND_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
PERMANENT_MARKERS = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "Forbidden", "NoSuchKey", "Path does not exist", "not found")
RETRY_SECONDS = float(os.environ.get("DREAMBLEND_STORAGE_RETRY_SECONDS", "30"))


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    base = str(uri).rstrip("/")
    for part in parts:
        base = f"{base}/{str(part).strip('/')}"
    return base


def s3_endpoint() -> str | None:
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    parsed = urlparse(uri)
    endpoint = s3_endpoint()
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
              "connect_timeout": 5, "request_timeout": 60}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")


def _is_permanent(exc: Exception) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return any(marker in str(exc) for marker in PERMANENT_MARKERS)


def with_retries(action: str, uri: str, fn, retry_seconds: float | None = None):
    """Run ``fn()``; retry transient failures with backoff for up to ``retry_seconds``."""
    deadline = time.monotonic() + (RETRY_SECONDS if retry_seconds is None else retry_seconds)
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc):
                if isinstance(exc, FileNotFoundError):
                    raise FileNotFoundError(f"{action} {uri}: not found") from exc
                raise StorageError(f"{action} {uri} failed: {exc}") from exc
            if time.monotonic() + delay > deadline:
                raise StorageError(f"{action} {uri} failed after retries: {exc}") from exc
            logger.warning("%s %s failed (%s); retrying in %.1fs", action, uri, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read():
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return with_retries("read", uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (readers see the old object or the whole new one)."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        _write_local_atomic(Path(path), data)
        return

    def write():
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    with_retries("write", uri, write)


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    info = with_retries("stat", uri, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def list_dir(uri: str) -> list[str]:
    """Names of the direct children of ``uri`` (files and directories); [] when it is absent."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    infos = with_retries("list", uri, lambda: fs.get_file_info(selector))
    return sorted(info.base_name for info in infos)


def list_files(uri: str) -> list[str]:
    """Paths relative to ``uri`` of all files below it, recursively; [] when it is absent."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = with_retries("list", uri, lambda: fs.get_file_info(selector))
    prefix = path.rstrip("/") + "/"
    return sorted(info.path[len(prefix):] for info in infos if info.type == pafs.FileType.File)


def delete(uri: str) -> None:
    """Delete a file or a whole directory tree; absent is fine."""
    fs, path = filesystem(uri)
    info = with_retries("stat", uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        with_retries("delete", uri, lambda: fs.delete_dir(path))
    elif info.type == pafs.FileType.File:
        with_retries("delete", uri, lambda: fs.delete_file(path))


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy every file below ``local_dir`` to ``uri`` (relative paths kept)."""
    root = Path(local_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        write_bytes(join(uri, file.relative_to(root).as_posix()), file.read_bytes())


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy every file below ``uri`` into ``local_dir``; raises FileNotFoundError if empty."""
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no files found")
    root = Path(local_dir)
    for rel in files:
        _write_local_atomic(root / rel, read_bytes(join(uri, rel)))
    return root


def copy_dir(src: str, dst: str) -> None:
    for rel in list_files(src):
        write_bytes(join(dst, rel), read_bytes(join(src, rel)))


def cache_root() -> Path:
    return Path(os.environ.get("DREAMBLEND_CACHE", Path.home() / ".cache" / "dreamblend"))


def cached_download(uri: str) -> Path:
    """A local copy of the directory ``uri``, downloaded once into the cache (complete or absent)."""
    if not is_s3(uri):
        return Path(uri)
    import hashlib

    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return target
    staging = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    download_dir(uri, staging)
    (staging / ".complete").write_text(uri)
    if target.exists():
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target
