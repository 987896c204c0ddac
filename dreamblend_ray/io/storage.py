"""One URI API over local paths and remote URIs (``s3://``, ``gs://``, ...) through ``pyarrow.fs``.

Why pyarrow.fs: Ray Data already reads and writes Parquet through it, so one filesystem object
serves both our own files and Ray Data's, with the same endpoint override and credentials.

This module is the only place that looks at a URI's scheme: callers ask :func:`is_remote`,
:func:`is_local` or :func:`scheme`. :func:`filesystem` resolves a scheme through
``FILESYSTEM_BUILDERS`` (``s3``, ``gs``/``gcs``: our own settings) and any other scheme through
``pyarrow.fs.FileSystem.from_uri`` (``hdfs://``, ...); a scheme pyarrow cannot resolve is a
ValueError naming it. Plain paths and ``file://`` URIs are local.

Credentials come from each scheme's standard chain: for S3 the AWS chain, with an S3-compatible
endpoint (MinIO, moto, ...) taken from ``DREAMBLEND_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``; for GCS Google's application default credentials, with an endpoint (an
emulator) from ``DREAMBLEND_GCS_ENDPOINT`` or ``STORAGE_EMULATOR_HOST`` and anonymous access when
``DREAMBLEND_GCS_ANONYMOUS=1``.
Writes are atomic on local paths (a temporary name, then a rename) and on object stores (an S3
PUT or a GCS upload is visible whole or not at all). Transient errors (connection refused or
reset, timeouts, throttling, 5xx) are retried with exponential backoff for at most
``DREAMBLEND_STORAGE_RETRY_SECONDS`` (default 30) per operation; permanent ones (no such bucket,
access denied, bad credentials, not found, other 4xx) fail at once with the URI. pyarrow names S3
errors by the AWS SDK's enum (``NO_SUCH_BUCKET``, ``ACCESS_DENIED``, ``INVALID_ACCESS_KEY_ID``) and
GCS errors by google-cloud's status (``google::cloud::Status(NOT_FOUND: ...)``); those names are
what ``is_permanent`` looks for.
``join`` refuses ``..`` and empty parts, so keys built from validated ids stay under their root.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

S3_ENDPOINT_VARIABLES = ("DREAMBLEND_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
GCS_ENDPOINT_VARIABLES = ("DREAMBLEND_GCS_ENDPOINT", "STORAGE_EMULATOR_HOST")
GCS_ANONYMOUS_VARIABLE = "DREAMBLEND_GCS_ANONYMOUS"
# The non-secret endpoint settings of every scheme (jobs hand them to their actors).
ENDPOINT_VARIABLES = S3_ENDPOINT_VARIABLES + GCS_ENDPOINT_VARIABLES + (GCS_ANONYMOUS_VARIABLE,)
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                        "AWS_REGION", "AWS_DEFAULT_REGION")
GCS_CREDENTIAL_VARIABLES = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CONFIG")
# pyarrow reports S3 errors by the AWS SDK's enum names (``AWS Error NO_SUCH_BUCKET during ...``)
# and GCS errors as ``google::cloud::Status(CODE: ...)``; the CamelCase S3 codes are kept for
# messages relayed from other layers.
PERMANENT_MARKERS = ("NO_SUCH_BUCKET", "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                     "NO_SUCH_KEY", "INVALID_BUCKET_NAME", "NoSuchBucket", "AccessDenied",
                     "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchKey", "InvalidBucketName",
                     "Forbidden", "Path does not exist", "bucket does not exist",
                     "is a directory", "is not a directory",
                     "Status(NOT_FOUND", "Status(PERMISSION_DENIED", "Status(UNAUTHENTICATED",
                     "Status(INVALID_ARGUMENT")
# An unclassified "HTTP status 4xx" is the client's fault (except timeouts and throttling).
_CLIENT_STATUS = re.compile(r"HTTP status (4\d\d)")
_TRANSIENT_STATUS = {"408", "429"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
DEFAULT_RETRY_SECONDS = 30.0
# How long the GCS client retries one request itself; with_retries bounds the whole operation.
GCS_CLIENT_RETRY = datetime.timedelta(seconds=5)


def default_retry_seconds() -> float:
    """Bounded total time for retrying one operation (``DREAMBLEND_STORAGE_RETRY_SECONDS``, default 30)."""
    return float(os.environ.get("DREAMBLEND_STORAGE_RETRY_SECONDS", DEFAULT_RETRY_SECONDS))


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def scheme(uri: str) -> str:
    """The URI's scheme in lower case (``s3``, ``gs``, ``file``, ...); ``""`` for a plain path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else ""


