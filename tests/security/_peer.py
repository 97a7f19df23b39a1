"""A scripted engine: a real gRPC client of ``Fleet.Connect`` whose answers the test chooses.

It speaks the same protocol as ``hotswap engine`` over a real port, so the control plane
cannot tell it from one; the test decides when (and whether) it answers prepare and commit,
which makes the branches around the commit point deterministic.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import fleet_pb2_grpc as fg

_STOP = object()


class ScriptedEngine:
    def __init__(
        self,
        control: str,
        name: str,
        *,
        token: str | None = None,
        instance_id: str | None = None,
        address: str = "127.0.0.1:1",
    ) -> None:
        self.name = name
        self.instance_id = instance_id or uuid.uuid4().hex
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(control)
        self._stub: Any = fg.FleetStub(self._channel)  # type: ignore[arg-type]
        self._outbox: queue.Queue[Any] = queue.Queue()
        self.received: queue.Queue[f.ControlMessage] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._call: Any = None
        self._reader: threading.Thread | None = None

    def _requests(self) -> Iterator[f.EngineMessage]:
        yield f.EngineMessage(
            hello=f.Hello(name=self.name, address=self.address, instance_id=self.instance_id)
        )
        while (message := self._outbox.get()) is not _STOP:
            yield message

    def connect(self) -> ScriptedEngine:
        self._call = self._stub.Connect(self._requests(), metadata=self._metadata)

        def read() -> None:
            try:
                for message in self._call:
                    self.received.put(message)
                    if message.WhichOneof("kind") == "heartbeat":
                        self.send(f.EngineMessage(heartbeat=f.Heartbeat()))
            except grpc.RpcError as exc:
                self.error = exc

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        return self

    def send(self, message: f.EngineMessage) -> None:
        self._outbox.put(message)

    def next(self, kind: str, timeout: float = 10.0) -> f.ControlMessage:
        """The next message of `kind` (others are skipped); fails after `timeout` s."""
        while True:
            message = self.received.get(timeout=timeout)
            if message.WhichOneof("kind") == kind:
                return message

    def report(self, serving: list[f.ServingPipeline]) -> None:
        self.send(f.EngineMessage(state=f.StateReport(serving=serving)))

    def prepared(self, swap_id: str) -> None:
        self.send(f.EngineMessage(prepared=f.PrepareResult(swap_id=swap_id, ok=True)))

    def wait_closed(self, timeout: float = 10.0) -> grpc.RpcError | None:
        assert self._reader is not None
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the stream is still open"
        return self.error

    def close(self) -> None:
        self._outbox.put(_STOP)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
