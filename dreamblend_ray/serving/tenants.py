"""Tenants and their API keys: the keys file, constant-time authentication, rotation, throttling.

A keys file (YAML or JSON; in Kubernetes a mounted Secret) maps each tenant to its keys and quotas::

    tenants:
      acme:                       # tenant id: [a-z0-9][a-z0-9-]{0,62}
        keys:
          - id: acme-2026-12      # key id: [A-Za-z0-9_.-]{1,64}, unique in the file; may appear in logs
            sha256: <64 hex>      # SHA-256 of the key; the key itself is never stored
        quotas:                   # all optional; absent = unlimited
          requests_per_minute: 600
          images_per_minute: 200
          concurrent_trainings: 2
          subjects: 100
        priority: 0               # optional; higher = admitted first in the continuous batch

- :func:`parse_keys` turns the text into a :class:`KeyTable`; :meth:`KeyTable.authenticate` hashes a
  presented key and compares it with every stored digest (``hmac.compare_digest``, no early exit),
  so its time does not depend on which key matched. Keys are high-entropy random strings
  (:func:`new_key`), so one SHA-256 is enough: there is nothing to brute-force that a slow hash
  would protect.
- :class:`KeyStore` re-reads the file when it changes (rotation without a restart) and keeps the
  last good table when a new one is malformed.
- :func:`single_key_table`: today's single-key settings as the one tenant ``default``.
- :func:`check_key_strength`, :func:`new_key`, :func:`key_entry`: weak keys refused, fresh keys and
  the keys-file entry of one.
- :func:`presented_credentials`: the key a request carries, and whether it carries two that
  disagree (RFC 6750 allows one credential per request).
- :class:`FailureThrottle`: repeated 401s per client address.

No key and no digest ever reaches a log line, an exception message or a ``repr``: errors name
tenants, key ids and positions only. Stdlib and PyYAML only, so the ingress stays light.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import yaml

logger = logging.getLogger(__name__)

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
DEFAULT_TENANT = "default"
KEY_PREFIX = "dbk_"
MIN_KEY_CHARS = 32
MIN_DISTINCT_CHARS = 8
# Lower-case fragments of example and placeholder secrets; a key containing one is refused. The first
# is the value of k8s/base/secret-api-key.example.yaml.
PLACEHOLDERS = ("replace_me_with_a_long_random_string", "replace_me", "replace-me", "replaceme", "changeme",
                "change-me", "change_me", "test-key", "test_key", "testkey", "your-api-key", "your_api_key",
                "placeholder", "example", "password")
FILE_FIELDS = frozenset({"tenants"})
TENANT_FIELDS = frozenset({"keys", "quotas", "priority"})
KEY_FIELDS = frozenset({"id", "sha256"})


# --------------------------------------------------------------------------------------------
# Tenants, quotas, principals


def _check_id(value: Any, pattern: re.Pattern, what: str) -> None:
    """ValueError unless ``value`` is a string matching ``pattern`` (the value is not echoed: a
    misplaced key must not reach a message)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} must be a string matching {pattern.pattern}")


def _check_positive(value: Any, what: str) -> None:
    """ValueError unless ``value`` is None or an int >= 1 (bool is not an int here)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1 (or absent for no limit)")


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; None means unlimited."""

    requests_per_minute: int | None = field(default=None, metadata={"help": "HTTP requests per minute"})
    images_per_minute: int | None = field(default=None, metadata={"help": "generated images per minute"})
    concurrent_trainings: int | None = field(default=None, metadata={"help": "trainings queued or running"})
    subjects: int | None = field(default=None, metadata={"help": "subjects stored"})

    def __post_init__(self):
        for item in fields(self):
            _check_positive(getattr(self, item.name), f"quota {item.name}")


@dataclass(frozen=True)
class Tenant:
    """One customer: its id, quotas and admission priority (higher first)."""

    id: str
    quotas: Quotas = field(default_factory=Quotas)
    priority: int = 0

    def __post_init__(self):
        _check_id(self.id, TENANT_ID, "a tenant id")
        if not isinstance(self.quotas, Quotas):
            raise ValueError(f"tenant {self.id!r}: quotas must be a Quotas")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"tenant {self.id!r}: priority must be an integer")


