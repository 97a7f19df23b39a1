"""The registry of engines connected over ``Fleet.Connect`` and the request/answer plumbing on
their streams.

The fleet protocol is itself the wire contract with engines, so this module speaks in
``hotswap.v1.fleet_pb2`` messages (protobuf values, no grpc): the servicer only pumps them
between the stream and an `EngineSession`.

Every engine stream is bounded (its outbox holds at most `OUTBOX_LIMIT` messages: an engine
that stops reading is disconnected, not buffered for), and sessions of engines gone for longer
than `forget_after` are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hotswap.control.domain import check_name
from hotswap.control.errors import InvalidArgument
from hotswap.control.metrics import ControlMetrics
from hotswap.v1 import fleet_pb2

log = logging.getLogger(__name__)

# Messages waiting for one engine: far above what a live engine leaves unread (a desired state,
# a few swap messages and heartbeats), far below what would hold real memory.
OUTBOX_LIMIT = 1024
# Engines remembered at once (live ones and recently gone ones): each is a few KB.
MAX_SESSIONS = 4096
_ADDRESS = re.compile(r"[A-Za-z0-9._\-\[\]:]{1,255}")


class EngineGone(Exception):
    """The engine's stream closed while the control plane waited for its answer."""


class EngineRefused(Exception):
    """A Hello that may not become a session (the name is taken, or not this credential's)."""


