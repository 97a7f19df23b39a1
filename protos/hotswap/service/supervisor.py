"""Owns a service's background tasks, so that one crashing is never silent.

A task that ends with an exception (not by being cancelled) is logged with its traceback and
resolves `crashed`; `serve_until_signalled` waits on it beside the stop signals and stops the
service with an error, as an `asyncio.TaskGroup` would. Stopping cancels the tasks in the
order the service asks, then any left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskCrashed(Exception):
    """A background task of the service ended with an exception."""


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._crashed: asyncio.Future[TaskCrashed] | None = None

    @property
    def crashed(self) -> asyncio.Future[TaskCrashed]:
        """Resolves (with the failure) when a task crashes; never when one is cancelled."""
        if self._crashed is None:
            self._crashed = asyncio.get_running_loop().create_future()
        return self._crashed

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.critical("background task %s crashed", task.get_name(), exc_info=error)
        if not self.crashed.done():
            self.crashed.set_result(
                TaskCrashed(f"background task {task.get_name()} crashed: {error}")
            )

    async def cancel(self, *names: str) -> None:
        """Cancels the named tasks (every task when none is named) and waits for them."""
        for name in names or list(self._tasks):
            task = self._tasks.pop(name, None)
            if task is None or task.done():  # a crash was reported when it happened
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