@dataclass(frozen=True)
class Principal:
    """Who a request is: the tenant and the id of the key it presented (both safe to log)."""

    tenant: str
    key_id: str

    def __post_init__(self):
        _check_id(self.tenant, TENANT_ID, "a tenant id")
        _check_id(self.key_id, KEY_ID, "a key id")


# --------------------------------------------------------------------------------------------
# The table of keys


def digest_of(key: str) -> bytes:
    """SHA-256 of a key's UTF-8 bytes (lone surrogates passed through, so any header value hashes)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyTable:
    """Tenants and their key digests, as one keys file defines them; immutable."""

    def __init__(self, tenants: Iterable[Tenant], keys: Iterable[tuple[bytes, Principal]]):
        self._tenants = MappingProxyType({tenant.id: tenant for tenant in tenants})
        self._entries = tuple(keys)
        for digest, principal in self._entries:
            if len(digest) != hashlib.sha256().digest_size or principal.tenant not in self._tenants:
                raise ValueError(f"key {principal.key_id!r} needs a 32-byte digest and a known tenant")

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal whose key is ``presented``, or None. Every stored digest is compared
        (``hmac.compare_digest``, no early exit), so the time taken does not reveal which key, if
        any, matched; a missing or empty key is compared too."""
        digest = digest_of(presented or "")
        found = None
        for stored, principal in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = principal
        return found if presented else None

    def tenant(self, tenant_id: str) -> Tenant:
        """The tenant ``tenant_id``; KeyError when the table has none of that id."""
        return self._tenants[tenant_id]

    @property
    def tenants(self) -> Mapping[str, Tenant]:
        """Tenant id -> Tenant, in file order (read-only)."""
        return self._tenants

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, in file order."""
        return tuple(principal.key_id for _, principal in self._entries)

    def key_ids_of(self, tenant_id: str) -> tuple[str, ...]:
        """The key ids of one tenant, in file order."""
        return tuple(p.key_id for _, p in self._entries if p.tenant == tenant_id)

    def __repr__(self) -> str:
        return f"KeyTable({len(self._tenants)} tenants, {len(self._entries)} keys)"


def single_key_table(key: str, tenant: str = DEFAULT_TENANT, key_id: str = "default") -> KeyTable:
    """Today's single API key as one tenant (``default``) without quotas. The caller decides
    whether to refuse a weak key first (:func:`check_key_strength`)."""
    if not isinstance(key, str) or not key:
        raise ValueError("the API key is empty")
    principal = Principal(tenant, key_id)
    return KeyTable([Tenant(tenant)], [(digest_of(key), principal)])


# --------------------------------------------------------------------------------------------
# Parsing a keys file


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one
    silently, which would hide a second entry of a tenant)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int)) and key in seen:
                raise ValueError(f"a mapping repeats the field or tenant {_shown(key)} "
                                 f"(line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shown(value: Any) -> str:
    """``value`` quoted when it looks like a short name, else a neutral word (a key or digest pasted
    in the wrong place must not be echoed)."""
    if isinstance(value, str) and len(value) < MIN_KEY_CHARS and re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        return repr(value)
    return "(not shown)"


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object, refusing repeated names (``json.loads(object_pairs_hook=...)``)."""
    result = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"a JSON object repeats the name {_shown(name)}")
        result[name] = value
    return result


