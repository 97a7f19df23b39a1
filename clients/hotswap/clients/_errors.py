"""Errors raised by the hotswap SDK. Every one carries the server's message, never a raw gRPC
traceback: the transport error is mapped once, where the RPC is made (``_rpc.py``).

    HotswapError                       base of everything the SDK raises on purpose
    ├── AuthenticationError            UNAUTHENTICATED: no token, or one the server does not know
    ├── PermissionDeniedError          PERMISSION_DENIED: the token has no rights to that
    ├── DataLossError                  DATA_LOSS: stored bytes no longer match their sha256
    ├── InsecureTransportError         (the SDK) a token would travel in cleartext
    ├── EntityNotFoundError            NOT_FOUND: unknown workspace, model, pipeline or version
    ├── EntityExistsError              ALREADY_EXISTS: the name is taken
    ├── InvalidInputError              INVALID_ARGUMENT, OUT_OF_RANGE: bad ONNX, bad data, bad name
    ├── DeploymentError                FAILED_PRECONDITION: swap aborted, pipeline not deployed
    │   └── ConcurrentDeployError      ABORTED: someone else changed the deployment first
    ├── LimitExceededError             RESOURCE_EXHAUSTED: a size limit
    ├── UnavailableError               UNAVAILABLE: server down, or no engine ready
    ├── HotswapTimeoutError            DEADLINE_EXCEEDED (also a built-in ``TimeoutError``)
    │   └── InferenceTimeoutError      DEADLINE_EXCEEDED on ``Pipeline.infer``
    ├── CancelledError                 CANCELLED: the call was cancelled before it finished
    └── ServerError                    anything else (INTERNAL, UNKNOWN, ...): a server bug

    HotswapWarning                     something happened that needs a look, though the call
    │                                  succeeded (e.g. an engine did not confirm a commit)
    └── InsecureTransportWarning       a token is sent in cleartext because that was allowed
"""

from __future__ import annotations

import grpc

__all__ = [
    "AuthenticationError",
    "CancelledError",
    "ConcurrentDeployError",
    "DataLossError",
    "DeploymentError",
    "EntityExistsError",
    "EntityNotFoundError",
    "HotswapError",
    "HotswapTimeoutError",
    "HotswapWarning",
    "InferenceTimeoutError",
    "InsecureTransportError",
    "InsecureTransportWarning",
    "InvalidInputError",
    "LimitExceededError",
    "PermissionDeniedError",
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


class AuthenticationError(HotswapError):
    """The server needs a bearer token, or does not know the one given: pass ``token=`` (or
    set ``HOTSWAP_TOKEN``)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(HotswapError):
    """The token is valid but has no rights to what was asked (another workspace)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DataLossError(HotswapError):
    """Stored bytes no longer match their sha256 (disk corruption on the server)."""

    code = grpc.StatusCode.DATA_LOSS


class InsecureTransportError(HotswapError):
    """The SDK refused to send a bearer token in cleartext to a non-loopback address."""


class CancelledError(HotswapError):
    """The call was cancelled before it finished."""

    code = grpc.StatusCode.CANCELLED


class HotswapWarning(UserWarning):
    """A call succeeded but something in it needs a look (the message says what)."""


class InsecureTransportWarning(HotswapWarning):
    """A bearer token is being sent in cleartext, because ``allow_plaintext_token`` is set."""


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
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.CANCELLED: CancelledError,
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


def from_rpc_error(
    err: grpc.RpcError, *, target: str, timeout: float | None = None
) -> HotswapError:
    """Maps a grpc ``RpcError`` to an SDK error, adding where the call went when it never got
    there (UNAVAILABLE straight from the channel) or never came back (a deadline)."""
    if not isinstance(err, grpc.Call):
        return ServerError(f"gRPC call to {target} failed: {err}")
    code = err.code()
    message = err.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and _is_connect_failure(message):
        message = f"cannot reach {target}: {message}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED and message.lower() == "deadline exceeded":
        waited = f" within {timeout:g} s" if timeout else ""
        message = (
            f"no answer from {target}{waited}: it may be stopped, stalled or overloaded "
            "(check it, or pass a longer timeout)"
        )
    return error_for_status(code, message)


def _is_connect_failure(message: str) -> bool:
    lowered = message.lower()
    return any(s in lowered for s in ("failed to connect", "connection refused", "dns resolution"))