@dataclass(eq=False)
class EngineSession:
    """One engine's live stream. A reconnecting engine gets a new session under the same name."""

    name: str
    address: str
    instance_id: str = ""
    # The engine credential's name that opened the stream ("" on an open control plane).
    principal: str = ""
    outbox: asyncio.Queue[fleet_pb2.ControlMessage | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT + 1)
    )
    connected: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    disconnected_at: float = 0.0
    serving: dict[str, fleet_pb2.ServingPipeline] = field(default_factory=dict)
    # Futures for answers, keyed by (kind, swap_id).
    pending: dict[tuple[str, str], asyncio.Future[fleet_pb2.EngineMessage]] = field(
        default_factory=dict
    )
    # Set whenever a StateReport arrives or the stream closes, so callers can wait for a change.
    reported: asyncio.Event = field(default_factory=asyncio.Event)
    # The blobs this engine may fetch: those of its desired state and of swaps in progress.
    desired_blobs: frozenset[str] = frozenset()
    prepare_blobs: dict[str, frozenset[str]] = field(default_factory=dict)

    def send(self, message: fleet_pb2.ControlMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "desired":
            self.desired_blobs = frozenset(
                step.sha256 for version in message.desired.pipelines for step in version.steps
            )
        elif kind == "prepare":
            prepare = message.prepare
            self.prepare_blobs[prepare.swap_id] = frozenset(s.sha256 for s in prepare.version.steps)
        elif kind in ("commit", "abort"):
            # A committed version's blobs are in the desired state sent right after.
            swap_id = message.commit.swap_id if kind == "commit" else message.abort.swap_id
            self.prepare_blobs.pop(swap_id, None)
        if self.outbox.qsize() >= OUTBOX_LIMIT:
            raise OverflowError(f"engine {self.name} is not reading its stream")
        self.outbox.put_nowait(message)

    def may_fetch(self, sha256: str) -> bool:
        return sha256 in self.desired_blobs or any(
            sha256 in blobs for blobs in self.prepare_blobs.values()
        )

    def lost(self, lost_after: float) -> bool:
        return not self.connected or time.monotonic() - self.last_seen > lost_after


class Fleet:
    """Engines by name, their latest reports, and awaited answers to prepare/commit."""

    def __init__(
        self,
        desired_state: Callable[[str], fleet_pb2.DesiredState],
        lost_after: float,
        metrics: ControlMetrics | None = None,
        *,
        access_rules: Callable[[], fleet_pb2.AccessRules] = fleet_pb2.AccessRules,
        forget_after: float = 3600.0,
    ) -> None:
        self._desired_state = desired_state
        self._access_rules = access_rules
        self.lost_after = lost_after
        self.forget_after = forget_after
        self._metrics = metrics or ControlMetrics()
        self._metrics.watch_engines(lambda: len(self.live()))
        self.sessions: dict[str, EngineSession] = {}
        # Called with an engine's name right after it (re)connects, before its desired state
        # is sent: lets the deployer give a fresh engine a deployment that lacks replicas.
        self.on_connect: Callable[[str], None] = lambda name: None

    def connect(self, hello: fleet_pb2.Hello, principal: str = "") -> EngineSession:
        """Registers a Hello's stream. Raises EngineRefused when another live engine instance
        holds the name: the live one keeps its stream (an engine's own reconnect, with the same
        instance id and credential, replaces its stale stream). Raises InvalidArgument for a
        name or address that is not one."""
        check_name("engine", hello.name)
        if not _ADDRESS.fullmatch(hello.address) or ":" not in hello.address:
            raise InvalidArgument(
                f"engine address {hello.address[:60]!r} is not host:port: pass --advertise"
            )
        old = self.sessions.get(hello.name)
        if old is None:
            self._make_room()
        elif not old.lost(self.lost_after):
            same = (
                bool(hello.instance_id)
                and hello.instance_id == old.instance_id
                and principal == old.principal
            )
            if not same:
                raise EngineRefused(
                    f"engine name {hello.name!r} is in use by another live engine (from "
                    f"{old.address}): give this engine its own --name"
                )
        self._metrics.engine_connects.inc()
        if old is not None:
            self._metrics.engine_reconnects.inc()
            if old.connected:
                log.warning("engine %s reconnected; closing its previous stream", hello.name)
                self._close(old, "replaced by a new connection from the same engine")
        session = EngineSession(hello.name, hello.address, hello.instance_id, principal)
        for serving in hello.serving:
            session.serving[f"{serving.workspace}/{serving.pipeline}"] = serving
        self.sessions[hello.name] = session
        log.info("engine %s connected from %s", hello.name, hello.address)
        self._send(session, fleet_pb2.ControlMessage(access=self._access_rules()))
        self.on_connect(hello.name)
        self.send_desired(hello.name)
        return session

    def _make_room(self) -> None:
        """Forgets the longest-gone engine when the registry is full; refuses when every
        remembered engine is connected."""
        if len(self.sessions) < MAX_SESSIONS:
            return
        gone = [s for s in self.sessions.values() if not s.connected]
        if not gone:
            raise EngineRefused(f"{MAX_SESSIONS} engines are connected already")
        del self.sessions[min(gone, key=lambda s: s.disconnected_at).name]

    def disconnect(self, session: EngineSession) -> None:
        if session.connected:
            log.warning("engine %s disconnected", session.name)
            self._close(session, "disconnected")

    def _close(self, session: EngineSession, why: str) -> None:
        session.connected = False
        session.disconnected_at = time.monotonic()
        session.prepare_blobs.clear()
        while not session.outbox.empty():  # nothing queued is worth keeping for a dead stream
            session.outbox.get_nowait()
        session.outbox.put_nowait(None)
        for future in session.pending.values():
            if not future.done():
                future.set_exception(EngineGone(f"engine {session.name} {why}"))
        session.pending.clear()
        session.reported.set()  # waiters on this engine's reports must look again

    def _send(self, session: EngineSession, message: fleet_pb2.ControlMessage) -> None:
        if not session.connected:
            return
        try:
            session.send(message)
        except OverflowError as exc:
            log.error("%s: closing its stream", exc)
            self._close(session, "stopped reading its stream")

    def send(self, session: EngineSession, message: fleet_pb2.ControlMessage) -> None:
        """Queues `message` for `session` (dropped if the stream is closed)."""
        self._send(session, message)

    def send_desired(self, name: str) -> None:
        session = self.sessions.get(name)
        if session is not None:
            self._send(session, fleet_pb2.ControlMessage(desired=self._desired_state(name)))

    def push_access(self) -> None:
        """Sends the current access rules to every connected engine (after a token change)."""
        message = fleet_pb2.ControlMessage(access=self._access_rules())
        for session in list(self.sessions.values()):
            self._send(session, message)

    def live(self) -> list[EngineSession]:
        """Connected engines whose heartbeats are current, by name."""
        return sorted(
            (s for s in self.sessions.values() if not s.lost(self.lost_after)),
            key=lambda s: s.name,
        )

    def forget_gone(self, keep: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Drops sessions closed for longer than `forget_after`, except those `keep` names
        (e.g. engines a deployment still lists). Returns the names dropped."""
        now = time.monotonic()
        gone = [
            name
            for name, s in self.sessions.items()
            if not s.connected and now - s.disconnected_at > self.forget_after and not keep(name)
        ]
        for name in gone:
            del self.sessions[name]
        return gone

    def handle(self, session: EngineSession, message: fleet_pb2.EngineMessage) -> None:
        """Applies one message from an engine's stream."""
        session.last_seen = time.monotonic()
        session.last_seen_ms = int(time.time() * 1000)
        kind = message.WhichOneof("kind")
        if kind == "prepared":
            self._resolve(session, ("prepare", message.prepared.swap_id), message)
        elif kind == "committed":
            self._resolve(session, ("commit", message.committed.swap_id), message)
        elif kind == "logs":
            self._resolve(session, ("logs", message.logs.query_id), message)
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
        self._send(session, message)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            session.pending.pop(key, None)

    async def heartbeat_forever(
        self, interval: float, every_beat: Callable[[], None] = lambda: None
    ) -> None:
        """Sends heartbeats so engines (and any proxy between) see a live stream; runs
        `every_beat` (housekeeping) once per interval."""
        while True:
            await asyncio.sleep(interval)
            beat = fleet_pb2.ControlMessage(
                heartbeat=fleet_pb2.Heartbeat(sent_ms=int(time.time() * 1000))
            )
            for session in list(self.sessions.values()):
                self._send(session, beat)
            every_beat()