def load_document(text: str) -> Any:
    """The keys file's data: JSON when it starts with ``{``, else YAML. Syntax errors name the
    line and column only (PyYAML's own message quotes the offending line)."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the keys file is not valid JSON: {exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = re.sub(r"[A-Za-z0-9_.+/=-]{%d,}" % MIN_KEY_CHARS, "(not shown)", exc.problem or "syntax error")
        raise ValueError(f"the keys file is not valid YAML: {problem}{where}") from None
    except yaml.YAMLError:
        raise ValueError("the keys file is not valid YAML") from None


def _mapping(value: Any, allowed: frozenset, what: str) -> dict:
    """``value`` as a mapping with only ``allowed`` fields; ValueError naming ``what`` otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping")
    unknown = sorted(_shown(name) for name in value if name not in allowed)
    if unknown:
        raise ValueError(f"{what} has unknown fields {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _parse_quotas(value: Any, tenant_id: str) -> Quotas:
    """A tenant's ``quotas:`` block (absent or null: unlimited)."""
    if value is None:
        return Quotas()
    names = frozenset(item.name for item in fields(Quotas))
    try:
        return Quotas(**_mapping(value, names, f"tenant {tenant_id!r}: quotas"))
    except ValueError as exc:
        raise ValueError(f"tenant {tenant_id!r}: {exc}") from None


def _parse_key(value: Any, tenant_id: str, position: int) -> tuple[bytes, Principal]:
    """One entry of a tenant's ``keys:`` list -> (digest, principal)."""
    what = f"tenant {tenant_id!r}, key {position}"
    entry = _mapping(value, KEY_FIELDS, what)
    missing = sorted(KEY_FIELDS - entry.keys())
    if missing:
        raise ValueError(f"{what}: the field {missing[0]!r} is missing")
    _check_id(entry["id"], KEY_ID, f"{what}: the id")
    hexdigest = entry["sha256"]
    if not isinstance(hexdigest, str) or not SHA256_HEX.fullmatch(hexdigest):
        raise ValueError(f"tenant {tenant_id!r}, key {entry['id']!r}: sha256 must be a quoted string of "
                         "64 hexadecimal digits")
    return bytes.fromhex(hexdigest), Principal(tenant_id, entry["id"])


def _parse_tenant(tenant_id: Any, value: Any) -> tuple[Tenant, list[tuple[bytes, Principal]]]:
    """One tenant's block -> the Tenant and its keys."""
    if not isinstance(tenant_id, str):
        raise ValueError("a tenant id is not a string: quote ids that YAML reads as numbers, booleans or "
                         "null (e.g. \"123\", \"no\")")
    if not TENANT_ID.fullmatch(tenant_id):
        raise ValueError(f"the tenant id {_shown(tenant_id)} is not valid: tenant ids match {TENANT_ID.pattern}")
    block = _mapping(value, TENANT_FIELDS, f"tenant {tenant_id!r}")
    keys = block.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"tenant {tenant_id!r} has no keys: give it a non-empty `keys:` list")
    priority = block.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"tenant {tenant_id!r}: priority must be an integer")
    tenant = Tenant(tenant_id, _parse_quotas(block.get("quotas"), tenant_id), priority)
    return tenant, [_parse_key(item, tenant_id, index + 1) for index, item in enumerate(keys)]


def _check_unique(entries: list[tuple[bytes, Principal]]) -> None:
    """ValueError when two keys share an id or a digest (named by their ids)."""
    ids: set[str] = set()
    digests: dict[bytes, str] = {}
    for digest, principal in entries:
        if principal.key_id in ids:
            raise ValueError(f"the key id {principal.key_id!r} appears twice: key ids are unique in the file")
        ids.add(principal.key_id)
        if digest in digests:
            raise ValueError(f"keys {digests[digest]!r} and {principal.key_id!r} have the same sha256: "
                             "each key must be distinct")
        digests[digest] = principal.key_id


def parse_keys(text: str) -> KeyTable:
    """The :class:`KeyTable` of a keys file's text (YAML or JSON; schema in the module docstring).

    Raises ValueError with a sentence naming the problem (never a key or a digest): bad syntax,
    unknown fields, bad ids, repeated key ids or digests, a digest that is not 64 hex digits, a
    tenant without keys, a file without tenants.
    """
    document = _mapping(load_document(text), FILE_FIELDS, "the keys file")
    tenants_block = document.get("tenants")
    if not isinstance(tenants_block, dict) or not tenants_block:
        raise ValueError("the keys file defines no tenants: it needs a non-empty `tenants:` mapping")
    tenants, entries = [], []
    for tenant_id, value in tenants_block.items():
        tenant, keys = _parse_tenant(tenant_id, value)
        tenants.append(tenant)
        entries.extend(keys)
    _check_unique(entries)
    return KeyTable(tenants, entries)


# --------------------------------------------------------------------------------------------
# A keys file that may change: rotation without a restart


