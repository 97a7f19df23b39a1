"""Errors raised by the engine's domain code. They carry no transport codes: the servicer maps
them to gRPC status codes once, at the edge (``hotswap.engine._convert``).

    EngineError
    ├── InvalidInput          bad Arrow, wrong column/width/dtype, nulls   (INVALID_ARGUMENT)
    ├── PipelineNotServed     the engine does not serve that pipeline      (NOT_FOUND)
    ├── PipelineLoading       assigned, first version still loading       (UNAVAILABLE)
    ├── RequestTooLarge       more rows than --max-rows                    (RESOURCE_EXHAUSTED)
    ├── Overloaded            the inference queue is full                  (RESOURCE_EXHAUSTED)
    ├── ModelUnavailable      a model's own process died; it is restarting (UNAVAILABLE)
    ├── access.Unauthenticated / access.PermissionDenied   token checks   (UNAUTHENTICATED, ...)
    └── PrepareError          a version could not be fetched, built or warmed up (`cause`)
        ├── BlobError         a blob could not be fetched or failed its sha256 check
        ├── WarmupFailed      the warm-up inference failed
        └── NotPrepared       commit of a swap this engine did not prepare
"""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidInput(EngineError):
    """The request's data cannot be served: the message says what to change."""


class PipelineNotServed(EngineError):
    """The engine serves no pipeline by that name."""


class PipelineLoading(EngineError):
    """The pipeline is assigned to this engine but not loaded yet."""


class RequestTooLarge(EngineError):
    """The request has more rows than the engine accepts in one call."""


class Overloaded(EngineError):
    """More requests wait for an inference thread than the engine queues (--max-queued)."""


class ModelUnavailable(EngineError):
    """The process serving a big model (`model_process`) ended; a new one is loading it."""


class PrepareError(EngineError):
    """A pipeline version could not be made ready to serve. `cause` names the stage that
    failed, for the fleet protocol's typed cause and the metrics."""

    cause = "build"


class BlobError(PrepareError):
    """A model blob could not be fetched, or its bytes do not match its sha256."""

    cause = "fetch"


class WarmupFailed(PrepareError):
    """The warm-up inference of a built version failed."""

    cause = "warmup"


class NotPrepared(PrepareError):
    """A commit named a swap this engine did not prepare (or that was aborted)."""

    cause = "not_prepared"