def is_local(uri: str) -> bool:
    """True for a plain path or a ``file://`` URI: read in place, never downloaded."""
    return scheme(uri) in ("", "file")


def is_remote(uri: str) -> bool:
    """True for a URI with any scheme but ``file://`` (``s3://``, ``gs://``, ``hdfs://``, ...)."""
    return not is_local(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a remote URI.

    Parts never climb out of ``uri``: an empty part or a ``..`` segment raises ValueError, so keys
    built from (validated) subject ids cannot escape their prefix.
    """
    base = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if not part or any(seg in ("", ".", "..") for seg in part.split("/")):
            raise ValueError(f"storage path part must be a plain relative path, got {part!r}")
        base = f"{base}/{part}"
    return base


def s3_endpoint() -> str | None:
    return _first_set(S3_ENDPOINT_VARIABLES)


def gcs_endpoint() -> str | None:
    return _first_set(GCS_ENDPOINT_VARIABLES)


def _first_set(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def local_path(uri: str) -> str:
    """The absolute local path of a plain path or a ``file://`` URI."""
    uri = str(uri)
    if scheme(uri) == "file":
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().absolute())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it.

    Local paths and ``file://`` are the local filesystem; a scheme in ``FILESYSTEM_BUILDERS`` is
    built with our settings (one filesystem, and its connection pool, shared per endpoint and
    credential settings); any other goes through ``pyarrow.fs.FileSystem.from_uri``.
    """
    kind = scheme(uri)
    if kind in ("", "file"):
        return pafs.LocalFileSystem(), local_path(uri)
    return FILESYSTEM_BUILDERS.get(kind, _pyarrow_from_uri)(str(uri))


def _bucket_path(uri: str) -> str:
    """``bucket/key`` of an object-store URI; ValueError when it names no bucket."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ValueError(f"{parsed.scheme} URI must name a bucket ({parsed.scheme}://bucket/prefix), "
                         f"got {uri!r}")
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def _endpoint_parts(endpoint: str) -> dict:
    """``endpoint_override`` and ``scheme`` for an endpoint given as ``[scheme://]host[:port]``."""
    scheme_, _, host = endpoint.rstrip("/").partition("://")
    return {"endpoint_override": host or scheme_, "scheme": scheme_ if host else "https"}


def _s3_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    path = _bucket_path(uri)
    settings = tuple(os.environ.get(name) for name in CREDENTIAL_VARIABLES)
    return _s3_filesystem(s3_endpoint(), settings), path


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, settings: tuple) -> pafs.S3FileSystem:
    """An S3 filesystem; ``settings`` (the credential variables) only keys the cache."""
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
              "connect_timeout": 5, "request_timeout": 60}
    if endpoint:
        kwargs.update(_endpoint_parts(endpoint))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    _finalize_s3_at_exit()
    return pafs.S3FileSystem(**kwargs)


def _gcs_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    path = _bucket_path(uri)
    anonymous = os.environ.get(GCS_ANONYMOUS_VARIABLE, "").strip().lower() in ("1", "true", "yes")
    settings = tuple(os.environ.get(name) for name in GCS_CREDENTIAL_VARIABLES)
    return _gcs_filesystem(gcs_endpoint(), anonymous, settings), path


@functools.lru_cache(maxsize=8)
def _gcs_filesystem(endpoint: str | None, anonymous: bool, settings: tuple) -> pafs.FileSystem:
    """A GCS filesystem; credentials from Google's default chain unless ``anonymous``.
    ``settings`` (the credential variables) only keys the cache."""
    kwargs = {"anonymous": anonymous, "retry_time_limit": GCS_CLIENT_RETRY}
    if endpoint:
        kwargs.update(_endpoint_parts(endpoint))
    return pafs.GcsFileSystem(**kwargs)


