"""The worker relay against scripted workers speaking the real Fleet protocol over its unix
socket: a worker that does not answer fails the swap in time instead of hanging process 0,
one swap cannot be asked twice at once, a worker that reconnects is told what process 0
serves, and a newer stream of a worker's name survives the older one's end."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hotswap.engine import workers
from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.host import EngineHost
from hotswap.engine.link import ControlLink
from hotswap.engine.runtime import RuntimeOptions
from hotswap.engine.workers import WorkerGone, WorkerRelay
from hotswap.v1 import fleet_pb2, fleet_pb2_grpc
from hotswap.v1 import types_pb2 as t


class ScriptedWorker:
    """A worker's Fleet stream: says hello, records what it is told, answers on request."""

    def __init__(self, address: str, name: str = "engine-1.w1") -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._outbox: asyncio.Queue[fleet_pb2.EngineMessage] = asyncio.Queue()
        self.told: asyncio.Queue[fleet_pb2.ControlMessage] = asyncio.Queue()
        self._name = name
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def _messages(self) -> AsyncIterator[fleet_pb2.EngineMessage]:
        yield fleet_pb2.EngineMessage(hello=fleet_pb2.Hello(name=self._name))
        while True:
            yield await self._outbox.get()

    async def connect(self) -> ScriptedWorker:
        self._call = fleet_pb2_grpc.FleetStub(self._channel).Connect(self._messages())

        async def read() -> None:
            async for message in self._call:
                self.told.put_nowait(message)

        self._reader = asyncio.create_task(read())
        return self

    def send(self, message: fleet_pb2.EngineMessage) -> None:
        self._outbox.put_nowait(message)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[WorkerRelay, str]]:
    async def no_fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        raise AssertionError("no blob is fetched here")
        yield b""

    relay = WorkerRelay(BlobCache(tmp_path / "blobs", no_fetch), expected=1)
    address = f"unix:{tmp_path / 'relay.sock'}"
    server = workers.unix_server(relay, address)
    await server.start()
    yield relay, address
    await server.stop(None)


async def _next(worker: ScriptedWorker, kind: str) -> fleet_pb2.ControlMessage:
    while True:
        message = await asyncio.wait_for(worker.told.get(), 10)
        if message.WhichOneof("kind") == kind:
            return message


