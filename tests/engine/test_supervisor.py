"""A crashed background task stops the service loudly; a cancelled one is just stopped."""

from __future__ import annotations

import asyncio

import pytest

from hotswap.service.edge import StartupError, serve_until_signalled
from hotswap.service.supervisor import Supervisor


class Service:
    def __init__(self, body: str) -> None:
        self.supervisor = Supervisor()
        self.body = body
        self.stopped = False
        self.drained = False

    async def start(self) -> str:
        async def crash() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("the reaper broke")

        async def forever() -> None:
            await asyncio.Event().wait()

        self.supervisor.spawn("reaper", crash() if self.body == "crash" else forever())
        return "here"

    async def drain(self) -> None:
        self.drained = True

    async def stop(self, grace: float = 0) -> None:
        self.stopped = True
        await self.supervisor.cancel()


async def test_a_crashed_task_stops_the_service_with_its_name() -> None:
    service = Service("crash")
    with pytest.raises(StartupError, match="background task reaper crashed: the reaper broke"):
        await asyncio.wait_for(serve_until_signalled(lambda: service, "test"), 10)
    assert service.stopped
    assert not service.drained  # a crash is no orderly shutdown: nothing is handed over


async def test_cancelled_tasks_are_not_crashes() -> None:
    service = Service("forever")
    await service.start()
    await service.supervisor.cancel()
    assert not service.supervisor.crashed.done()
