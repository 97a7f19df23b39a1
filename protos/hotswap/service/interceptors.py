"""`GuardInterceptor`, which both services use to admit each call of their guarded services
(authentication and workspace checks, supplied by each service). The streams anyone may
hold without a token are capped in `probes`, not here: an interceptor costs every call."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from hotswap.service.edge import StatusTable, status_for

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the runtime class is not generic
    Handler = grpc.RpcMethodHandler

# Checks one call's request (None for client-streaming calls) and sets the caller's context
# variables; raises a domain error (mapped by the guard's status table) to refuse it.
Enter = Callable[[Any], None]


def _rewrap(handler: Handler, **behavior: Any) -> Handler:
    kind, fn = next(iter(behavior.items()))
    factory: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        fn,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call of the services `guarded` names through `admit(method, metadata)`,
    which authenticates the caller and returns how to enter the handler. Errors listed in
    `table` (from `admit` or the returned `Enter`) become their status codes; the handler
    never runs for a refused call. Calls to other services (health) pass untouched."""

    def __init__(
        self,
        guarded: Callable[[str], bool],
        admit: Callable[[str, Mapping[str, str]], Enter],
        table: StatusTable,
    ) -> None:
        self._guarded = guarded
        self._admit = admit
        self._table = table

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        service = details.method.split("/")[1] if details.method.count("/") >= 2 else ""
        if handler is None or not self._guarded(service):
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            enter = self._admit(details.method, metadata)
        except Exception as exc:
            code = status_for(self._table, exc)
            if code is None:
                raise
            return _refuse(handler, code, str(exc))
        return self._entered(handler, enter)

    def _entered(self, handler: Handler, enter: Enter) -> Handler:
        table = self._table

        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                enter(request)
            except Exception as exc:
                code = status_for(table, exc)
                if code is None:
                    raise
                await context.abort(code, str(exc))

        if handler.unary_unary:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(request, context)
                return await inner_uu(request, context)

            return _rewrap(handler, unary_unary=unary_unary)
        if handler.stream_unary:
            inner_su: Any = handler.stream_unary

            async def stream_unary(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                await check(None, context)  # what the stream names is checked by the servicer
                return await inner_su(requests, context)

            return _rewrap(handler, stream_unary=stream_unary)
        if handler.unary_stream:
            return _rewrap(handler, unary_stream=_around_stream(handler.unary_stream, check))
        return _rewrap(handler, stream_stream=_around_stream(handler.stream_stream, check, False))


def _around_stream(
    inner: Any,
    before: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]],
    pass_request: bool = True,
    after: Callable[[], None] = lambda: None,
) -> Any:
    """A streaming handler that awaits `before(request or None, context)`, runs `inner`, then
    `after()`; whichever way `inner` streams (an async generator that yields, or a coroutine
    that calls ``context.write``, as grpcio-health-checking's Watch does)."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                await before(request if pass_request else None, context)
                async for item in inner(request, context):
                    yield item
            finally:
                after()

        return generator

    async def writer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            await before(request if pass_request else None, context)
            return await inner(request, context)
        finally:
            after()

    return writer


def _refuse(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def abort_stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return _rewrap(handler, unary_unary=abort)
    if handler.stream_unary:
        return _rewrap(handler, stream_unary=abort)
    if handler.unary_stream:
        return _rewrap(handler, unary_stream=abort_stream)
    return _rewrap(handler, stream_stream=abort_stream)
