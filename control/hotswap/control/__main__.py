"""``hotswap control`` / ``python -m hotswap.control``: run the control plane."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from hotswap import _logs
from hotswap.control.server import ControlPlaneServer
from hotswap.control.settings import Settings


async def _run(settings: Settings) -> None:
    server = ControlPlaneServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    _logs.configure("control", settings.log_format, os.environ.get("HOTSWAP_LOG_LEVEL", "INFO"))
    asyncio.run(_run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