class KeyStore:
    """The keys file at ``path``, re-read when it changes.

    Loaded at construction (ValueError when that fails). :meth:`current` checks the file's
    (mtime, ctime, size, inode) at most every ``check_every_s`` seconds of ``clock`` and re-reads it when
    they changed; a Kubernetes Secret update swaps a symlink, which changes the inode. A new file
    that does not parse (or cannot be read) keeps the last good table: a warning names the problem
    and :attr:`last_error` holds it until a good file loads. :attr:`reloads` counts successful
    reloads; ``on_reload(old, new)`` is called after each (e.g. for the audit trail), and its
    failure is logged, never raised to the request that triggered the check.
    """

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.monotonic,
                 check_every_s: float = 2.0,
                 on_reload: Callable[[KeyTable, KeyTable], None] | None = None):
        if check_every_s < 0:
            raise ValueError("check_every_s must be >= 0")
        self.path = os.fspath(path)
        self.clock, self.check_every_s, self.on_reload = clock, check_every_s, on_reload
        self.reloads = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._signature, self._table = self._read()
        self._checked_at = clock()

    def _stat(self) -> tuple[int, ...]:
        """The file's signature: (mtime, ctime, size, device, inode), following symlinks."""
        info = os.stat(self.path)
        return info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_dev, info.st_ino

    def _read(self) -> tuple[tuple[int, ...], KeyTable]:
        """(signature, table) of the file now; ValueError when it is unreadable or malformed."""
        try:
            signature = self._stat()  # before reading: a write after it is seen at the next check
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"the keys file {self.path} is not readable: {type(exc).__name__}") from None
        try:
            return signature, parse_keys(text)
        except ValueError as exc:
            raise ValueError(f"the keys file {self.path} is malformed: {exc}") from None

    def current(self) -> KeyTable:
        """The table to authenticate with now (re-reading the file first when a check is due)."""
        if self.clock() - self._checked_at >= self.check_every_s:
            self.check()
        return self._table

    def check(self) -> bool:
        """Look at the file now; re-read it if it changed. True when a new table was loaded."""
        with self._lock:
            self._checked_at = self.clock()
            try:
                if self._stat() == self._signature:
                    return False
                signature, table = self._read()
            except (OSError, ValueError) as exc:
                return self._failed(exc)
            old, self._table, self._signature = self._table, table, signature
            self.reloads, self.last_error = self.reloads + 1, None
        logger.info("keys file %s reloaded: %d tenants, key ids %s", self.path, len(table.tenants),
                    ", ".join(table.key_ids))
        self._notify(old, table)
        return True

    def _failed(self, exc: Exception) -> bool:
        """Keep the last good table; warn once per new state of the file (its signature)."""
        try:
            self._signature = self._stat()
        except OSError:
            self._signature = None
        message = str(exc) if isinstance(exc, ValueError) else f"the keys file {self.path} is not readable"
        if message != self.last_error:
            logger.warning("%s; keeping the last good keys (%d tenants)", message, len(self._table.tenants))
        self.last_error = message
        return False

    def _notify(self, old: KeyTable, new: KeyTable) -> None:
        """Call ``on_reload``; its failure is logged and swallowed (authentication goes on)."""
        if self.on_reload is None:
            return
        try:
            self.on_reload(old, new)
        except Exception:  # noqa: BLE001 - an audit hook must not break authentication
            logger.exception("the keys file reload callback failed")


# --------------------------------------------------------------------------------------------
# Keys: strength, fresh keys, their file entry


def check_key_strength(key: str) -> None:
    """ValueError for a weak key: shorter than 32 characters, fewer than 8 distinct characters,
    or containing a known placeholder (``REPLACE_ME``, ``changeme``, ``test-key``, the example
    Secret's value, ...). The message never contains the key."""
    if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
        raise ValueError(f"the API key is too short: use at least {MIN_KEY_CHARS} random characters "
                         "(`dreamblend keys new` makes one)")
    if len(set(key)) < MIN_DISTINCT_CHARS:
        raise ValueError("the API key is too repetitive to be random (`dreamblend keys new` makes one)")
    lowered = key.lower()
    if any(placeholder in lowered for placeholder in PLACEHOLDERS):
        raise ValueError("the API key is an example placeholder: replace it with a random key "
                         "(`dreamblend keys new` makes one)")


