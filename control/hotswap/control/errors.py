"""Errors raised by the control plane's domain code. They carry no transport codes: the
servicers map them to gRPC status codes once, at the edge (``hotswap.control._status``).

    ControlError
    ├── InvalidArgument       bad name, bad ONNX, sha256 mismatch         (INVALID_ARGUMENT)
    ├── NotFound              unknown workspace/model/pipeline/version    (NOT_FOUND)
    ├── AlreadyExists         the name is taken                           (ALREADY_EXISTS)
    ├── LimitExceeded         a size limit                                (RESOURCE_EXHAUSTED)
    ├── DeployFailed          swap aborted, or pipeline not deployed      (FAILED_PRECONDITION)
    ├── DeployConflict        expected_current_version did not match      (ABORTED)
    ├── NoEngines             no engine connected to serve a deployment   (UNAVAILABLE)
    └── BlobCorrupt           a stored blob no longer matches its sha256  (DATA_LOSS)
"""


class ControlError(Exception):
    """Base of every error the control plane raises on purpose."""


class InvalidArgument(ControlError):
    """The request is malformed; the message says what to change."""


class NotFound(ControlError):
    """A named workspace, model, pipeline or version does not exist."""


class AlreadyExists(ControlError):
    """The name is already taken."""


class LimitExceeded(ControlError):
    """The request exceeds a configured limit (e.g. the model size limit)."""


class DeployFailed(ControlError):
    """A deploy could not complete; whatever served before still serves."""


class DeployConflict(ControlError):
    """Someone else deployed first (compare-and-set on the current version failed)."""


class FailedPrecondition(ControlError):
    """The pipeline is not in a state that allows this (e.g. a rollout of it is running)."""


class NoEngines(ControlError):
    """No engine is connected to serve the request."""


class BlobCorrupt(ControlError):
    """A stored blob's bytes no longer hash to its sha256 (disk corruption)."""
