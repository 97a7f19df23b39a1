"""The gRPC channels one :class:`~hotswap.Client` shares with the objects it hands out."""

from __future__ import annotations

import threading

import grpc

from hotswap.clients._rpc import ControlStub, Security, Unary, engine_infer, open_channel
from hotswap.v1 import engine_pb2


class Channels:
    """One channel to the control plane plus one per engine address, opened on first use."""

    def __init__(self, address: str, security: Security | None = None) -> None:
        self.address = address
        self._security = security or Security()
        self._channel = open_channel(address, self._security)
        self.control = ControlStub(self._channel, address)
        self._lock = threading.Lock()
        self._engines: dict[
            str, tuple[grpc.Channel, Unary[engine_pb2.InferRequest, engine_pb2.InferResponse]]
        ] = {}

    @property
    def tls(self) -> bool:
        return self._security.ca is not None

    def infer_stub(self, address: str) -> Unary[engine_pb2.InferRequest, engine_pb2.InferResponse]:
        """``Engine.Infer`` on the engine at ``address``, reusing its channel."""
        with self._lock:
            entry = self._engines.get(address)
            if entry is None:
                channel = open_channel(address, self._security)
                entry = (channel, engine_infer(channel, address))
                self._engines[address] = entry
            return entry[1]

    def close(self) -> None:
        """Closes every channel; the objects handed out stop working."""
        with self._lock:
            for channel, _ in self._engines.values():
                channel.close()
            self._engines.clear()
        self._channel.close()