def new_key() -> str:
    """A fresh key: ``dbk_`` and 32 random bytes, URL-safe base64 (47 characters)."""
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            check_key_strength(key)
        except ValueError:
            continue  # astronomically rare: random text containing a placeholder word
        return key


def key_entry(tenant: str, key_id: str, key: str) -> str:
    """The keys-file YAML of one tenant with one key (its sha256, never the key): a complete file
    on its own, or the lines to merge under an existing ``tenants:``/tenant."""
    Principal(tenant, key_id)  # validates both ids
    check_key_strength(key)
    return (f"tenants:\n"
            f"  {json.dumps(tenant)}:\n"
            f"    keys:\n"
            f"      - id: {json.dumps(key_id)}\n"
            f"        sha256: \"{hashlib.sha256(key.encode('utf-8')).hexdigest()}\"\n")


# --------------------------------------------------------------------------------------------
# The credentials of a request


def _header_values(headers, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), stripped. ``headers`` is a mapping or
    anything with ``items()``; Starlette's Headers yields repeated headers one by one."""
    items = headers.items() if hasattr(headers, "items") else headers
    return [str(value).strip() for key, value in items if str(key).lower() == name]


def _bearer(value: str) -> str | None:
    """The token of ``Bearer TOKEN`` (scheme case-insensitive), else None."""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def presented_credentials(headers) -> tuple[str | None, bool]:
    """(key, conflict): the key sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, and
    whether the request carries more than one credential that disagree (RFC 6750 section 2: a
    client must not use more than one method). Conflicts: both headers with different keys, an
    Authorization that is not a Bearer credential beside an X-API-Key, or a header repeated with
    different values. A conflict returns (None, True): answer 401 whatever the keys are.
    A lone non-Bearer Authorization (e.g. Basic) is no key: (None, False)."""
    authorizations = [value for value in _header_values(headers, "authorization") if value]
    api_keys = [value for value in _header_values(headers, "x-api-key") if value]
    if len(set(authorizations)) > 1 or len(set(api_keys)) > 1:
        return None, True
    bearer = _bearer(authorizations[0]) if authorizations else None
    api_key = api_keys[0] if api_keys else None
    if authorizations and api_key is not None:
        if bearer is None or bearer != api_key:
            return None, True
    return (bearer or api_key), False


# --------------------------------------------------------------------------------------------
# Throttling repeated authentication failures


class FailureThrottle:
    """Counts 401s per client address in a sliding window of ``window_s`` seconds; an address
    with ``limit`` failures in the window is blocked until the oldest of them leaves it.

    Memory is bounded: at most ``limit`` timestamps per address and ``max_addresses`` addresses
    (the least recently failing are forgotten first). Per process: with several ingress replicas
    each counts its own share, so a client may fail up to ``limit`` times per replica per window.
    """

    def __init__(self, limit: int = 10, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 10_000):
        for value, name in ((limit, "limit"), (max_addresses, "max_addresses")):
            if value is None:
                raise ValueError(f"{name} must be an integer >= 1")
            _check_positive(value, name)
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.limit, self.window_s, self.clock, self.max_addresses = limit, window_s, clock, max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def blocked(self, address: str | None) -> float:
        """Seconds ``address`` must wait before it may try again (0.0 when it is not blocked)."""
        with self._lock:
            times = self._failures.get(address or "unknown")
            if times is None:
                return 0.0
            now = self.clock()
            self._expire(times, now)
            if len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def record_failure(self, address: str | None) -> None:
        """Count one failed authentication from ``address``."""
        address = address or "unknown"
        with self._lock:
            now = self.clock()
            times = self._failures.pop(address, None) or deque(maxlen=self.limit)
            self._expire(times, now)
            times.append(now)
            self._failures[address] = times  # most recent last
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def _expire(self, times: deque, now: float) -> None:
        """Drop the failures older than the window."""
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def __len__(self) -> int:
        """How many addresses are tracked."""
        return len(self._failures)
