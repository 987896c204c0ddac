"""Guards for what the service fetches or calls on a client's behalf (SSRF).

Two kinds of client-supplied location reach the service: URLs (webhook receivers, https image
sources) and storage URIs (``image_uris``). Both are checked here, before anything is fetched:

- :func:`check_outbound_url` accepts https URLs (http only when the policy allows it) without
  userinfo, whose host, when asked, is on the operator's allow-list, and whose every resolved
  address is public: loopback, private, CGNAT and unique-local addresses only when the policy
  allows them; link-local (cloud metadata at 169.254.169.254), multicast, unspecified and
  reserved addresses never, nor IPv6 addresses that embed one of those (IPv4-mapped, 6to4, NAT64,
  Teredo).
- :func:`safe_post` and :func:`safe_get` check the URL, then connect to the address that was
  checked (not to the name, which DNS could rebind between check and connect), send the original
  host as ``Host`` and TLS SNI (so certificates are verified against the name), never follow a
  redirect, and bound every socket operation by a timeout.
- :func:`check_storage_source` accepts a storage URI only under one of the operator's prefixes,
  on path-segment boundaries, refusing ``..``, empty segments, NUL and backslashes, and resolving
  local symlinks first.

Refusals are ValueErrors that name the rule and at most the host, never the resolved address, the
path or the query (they may reach a client, and must not map the internal network for it).
This module is the bottom layer: standard library only.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

logger = logging.getLogger(__name__)

# Private networks an operator may allow (RFC 1918, RFC 6598 CGNAT, RFC 4193 unique-local).
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in
                         ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64, RFC 8215).
NAT64_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48"))
LOOPBACK_NAMES = ("localhost",)
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[A-Za-z0-9._-]+$")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_READ_CHUNK = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NetPolicy:
    """Where outbound requests may go.

    allow_hosts: https hosts allowed as image sources (exact, lower-case host names or IP literals).
    allow_private: allow 10/8, 172.16/12, 192.168/16, 100.64/10 (CGNAT) and fc00::/7.
    allow_loopback: allow 127/8, ::1 and ``localhost`` (tests, a sidecar receiver).
    require_https: refuse plain http.
    """

    allow_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    allow_loopback: bool = False
    require_https: bool = True

    def __post_init__(self):
        if not isinstance(self.allow_hosts, tuple):
            raise ValueError(f"NetPolicy.allow_hosts must be a tuple of host names, "
                             f"got {type(self.allow_hosts).__name__}")
        for host in self.allow_hosts:
            if not isinstance(host, str) or host != host.lower() \
                    or not (_HOST_NAME.match(host) or _is_ip_literal(host)):
                raise ValueError(f"NetPolicy.allow_hosts entries must be bare lower-case host names "
                                 f"(no scheme, port, path or upper case), got {host!r}")
        for name in ("allow_private", "allow_loopback", "require_https"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NetPolicy.{name} must be true or false, got {getattr(self, name)!r}")


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_outbound_url(url: str, policy: NetPolicy, *, resolve=socket.getaddrinfo,
                       need_allow_list: bool) -> list[str]:
    """Check ``url`` against ``policy``; return the resolved IP addresses, all of them allowed.

    ``resolve`` is ``socket.getaddrinfo`` (tests inject their own). ``need_allow_list`` demands
    the host be in ``policy.allow_hosts`` (image sources); webhooks pass False. Raises ValueError
    naming the rule broken (and at most the host).
    """
    parts = _parse_url(url, policy)
    host = parts.hostname
    if need_allow_list and host.rstrip(".") not in policy.allow_hosts:
        raise ValueError(f"URL refused: host {host!r} is not on the operator's allow-list")
    if (host.rstrip(".") in LOOPBACK_NAMES or host.rstrip(".").endswith(".localhost")) \
            and not policy.allow_loopback:
        raise ValueError(f"URL refused: host {host!r} is loopback (not allowed by the policy)")
    addresses = _resolve(host, _port(parts), resolve)
    for address in addresses:
        rule = address_rule(address, policy)
        if rule:
            raise ValueError(f"URL refused: host {host!r} resolves to {rule}")
    return [str(address) for address in addresses]


def _parse_url(url: str, policy: NetPolicy) -> SplitResult:
    """Split ``url``; ValueError unless its scheme, userinfo, host and port pass the policy."""
    if not isinstance(url, str) or not url:
        raise ValueError("URL refused: it must be a non-empty string")
    if _CONTROL.search(url):
        raise ValueError("URL refused: it contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("URL refused: it could not be parsed (bad host or port)") from None
    allowed = ("https",) if policy.require_https else ("https", "http")
    if parts.scheme.lower() not in allowed:
        raise ValueError(f"URL refused: the scheme must be {' or '.join(allowed)}")
    if "@" in parts.netloc:
        raise ValueError("URL refused: credentials in the URL (user:pass@host) are not accepted")
    if not parts.hostname:
        raise ValueError("URL refused: it names no host")
    return parts


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def _resolve(host: str, port: int, resolve) -> list[Address]:
    """The distinct addresses ``host`` resolves to, in the resolver's order."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(f"URL refused: host {host!r} could not be resolved") from None
    addresses: list[Address] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        except ValueError:
            raise ValueError(f"URL refused: host {host!r} resolved to something not an IP address") from None
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ValueError(f"URL refused: host {host!r} resolved to no address")
    return addresses


