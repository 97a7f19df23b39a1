"""Enforces `auth.TokenBook` at the gRPC edge: authenticates every call to the ControlPlane
and Fleet services, checks the request's workspace, and exposes the caller to servicers
through `auth.current`. Health and reflection stay open, as probes expect."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from hotswap.control import auth

PROTECTED = {"hotswap.v1.ControlPlane": False, "hotswap.v1.Fleet": True}  # service -> engine?

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the runtime class is not generic
    Handler = grpc.RpcMethodHandler


def _rewrap(handler: Handler, **behavior: Any) -> Handler:
    kind, fn = next(iter(behavior.items()))
    factory: Callable[..., Handler] = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        fn,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, book: auth.TokenBook) -> None:
        self._book = book

    def _principal(self, details: grpc.HandlerCallDetails, engine_service: bool) -> auth.Principal:
        metadata = dict(details.invocation_metadata or ())
        value = metadata.get("authorization")
        principal = self._book.authenticate(value if isinstance(value, str) else None)
        if engine_service and not principal.engine:
            raise auth.PermissionDenied("only engine credentials may use the Fleet service")
        if not engine_service and principal.engine:
            raise auth.PermissionDenied("engine credentials cannot call the ControlPlane API")
        return principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.split("/")[1]
        if handler is None or service not in PROTECTED:
            return handler
        try:
            principal = self._principal(handler_call_details, PROTECTED[service])
        except auth.Unauthenticated as exc:
            return self._deny(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except auth.PermissionDenied as exc:
            return self._deny(handler, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self._as(handler, principal)

    @staticmethod
    def _deny(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
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

    @staticmethod
    def _as(handler: Handler, principal: auth.Principal) -> Handler:
        """The handler, run with `principal` as the caller and its workspace checked."""

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            workspace = getattr(request, "workspace", None)
            if isinstance(workspace, str) and workspace and not principal.may_use(workspace):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token {principal.name!r} has no rights to workspace {workspace!r}",
                )

        if handler.unary_unary:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                auth.current.set(principal)
                await checked(request, context)
                return await inner_uu(request, context)

            return _rewrap(handler, unary_unary=unary_unary)
        if handler.stream_unary:
            inner_su: Any = handler.stream_unary

            async def stream_unary(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                # The workspace is inside the stream (UploadModel's header): the servicer checks.
                auth.current.set(principal)
                return await inner_su(requests, context)

            return _rewrap(handler, stream_unary=stream_unary)
        if handler.unary_stream:
            inner_us: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                auth.current.set(principal)
                await checked(request, context)
                async for item in inner_us(request, context):
                    yield item

            return _rewrap(handler, unary_stream=unary_stream)
        inner_ss: Any = handler.stream_stream

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            auth.current.set(principal)
            async for item in inner_ss(requests, context):
                yield item

        return _rewrap(handler, stream_stream=stream_stream)
