"""The engine's side of the Fleet stream without a network: control messages in, engine
messages out, in the order the protocol promises."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from hotswap.engine import access
from hotswap.engine.blob_cache import BlobCache
from hotswap.engine.host import EngineHost
from hotswap.engine.link import ControlLink
from hotswap.engine.runtime import RuntimeOptions
from hotswap.v1 import fleet_pb2 as f
from hotswap.v1 import types_pb2 as t

TOKEN = "alice-token-0123456789abcdef"


def _link(
    tmp_path: Path, model: bytes, heartbeat_interval: float = 1.0
) -> tuple[ControlLink, access.Rules]:
    async def fetch(sha256: str, offset: int) -> AsyncIterator[bytes]:
        yield model[offset:]

    host = EngineHost(BlobCache(tmp_path / "cache", fetch), RuntimeOptions(), 0)
    rules = access.Rules(fail_closed=True)
    # The channel is never dialled: the test feeds the link's dispatcher directly.
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    link = ControlLink(
        host, "127.0.0.1:1", "e1", "127.0.0.1:2", heartbeat_interval, channel=channel,
        token="t" * 16, rules=rules,
    )  # fmt: skip
    return link, rules


def _version(model: bytes, number: int = 1) -> t.PipelineVersion:
    step = t.ModelVersion(name="rf", version="mv", sha256=hashlib.sha256(model).hexdigest())
    return t.PipelineVersion(
        workspace="ws", pipeline="p", version_id=f"id-{number}", number=number, steps=[step]
    )


async def _sent(link: ControlLink) -> list[f.EngineMessage]:
    await asyncio.gather(*list(link._tasks))
    out = []
    while not link._outbox.empty():
        out.append(link._outbox.get_nowait())
    return out


async def test_access_rules_desired_state_and_a_swap(tmp_path: Path, assets: Path) -> None:
    model = (assets / "models" / "rf_model.onnx").read_bytes()
    link, rules = _link(tmp_path, model)
    grant = f.TokenGrant(name="alice", token_sha256=hashlib.sha256(TOKEN.encode()).digest(),
                         workspaces=["ws"])  # fmt: skip
    link._dispatch(f.ControlMessage(access=f.AccessRules(required=True, grants=[grant])))
    assert rules.authenticate(f"Bearer {TOKEN}").may_use("ws")

    link._dispatch(
        f.ControlMessage(desired=f.DesiredState(revision=5, pipelines=[_version(model)]))
    )
    reports = [m.state for m in await _sent(link)]
    # Revision 0 while applying, then the desired revision once applied.
    assert [r.revision for r in reports] == [0, 5]
    assert [(s.pipeline, s.number, s.pipeline_state) for s in reports[1].serving] == [
        ("p", 1, f.PIPELINE_STATE_RUNNING)
    ]

    link._dispatch(f.ControlMessage(prepare=f.Prepare(swap_id="s2", version=_version(model, 2))))
    [prepared] = await _sent(link)
    assert prepared.prepared.ok and prepared.prepared.swap_id == "s2"
    link._dispatch(f.ControlMessage(commit=f.Commit(swap_id="s2")))
    [committed] = await _sent(link)
    # What it serves rides on the answer: endpoints list the engine by the time Deploy
    # returns, and no separate report is sent.
    assert committed.committed.ok and committed.committed.swap_id == "s2"
    assert committed.committed.state.serving[0].number == 2

    # The desired state that follows a commit loads nothing: one report, the applied one.
    link._dispatch(
        f.ControlMessage(desired=f.DesiredState(revision=6, pipelines=[_version(model, 2)]))
    )
    assert [m.state.revision for m in await _sent(link)] == [6]

    link._dispatch(f.ControlMessage(commit=f.Commit(swap_id="never-prepared")))
    [refused] = await _sent(link)
    assert not refused.committed.ok
    assert refused.committed.cause == f.FAILURE_CAUSE_NOT_PREPARED
    link._host.close()


async def test_a_commit_switches_at_its_instant_not_before(tmp_path: Path, assets: Path) -> None:
    model = (assets / "models" / "rf_model.onnx").read_bytes()
    link, _ = _link(tmp_path, model)
    link._dispatch(f.ControlMessage(prepare=f.Prepare(swap_id="s1", version=_version(model))))
    [prepared] = await _sent(link)
    assert prepared.prepared.ok
    switch_at_us = time.time_ns() // 1000 + 200_000  # 200 ms from now
    link._dispatch(f.ControlMessage(commit=f.Commit(swap_id="s1", switch_at_us=switch_at_us)))
    assert await _sent(link) == []  # nothing yet: the instant has not come
    committed = (await asyncio.wait_for(link._outbox.get(), 5)).committed
    assert committed.state.serving[0].number == 1 and committed.ok
    assert committed.received_at_us < switch_at_us <= committed.switched_at_us


async def test_an_idle_heartbeat_watches_no_split_models_until_a_swap(tmp_path: Path) -> None:
    """With no split step to watch, the heartbeat sleeps until its next beat (an idle engine
    used to wake 20 times a second to count failures); a swap that loads split steps starts
    the watch at once, without an extra beat."""
    link, _ = _link(tmp_path, b"", heartbeat_interval=600.0)
    checks = 0

    count_errors = link._split_errors

    def counting_errors() -> int | None:
        nonlocal checks
        found = count_errors()
        checks += found is not None  # a check of split models' failures
        return found

    link._split_errors = counting_errors  # type: ignore[method-assign]
    beating = asyncio.create_task(link._heartbeat_forever())
    try:
        first = await asyncio.wait_for(link._outbox.get(), 5)
        assert first.HasField("heartbeat")
        for _ in range(20):  # let the loop run the heartbeat's wait
            await asyncio.sleep(0)
        assert checks == 0
        # A swap that loads a version with a split step (what traffic() then lists).
        link._host.traffic = lambda: [(None, [])]  # type: ignore[method-assign,list-item]
        link._host.changes.notify()
        deadline = asyncio.get_running_loop().time() + 5
        while checks == 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert checks > 0  # watching now, not 600 s later
        assert link._outbox.empty()  # and no beat before its time
    finally:
        beating.cancel()
        link._host.close()