async def test_a_worker_that_never_answers_fails_the_prepare_in_time(
    relay: tuple[WorkerRelay, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, address = relay
    monkeypatch.setattr(workers, "PREPARE_TIMEOUT", 0.3)
    worker = await ScriptedWorker(address).connect()
    await hub.wait_connected(10)
    prepare = fleet_pb2.Prepare(swap_id="s1")
    asking = asyncio.create_task(hub.prepare(prepare))
    assert (await _next(worker, "prepare")).prepare.swap_id == "s1"
    # The same swap cannot be asked again while the first waits (its answer would be lost).
    with pytest.raises(WorkerGone, match="already being asked"):
        await hub.prepare(prepare)
    with pytest.raises(WorkerGone, match="did not answer"):
        await asking
    # Answered this time: the relay hands back the worker's own result.
    asking = asyncio.create_task(hub.prepare(fleet_pb2.Prepare(swap_id="s2")))
    await _next(worker, "prepare")
    worker.send(
        fleet_pb2.EngineMessage(prepared=fleet_pb2.PrepareResult(swap_id="s2", error="no blob"))
    )
    [answer] = await asking
    assert (answer.swap_id, answer.ok, answer.error) == ("s2", False, "no blob")
    # Process 0's stream ended: the swaps the workers were asked to prepare are aborted too.
    hub.abort_all()
    aborted = {(await _next(worker, "abort")).abort.swap_id for _ in range(2)}
    assert aborted == {"s1", "s2"}
    await worker.close()


async def test_a_reconnecting_worker_is_told_what_process_0_serves(
    relay: tuple[WorkerRelay, str],
) -> None:
    hub, address = relay
    serving = fleet_pb2.DesiredState(revision=7)
    serving.pipelines.add(workspace="ws", pipeline="p", version_id="v9", number=9)
    hub.serving = lambda: serving
    first = await ScriptedWorker(address).connect()
    assert (await _next(first, "desired")).desired == serving
    # The same name again: the newer stream is the worker now, whatever the older one does.
    second = await ScriptedWorker(address).connect()
    assert (await _next(second, "desired")).desired == serving
    await first.close()
    # The older stream's end reaches the relay on the server's schedule: for half a second
    # after it, the newer stream must stay connected.
    loop = asyncio.get_running_loop()
    settled = loop.time() + 0.5
    while loop.time() < settled:
        await hub.wait_connected(timeout=0.05)
    asking = asyncio.create_task(hub.commit(fleet_pb2.Commit(swap_id="s3")))
    await _next(second, "commit")
    second.send(fleet_pb2.EngineMessage(committed=fleet_pb2.CommitResult(swap_id="s3", ok=True)))
    [answer] = await asking
    assert answer.ok
    await second.close()


async def test_process_0_answers_a_swap_only_with_every_worker(
    relay: tuple[WorkerRelay, str], tmp_path: Path, assets: Path
) -> None:
    """Process 0's link with the relay: a worker's failed prepare fails the swap with its
    cause; a worker's failed commit (past the commit point) still switches process 0, is
    reported as failed, and the workers are told what process 0 now serves."""
    hub, address = relay
    model = (assets / "models" / "rf_model.onnx").read_bytes()

    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        yield model[offset:]

    host = EngineHost(BlobCache(tmp_path / "cache", fetch), RuntimeOptions(), 0)
    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never dialled: messages fed directly
    link = ControlLink(host, "127.0.0.1:1", "e1", "127.0.0.1:2", 1.0, channel=channel, relay=hub)
    worker = await ScriptedWorker(address).connect()
    await hub.wait_connected(10)

    async def exchange(message: fleet_pb2.ControlMessage, answer: Any) -> list[Any]:
        link._dispatch(message)
        told = await _next(worker, str(message.WhichOneof("kind")))
        worker.send(fleet_pb2.EngineMessage(**{answer[0]: answer[1](told)}))
        await asyncio.gather(*list(link._tasks))
        out = []
        while not link._outbox.empty():
            out.append(link._outbox.get_nowait())
        return out

    sha = hashlib.sha256(model).hexdigest()
    version = t.PipelineVersion(
        workspace="ws", pipeline="p", version_id="id-2", number=2,
        steps=[t.ModelVersion(name="rf", version="mv", sha256=sha)],
    )  # fmt: skip
    failed_prepare = await exchange(
        fleet_pb2.ControlMessage(prepare=fleet_pb2.Prepare(swap_id="s1", version=version)),
        ("prepared", lambda m: fleet_pb2.PrepareResult(
            swap_id="s1", error="disk full", cause=fleet_pb2.FAILURE_CAUSE_FETCH)),
    )  # fmt: skip
    [answer] = [m.prepared for m in failed_prepare]
    assert not answer.ok and "disk full" in answer.error
    assert answer.cause == fleet_pb2.FAILURE_CAUSE_FETCH
    assert (await _next(worker, "abort")).abort.swap_id == "s1"

    ready = await exchange(
        fleet_pb2.ControlMessage(prepare=fleet_pb2.Prepare(swap_id="s2", version=version)),
        ("prepared", lambda m: fleet_pb2.PrepareResult(swap_id="s2", ok=True)),
    )
    assert [m.prepared.ok for m in ready] == [True]
    committed = await exchange(
        fleet_pb2.ControlMessage(commit=fleet_pb2.Commit(swap_id="s2")),
        ("committed", lambda m: fleet_pb2.CommitResult(
            swap_id="s2", error="not prepared", cause=fleet_pb2.FAILURE_CAUSE_NOT_PREPARED)),
    )  # fmt: skip
    [result] = [m.committed for m in committed if m.WhichOneof("kind") == "committed"]
    assert not result.ok and "a worker process: not prepared" in result.error
    assert [s.active.spec.number for s in host.states() if s.active] == [2]
    resync = await _next(worker, "desired")
    assert [(p.pipeline, p.number) for p in resync.desired.pipelines] == [("p", 2)]
    await worker.close()
    host.close()


async def test_workers_version_counts_reach_process_0s_heartbeat(
    relay: tuple[WorkerRelay, str],
) -> None:
    hub, address = relay
    worker = await ScriptedWorker(address).connect()
    await hub.wait_connected(10)
    counts = fleet_pb2.VersionTraffic(workspace="ws", pipeline="p", version_id="v1", number=1,
                                      requests=40, errors=1, seconds=0.02)  # fmt: skip
    worker.send(fleet_pb2.EngineMessage(heartbeat=fleet_pb2.Heartbeat(versions=[counts])))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not hub.versions() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    # Relayed as the worker said it: the control plane sums one entry per process.
    assert hub.versions() == [counts]
    await worker.close()
