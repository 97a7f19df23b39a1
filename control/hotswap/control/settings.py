"""Control plane settings: one frozen value, built once from flags over HOTSWAP_* env."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hotswap.service.edge import add_server_flags

DEFAULT_DATA_DIR = Path.home() / ".hotswap" / "control"


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    listen: str = "127.0.0.1:50051"
    max_model_bytes: int = 2 * 1024**3
    prepare_timeout: float = 120.0
    commit_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    lost_after: float = 5.0
    # When set, the bound address ("host:port") is written here once serving (for port 0).
    address_file: Path | None = None
    # Prometheus endpoint port on the --listen host: 0 picks one, -1 turns it off.
    metrics_port: int = -1
    log_format: str = "text"  # text | json
    # TLS: server certificate and key (PEM); with tls_client_ca, clients need certificates too.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens for the API and for engines (see hotswap.control.auth); None = open.
    tokens_file: Path | None = None
    # Where the Prometheus endpoint binds: loopback unless told otherwise.
    metrics_host: str = "127.0.0.1"
    # RPCs served at once; more are refused with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 1024
    # Seconds after which a disconnected engine no deployment names is forgotten.
    forget_after: float = 3600.0
    # The Fleet service (engines' stream and blob downloads) on a port of its own, so a
    # firewall or NetworkPolicy can let only engines reach it; "" = on --listen.
    fleet_listen: str = ""
    # gRPC health alone, in plaintext, for probes that speak no TLS; "" = off.
    health_listen: str = ""
    # The web console (HTTP, TLS with the gRPC server's certificate); "" = off.
    http_listen: str = ""

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
        env = environ.get
        parser = argparse.ArgumentParser(
            prog="hotswap control", description="Run the hotswap control plane."
        )
        parser.add_argument(
            "--listen",
            default=env("HOTSWAP_LISTEN", "127.0.0.1:50051"),
            help="host:port to serve on; port 0 picks a free one (default %(default)s)",
        )
        parser.add_argument(
            "--fleet-listen",
            default=env("HOTSWAP_FLEET_LISTEN", ""),
            help="serve engines (Fleet: their stream and model downloads) on this host:port "
            "only, not on --listen, so a firewall can keep everyone else off it (default: "
            "on --listen)",
        )
        parser.add_argument(
            "--http-listen",
            default=env("HOTSWAP_HTTP_LISTEN", ""),
            help="serve the web console on this host:port (HTTPS with --tls-cert; the API "
            "tokens guard it as they guard gRPC); port 0 picks one (default: off)",
        )
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=Path(env("HOTSWAP_DATA_DIR", str(DEFAULT_DATA_DIR))),
            help="where the SQLite database and model blobs live (default %(default)s)",
        )
        parser.add_argument(
            "--max-model-bytes",
            type=int,
            default=int(env("HOTSWAP_MAX_MODEL_BYTES", str(_DEFAULTS.max_model_bytes))),
            help="largest model accepted for upload (default %(default)s)",
        )
        parser.add_argument(
            "--prepare-timeout",
            type=float,
            default=float(env("HOTSWAP_PREPARE_TIMEOUT", str(_DEFAULTS.prepare_timeout))),
            help="seconds each engine gets to prepare a new version (default %(default)s)",
        )
        parser.add_argument(
            "--commit-timeout",
            type=float,
            default=float(env("HOTSWAP_COMMIT_TIMEOUT", str(_DEFAULTS.commit_timeout))),
            help="seconds each engine gets to confirm a commit (default %(default)s)",
        )
        parser.add_argument(
            "--heartbeat-interval",
            type=float,
            default=float(env("HOTSWAP_HEARTBEAT_INTERVAL", str(_DEFAULTS.heartbeat_interval))),
        )
        parser.add_argument(
            "--lost-after",
            type=float,
            default=float(env("HOTSWAP_LOST_AFTER", str(_DEFAULTS.lost_after))),
            help="seconds without a heartbeat before an engine counts as lost",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=int(env("HOTSWAP_METRICS_PORT", str(_DEFAULTS.metrics_port))),
            help="serve Prometheus metrics on this port (0 = any free port, -1 = off; "
            "default %(default)s)",
        )
        add_server_flags(
            parser,
            env,
            metrics_host=_DEFAULTS.metrics_host,
            max_concurrent_rpcs=_DEFAULTS.max_concurrent_rpcs,
        )
        parser.add_argument(
            "--forget-after",
            type=float,
            default=float(env("HOTSWAP_FORGET_AFTER", str(_DEFAULTS.forget_after))),
            help="seconds after which a disconnected engine that serves nothing is forgotten",
        )
        parser.add_argument(
            "--log-format",
            choices=("text", "json"),
            default=env("HOTSWAP_LOG_FORMAT", _DEFAULTS.log_format),
            help="service log lines: readable text or one JSON object per line (%(default)s)",
        )
        parser.add_argument("--address-file", type=Path, default=None, help=argparse.SUPPRESS)
        for flag, variable, text in (
            ("--tls-cert", "HOTSWAP_TLS_CERT", "PEM certificate to serve TLS with"),
            ("--tls-key", "HOTSWAP_TLS_KEY", "PEM private key of --tls-cert"),
            ("--tls-client-ca", "HOTSWAP_TLS_CLIENT_CA", "require client certificates of this CA"),
            ("--tokens-file", "HOTSWAP_TOKENS_FILE", "JSON bearer tokens (hotswap.control.auth)"),
        ):
            found = env(variable)
            parser.add_argument(flag, type=Path, default=Path(found) if found else None, help=text)
        args = parser.parse_args(list(argv))
        return cls(
            data_dir=args.data_dir,
            listen=args.listen,
            max_model_bytes=args.max_model_bytes,
            prepare_timeout=args.prepare_timeout,
            commit_timeout=args.commit_timeout,
            heartbeat_interval=args.heartbeat_interval,
            lost_after=args.lost_after,
            address_file=args.address_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tokens_file=args.tokens_file,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            forget_after=args.forget_after,
            log_format=args.log_format,
            fleet_listen=args.fleet_listen,
            health_listen=args.health_listen,
            http_listen=args.http_listen,
        )


_DEFAULTS = Settings(data_dir=DEFAULT_DATA_DIR)
