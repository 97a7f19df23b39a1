"""gRPC health checking and server reflection on both services, against a live stack: what
Kubernetes probes, load balancers, grpcurl and GUI clients use."""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from hotswap.clients._stack import LocalStack
from hotswap.v1 import control_pb2 as c
from tests.e2e import _api
from tests.e2e.conftest import seed_models
from tests.interop.conftest import PIPELINE, Deployed

Status = health_pb2.HealthCheckResponse
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
WATCH_SECONDS = 30  # bounds every Watch stream: a missing status fails, never hangs


@pytest.fixture
def channels() -> Iterator[dict[str, grpc.Channel]]:
    opened: dict[str, grpc.Channel] = {}
    yield opened
    for channel in opened.values():
        channel.close()


def _channel(channels: dict[str, grpc.Channel], address: str) -> grpc.Channel:
    if address not in channels:
        channels[address] = grpc.insecure_channel(address)
    return channels[address]


def _health(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)


def _check(channel: grpc.Channel, service: str) -> Any:
    return _health(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


class Watch:
    """A Watch stream read on a thread, so the test can wait for each status with a bound."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self._call = _health(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=WATCH_SECONDS
        )
        self._seen: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._seen.put(response.status)
        except grpc.RpcError as exc:
            self._seen.put(exc.code())

    def next(self, timeout: float = 20) -> Any:
        return self._seen.get(timeout=timeout)

    def until(self, status: Any, timeout: float = 20) -> list[Any]:
        """Every status up to and including `status` (fails if the stream ends first)."""
        seen = [self.next(timeout)]
        while seen[-1] != status:
            assert not isinstance(seen[-1], grpc.StatusCode), seen
            seen.append(self.next(timeout))
        return seen

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


def _reflected(channel: grpc.Channel) -> tuple[set[str], descriptor_pool.DescriptorPool]:
    database = ProtoReflectionDescriptorDatabase(channel)
    return set(database.get_services()), descriptor_pool.DescriptorPool(database)


def test_control_plane_health_and_reflection(
    stack: LocalStack, channels: dict[str, grpc.Channel]
) -> None:
    channel = _channel(channels, stack.control_address)
    for service in ("", "hotswap.v1.ControlPlane", "hotswap.v1.Fleet", "liveness"):
        assert _check(channel, service) == Status.SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        _check(channel, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    services, pool = _reflected(channel)
    assert services == {"hotswap.v1.ControlPlane", "hotswap.v1.Fleet", HEALTH, REFLECTION}
    deploy = pool.FindServiceByName("hotswap.v1.ControlPlane").methods_by_name["Deploy"]
    assert deploy.input_type.full_name == "hotswap.v1.DeployRequest"
    assert deploy.input_type.fields_by_name["version"].number == 3


def test_engine_reflection_is_enough_to_call_it(
    deployed: Deployed, channels: dict[str, grpc.Channel]
) -> None:
    channel = _channel(channels, deployed.engine)
    services, pool = _reflected(channel)
    assert services == {
        "hotswap.v1.Engine",
        "inference.GRPCInferenceService",
        HEALTH,
        REFLECTION,
    }
    oip = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ServerReady", "ModelMetadata", "ModelInfer", "RepositoryIndex"} <= set(
        oip.methods_by_name
    )
    infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert infer.fields_by_name["raw_input_contents"].number == 7
    assert pool.FindServiceByName("hotswap.v1.Engine").methods_by_name["Infer"]

    # What grpcurl does: build the messages from the reflected descriptors alone and call.
    method = oip.methods_by_name["ModelMetadata"]
    # Classes built at run time from descriptors: their fields are unknown to the type checker.
    request_class: Any = message_factory.GetMessageClass(method.input_type)
    response_class: Any = message_factory.GetMessageClass(method.output_type)
    call: Any = channel.unary_unary(
        f"/{oip.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    metadata: Any = call(request_class(name=PIPELINE), timeout=5)
    assert metadata.name == PIPELINE
    assert list(metadata.versions) == [str(deployed.versions["rf"])]
    assert [(i.name, list(i.shape)) for i in metadata.inputs] == [("float_input", [-1, 18])]


def test_pipeline_status_follows_deploy_and_undeploy(
    stack: LocalStack, assets: Path, channels: dict[str, grpc.Channel]
) -> None:
    control = _api.control(stack.control_address)
    seed_models(control, assets, PIPELINE)
    version = _api.new_version(control, PIPELINE, "rf").number
    engine = _channel(channels, stack.engine_addresses[0])
    service = f"hotswap.pipeline/{_api.WS}/{PIPELINE}"

    # Assigned nothing (and told so by the control plane): ready.
    overall = Watch(engine, "")
    assert overall.until(Status.SERVING)[-1] == Status.SERVING
    overall.cancel()
    with pytest.raises(grpc.RpcError) as unknown:
        _check(engine, service)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    pipeline = Watch(engine, service)
    assert pipeline.next() == Status.SERVICE_UNKNOWN
    _api.deploy(control, PIPELINE, version)
    assert pipeline.next() == Status.SERVING
    assert _check(engine, "") == Status.SERVING

    control.Undeploy(c.UndeployRequest(workspace=_api.WS, pipeline=PIPELINE), timeout=30)
    assert pipeline.next() == Status.NOT_SERVING
    pipeline.cancel()
    assert _check(engine, "") == Status.SERVING


def test_restarted_engine_is_not_serving_until_its_pipelines_are_loaded(
    deployed: Deployed, channels: dict[str, grpc.Channel]
) -> None:
    stack = deployed.stack
    service = f"hotswap.pipeline/{_api.WS}/{PIPELINE}"
    # With the control plane away, a restarted engine does not know what it must serve.
    stack.kill("control")
    stack.kill("engine-1")
    stack.start_engine("engine-1")
    engine = _channel(channels, deployed.engine)
    assert _check(engine, "") == Status.NOT_SERVING
    assert _check(engine, "hotswap.v1.Engine") == Status.NOT_SERVING
    assert _check(engine, "inference.GRPCInferenceService") == Status.NOT_SERVING
    assert _check(engine, "liveness") == Status.SERVING

    overall = Watch(engine, "")
    pipeline = Watch(engine, service)
    assert overall.next() == Status.NOT_SERVING
    assert pipeline.next() == Status.SERVICE_UNKNOWN
    stack.start_control()
    # It learns its assignment, loads the pipeline (NOT_SERVING meanwhile), then serves.
    assert pipeline.until(Status.SERVING)[-1] == Status.SERVING
    assert overall.until(Status.SERVING) == [Status.SERVING]
    assert _check(engine, "inference.GRPCInferenceService") == Status.SERVING

    # A graceful stop turns every status NOT_SERVING first, so balancers drain the engine.
    stack.kill("engine-1", signal.SIGTERM)
    assert overall.until(Status.NOT_SERVING)[-1] == Status.NOT_SERVING
    overall.cancel()
    pipeline.cancel()
