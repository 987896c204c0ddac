"""The request a line of work belongs to: its id, route and tenant, carried in context variables.

A request id ties an HTTP request to every line it causes: the ingress's access line, the model
replica's lines, the continuous batch's, the subject record and the webhook payloads. A client may
send ``X-Request-ID``; it is kept when it is a plausible id (:func:`valid_request_id`: 8 to 128
characters of letters, digits and ``-_.:+/=``, the set of UUIDs, ULIDs, W3C trace ids and base64
tokens) and replaced by a new one otherwise, so a hostile header never reaches a log line, a record
or a response. Serve's proxy accepts any header, so :func:`proxy_middlewares` (wired by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``) applies the same rule before the proxy reads it.

Context variables follow asyncio tasks and ``asyncio.to_thread``; work that outlives the request
(the continuous batch's loop, the scheduler) passes the id explicitly and :func:`bound` sets it.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import sys
import uuid

HEADER = "x-request-id"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "dreamblend_ray.observability.context:proxy_middlewares"
_VALID = re.compile(r"[A-Za-z0-9._:+/=-]{8,128}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("dreamblend_request_id", default=None)
route: contextvars.ContextVar[str | None] = contextvars.ContextVar("dreamblend_route", default=None)
tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("dreamblend_tenant", default=None)
training_kind: contextvars.ContextVar[str] = contextvars.ContextVar("dreamblend_training_kind", default="job")


def valid_request_id(value) -> bool:
    """Whether ``value`` is an acceptable client-sent request id."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value) -> str:
    """``value`` when it is a valid id, else a new one."""
    return value if valid_request_id(value) else new_request_id()


def current_request_id() -> str | None:
    """This context's request id; inside a Serve replica without one, Serve's request context's."""
    value = request_id.get()
    if value is None:
        value = _serve_request_id()
    return value


def _serve_request_id() -> str | None:
    """Serve's request id, only where Serve is loaded already (a replica): importing it from a log
    filter would cost a second and re-attach Serve's own console handler mid-record."""
    serve_context = sys.modules.get("ray.serve.context")
    if serve_context is None:
        return None
    value = serve_context._get_serve_request_context().request_id
    return value if valid_request_id(value) else None


@contextlib.contextmanager
def bound(request: str | None = None, tenant_id: str | None = None, route_template: str | None = None):
    """Set the given parts of the context for the block (the ones left None are unchanged)."""
    tokens = [(var, var.set(value)) for var, value in ((request_id, request), (tenant, tenant_id),
                                                      (route, route_template)) if value is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# --------------------------------------------------------------------------- Serve's HTTP proxy

class RequestIdGuard:
    """ASGI middleware for Serve's HTTP proxy: an invalid ``X-Request-ID`` is replaced by a new id
    before the proxy's own middleware takes it as the request's id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != HEADER.encode()]
            sent = [v for k, v in scope.get("headers", []) if k.lower() == HEADER.encode()]
            value = sent[0].decode("latin-1") if len(sent) == 1 else None
            if len(sent) != 1 or not valid_request_id(value):
                value = new_request_id() if sent else None
            if value is not None:
                headers.append((HEADER.encode(), value.encode("latin-1")))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """The HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the request id guard."""
    from starlette.middleware import Middleware

    return [Middleware(RequestIdGuard)]
