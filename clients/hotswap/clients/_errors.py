"""Errors raised by the hotswap SDK. Every one carries the server's message, never a raw gRPC
traceback: the transport error is mapped once, where the RPC is made (``_rpc.py``).

    HotswapError                       base of everything the SDK raises on purpose
    ├── EntityNotFoundError            NOT_FOUND: unknown workspace, model, pipeline or version
    ├── EntityExistsError              ALREADY_EXISTS: the name is taken
    ├── InvalidInputError              INVALID_ARGUMENT, OUT_OF_RANGE: bad ONNX, bad data, bad name
    ├── DeploymentError                FAILED_PRECONDITION: swap aborted, pipeline not deployed
    │   └── ConcurrentDeployError      ABORTED: someone else changed the deployment first
    ├── LimitExceededError             RESOURCE_EXHAUSTED: a size limit
    ├── UnavailableError               UNAVAILABLE: server down, or no engine ready
    ├── HotswapTimeoutError            DEADLINE_EXCEEDED (also a built-in ``TimeoutError``)
    │   └── InferenceTimeoutError      DEADLINE_EXCEEDED on ``Pipeline.infer``
    └── ServerError                    anything else (INTERNAL, UNKNOWN, ...): a server bug
"""

from __future__ import annotations

import grpc

__all__ = [
    "ConcurrentDeployError",
    "DeploymentError",
    "EntityExistsError",
    "EntityNotFoundError",
    "HotswapError",
    "HotswapTimeoutError",
    "InferenceTimeoutError",
    "InvalidInputError",
    "LimitExceededError",
    "ServerError",
    "UnavailableError",
    "error_for_status",
]


class HotswapError(Exception):
    """Base class of every error the SDK raises on purpose.

    Attributes:
        message: What went wrong, as the server (or the SDK) said it.
        code: The gRPC status code behind the error, or ``None`` when the SDK raised it itself.
    """

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class EntityNotFoundError(HotswapError):
    """The workspace, model, pipeline or version does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class EntityExistsError(HotswapError):
    """An entity with that name already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidInputError(HotswapError):
    """The request was rejected as invalid: the message says what to change."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeploymentError(HotswapError):
    """A deployment could not be made (the previous version keeps serving), or the pipeline is
    not deployed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConcurrentDeployError(DeploymentError):
    """The deployment changed under this call (a concurrent deploy won): re-read and retry."""

    code = grpc.StatusCode.ABORTED


class LimitExceededError(HotswapError):
    """A size or count limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(HotswapError):
    """The server cannot be reached, or no engine is ready to serve."""

    code = grpc.StatusCode.UNAVAILABLE


class HotswapTimeoutError(HotswapError, TimeoutError):
    """A call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InferenceTimeoutError(HotswapTimeoutError):
    """An inference did not finish within its timeout."""


class ServerError(HotswapError):
    """The server failed in a way it did not expect (a bug worth reporting)."""

    code = grpc.StatusCode.INTERNAL


# Most specific first; a code absent here becomes a ServerError.
_BY_CODE: dict[grpc.StatusCode, type[HotswapError]] = {
    grpc.StatusCode.NOT_FOUND: EntityNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: EntityExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.ABORTED: ConcurrentDeployError,
    grpc.StatusCode.FAILED_PRECONDITION: DeploymentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: HotswapTimeoutError,
}


def error_for_status(code: grpc.StatusCode, message: str) -> HotswapError:
    """Builds the SDK error for a gRPC status code and message.

    Args:
        code: The status code the server (or the channel) returned.
        message: The status details.

    Returns:
        An instance of the most specific :class:`HotswapError` subclass for ``code``.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return ServerError(f"{code.name}: {message}" if message else code.name, code=code)
    return cls(message or code.name.replace("_", " ").lower(), code=code)


def from_rpc_error(err: grpc.RpcError, *, target: str) -> HotswapError:
    """Maps a grpc ``RpcError`` to an SDK error, adding where the call went when it never got
    there (UNAVAILABLE straight from the channel)."""
    if not isinstance(err, grpc.Call):
        return ServerError(f"gRPC call to {target} failed: {err}")
    code = err.code()
    message = err.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and _is_connect_failure(message):
        message = f"cannot reach {target}: {message}"
    return error_for_status(code, message)


def _is_connect_failure(message: str) -> bool:
    lowered = message.lower()
    return any(s in lowered for s in ("failed to connect", "connection refused", "dns resolution"))
