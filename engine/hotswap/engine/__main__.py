"""``hotswap engine`` / ``python -m hotswap.engine``: run an engine."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from hotswap.engine.server import EngineServer
from hotswap.engine.settings import Settings
from hotswap.engine.workers import PARENT_ENV, SETTINGS_ENV, die_with_parent, settings_from_env
from hotswap.service import log_config as _logs
from hotswap.service.edge import StartupError, serve_until_signalled


def main(argv: Sequence[str] | None = None) -> int:
    worker = os.environ.get(SETTINGS_ENV)
    if worker:  # a worker process of an engine started with --processes (engine/workers.py)
        die_with_parent(int(os.environ[PARENT_ENV]))
        settings = settings_from_env(worker)
    else:
        settings = Settings.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    _logs.configure("engine", settings.log_format, os.environ.get("HOTSWAP_LOG_LEVEL", "INFO"))
    try:
        asyncio.run(serve_until_signalled(lambda: EngineServer(settings), __name__))
    except StartupError as exc:
        print(f"hotswap engine: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
