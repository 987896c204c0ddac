"""Signed webhooks (Standard Webhooks, https://www.standardwebhooks.com/) through a durable outbox.

A state change enqueues one delivery: a JSON record under ``{root}/webhooks/outbox/{id}.json``,
written atomically, holding the exact body that will be sent. A periodic loop calls
:meth:`Outbox.deliver_due`, which POSTs every due record with the spec's three headers::

    webhook-id: msg_...                     the same on every try (the receiver's idempotency key)
    webhook-timestamp: 1614265330           unix seconds of this try
    webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>

where ``key`` is the base64-decoded part of the secret ``whsec_<base64>``. A 2xx removes the
record; anything else (a status, a refused connection, a timeout) is retried with capped
exponential backoff, and after ``max_attempts`` tries the record moves to
``{root}/webhooks/dead/{id}.json``. Deliveries are at least once: a crash between a 2xx and the
record's removal sends it again, with the same id. Run one delivery loop per root (two loops on
one root may both send a due record). Outbound URLs pass :mod:`dreamblend_ray.io.netguard`, at
enqueue and again at every try (the POST connects only to a checked address).

The secret never appears in a record, a log line or an error; a URL is never logged either (its
query may carry a receiver's token): log lines name the delivery id.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dreamblend_ray.observability import metrics
from dreamblend_ray.io import netguard, storage
from dreamblend_ray.io.netguard import NetPolicy

logger = logging.getLogger(__name__)

EVENTS = ("subject.training", "subject.ready", "subject.failed", "subject.canceled", "subject.deleted",
          "job.completed")
SECRET_VARIABLE = "DREAMBLEND_WEBHOOK_SECRET"
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
USER_AGENT = "dreamblend-webhooks/1"
# Retries of deliveries that failed together (a receiver's outage) spread over up to this fraction
# of their delay, by a hash of the delivery id (deterministic, so backoff_s stays pure).
JITTER = 0.1


def load_secret(env: str = SECRET_VARIABLE, file: str | None = None) -> bytes | None:
    """The HMAC key from ``file`` (when given) or the environment variable ``env``; None when
    neither is set. The value is ``whsec_<base64>`` (surrounding whitespace ignored) of at least
    24 bytes; anything else is a ValueError that never shows the value."""
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"the webhook secret file {file} could not be read "
                             f"({type(exc).__name__})") from None
        return decode_secret(text, source=f"the file {file}")
    text = os.environ.get(env, "").strip()
    return decode_secret(text, source=f"${env}") if text else None


def decode_secret(text: str, source: str = "the webhook secret") -> bytes:
    """The key bytes of ``whsec_<base64>``; ValueError naming ``source`` (never the value)."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"the webhook secret in {source} must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the webhook secret in {source} is not valid base64 after {SECRET_PREFIX!r}") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the webhook secret in {source} must decode to at least {MIN_SECRET_BYTES} bytes, "
                         f"got {len(key)}")
    return key


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    content = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(secret: str | bytes, headers: Mapping, body: bytes, tolerance_s: float = 300,
           now: float | None = None) -> None:
    """Check a delivery as a receiver does; ValueError when a header is missing, the timestamp is
    more than ``tolerance_s`` from ``now`` (default: the clock), or no ``v1`` signature of the
    space-separated list matches. ``secret`` is ``whsec_<base64>`` or the key bytes."""
    key = _key(secret)
    lowered = {str(name).lower(): value for name, value in headers.items()}
    msg_id, stamp, signatures = (lowered.get(name) for name in
                                 ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        raise ValueError("webhook refused: the webhook-id, webhook-timestamp and webhook-signature "
                         "headers are required")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise ValueError("webhook refused: webhook-timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise ValueError(f"webhook refused: its timestamp is more than {tolerance_s:g}s "
                         f"{'old' if timestamp < now else 'in the future'}")
    expected = sign(key, msg_id, timestamp, body).encode()
    for candidate in str(signatures).split(" "):
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return
    raise ValueError("webhook refused: no signature matches")


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    if isinstance(secret, str):
        return decode_secret(secret.strip())
    raise ValueError(f"the webhook secret must be a whsec_ string or bytes, got {type(secret).__name__}")


@dataclass(frozen=True)
class WebhookPolicy:
    """How deliveries are tried: at most ``max_attempts`` POSTs of ``timeout_s`` each, spaced by
    ``backoff_s`` (``base_delay_s`` doubling up to ``max_delay_s``), to URLs ``net`` allows."""

    max_attempts: int = 8
    base_delay_s: float = 1.0
    max_delay_s: float = 600.0
    timeout_s: float = 5.0
    net: NetPolicy = field(default_factory=NetPolicy)

    def __post_init__(self):
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) \
                or not 1 <= self.max_attempts <= 100:
            raise ValueError(f"max_attempts must be an integer in [1, 100], got {self.max_attempts!r}")
        for name, high in (("base_delay_s", 86400), ("max_delay_s", 86400), ("timeout_s", 300)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= high:
                raise ValueError(f"{name} must be a number of seconds in (0, {high}], got {value!r}")
        if self.max_delay_s < self.base_delay_s:
            raise ValueError(f"max_delay_s ({self.max_delay_s}) must not be below base_delay_s "
                             f"({self.base_delay_s})")
        if not isinstance(self.net, NetPolicy):
            raise ValueError(f"net must be a NetPolicy, got {type(self.net).__name__}")


def backoff_s(attempt: int, policy: WebhookPolicy, key: str = "") -> float:
    """Seconds to wait after failed try number ``attempt`` (1, 2, ...): ``base_delay_s * 2**(attempt-1)``
    capped at ``max_delay_s``, less up to ``JITTER`` of it by a hash of ``key`` (none for ``""``).
    Pure; non-decreasing in ``attempt`` for a given key."""
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
    delay = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(attempt - 1, 64))
    if not key:
        return delay
    unit = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return delay * (1.0 - JITTER * unit)


