"""The registry of engines connected over ``Fleet.Connect`` and the request/answer plumbing on
their streams.

The fleet protocol is itself the wire contract with engines, so this module speaks in
``hotswap.v1.fleet_pb2`` messages (protobuf values, no grpc): the servicer only pumps them
between the stream and an `EngineSession`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.control.metrics import ControlMetrics
from hotswap.v1 import fleet_pb2

log = logging.getLogger(__name__)


class EngineGone(Exception):
    """The engine's stream closed while the control plane waited for its answer."""


@dataclass(eq=False)
class EngineSession:
    """One engine's live stream. A reconnecting engine gets a new session under the same name."""

    name: str
    address: str
    outbox: asyncio.Queue[fleet_pb2.ControlMessage | None] = field(default_factory=asyncio.Queue)
    connected: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    serving: dict[str, fleet_pb2.ServingPipeline] = field(default_factory=dict)
    # Futures for answers, keyed by (kind, swap_id).
    pending: dict[tuple[str, str], asyncio.Future[fleet_pb2.EngineMessage]] = field(
        default_factory=dict
    )
    # Set whenever a StateReport arrives, so callers can wait for a change to land.
    reported: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: fleet_pb2.ControlMessage) -> None:
        self.outbox.put_nowait(message)

    def lost(self, lost_after: float) -> bool:
        return not self.connected or time.monotonic() - self.last_seen > lost_after


class Fleet:
    """Engines by name, their latest reports, and awaited answers to prepare/commit."""

    def __init__(
        self,
        desired_state: Callable[[str], fleet_pb2.DesiredState],
        lost_after: float,
        metrics: ControlMetrics | None = None,
    ) -> None:
        self._desired_state = desired_state
        self.lost_after = lost_after
        self._metrics = metrics or ControlMetrics()
        self._metrics.watch_engines(lambda: len(self.live()))
        self.sessions: dict[str, EngineSession] = {}
        # Called with an engine's name right after it (re)connects, before its desired state
        # is sent: lets the deployer give a fresh engine a deployment that lacks replicas.
        self.on_connect: Callable[[str], None] = lambda name: None

    def connect(self, hello: fleet_pb2.Hello) -> EngineSession:
        old = self.sessions.get(hello.name)
        self._metrics.engine_connects.inc()
        if old is not None:
            self._metrics.engine_reconnects.inc()
        if old is not None and old.connected:
            log.warning("engine %s reconnected; closing its previous stream", hello.name)
            self._close(old, "replaced by a new connection from the same engine")
        session = EngineSession(hello.name, hello.address)
        for serving in hello.serving:
            session.serving[f"{serving.workspace}/{serving.pipeline}"] = serving
        self.sessions[hello.name] = session
        log.info("engine %s connected from %s", hello.name, hello.address)
        self.on_connect(hello.name)
        self.send_desired(hello.name)
        return session

    def disconnect(self, session: EngineSession) -> None:
        if session.connected:
            log.warning("engine %s disconnected", session.name)
            self._close(session, "disconnected")

    def _close(self, session: EngineSession, why: str) -> None:
        session.connected = False
        session.outbox.put_nowait(None)
        for future in session.pending.values():
            if not future.done():
                future.set_exception(EngineGone(f"engine {session.name} {why}"))
        session.pending.clear()

    def send_desired(self, name: str) -> None:
        session = self.sessions.get(name)
        if session is not None and session.connected:
            session.send(fleet_pb2.ControlMessage(desired=self._desired_state(name)))

    def live(self) -> list[EngineSession]:
        """Connected engines whose heartbeats are current, by name."""
        return sorted(
            (s for s in self.sessions.values() if not s.lost(self.lost_after)),
            key=lambda s: s.name,
        )

    def handle(self, session: EngineSession, message: fleet_pb2.EngineMessage) -> None:
        """Applies one message from an engine's stream."""
        session.last_seen = time.monotonic()
        session.last_seen_ms = int(time.time() * 1000)
        kind = message.WhichOneof("kind")
        if kind == "prepared":
            self._resolve(session, ("prepare", message.prepared.swap_id), message)
        elif kind == "committed":
            self._resolve(session, ("commit", message.committed.swap_id), message)
        elif kind == "state":
            session.serving = {f"{s.workspace}/{s.pipeline}": s for s in message.state.serving}
            session.reported.set()
            session.reported = asyncio.Event()

    @staticmethod
    def _resolve(
        session: EngineSession, key: tuple[str, str], message: fleet_pb2.EngineMessage
    ) -> None:
        future = session.pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def ask(
        self,
        session: EngineSession,
        message: fleet_pb2.ControlMessage,
        key: tuple[str, str],
        timeout: float,
    ) -> fleet_pb2.EngineMessage:
        """Sends `message` and waits for the answer keyed `key`.

        Raises EngineGone if the stream drops, TimeoutError after `timeout` seconds.
        """
        if not session.connected:
            raise EngineGone(f"engine {session.name} is not connected")
        future: asyncio.Future[fleet_pb2.EngineMessage] = asyncio.get_running_loop().create_future()
        session.pending[key] = future
        session.send(message)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            session.pending.pop(key, None)

    async def heartbeat_forever(self, interval: float) -> None:
        """Sends heartbeats so engines (and any proxy between) see a live stream."""
        while True:
            await asyncio.sleep(interval)
            beat = fleet_pb2.ControlMessage(
                heartbeat=fleet_pb2.Heartbeat(sent_ms=int(time.time() * 1000))
            )
            for session in self.sessions.values():
                if session.connected:
                    session.send(beat)
