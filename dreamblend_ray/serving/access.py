"""The ingress's view of every request: its id, one access line, the HTTP metrics, recent latencies.

:class:`AccessMiddleware` is the outermost ASGI middleware of the API, so it sees every answer (401s,
413s and 429s of the inner middlewares included). Per request it

- takes the request id (``X-Request-ID`` when valid, else a new one; ``observability.context``),
  binds it, with the tenant and route, to the request's context, and returns it on the response;
- logs one access line (``dreamblend_ray.access``): method, route template, status, latency,
  bytes in and out, tenant, request id (as fields in the JSON format);
- records ``dreamblend_http_requests``, ``_http_request_seconds``, ``_http_request_bytes``,
  ``_http_response_bytes`` and, for 413/429/503, ``_http_rejections`` with the reason the handler
  put in ``request.state.reject_reason`` (:func:`reject`);
- keeps the last :data:`RECENT` latencies of the generation routes for the status view.

Labels stay bounded: the route is the matched path template (``/v1/subjects/{subject_id}``) or
``other``; the tenant is the authenticated one, ``default`` without tenants, ``anonymous`` before
authentication.
"""

from __future__ import annotations

import collections
import logging
import time

from dreamblend_ray.config import DEFAULT_TENANT
from dreamblend_ray.observability import context, metrics

logger = logging.getLogger("dreamblend_ray.access")

RECENT = 256
STATUS_REASONS = {413: "body_too_large", 429: "quota", 503: "overloaded"}  # when no handler said why
ANONYMOUS = "anonymous"


def reject(request, reason: str) -> None:
    """Note why the request is refused (a ``catalog.REJECT_REASONS`` value) for the rejection metric."""
    request.state.reject_reason = reason


def route_template(scope) -> str:
    """The matched route's path template; for answers given before routing (401, 413, 429 of the
    middlewares) the template the path would have matched; else ``other``."""
    route = scope.get("route")
    if route is None:
        route = _match(scope)
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


def _match(scope):
    from starlette.routing import Match

    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches({**scope, "type": "http"})
        if match is Match.FULL:
            return route
    return None


def tenant_label(scope, auth_enabled: bool) -> str:
    """The authenticated tenant; ``anonymous`` when auth is on and none was; else ``default``."""
    principal = (scope.get("state") or {}).get("principal")
    if principal is not None:
        return principal.tenant
    return ANONYMOUS if auth_enabled else DEFAULT_TENANT


class AccessMiddleware:
    """ASGI middleware (outermost): request id, access log, ingress metrics, recent latencies.

    ``echo_request_id``: put ``X-Request-ID`` on the response. Behind Serve's HTTP proxy, which puts
    the id it passed in on every response itself, it is False, and the header is added only when
    the id had to be replaced (the proxy's guard is not installed)."""

    def __init__(self, app, recent: collections.deque | None = None, echo_request_id: bool = True,
                 auth_enabled: bool = False):
        self.app = app
        self.recent = recent if recent is not None else collections.deque(maxlen=RECENT)
        self.echo, self.auth_enabled = echo_request_id, auth_enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = scope.get("headers") or []
        sent_ids = [value for key, value in headers if key.lower() == context.HEADER.encode()]
        sent = sent_ids[0].decode("latin-1") if len(sent_ids) == 1 else None
        request_id = context.accept_request_id(sent)
        echo = self.echo or request_id != sent
        scope.setdefault("state", {})["request_id"] = request_id
        counts = {"in": 0, "out": 0, "status": 500}

        async def counted_receive():
            message = await receive()
            if message.get("type") == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def with_id(message):
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
            if message["type"] == "http.response.start" and echo:
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != context.HEADER.encode()]
                message = {**message, "headers": kept + [(context.HEADER.encode(), request_id.encode())]}
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        with context.bound(request=request_id):
            try:
                await self.app(scope, counted_receive, with_id)
            finally:
                try:
                    self._record(scope, request_id, counts, time.perf_counter() - start)
                except Exception:  # noqa: BLE001 - the answer is sent; a metric must never fail it
                    logger.exception("recording request %s failed", request_id)

    def _record(self, scope, request_id: str, counts: dict, seconds: float) -> None:
        status, route, method = counts["status"], route_template(scope), scope.get("method", "?")
        tenant = tenant_label(scope, self.auth_enabled)
        labels = {"route": route, "tenant": tenant}
        metrics.get("http_requests").inc(method=method, status=status, **labels)
        metrics.get("http_request_seconds").observe(seconds, route=route, method=method, status=status)
        metrics.get("http_request_bytes").inc(counts["in"], **labels)
        metrics.get("http_response_bytes").inc(counts["out"], **labels)
        if status in STATUS_REASONS:
            reason = (scope.get("state") or {}).get("reject_reason") or STATUS_REASONS[status]
            metrics.get("http_rejections").inc(status=status, reason=reason, tenant=tenant)
        if method == "POST" and route.startswith("/v1/generate"):
            self.recent.append((time.time(), status, seconds))
        level = logging.WARNING if status >= 500 else logging.INFO
        logger.log(level, "%s %s %d %.1f ms", method, route, status, seconds * 1000,
                   extra={"request_id": request_id, "route": route, "method": method, "status": status,
                          "latency_ms": round(seconds * 1000, 1), "bytes_in": counts["in"],
                          "bytes_out": counts["out"], "tenant": tenant})