def iso_utc(seconds: float) -> str:
    """``2026-12-07T15:44:00Z`` for unix ``seconds``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def encode_body(event_type: str, data: dict, timestamp: float) -> str:
    """The delivery's JSON body ``{"type", "timestamp", "data"}``, compact with sorted keys;
    ValueError when ``data`` is not JSON (NaN included)."""
    payload = {"type": event_type, "timestamp": iso_utc(timestamp), "data": data}
    try:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"webhook data must be plain JSON ({exc})") from None


class Outbox:
    """A durable queue of webhook deliveries under ``{root}/webhooks/`` (see the module docstring).

    ``clock`` (unix seconds) and ``post`` (``netguard.safe_post``'s signature) are injectable.
    """

    def __init__(self, root: str, secret: bytes | None, policy: WebhookPolicy, clock=time.time,
                 post=netguard.safe_post):
        if not isinstance(policy, WebhookPolicy):
            raise ValueError(f"policy must be a WebhookPolicy, got {type(policy).__name__}")
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES):
            raise ValueError(f"the webhook secret must be the key bytes (load_secret's result) of at least "
                             f"{MIN_SECRET_BYTES} bytes, or None")
        self.root, self.policy, self._secret = root, policy, secret
        self._clock, self._post = clock, post
        self.outbox_dir = storage.join(root, "webhooks", "outbox")
        self.dead_dir = storage.join(root, "webhooks", "dead")

    def __repr__(self) -> str:  # never shows the secret
        return f"Outbox(root={self.root!r}, secret={'set' if self._secret else None}, policy={self.policy!r})"

    def enqueue(self, event_type: str, url: str, data: dict, request_id: str | None = None) -> str:
        """Store one delivery of ``event_type`` with ``data`` to ``url``, due now; its id.

        ValueError (before anything is stored) without a secret, for an unknown event, a URL the
        net policy refuses (its host is resolved now, and again at every try) or non-JSON data.
        """
        if self._secret is None:
            raise ValueError(f"webhooks need a secret: set ${SECRET_VARIABLE} (or the secret file) "
                             f"to whsec_<base64 of at least {MIN_SECRET_BYTES} random bytes>")
        if event_type not in EVENTS:
            raise ValueError(f"unknown webhook event {event_type!r}; known: {', '.join(EVENTS)}")
        netguard.check_outbound_url(url, self.policy.net, need_allow_list=bool(self.policy.net.allow_hosts))
        now = self._clock()
        body = encode_body(event_type, data, now)
        msg_id = f"msg_{time.time_ns():x}{uuid.uuid4().hex[:12]}"  # sorts by creation
        record = {"id": msg_id, "type": event_type, "url": url, "payload": json.loads(body), "body": body,
                  "attempts": 0, "next_attempt_at": now, "created_at": now, "last_error": None,
                  "request_id": request_id}
        storage.write_json(self._path(msg_id), record)
        logger.info("webhook %s (%s) queued%s", msg_id, event_type, _for_request(request_id))
        return msg_id

    def pending(self) -> list[dict]:
        """Every queued delivery, the next due first."""
        return sorted(self._records(self.outbox_dir), key=lambda r: (r.get("next_attempt_at", 0), r["id"]))

    def dead_letters(self) -> list[dict]:
        """Deliveries that used up their tries, oldest first."""
        return sorted(self._records(self.dead_dir), key=lambda r: (r.get("created_at", 0), r["id"]))

    def deliver_due(self, now: float | None = None, limit: int = 50) -> dict:
        """One delivery pass: try up to ``limit`` due records, oldest first. Never raises.

        Deliveries to one URL go out in the order they were queued: a URL whose oldest pending
        record is not due yet, or fails this pass, holds its later records back (so
        ``subject.training`` never arrives after ``subject.ready``).

        Returns counts ``{"delivered", "retried", "dead", "errors"}`` (``errors``: records that
        could not be read or updated in storage; they are tried again on a later pass).
        """
        counts = {"delivered": 0, "retried": 0, "dead": 0, "errors": 0}
        try:
            now = self._clock() if now is None else now
            queue = sorted(self._records(self.outbox_dir), key=lambda r: (r.get("created_at", 0), r["id"]))
        except Exception as exc:  # noqa: BLE001 - a delivery pass never raises
            logger.warning("webhook outbox %s could not be listed: %s", self.root, type(exc).__name__)
            counts["errors"] += 1
            return counts
        held, tried = set(), 0
        for record in queue:
            if tried >= limit:
                break
            if record["url"] in held or record.get("next_attempt_at", 0) > now:
                held.add(record["url"])
                continue
            tried += 1
            try:
                outcome = self._attempt(record, now)
            except Exception as exc:  # noqa: BLE001 - storage trouble: the record stays, tried later
                logger.warning("webhook %s could not be updated: %s", record.get("id"), exc)
                outcome = "errors"
            counts[outcome] += 1
            if outcome != "errors":
                metrics.get("webhook_deliveries").inc(outcome=outcome)
            if outcome != "delivered":
                held.add(record["url"])
        metrics.get("webhook_backlog").set(len(queue) - counts["delivered"] - counts["dead"])
        return counts

    def _attempt(self, record: dict, now: float) -> str:
        """POST one record once and file the outcome; ``"delivered"``, ``"retried"`` or ``"dead"``."""
        status, reason = self._send(record, now)
        if status is not None and 200 <= status < 300:
            storage.delete(self._path(record["id"]))
            logger.info("webhook %s (%s) delivered: HTTP %d after %d earlier tries%s", record["id"],
                        record["type"], status, record["attempts"], _for_request(record.get("request_id")))
            return "delivered"
        record = {**record, "attempts": record["attempts"] + 1, "last_error": reason}
        if record["attempts"] >= self.policy.max_attempts:
            storage.write_json(storage.join(self.dead_dir, f"{record['id']}.json"), {**record, "dead_at": now})
            storage.delete(self._path(record["id"]))
            logger.warning("webhook %s (%s) dead after %d tries: %s%s", record["id"], record["type"],
                           record["attempts"], reason, _for_request(record.get("request_id")))
            return "dead"
        record["next_attempt_at"] = now + backoff_s(record["attempts"], self.policy, record["id"])
        storage.write_json(self._path(record["id"]), record)
        logger.info("webhook %s (%s) try %d failed (%s); next in %.1fs", record["id"], record["type"],
                    record["attempts"], reason, record["next_attempt_at"] - now)
        return "retried"

    def _send(self, record: dict, now: float) -> tuple[int | None, str]:
        """(HTTP status or None, a short reason without URL or secret) of one POST."""
        body = record["body"].encode("utf-8")
        timestamp = int(now)
        headers = {"webhook-id": record["id"], "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self._secret, record["id"], timestamp, body),
                   "content-type": "application/json", "user-agent": USER_AGENT}
        try:
            status = self._post(record["url"], body, headers, self.policy.net, self.policy.timeout_s,
                                need_allow_list=bool(self.policy.net.allow_hosts))
        except ValueError as exc:  # netguard's refusals name the rule and the host only
            return None, f"refused: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, TLS, protocol
            return None, type(exc).__name__
        return status, f"HTTP {status}"

    def _path(self, msg_id: str) -> str:
        return storage.join(self.outbox_dir, f"{msg_id}.json")

    @staticmethod
    def _records(folder: str) -> list[dict]:
        """The records in ``folder``; a file that cannot be read is logged and skipped."""
        records = []
        for name in storage.list_dir(folder):
            if name.startswith(".") or not name.endswith(".json"):
                continue  # a local atomic write's temporary file
            try:
                record = storage.read_json(storage.join(folder, name))
            except FileNotFoundError:
                continue  # delivered or moved by the pass that listed it
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
                logger.warning("webhook record %s/%s unreadable: %s", folder, name, type(exc).__name__)
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records.append(record)
            else:
                logger.warning("webhook record %s/%s is not a delivery record; skipped", folder, name)
        return records


def _for_request(request_id: str | None) -> str:
    return f" (request {request_id})" if request_id else ""
