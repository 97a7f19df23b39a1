"""hotswap: open, fast ONNX model serving with zero-downtime hot swap.

`hotswap` spans four source roots (protos, control, engine, clients); this pkgutil-style
``__init__`` lets them share the namespace.

The SDK is importable from here::

    import hotswap
    wl = hotswap.Client()

Its names load on first use, so ``import hotswap.v1...`` in the servers pulls in neither the
SDK nor pyarrow, and pandas is only imported when a DataFrame is involved.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hotswap.clients._client import (
        Client,
        Workspace,
        WorkspaceList,
    )
    from hotswap.clients._deploy import (
        DeploymentConfig,
        DeploymentConfigBuilder,
        DeployResult,
    )
    from hotswap.clients._errors import (
        AuthenticationError,
        CancelledError,
        ConcurrentDeployError,
        DataLossError,
        DeploymentError,
        EntityExistsError,
        EntityNotFoundError,
        HotswapError,
        HotswapTimeoutError,
        HotswapWarning,
        InferenceTimeoutError,
        InsecureTransportError,
        InsecureTransportWarning,
        InvalidInputError,
        LimitExceededError,
        PermissionDeniedError,
        ServerError,
        UnavailableError,
    )
    from hotswap.clients._infer import (
        Served,
    )
    from hotswap.clients._model import (
        Framework,
        Model,
        ModelList,
        TensorSpec,
    )
    from hotswap.clients._pipeline import (
        Pipeline,
        PipelineList,
    )
    from hotswap.clients._pipeline_version import (
        PipelineVersion,
        PipelineVersionList,
    )
    from hotswap.clients._rollout import Rollout
    from hotswap.clients._splits import Split

_EXPORTS: dict[str, str] = {
    "Client": "_client",
    "Workspace": "_client",
    "WorkspaceList": "_client",
    "DeploymentConfig": "_deploy",
    "DeploymentConfigBuilder": "_deploy",
    "DeployResult": "_deploy",
    "AuthenticationError": "_errors",
    "CancelledError": "_errors",
    "DataLossError": "_errors",
    "HotswapWarning": "_errors",
    "InsecureTransportError": "_errors",
    "InsecureTransportWarning": "_errors",
    "PermissionDeniedError": "_errors",
    "ConcurrentDeployError": "_errors",
    "DeploymentError": "_errors",
    "EntityExistsError": "_errors",
    "EntityNotFoundError": "_errors",
    "HotswapError": "_errors",
    "HotswapTimeoutError": "_errors",
    "InferenceTimeoutError": "_errors",
    "InvalidInputError": "_errors",
    "LimitExceededError": "_errors",
    "ServerError": "_errors",
    "UnavailableError": "_errors",
    "Served": "_infer",
    "Framework": "_model",
    "Model": "_model",
    "ModelList": "_model",
    "TensorSpec": "_model",
    "Pipeline": "_pipeline",
    "PipelineList": "_pipeline",
    "PipelineVersion": "_pipeline_version",
    "PipelineVersionList": "_pipeline_version",
    "Rollout": "_rollout",
    "Split": "_splits",
}

__all__ = [
    "AuthenticationError",
    "CancelledError",
    "Client",
    "ConcurrentDeployError",
    "DataLossError",
    "DeployResult",
    "DeploymentConfig",
    "DeploymentConfigBuilder",
    "DeploymentError",
    "EntityExistsError",
    "EntityNotFoundError",
    "Framework",
    "HotswapError",
    "HotswapTimeoutError",
    "HotswapWarning",
    "InferenceTimeoutError",
    "InsecureTransportError",
    "InsecureTransportWarning",
    "InvalidInputError",
    "LimitExceededError",
    "Model",
    "ModelList",
    "PermissionDeniedError",
    "Pipeline",
    "PipelineList",
    "PipelineVersion",
    "PipelineVersionList",
    "Rollout",
    "Served",
    "ServerError",
    "Split",
    "TensorSpec",
    "UnavailableError",
    "Workspace",
    "WorkspaceList",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hotswap' has no attribute {name!r}")
    value = getattr(import_module(f"hotswap.clients.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
