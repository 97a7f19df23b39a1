"""Shared gRPC edge helpers: mapping domain errors to status codes, and channel options.

Lives beside the generated ``hotswap.v1`` code because both servers (control plane and engine)
use it and neither should import the other. Domain code never imports this module.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
StatusTable = Mapping[type[Exception], grpc.StatusCode]

# gRPC's 4 MiB default is too small for large Arrow batches.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def status_for(table: StatusTable, exc: Exception) -> grpc.StatusCode | None:
    """The code of the most specific class in `table` that `exc` is an instance of."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


def unary_errors(
    table: StatusTable,
) -> Callable[
    [Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]],
    Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
]:
    """Decorates a unary (or client-streaming) servicer method: a domain error listed in
    `table` becomes its status code with the error's message; anything else propagates (grpc
    logs it and answers UNKNOWN)."""

    def decorate(
        method: Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Response:
            try:
                return await method(self, request, context)
            except Exception as exc:
                code = status_for(table, exc)
                if code is None:
                    raise
                await context.abort(code, str(exc))

        return wrapper

    return decorate


def stream_errors(
    table: StatusTable,
) -> Callable[
    [Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]]],
    Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]],
]:
    """Like `unary_errors`, for server-streaming methods (async generators)."""

    def decorate(
        method: Callable[
            [Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]
        ],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Response]]:
        @functools.wraps(method)
        async def wrapper(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Response]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                code = status_for(table, exc)
                if code is None:
                    raise
                await context.abort(code, str(exc))

        return wrapper

    return decorate


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Let clients keep idle connections open with keepalive pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
