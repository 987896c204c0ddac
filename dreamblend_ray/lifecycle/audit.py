"""The audit trail: who created, deleted or canceled what, key-file reloads, and refusals.

Object storage cannot append, so each event is its own small JSON object, written atomically::

    {root}/audit/{YYYY-MM-DD}/{time_ns:020d}-{uuid8}.json

(the UTC day and the event's time in nanoseconds, so names sort by time; the uuid part keeps two
events of the same nanosecond apart). An event holds ``time`` (ISO 8601, UTC), ``action`` (one of
:data:`ACTIONS`), ``tenant`` (``-`` for service-wide events such as ``keys.reload``), ``key_id`` (the
key's public id, never the key; None when no key was valid), ``target`` (a subject or job id),
``request_id`` and ``detail`` (a short dict). A detail that looks like key material (a name such as
``key``, ``secret``, ``token``, ``password`` or ``authorization``, or a string holding 32 or more
characters of ``[A-Za-z0-9_-]``) is refused with a ValueError: an audit record must never carry a
credential. (So a reload counts its ``entries``, not its "keys"; a uuid4 in hex is refused too, with
its dashes it passes.)

:meth:`AuditLog.record` never raises for a failed write: an audit failure must not fail the
request. The failure is logged (without the event's detail) and counted in ``failures`` (exported
as a metric by the caller). It is synchronous, one storage write (with storage's bounded retries):
async callers run it in a worker thread. :func:`read_events` reads the trail back in time order,
filtered; ``dreamblend audit`` prints it as JSON lines.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping

from dreamblend_ray.io import storage

logger = logging.getLogger(__name__)

ACTIONS = ("subject.create", "subject.delete", "subject.cancel", "job.create", "keys.reload",
           "quota.refused", "auth.refused")
AUDIT_DIR = "audit"
KEY_LIKE_NAME = re.compile(r"key|secret|token|password|passwd|authorization|credential", re.IGNORECASE)
KEY_LIKE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,}")
MAX_DETAIL_ITEMS = 16
MAX_DETAIL_CHARS = 1024
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_EVENT_NAME = re.compile(r"^\d{20}-[0-9a-f]{8}\.json$")


class AuditLog:
    """Appends audit events under ``{root}/audit/``; ``clock`` gives unix seconds (time.time)."""

    def __init__(self, root: str, clock: Callable[[], float] = time.time):
        if not isinstance(root, str) or not root:
            raise ValueError("the audit log needs a storage root (a local path or a URI)")
        self.root = root
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0

    def record(self, action: str, tenant: str, key_id: str | None, target: str | None = None,
               request_id: str | None = None, detail: Mapping | None = None) -> None:
        """Append one event. ValueError for a bad action, field or detail (a caller's bug); a failed
        write is logged and counted in ``failures``, never raised."""
        event = make_event(self._clock(), action, tenant, key_id, target, request_id, detail)
        uri = event_uri(self.root, event["time_ns"])
        try:
            storage.write_json(uri, event["body"])
        except Exception as exc:  # noqa: BLE001 - an audit failure must not fail the request
            with self._lock:
                self.failures += 1
            logger.error("audit event %s for tenant %s not written (%s: %s)", action, tenant,
                         type(exc).__name__, exc)


def make_event(now: float, action: str, tenant: str, key_id: str | None, target: str | None,
               request_id: str | None, detail: Mapping | None) -> dict:
    """``{"time_ns": int, "body": dict}`` of one event, validated."""
    if action not in ACTIONS:
        raise ValueError(f"audit action must be one of {ACTIONS}, got {action!r}")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"an audit event needs a tenant id, got {tenant!r}")
    for name, value in (("key_id", key_id), ("target", target), ("request_id", request_id)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"audit field {name} must be a string or None, got {type(value).__name__}")
    time_ns = int(round(now * 1e9))
    stamp = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.timezone.utc)
    body = {"time": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"), "action": action,
            "tenant": tenant, "key_id": key_id, "target": target, "request_id": request_id,
            "detail": check_detail(detail)}
    return {"time_ns": time_ns, "body": body}


def check_detail(detail: Mapping | None) -> dict:
    """A copy of ``detail``: a short dict of plain values; ValueError for anything like key material."""
    if detail is None:
        return {}
    if not isinstance(detail, Mapping):
        raise ValueError(f"audit detail must be a dict, got {type(detail).__name__}")
    if len(detail) > MAX_DETAIL_ITEMS:
        raise ValueError(f"audit detail holds at most {MAX_DETAIL_ITEMS} items, got {len(detail)}")
    checked = {}
    for name, value in detail.items():
        if not isinstance(name, str) or KEY_LIKE_NAME.search(name) or KEY_LIKE_VALUE.search(name):
            raise ValueError(f"audit detail names must be plain strings that do not look like key material "
                             f"(key, secret, token, password, authorization), refused {_shown(name)}")
        checked[name] = _check_value(name, value)
    if len(repr(checked)) > MAX_DETAIL_CHARS:
        raise ValueError(f"audit detail must be short (at most {MAX_DETAIL_CHARS} characters)")
    return checked


def _check_value(name: str, value):
    """A detail value: None, a bool, a number, a string without key-like runs, or a list of them."""
    if isinstance(value, (list, tuple)):
        return [_check_value(name, item) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if not isinstance(value, str):
        raise ValueError(f"audit detail {name!r} must be a plain value, got {type(value).__name__}")
    if KEY_LIKE_VALUE.search(value):
        raise ValueError(f"audit detail {name!r} looks like key material (32 or more characters of "
                         f"[A-Za-z0-9_-]): refused")
    return value


def _shown(name) -> str:
    """A refused detail name, shown only when it cannot itself be key material."""
    return repr(name) if isinstance(name, str) and not KEY_LIKE_VALUE.search(name) else "a key-like name"


def event_uri(root: str, time_ns: int) -> str:
    """``{root}/audit/{UTC day}/{time_ns:020d}-{uuid8}.json``."""
    day = datetime.datetime.fromtimestamp(time_ns // 1_000_000_000, tz=datetime.timezone.utc).date()
    return storage.join(root, AUDIT_DIR, day.isoformat(), f"{time_ns:020d}-{uuid.uuid4().hex[:8]}.json")


def read_events(root: str, since: str | None = None, tenant: str | None = None, action: str | None = None,
                limit: int | None = None) -> list[dict]:
    """Events in time order from the UTC day ``since`` (YYYY-MM-DD) on, of ``tenant`` and ``action``
    when given; the first ``limit`` of them. An unreadable event is logged and skipped."""
    _check_filters(since, action, limit)
    events = []
    audit_root = storage.join(root, AUDIT_DIR)
    for day in (d for d in storage.list_dir(audit_root) if _DAY.match(d) and (since is None or d >= since)):
        day_uri = storage.join(audit_root, day)
        for name in (n for n in storage.list_dir(day_uri) if _EVENT_NAME.match(n)):
            event = _read_event(storage.join(day_uri, name))
            if event is None or (tenant is not None and event.get("tenant") != tenant) \
                    or (action is not None and event.get("action") != action):
                continue
            events.append(event)
            if limit is not None and len(events) >= limit:
                return events
    return events


def _check_filters(since: str | None, action: str | None, limit: int | None) -> None:
    if since is not None:
        try:
            if not _DAY.match(since):
                raise ValueError
            datetime.date.fromisoformat(since)
        except (TypeError, ValueError):
            raise ValueError(f"since must be a UTC day as YYYY-MM-DD, got {since!r}") from None
    if action is not None and action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")


def _read_event(uri: str) -> dict | None:
    try:
        event = storage.read_json(uri)
    except (storage.StorageError, FileNotFoundError, ValueError) as exc:
        logger.warning("audit event %s skipped: %s", uri, exc)
        return None
    return event if isinstance(event, dict) else None
