"""Log lines that say which request they belong to, as text or as one JSON object per line.

:class:`ContextFilter` puts the request id, tenant and route of the current context
(:mod:`dreamblend_ray.observability.context`) on every record; :class:`JsonFormatter` writes a
record as ``{"time", "level", "logger", "message", "request_id", "tenant", "route", "status",
"latency_ms", ...}`` (the fields a record has; an exception as ``"exc"``). ``--log-format json`` on
any command, and the Serve app's ``log_format: json``, switch to it; text stays the console's default.

On a Serve replica, :func:`install_replica_logging` gives this package's loggers a handler on the
worker's stderr (Ray keeps it in the session's ``worker-*.err`` files and forwards it to the
driver) and one on ``{ray session}/logs/dreamblend/{component}-{pid}.log``: the replica's own file,
in the chosen format, that operators and the tests read a request's lines from.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from dreamblend_ray.observability import context

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
# Record attributes worth a JSON field when a line carries them (``extra=`` of a log call).
FIELDS = ("request_id", "tenant", "route", "method", "status", "latency_ms", "bytes_in", "bytes_out",
          "replica", "subject", "job_id", "rows", "reason")
REPLICA_HANDLER = "dreamblend_replica"


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``tenant`` and ``route`` from the context (unless the call gave them),
    and ``request_tag`` (`` [id]`` or empty) for the text format."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = context.current_request_id()
        for name, var in (("tenant", context.tenant), ("route", context.route)):
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        record.request_tag = f" [{record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _iso(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The text format, with `` [request id]`` after the logger's name when there is one."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_tag"):
            record.request_tag = ""
        return super().format(record)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {value!r}")
    return value


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if check_format(log_format) == "json" else TextFormatter()


def replica_log_path(component: str) -> Path:
    """``{Ray session}/logs/dreamblend/{component}-{pid}.log`` (or ``$DREAMBLEND_LOG_DIR``)."""
    root = os.environ.get("DREAMBLEND_LOG_DIR") or _session_logs()
    return Path(root) / f"{component}-{os.getpid()}.log"


def _session_logs() -> str:
    """The Ray session's logs folder + ``/dreamblend`` (a temp folder outside a Ray worker)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None  # noqa: SLF001
    if node is None:  # Ray has no public accessor for the session's logs folder
        import tempfile

        return str(Path(tempfile.gettempdir()) / "dreamblend-logs")
    return str(Path(node.get_logs_dir_path()) / "dreamblend")


def install_replica_logging(component: str, log_format: str = "text", level: int = logging.INFO) -> Path:
    """This package's lines on a Serve replica: the worker's real stderr (Serve redirects
    ``sys.stderr`` into its own logger) and the replica's own file, with the request
    context, in ``log_format``. Idempotent; returns the file's path."""
    package = logging.getLogger("dreamblend_ray")
    for handler in [h for h in package.handlers if getattr(h, REPLICA_HANDLER, False)]:
        package.removeHandler(handler)
        handler.close()
    path = replica_log_path(component)
    path.parent.mkdir(parents=True, exist_ok=True)
    for handler in (logging.StreamHandler(sys.__stderr__), logging.FileHandler(path, encoding="utf-8")):
        setattr(handler, REPLICA_HANDLER, True)
        handler.addFilter(ContextFilter())
        handler.setFormatter(formatter(log_format))
        package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False  # Ray's root handler would print each line a second time
    return path
