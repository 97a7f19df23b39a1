"""Engine settings: one frozen value, built once from flags over HOTSWAP_* env."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Settings:
    control: str = "127.0.0.1:50051"
    listen: str = "127.0.0.1:0"
    # Stable name; the control plane gives a restarted engine its assignments back by name.
    # Empty: "<hostname>-<port>" once bound.
    name: str = ""
    cache_dir: Path | None = None  # default ~/.hotswap/engines/<name>
    threads: int = 1  # ONNX Runtime intra-op threads per session (0 = ORT default)
    workers: int = 4  # threads running inference
    max_rows: int = 1_000_000  # rows accepted in one Infer call
    heartbeat_interval: float = 1.0
    retain_seconds: float = 300.0
    advertise: str = ""  # address to tell clients; default: the bound address
    address_file: Path | None = None

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
        env = environ.get
        d = _DEFAULTS
        parser = argparse.ArgumentParser(
            prog="hotswap engine", description="Run a hotswap engine (a serving worker)."
        )
        parser.add_argument(
            "--control",
            default=env("HOTSWAP_CONTROL", d.control),
            help="control plane address host:port (default %(default)s)",
        )
        parser.add_argument(
            "--listen",
            default=env("HOTSWAP_ENGINE_LISTEN", d.listen),
            help="host:port to serve Infer on; port 0 picks one (default %(default)s)",
        )
        parser.add_argument("--name", default=env("HOTSWAP_ENGINE_NAME", d.name))
        parser.add_argument(
            "--cache-dir",
            type=Path,
            default=env("HOTSWAP_CACHE_DIR"),
            help="where fetched models are cached (default ~/.hotswap/engines/NAME)",
        )
        parser.add_argument(
            "--threads",
            type=int,
            default=int(env("HOTSWAP_THREADS", str(d.threads))),
            help="ONNX Runtime intra-op threads per session; 0 = ORT default (%(default)s)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=int(env("HOTSWAP_WORKERS", str(d.workers))),
            help="threads running inference (default %(default)s)",
        )
        parser.add_argument(
            "--max-rows",
            type=int,
            default=int(env("HOTSWAP_MAX_ROWS", str(d.max_rows))),
            help="most rows accepted in one Infer call (default %(default)s)",
        )
        parser.add_argument(
            "--heartbeat-interval",
            type=float,
            default=float(env("HOTSWAP_HEARTBEAT_INTERVAL", str(d.heartbeat_interval))),
        )
        parser.add_argument(
            "--retain-seconds",
            type=float,
            default=float(env("HOTSWAP_RETAIN_SECONDS", str(d.retain_seconds))),
            help="keep a swapped-out version loaded this long for instant rollback",
        )
        parser.add_argument("--advertise", default=env("HOTSWAP_ADVERTISE", d.advertise))
        parser.add_argument("--address-file", type=Path, default=None, help=argparse.SUPPRESS)
        args = parser.parse_args(list(argv))
        return cls(
            control=args.control,
            listen=args.listen,
            name=args.name,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            threads=args.threads,
            workers=args.workers,
            max_rows=args.max_rows,
            heartbeat_interval=args.heartbeat_interval,
            retain_seconds=args.retain_seconds,
            advertise=args.advertise,
            address_file=args.address_file,
        )

    def engine_name(self, port: int) -> str:
        return self.name or f"{socket.gethostname()}-{port}"


_DEFAULTS = Settings()