def address_rule(address: Address, policy: NetPolicy) -> str | None:
    """The rule ``address`` breaks under ``policy`` (a phrase such as ``"a private address (...)"``),
    or None when it may be contacted. Pure."""
    embedded, only = _embedded_ipv4(address)
    if embedded is not None:
        rule = address_rule(embedded, policy)
        if rule:
            return f"an IPv6 address that embeds {rule}"
        if only:
            return None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address (never allowed: cloud metadata lives there)"
    if address.is_loopback:
        return None if policy.allow_loopback else "a loopback address (not allowed by the policy)"
    if address.is_multicast:
        return "a multicast address"
    if any(address in network for network in PRIVATE_NETWORKS if network.version == address.version):
        return None if policy.allow_private else "a private address (not allowed by the policy)"
    if address.is_reserved or getattr(address, "is_site_local", False) or not address.is_global:
        return "a reserved address"
    return None


def _embedded_ipv4(address: Address) -> tuple[ipaddress.IPv4Address | None, bool]:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo client), if any, and
    whether that IPv4 address is the real destination (mapped and NAT64: nothing else to check)."""
    if address.version == 4:
        return None, False
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, True
    if any(address in network for network in NAT64_NETWORKS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), True
    if address.sixtofour is not None:
        return address.sixtofour, False
    if address.teredo is not None:
        return address.teredo[1], False
    return None, False


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a checked IP address; ``Host`` stays the URL's host."""

    def __init__(self, host: str, ip: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked IP address; SNI, certificate check and ``Host`` use the URL's host."""

    def __init__(self, host: str, ip: str, port: int, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _open(parts: SplitResult, ips: list[str], timeout_s: float) -> http.client.HTTPConnection:
    """A connected connection to the first checked address that answers."""
    host, port = parts.hostname, _port(parts)
    error: OSError | None = None
    for ip in ips:
        if parts.scheme.lower() == "https":
            conn = _PinnedHTTPSConnection(host, ip, port, timeout_s, ssl.create_default_context())
        else:
            conn = _PinnedHTTPConnection(host, ip, port, timeout_s)
        try:
            conn.connect()
            return conn
        except OSError as exc:
            conn.close()
            error = exc
    raise error


def _target(parts: SplitResult) -> str:
    """The request target: path and query, never the fragment."""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _check_timeout(timeout_s: float) -> None:
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 0 < timeout_s <= 300:
        raise ValueError(f"timeout_s must be a number of seconds in (0, 300], got {timeout_s!r}")


def safe_post(url: str, body: bytes, headers: dict, policy: NetPolicy, timeout_s: float, *,
              need_allow_list: bool = False, resolve=socket.getaddrinfo) -> int:
    """POST ``body`` to ``url`` after :func:`check_outbound_url`; return the HTTP status.

    Connects to a checked address only; a redirect is returned as its 3xx status, not followed.
    Connection errors and timeouts raise (OSError, ``http.client.HTTPException``).
    """
    _check_timeout(timeout_s)
    ips = check_outbound_url(url, policy, resolve=resolve, need_allow_list=need_allow_list)
    parts = urlsplit(url)
    conn = _open(parts, ips, timeout_s)
    try:
        conn.request("POST", _target(parts), body=body, headers=dict(headers))
        return conn.getresponse().status
    finally:
        conn.close()


def safe_get(url: str, policy: NetPolicy, timeout_s: float, max_bytes: int, *,
             resolve=socket.getaddrinfo) -> bytes:
    """GET ``url`` from an allow-listed host (:func:`check_outbound_url` with the allow-list);
    return the body. ValueError for a non-2xx status (redirects are not followed) or a body over
    ``max_bytes``; TimeoutError when the whole read takes longer than ``timeout_s``."""
    _check_timeout(timeout_s)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    ips = check_outbound_url(url, policy, resolve=resolve, need_allow_list=True)
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    conn = _open(parts, ips, timeout_s)
    try:
        conn.request("GET", _target(parts), headers={"Accept": "image/*"})
        response = conn.getresponse()
        if not 200 <= response.status < 300:
            raise ValueError(f"fetch from {parts.hostname!r} answered HTTP {response.status} "
                             f"(redirects are not followed)")
        return _read_bounded(response, max_bytes, deadline, parts.hostname)
    finally:
        conn.close()


def _read_bounded(response: http.client.HTTPResponse, max_bytes: int, deadline: float, host: str) -> bytes:
    """At most ``max_bytes`` of the body, before ``deadline``; ValueError when there is more."""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ValueError(f"fetch from {host!r} refused: the body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    while chunk := response.read(min(_READ_CHUNK, max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"fetch from {host!r} refused: the body is larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fetch from {host!r} took longer than its timeout")
    return b"".join(chunks)


def check_storage_source(uri: str, allowed_prefixes: tuple[str, ...]) -> str:
    """The normalised form of storage ``uri`` if it lies under one of ``allowed_prefixes``.

    Remote URIs (``s3://bucket/key``, ``gs://...``) must have a plain bucket and a key without
    ``.``/``..`` or empty segments, ``%``, ``?``, ``#``, and match a prefix of the same scheme and
    bucket on a segment boundary. Local paths (or ``file://``) must have no ``..`` or empty
    segment; they and the local prefixes are resolved with ``os.path.realpath`` (so a symlink
    cannot lead out) and come back as absolute real paths. ValueError names the rule, not the path.
    """
    if not isinstance(allowed_prefixes, tuple) or not allowed_prefixes:
        raise ValueError("storage source refused: no storage prefix is allowed")
    source = _normalise_source(uri, "storage source refused")
    for prefix in allowed_prefixes:
        root = _normalise_source(prefix, "an allowed storage prefix is invalid")
        if source == root or source.startswith(root.rstrip("/") + "/"):
            return source
    raise ValueError("storage source refused: it is not under an allowed storage prefix")


def _normalise_source(uri: str, what: str) -> str:
    """A canonical form for prefix matching; ValueError("{what}: {rule}") for a bad URI."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"{what}: it must be a non-empty string")
    if "\x00" in uri or "\\" in uri:
        raise ValueError(f"{what}: NUL characters and backslashes are not accepted")
    if _CONTROL.search(uri.replace(" ", "")):
        raise ValueError(f"{what}: control characters are not accepted")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else ""
    if scheme not in ("", "file"):
        return _normalise_remote(scheme, uri[match.end():], what)
    path = uri[match.end():] if match else uri
    if not path:
        raise ValueError(f"{what}: it names no path")
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    _check_segments(segments[:-1] if segments[-1] == "" else segments, what)
    return os.path.realpath(path)


def _normalise_remote(scheme: str, rest: str, what: str) -> str:
    """``scheme://bucket/key`` with the key's trailing slash dropped."""
    if any(char in rest for char in "%?#"):
        raise ValueError(f"{what}: '%', '?' and '#' are not accepted in a storage URI")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"{what}: the URI must name a plain bucket ({scheme}://bucket/key)")
    key = key[:-1] if key.endswith("/") else key
    if key:
        _check_segments(key.split("/"), what)
    return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def _check_segments(segments: list[str], what: str) -> None:
    if any(segment in ("", ".", "..") for segment in segments):
        raise ValueError(f"{what}: '.', '..' and empty path segments ('//') are not accepted")
