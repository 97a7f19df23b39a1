"""``hotswap control`` / ``python -m hotswap.control``: run the control plane."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from hotswap.control.server import ControlPlaneServer
from hotswap.control.settings import Settings
from hotswap.service import log_config as _logs
from hotswap.service.edge import StartupError, serve_until_signalled


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    _logs.configure("control", settings.log_format, os.environ.get("HOTSWAP_LOG_LEVEL", "INFO"))
    try:
        asyncio.run(serve_until_signalled(lambda: ControlPlaneServer(settings), __name__))
    except StartupError as exc:
        print(f"hotswap control: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
