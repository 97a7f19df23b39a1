"""Structured logs for both services: text for people (default) or one JSON object per line.

The request id, pipeline and version of the work at hand travel in `contextvars`, so every log
line written while handling a request carries them without being passed around. The request
id comes from the caller's ``x-request-id`` metadata (the SDK always sends one) or is made up.
Never log model bytes, tensors or credentials: messages here are for operators.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

REQUEST_ID_HEADER = "x-request-id"

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
pipeline: contextvars.ContextVar[str] = contextvars.ContextVar("pipeline", default="")
version: contextvars.ContextVar[int] = contextvars.ContextVar("version", default=0)

_FIELDS = ("request_id", "pipeline", "version")


def new_request_id() -> str:
    return uuid.uuid4().hex


class _ContextFilter(logging.Filter):
    """Copies the context variables onto every record (as attributes formatters can read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.pipeline = pipeline.get()
        record.version = version.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, service and the
    context fields that are set; exceptions as a single string."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self._service,
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value:
                doc[name] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL service logger: message [request_id=... pipeline=... version=...]``."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={getattr(record, name)}" for name in _FIELDS if getattr(record, name, None)
        )
        return f"{text} [{extra}]" if extra else text


def configure(service: str, log_format: str, level: str = "INFO") -> None:
    """Sets up the root logger for a service process (called once, in its ``main``)."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def request_id_of(metadata: Any) -> str:
    """The caller's ``x-request-id`` from invocation metadata, or "" when absent."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Sets `request_id` for each RPC (the caller's, else a new one) before its handler runs.

    For the control plane, whose RPCs are few and slow; the engine's Infer path skips it.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        given = request_id_of(handler_call_details.invocation_metadata)
        # An engine's Fleet stream lasts for hours: an id made up for it would tag unrelated
        # lines, so only the caller's own id is used there.
        if given or not handler_call_details.method.startswith("/hotswap.v1.Fleet/"):
            request_id.set(given or new_request_id())
        return await continuation(handler_call_details)