def _pyarrow_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any scheme pyarrow resolves itself (``hdfs://``, ...), with pyarrow's own settings."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as exc:  # pyarrow.ArrowInvalid: "Unrecognized filesystem type in URI"
        raise ValueError(f"storage scheme {scheme(uri)!r} of {uri!r} is not supported: give a local "
                         f"path or a URI pyarrow.fs resolves (s3://, gs://, hdfs://, ...) ({exc})") from exc


# The one place a scheme gets settings of its own: scheme -> builder(uri) -> (filesystem, path).
FILESYSTEM_BUILDERS = {"s3": _s3_from_uri, "gs": _gcs_from_uri, "gcs": _gcs_from_uri}


@functools.cache
def _finalize_s3_at_exit() -> None:
    """Once S3 is in use: at interpreter exit, drop our cached S3 filesystems and finalize
    pyarrow's S3 subsystem while the interpreter is still whole.

    Left to static destructors, the AWS SDK's clients (and their threads) are torn down after
    Python's own state, which aborts the process now and then with ``terminate called without an
    active exception`` (exit 134) after a script has done its work. ``atexit`` runs handlers last
    in, first out, so this runs before pyarrow's own ``ensure_s3_finalized`` (registered at import).
    """
    atexit.register(_finalize_s3)


def finalize() -> None:
    """The last storage call of a script that used S3, made in its main flow before it exits: drop
    our S3 filesystems and finalize pyarrow's S3 subsystem. A no-op when S3 was not used.

    The at-exit hook above still lets about 1 script in 75 abort at exit (4 of 300 measured on
    2026-12-02, a script reading a Parquet table from moto); this call at the end of the same
    script gave 0 of 150. pyarrow cannot initialize S3 again in this process afterwards, so call it
    only where the process ends (a script's last line), never in code that may run again in the
    same process (a library function, a command's ``main`` that tests call in-process).
    """
    if _finalize_s3_at_exit.cache_info().currsize:
        _finalize_s3()


def _finalize_s3() -> None:
    import gc

    _s3_filesystem.cache_clear()
    gc.collect()
    try:
        pafs.finalize_s3()
    except Exception as exc:  # noqa: BLE001 - nothing left to do about it at exit
        logger.debug("finalize_s3 at exit: %s", exc)


def is_permanent(exc: BaseException) -> bool:
    """True for errors that retrying cannot fix (missing bucket or key, denied, bad input)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, ValueError, TypeError)):
        return True
    text = str(exc)
    if any(marker in text for marker in PERMANENT_MARKERS):
        return True
    status = _CLIENT_STATUS.search(text)
    return bool(status) and status.group(1) not in _TRANSIENT_STATUS


def with_retries(action: str, uri: str, fn, retry_seconds: float | None = None):
    """Run ``fn()``; retry transient failures with exponential backoff for a bounded total time.

    Permanent failures raise at once: FileNotFoundError for a missing object, StorageError for
    the rest; both name the URI. ``retry_seconds`` defaults to :func:`default_retry_seconds`.
    """
    budget = default_retry_seconds() if retry_seconds is None else retry_seconds
    deadline = time.monotonic() + budget
    delay, attempt = 0.2, 1
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_permanent(exc):
                if isinstance(exc, FileNotFoundError):
                    raise FileNotFoundError(f"{action} {uri}: not found ({exc})") from exc
                raise StorageError(f"{action} {uri} failed: {exc}") from exc
            if time.monotonic() + delay > deadline:
                raise StorageError(
                    f"{action} {uri} failed after {attempt} attempts in {budget:.0f}s: {exc}") from exc
            logger.warning("%s %s failed (attempt %d: %s); retrying in %.1fs", action, uri, attempt,
                           exc, delay)
            time.sleep(delay)
            delay, attempt = min(delay * 2, 5.0), attempt + 1


class ObjectReplaced(OSError):
    """A remote object was replaced by one of another size while it was read (transient: retried)."""


def read_bytes(uri: str) -> bytes:
    """The object's bytes, whole: an object replaced while it is read is read again.

    pyarrow reads a remote object as byte ranges of the length it saw when it opened it, so an
    object overwritten in between by a longer one came back as the new one's first bytes (a
    truncated progress.json in one CI run). A remote read therefore checks the length it got
    against the object's, and reads again when they differ."""
    fs, path = filesystem(uri)
    local = is_local(uri)

    def read():
        for _ in range(3):
            with fs.open_input_stream(path) as stream:
                data = stream.read()
            if local or fs.get_file_info(path).size in (None, len(data)):
                return data
        raise ObjectReplaced(f"{uri} was replaced while it was read, three times in a row")

    return with_retries("read", uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (readers see the old object or the whole new one)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes({uri}) needs bytes, got {type(data).__name__}")
    fs, path = filesystem(uri)
    if is_local(uri):
        # Through with_retries too: an unwritable root (a file in the path, no permission) is a
        # StorageError naming the URI, like on a remote store.
        with_retries("write", uri, lambda: _write_local_atomic(Path(path), data))
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
    """A local copy of the directory ``uri``: a local ``uri`` as it is, a remote one downloaded
    once into the cache (complete or absent)."""
    if is_local(uri):
        return Path(local_path(uri)) if scheme(uri) else Path(uri)
    import hashlib

    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return target
    staging = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        download_dir(uri, staging)
        (staging / ".complete").write_text(uri)
        os.replace(staging, target)
    except OSError:
        # Another process on this node finished the same download first: keep its copy.
        if not (target / ".complete").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
