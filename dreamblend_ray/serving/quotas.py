"""Per-tenant rate quotas: requests per minute and images per minute, as token buckets.

A tenant's quotas (from the keys file) name two rates, ``requests_per_minute`` and
``images_per_minute``, each an int or None (unlimited). :class:`QuotaLimiter` keeps one
:class:`TokenBucket` per tenant and rate, created on the tenant's first request and rebuilt when its
quotas change (a key-file reload). A request is admitted only when both buckets can pay for it (one
request token, ``images`` image tokens): both are checked before either is charged, so a request
refused for images costs no request token. A refusal names the quota and a ``Retry-After`` in whole
seconds (at least 1); the HTTP layer answers it with a 429.

Token bucket: ``rate`` tokens per minute flow in continuously up to ``burst`` (default: one minute's
worth). A request larger than the burst (more images than a minute's worth) is admitted when the
bucket is full and leaves it in debt, so the long-run rate still holds and no request waits forever.

**Several ingress replicas.** Each ingress replica holds its own limiter built with
``share = 1 / ingress_replicas``: every bucket's rate and burst are divided by the replica count
(a bucket holds at least one token, so a rate below one per replica still admits requests at
``rate / N`` on average). The semantics:

- when Serve spreads a tenant's requests evenly over the replicas (its default, power of two
  choices over replicas with free capacity), the tenant gets its whole rate, as with one counter;
- a tenant whose requests all land on one replica gets ``1 / N`` of its rate: a quota is a ceiling,
  never exceeded overall (N replicas each admit at most ``rate / N``), but it can bind early;
- the burst is split the same way (up to one token per replica);
- when the replica count changes, the app is rebuilt with the new share (Serve restarts replicas
  on a config change; autoscaling ingress replicas would make the share stale: keep the ingress at a
  fixed count, it is cheap).

The alternative is one counting Ray actor that every replica asks (exact whatever the spread), at
the cost of one actor round trip per request and one process through which every request of the
service passes. ``benchmarks/bench_quotas.py`` measures both (2026-12-07, the project's 2-core CPU
machine, 2000 calls): an in-process check takes a median 4.6 µs (p95 4.9 µs); an ``await
actor.check.remote(...)`` 1.25 ms (p95 1.54 ms), 275 times more, and the one actor caps the whole
service at about 1,100 checks/s (32 concurrent callers). Per-replica buckets are the choice; the
actor would be worth its cost only for quotas that must be exact under a skewed spread (billing),
which rate quotas are not.

Memory is bounded: at most ``max_tenants`` tenants' buckets are kept, least recently used dropped
first (a dropped tenant starts again with full buckets). Thread-safe (one lock; a check is a few
arithmetic operations). Standard library only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

QUOTAS = ("requests_per_minute", "images_per_minute")
DEFAULT_MAX_TENANTS = 10_000
# Float slack when comparing token counts (refills are sums of small products).
EPSILON = 1e-9


@dataclass(frozen=True)
class Refusal:
    """A request over a quota: which one, and how many whole seconds until a retry can pass."""

    quota: str
    retry_after_s: int

    def __post_init__(self):
        if self.quota not in QUOTAS:
            raise ValueError(f"quota must be one of {QUOTAS}, got {self.quota!r}")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int) \
                or self.retry_after_s < 1:
            raise ValueError(f"retry_after_s must be an int of at least 1, got {self.retry_after_s!r}")


class TokenBucket:
    """``rate_per_minute`` tokens per minute, refilled continuously, holding at most ``burst``.

    ``burst`` defaults to ``rate_per_minute`` and is at least one token. The bucket starts full.
    """

    def __init__(self, rate_per_minute: float, clock: Callable[[], float] = time.monotonic,
                 burst: float | None = None):
        if isinstance(rate_per_minute, bool) or not isinstance(rate_per_minute, (int, float)) \
                or not rate_per_minute > 0 or math.isinf(rate_per_minute):
            raise ValueError(f"rate_per_minute must be a positive number, got {rate_per_minute!r}")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, (int, float))
                                  or not burst > 0):
            raise ValueError(f"burst must be a positive number or None, got {burst!r}")
        self.rate_per_s = rate_per_minute / 60.0
        self.capacity = max(1.0, float(rate_per_minute if burst is None else burst))
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate_per_s)
        self._last = now

    def wait_s(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens can be taken (0.0: now); takes nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of tokens must be a non-negative int, got {n!r}")
        self._refill()
        # A request above the burst needs a full bucket (and leaves it in debt).
        missing = min(n, self.capacity) - self._tokens
        return 0.0 if missing <= EPSILON else missing / self.rate_per_s

    def take(self, n: int = 1) -> float:
        """Take ``n`` tokens: 0.0 when taken, else the seconds until they would be (nothing taken)."""
        wait = self.wait_s(n)
        if wait == 0.0:
            self._tokens -= n
        return wait


@dataclass
class _TenantBuckets:
    limits: tuple[int | None, int | None]
    buckets: tuple[TokenBucket | None, TokenBucket | None]


class QuotaLimiter:
    """Per-tenant request and image buckets; ``share`` (in (0, 1]) divides every rate and burst.

    ``check(tenant_id, quotas, images)`` charges one request and ``images`` images, or refuses.
    ``quotas`` is any object with ``requests_per_minute`` and ``images_per_minute`` (int or None);
    None for ``quotas`` itself means unlimited.
    """

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 max_tenants: int = DEFAULT_MAX_TENANTS):
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"share must be a number in (0, 1] (1 / ingress replicas), got {share!r}")
        if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or max_tenants < 1:
            raise ValueError(f"max_tenants must be a positive int, got {max_tenants!r}")
        self.share = float(share)
        self.max_tenants = max_tenants
        self._clock = clock
        self._tenants: OrderedDict[str, _TenantBuckets] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tenants)

    def check(self, tenant_id: str, quotas, images: int) -> Refusal | None:
        """None when the request is admitted (and charged), else the :class:`Refusal` (nothing charged)."""
        if isinstance(images, bool) or not isinstance(images, int) or images < 0:
            raise ValueError(f"images must be a non-negative int, got {images!r}")
        limits = quota_limits(quotas)
        with self._lock:
            requests, image_bucket = self._buckets(tenant_id, limits)
            waits = {name: bucket.wait_s(n) for name, bucket, n in
                     ((QUOTAS[0], requests, 1), (QUOTAS[1], image_bucket, images)) if bucket is not None}
            refused = {name: wait for name, wait in waits.items() if wait > 0}
            if refused:
                quota = max(refused, key=refused.get)
                return Refusal(quota, max(1, math.ceil(max(refused.values()))))
            for bucket, n in ((requests, 1), (image_bucket, images)):
                if bucket is not None:
                    bucket.take(n)
        return None

    def _buckets(self, tenant_id: str, limits: tuple) -> tuple:
        """The tenant's buckets, built (or rebuilt, when its limits changed) on demand; LRU-bounded."""
        entry = self._tenants.get(tenant_id)
        if entry is None or entry.limits != limits:
            if entry is not None:
                logger.info("quotas of tenant %s changed: buckets rebuilt", tenant_id)
            entry = _TenantBuckets(limits, tuple(self._bucket(limit) for limit in limits))
            self._tenants[tenant_id] = entry
        self._tenants.move_to_end(tenant_id)
        while len(self._tenants) > self.max_tenants:
            self._tenants.popitem(last=False)
        return entry.buckets

    def _bucket(self, limit: int | None) -> TokenBucket | None:
        return None if limit is None else TokenBucket(limit * self.share, clock=self._clock)


def quota_limits(quotas) -> tuple[int | None, int | None]:
    """``(requests_per_minute, images_per_minute)`` of a quotas object (None: unlimited), validated."""
    if quotas is None:
        return (None, None)
    limits = []
    for name in QUOTAS:
        if not hasattr(quotas, name):
            raise ValueError(f"quotas must have a {name} attribute (an int or None)")
        value = getattr(quotas, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None (unlimited), got {value!r}")
        limits.append(value)
    return tuple(limits)
