"""The engines connected over ``Fleet.Connect``: a registry of their streams, and the
`EnginePort` the swap coordinator drives them through.

This is the one module that speaks the fleet protocol (``hotswap.v1.fleet_pb2``): it turns
the coordinator's calls into control messages, engines' answers into dataclasses, and their
reports into `Serving` values. The servicer only pumps messages between a stream and an
`EngineConnection`.

Every engine stream is bounded (its outbox holds at most `OUTBOX_LIMIT` messages: an engine
that stops reading is disconnected, not buffered for), and connections of engines gone for
longer than `forget_after` are dropped. Waiters for an engine's reports wait on one
`asyncio.Condition`, notified on every report and every disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hotswap.control import _convert
from hotswap.control.auth import Grant
from hotswap.control.domain import PipelineVersion, check_name
from hotswap.control.engine_port import (
    CommitDone,
    EngineGone,
    EngineRef,
    EngineRefusedSwap,
    PrepareDone,
)
from hotswap.control.errors import InvalidArgument
from hotswap.control.metrics import ControlMetrics
from hotswap.control.rates import Rate, RateMeter, VersionCount, combined
from hotswap.v1 import fleet_pb2, types_pb2

log = logging.getLogger(__name__)

# Messages waiting for one engine: far above what a live engine leaves unread (a desired state,
# a few swap messages and heartbeats), far below what would hold real memory.
OUTBOX_LIMIT = 1024
# Engines remembered at once (live ones and recently gone ones): each is a few KB.
MAX_SESSIONS = 4096
_ADDRESS = re.compile(r"[A-Za-z0-9._\-\[\]:]{1,255}")
# Placement labels an engine may announce (Hello.labels); keys and values are names.
MAX_LABELS = 16
# Entries of one heartbeat's counts taken (versions loaded, times processes, times models of
# split steps): far more than an engine holds, far less than a 64 MiB message could list.
MAX_HEARTBEAT_ENTRIES = 4096
# Versions kept converted to messages (Fleet._message): the ones swaps are sending now.
MAX_VERSION_MESSAGES = 256

# What the access rules are made from: whether tokens are required, and the user tokens.
AccessSource = Callable[[], tuple[bool, Sequence[Grant]]]


class EngineRefused(Exception):
    """A Hello that may not become a connection (the name is taken, or not this credential's)."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Serving:
    """What an engine reports for one pipeline."""

    workspace: str
    pipeline: str
    version_id: str  # the version serving now ("" when none yet)
    number: int
    state: str  # Running | Loading | Error
    error: str
    models: tuple[ServedModel, ...]


_STATES = {
    fleet_pb2.PIPELINE_STATE_RUNNING: "Running",
    fleet_pb2.PIPELINE_STATE_LOADING: "Loading",
    fleet_pb2.PIPELINE_STATE_ERROR: "Error",
}


def _checked_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """An engine's placement labels, if they are names; else InvalidArgument."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"an engine may carry at most {MAX_LABELS} labels, not {len(labels)}")
    for key, value in labels.items():
        check_name("engine label", key)
        check_name(f"engine label {key!r} value", value)
    return dict(labels)


def _sample_rates(connection: EngineConnection, beat: fleet_pb2.Heartbeat) -> None:
    # The engine's own clock: the window between its two counts, whatever the stream's delay.
    at = beat.sent_ms / 1000 if beat.sent_ms else time.monotonic()
    connection.rates.sample(
        at,
        (
            VersionCount(
                v.workspace, v.pipeline, v.version_id, v.number, v.requests, v.errors, v.seconds
            )
            # A prefix: a heartbeat of millions of entries would hold the loop for a minute.
            for v in beat.versions[:MAX_HEARTBEAT_ENTRIES]
            # Counts only go up from zero, and errors are some of the requests.
            if 0 <= v.errors <= v.requests and 0 <= v.seconds < math.inf
        ),
    )


def _serving(message: fleet_pb2.ServingPipeline) -> Serving:
    return Serving(
        message.workspace,
        message.pipeline,
        message.version_id,
        message.number,
        # The typed field; the string from engines that predate it.
        _STATES.get(message.pipeline_state, message.state),
        message.error,
        tuple(ServedModel(m.name, m.version, m.sha256) for m in message.models),
    )


@dataclass(eq=False)
class EngineConnection:
    """One engine's live stream. A reconnecting engine gets a new one under the same name."""

    name: str
    address: str
    instance_id: str = ""
    # The engine credential's name that opened the stream ("" on an open control plane).
    principal: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # The engine said it is shutting down (Drain): no new replicas, its replicas move.
    draining: bool = False
    # Where it serves HTTP (host:port), "" without an HTTP port.
    http_address: str = ""
    outbox: asyncio.Queue[fleet_pb2.ControlMessage | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT + 1)
    )
    connected: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    disconnected_at: float = 0.0
    serving: dict[str, Serving] = field(default_factory=dict)
    # The newest desired-state revision the engine reported as applied.
    applied_revision: int = 0
    # Futures for answers, keyed by (kind, swap or query id).
    pending: dict[tuple[str, str], asyncio.Future[fleet_pb2.EngineMessage]] = field(
        default_factory=dict
    )
    # The blobs this engine may fetch: those of its desired state and of swaps in progress.
    desired_blobs: frozenset[str] = frozenset()
    prepare_blobs: dict[str, frozenset[str]] = field(default_factory=dict)
    # What the models of split and shadow steps served here, as its last heartbeat said.
    traffic: list[types_pb2.ModelTraffic] = field(default_factory=list)
    # Requests/s and latency of its loaded versions, from its heartbeats' counts.
    rates: RateMeter = field(default_factory=RateMeter)

    def send(self, message: fleet_pb2.ControlMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "desired":
            self.desired_blobs = _desired_blobs(message.desired.pipelines)
        elif kind == "prepare":
            prepare = message.prepare
            self.prepare_blobs[prepare.swap_id] = frozenset(_blobs(prepare.version))
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


def _blobs(version: types_pb2.PipelineVersion) -> list[str]:
    """The blobs a version's engines fetch: every step's model and every split's."""
    return [
        *(step.sha256 for step in version.steps),
        *(m.sha256 for split in version.splits for m in split.models),
    ]


def _desired_blobs(pipelines: Iterable[types_pb2.PipelineVersion]) -> frozenset[str]:
    """The blobs an engine may fetch for its desired state."""
    return frozenset(sha for version in pipelines for sha in _blobs(version))


def _serves_exactly(connection: EngineConnection, versions: Sequence[PipelineVersion]) -> bool:
    """Whether the engine's last report has it running `versions` and nothing else."""
    wanted = {v.key: v.version_id for v in versions}
    served = connection.serving
    return served.keys() == wanted.keys() and all(
        s.state == "Running" and s.version_id == wanted[key] for key, s in served.items()
    )


class Fleet:
    """Engines by name, their latest reports, and awaited answers; an `EnginePort`."""

    def __init__(
        self,
        lost_after: float,
        metrics: ControlMetrics | None = None,
        *,
        access: AccessSource = lambda: (False, ()),
        forget_after: float = 3600.0,
    ) -> None:
        self._access = access
        self.lost_after = lost_after
        self.forget_after = forget_after
        self._metrics = metrics or ControlMetrics()
        self._metrics.watch_engines(lambda: len(self.live()))
        self.connections: dict[str, EngineConnection] = {}
        self._reports = asyncio.Condition()
        # Called when an engine reports model counts (rollouts decide on them at once).
        self.on_traffic: Callable[[], None] = lambda: None
        # Versions as messages, by version id: a swap sends the same version to every
        # engine (prepare, then desired state), so it is converted once, not per engine.
        self._messages: dict[str, tuple[PipelineVersion, types_pb2.PipelineVersion]] = {}

    # -- connections ----------------------------------------------------------------------

    def connect(self, hello: fleet_pb2.Hello, principal: str = "") -> EngineConnection:
        """Registers a Hello's stream and sends it the access rules. Raises EngineRefused when
        another live engine instance holds the name: the live one keeps its stream (an engine's
        own reconnect, with the same instance id and credential, replaces its stale stream).
        Raises InvalidArgument for a name or address that is not one."""
        check_name("engine", hello.name)
        if not _ADDRESS.fullmatch(hello.address) or ":" not in hello.address:
            raise InvalidArgument(
                f"engine address {hello.address[:60]!r} is not host:port: pass --advertise"
            )
        labels = _checked_labels(hello.labels)
        if hello.http_address and (
            not _ADDRESS.fullmatch(hello.http_address) or ":" not in hello.http_address
        ):
            raise InvalidArgument(
                f"engine HTTP address {hello.http_address[:60]!r} is not host:port"
            )
        old = self.connections.get(hello.name)
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
        connection = EngineConnection(
            hello.name,
            hello.address,
            hello.instance_id,
            principal,
            labels,
            hello.draining,
            hello.http_address,
        )
        for serving in hello.serving:
            connection.serving[f"{serving.workspace}/{serving.pipeline}"] = _serving(serving)
        self.connections[hello.name] = connection
        log.info("engine %s connected from %s", hello.name, hello.address)
        self._send(connection, fleet_pb2.ControlMessage(access=self._access_rules()))
        return connection

    def _make_room(self) -> None:
        """Forgets the longest-gone engine when the registry is full; refuses when every
        remembered engine is connected."""
        if len(self.connections) < MAX_SESSIONS:
            return
        gone = [s for s in self.connections.values() if not s.connected]
        if not gone:
            raise EngineRefused(f"{MAX_SESSIONS} engines are connected already")
        del self.connections[min(gone, key=lambda s: s.disconnected_at).name]

    def disconnect(self, connection: EngineConnection) -> None:
        if connection.connected:
            log.warning("engine %s disconnected", connection.name)
            self._close(connection, "disconnected")

    def _close(self, connection: EngineConnection, why: str) -> None:
        connection.connected = False
        connection.disconnected_at = time.monotonic()
        connection.prepare_blobs.clear()
        while not connection.outbox.empty():  # nothing queued is worth keeping for a dead stream
            connection.outbox.get_nowait()
        connection.outbox.put_nowait(None)
        for future in connection.pending.values():
            if not future.done():
                future.set_exception(EngineGone(f"engine {connection.name} {why}"))
        connection.pending.clear()
        self._notify()  # waiters on this engine's reports must look again

    def _send(self, connection: EngineConnection, message: fleet_pb2.ControlMessage) -> None:
        if not connection.connected:
            return
        try:
            connection.send(message)
        except OverflowError as exc:
            log.error("%s: closing its stream", exc)
            self._close(connection, "stopped reading its stream")

    def _access_rules(self) -> fleet_pb2.AccessRules:
        required, grants = self._access()
        return fleet_pb2.AccessRules(
            required=required,
            grants=[
                fleet_pb2.TokenGrant(
                    name=g.name, token_sha256=g.token_sha256, workspaces=sorted(g.workspaces)
                )
                for g in grants
            ],
        )

    def push_access(self) -> None:
        """Sends the current access rules to every connected engine (after a token change)."""
        message = fleet_pb2.ControlMessage(access=self._access_rules())
        for connection in list(self.connections.values()):
            self._send(connection, message)

    def forget_gone(self, keep: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Drops connections closed for longer than `forget_after`, except those `keep` names
        (e.g. engines a deployment still lists). Returns the names dropped."""
        now = time.monotonic()
        gone = [
            name
            for name, s in self.connections.items()
            if not s.connected and now - s.disconnected_at > self.forget_after and not keep(name)
        ]
        for name in gone:
            del self.connections[name]
        return gone

    # -- what engines say -------------------------------------------------------------------

    def handle(self, connection: EngineConnection, message: fleet_pb2.EngineMessage) -> None:
        """Applies one message from an engine's stream."""
        connection.last_seen = time.monotonic()
        connection.last_seen_ms = int(time.time() * 1000)
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            # Bounded as every message is (its size); the counts are only read, summed.
            connection.traffic = list(message.heartbeat.traffic[:MAX_HEARTBEAT_ENTRIES])
            if connection.traffic:
                self.on_traffic()
            _sample_rates(connection, message.heartbeat)
        elif kind == "prepared":
            self._resolve(connection, ("prepare", message.prepared.swap_id), message)
        elif kind == "committed":
            if message.committed.HasField("state"):  # known before the answer is (see there)
                self._apply_state(connection, message.committed.state)
            self._resolve(connection, ("commit", message.committed.swap_id), message)
        elif kind == "logs":
            self._resolve(connection, ("logs", message.logs.query_id), message)
        elif kind == "drain":
            if not connection.draining:
                log.warning("engine %s is draining: %s", connection.name, message.drain.reason)
            connection.draining = True
            self._notify()
        elif kind == "state":
            self._apply_state(connection, message.state)

    def _apply_state(self, connection: EngineConnection, state: fleet_pb2.StateReport) -> None:
        connection.serving = {f"{s.workspace}/{s.pipeline}": _serving(s) for s in state.serving}
        connection.applied_revision = max(connection.applied_revision, state.revision)
        self._notify()

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._reports:
                self._reports.notify_all()

        # Called from synchronous code on the loop: the notification runs right after.
        asyncio.get_running_loop().create_task(notify())

    @staticmethod
    def _resolve(
        connection: EngineConnection, key: tuple[str, str], message: fleet_pb2.EngineMessage
    ) -> None:
        future = connection.pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _ask(
        self,
        engine: str,
        message: fleet_pb2.ControlMessage,
        key: tuple[str, str],
        timeout: float,
    ) -> fleet_pb2.EngineMessage:
        """Sends `message` and waits for the answer keyed `key`.

        Raises EngineGone if the stream drops, TimeoutError after `timeout` seconds.
        """
        connection = self.connections.get(engine)
        if connection is None or not connection.connected:
            raise EngineGone(f"engine {engine} is not connected")
        future: asyncio.Future[fleet_pb2.EngineMessage] = asyncio.get_running_loop().create_future()
        connection.pending[key] = future
        self._send(connection, message)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            connection.pending.pop(key, None)

    # -- the EnginePort -----------------------------------------------------------------------

    def live(self) -> list[EngineRef]:
        """Connected engines whose heartbeats are current, by name."""
        return [
            EngineRef(s.name, s.address, s.labels, s.draining)
            for s in sorted(self.connections.values(), key=lambda s: s.name)
            if not s.lost(self.lost_after)
        ]

    def traffic(self, version_id: str) -> list[tuple[str, types_pb2.ModelTraffic]]:
        """(engine, counts) that engines last reported of a pipeline version's split and
        shadow models, lost engines' last reports included (what they served still counts).
        Callers keep only the engines they assigned: an engine's word is its own."""
        return [
            (c.name, t)
            for c in self.connections.values()
            for t in c.traffic
            if t.version_id == version_id
        ]

    def rates(self, workspace: str, pipeline: str, engines: Collection[str]) -> list[Rate]:
        """A pipeline's requests/s and latency per version, summed over `engines` (the ones
        assigned to it: an engine's word counts only for what it was given to serve) whose
        heartbeats are current (a lost engine's last rate says nothing about now)."""
        return combined(
            rate
            for name in engines
            if (c := self.connections.get(name)) is not None and not c.lost(self.lost_after)
            for rate in c.rates.rates.values()
            if rate.workspace == workspace and rate.pipeline == pipeline
        )

    def instance_of(self, name: str) -> str:
        """The process instance an engine name last connected from ("" when unknown): a
        change means the engine restarted, and its counts started again from zero."""
        connection = self.connections.get(name)
        return connection.instance_id if connection else ""

    def known(self, name: str) -> bool:
        return name in self.connections

    def address_of(self, name: str) -> str:
        connection = self.connections.get(name)
        return connection.address if connection else ""

    async def prepare(
        self, engine: str, swap_id: str, version: PipelineVersion, request_id: str, timeout: float
    ) -> PrepareDone:
        message = fleet_pb2.ControlMessage(
            prepare=fleet_pb2.Prepare(
                swap_id=swap_id, version=self._message(version), request_id=request_id
            )
        )
        answer = (await self._ask(engine, message, ("prepare", swap_id), timeout)).prepared
        if not answer.ok:
            raise EngineRefusedSwap(answer.error)
        return PrepareDone(answer.fetch_ms, answer.load_ms, answer.warmup_ms, answer.reused)

    async def commit(
        self, engine: str, swap_id: str, request_id: str, timeout: float, switch_at_us: int = 0
    ) -> CommitDone:
        message = fleet_pb2.ControlMessage(
            commit=fleet_pb2.Commit(
                swap_id=swap_id, request_id=request_id, switch_at_us=switch_at_us
            )
        )
        answer = (await self._ask(engine, message, ("commit", swap_id), timeout)).committed
        if not answer.ok:
            raise EngineRefusedSwap(answer.error)
        return CommitDone(answer.switch_us, answer.switched_at_us, answer.received_at_us)

    def abort(self, engine: str, swap_id: str, reason: str, request_id: str) -> None:
        connection = self.connections.get(engine)
        if connection is not None:
            abort = fleet_pb2.Abort(swap_id=swap_id, reason=reason, request_id=request_id)
            self._send(connection, fleet_pb2.ControlMessage(abort=abort))

    def push_desired(
        self,
        engine: str,
        versions: Sequence[PipelineVersion],
        revision: int,
        unless_served: bool = False,
    ) -> None:
        connection = self.connections.get(engine)
        if connection is None:
            return
        pipelines = [self._message(v) for v in versions]
        if unless_served and _serves_exactly(connection, versions):
            # The engine would change nothing and answer a StateReport: two messages a swap
            # per engine saved. Which blobs it may fetch still follows the desired state.
            connection.desired_blobs = _desired_blobs(pipelines)
            return
        desired = fleet_pb2.DesiredState(revision=revision, pipelines=pipelines)
        self._send(connection, fleet_pb2.ControlMessage(desired=desired))

    def _message(self, version: PipelineVersion) -> types_pb2.PipelineVersion:
        known = self._messages.get(version.version_id)
        if known is None or known[0] is not version:  # a version read again: convert again
            if len(self._messages) >= MAX_VERSION_MESSAGES:
                self._messages.clear()
            known = self._messages[version.version_id] = (
                version,
                _convert.pipeline_version(version),
            )
        return known[1]

    def drained(self, engine: str, kept: Sequence[str]) -> None:
        connection = self.connections.get(engine)
        if connection is not None:
            done = fleet_pb2.DrainDone(kept=kept)
            self._send(connection, fleet_pb2.ControlMessage(drained=done))

    async def wait_applied(self, engine: str, revision: int, timeout: float) -> bool:
        connection = self.connections.get(engine)
        if connection is None:
            return False

        def settled() -> bool:
            return not connection.connected or connection.applied_revision >= revision

        try:
            async with self._reports:
                await asyncio.wait_for(self._reports.wait_for(settled), timeout)
        except TimeoutError:
            return False
        return connection.connected and connection.applied_revision >= revision

    async def query_logs(
        self, engine: str, request: types_pb2.GetLogsRequest, query_id: str, timeout: float
    ) -> types_pb2.LogsResponse:
        """One engine's inference log rows, asked over its own stream. Raises EngineGone (or
        TimeoutError) when it cannot answer."""
        message = fleet_pb2.ControlMessage(
            logs=fleet_pb2.LogsQuery(query_id=query_id, request=request)
        )
        answer = (await self._ask(engine, message, ("logs", query_id), timeout)).logs
        if answer.error:
            raise EngineGone(f"engine {engine} could not read its log: {answer.error}")
        return answer.logs

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
            for connection in list(self.connections.values()):
                self._send(connection, beat)
            every_beat()
