"""Engine settings: one frozen value, built once from flags over HOTSWAP_* env."""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hotswap.service.edge import add_server_flags, env_flag


@dataclass(frozen=True, slots=True)
class Settings:
    control: str = "127.0.0.1:50051"
    listen: str = "127.0.0.1:0"
    # Stable name; the control plane gives a restarted engine its assignments back by name.
    # Empty: "<hostname>-<port>" once bound.
    name: str = ""
    cache_dir: Path | None = None  # default ~/.hotswap/engines/<name>
    threads: int = 1  # ONNX Runtime intra-op threads per session (0 = ORT default)
    # Models of at least this many MiB are served by a process of their own (None: never).
    isolate_above_mb: float | None = 8.0
    workers: int = 4  # threads running inference
    max_rows: int = 1_000_000  # rows accepted in one Infer call
    # Requests up to this many bytes run on the event loop (fast models only); 0 = never.
    inline_bytes: int = 8192
    heartbeat_interval: float = 1.0
    retain_seconds: float = 300.0
    retain_versions: int = 2  # swapped-out versions kept per pipeline (instant rollback)
    advertise: str = ""  # address to tell clients; default: the bound address
    # TLS for this engine's own server (Infer), PEM files; with tls_client_ca, callers need
    # certificates of that CA (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # TLS to the control plane: the CA to trust, and this engine's certificate for mutual TLS.
    control_ca: Path | None = None
    control_cert: Path | None = None
    control_key: Path | None = None
    # The engine credential for Fleet.Connect (from --control-token-file or env).
    control_token: str = ""
    # Send the credential over plaintext to a non-loopback control plane (refused otherwise).
    allow_plaintext_token: bool = False
    address_file: Path | None = None
    # Inference log (docs/observability.md): on by default, under <cache-dir>/inference-logs.
    inference_log: bool = True
    log_dir: Path | None = None
    log_memory_bytes: int = 64 * 1024**2  # rows waiting to be written, at most
    log_disk_bytes: int = 1024**3  # log files on disk, at most (oldest dropped first)
    # Prometheus endpoint port on the --listen host: 0 picks one, -1 turns it off.
    metrics_port: int = -1
    # Where the Prometheus endpoint binds: loopback unless told otherwise.
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"  # service logs: text | json
    # RPCs served at once (RESOURCE_EXHAUSTED beyond), and requests waiting for a thread.
    max_concurrent_rpcs: int = 1024
    max_queued: int = 256
    # Processes serving the port (engine/workers.py); 1 = this process alone.
    processes: int = 1
    # Set for worker processes only: bind the port with SO_REUSEPORT beside process 0, and
    # check tokens though this process holds no credential (process 0 does).
    reuse_port: bool = False
    require_access: bool = False
    # Placement labels sent to the control plane (`host`, `zone`: replicas spread over them).
    labels: tuple[tuple[str, str], ...] = ()
    # On SIGTERM, seconds to wait for the control plane to move this engine's pipelines
    # elsewhere before the server stops (in-flight requests then get the stop's grace).
    drain_timeout: float = 20.0
    # gRPC health alone, in plaintext, for probes that speak no TLS; "" = off.
    health_listen: str = ""
    # HTTP (OIP REST, Wallaroo's formats) on its own port, host:port (0 picks one); "" = off.
    http_listen: str = ""

    @property
    def isolate_bytes(self) -> int | None:
        """`isolate_above_mb` in bytes, as the runtime takes it."""
        return None if self.isolate_above_mb is None else int(self.isolate_above_mb * 1024**2)

    @property
    def secured(self) -> bool:
        """Whether calls need a token: the engine belongs to a secured stack."""
        return bool(self.control_token) or self.require_access

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
            "--isolate-above-mb",
            type=_megabytes_or_off,
            default=_megabytes_or_off(env("HOTSWAP_ISOLATE_ABOVE_MB", str(d.isolate_above_mb))),
            metavar="MB|off",
            help="serve models whose ONNX file is at least this many MiB from a process of "
            "their own, so that loading and freeing them never pauses serving; 0 = every "
            "model, off = none (%(default)s)",
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
            "--inline-bytes",
            type=int,
            default=int(env("HOTSWAP_INLINE_BYTES", str(d.inline_bytes))),
            help="run requests up to this size on the event loop instead of a worker thread "
            "when the model is fast (1-row inference < 0.5 ms); 0 = never (default %(default)s)",
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
        parser.add_argument(
            "--retain-versions",
            type=int,
            default=int(env("HOTSWAP_RETAIN_VERSIONS", str(d.retain_versions))),
            help="swapped-out versions kept loaded per pipeline: rollback to them is instant "
            "and new versions of their models share their sessions (default %(default)s)",
        )
        parser.add_argument("--advertise", default=env("HOTSWAP_ADVERTISE", d.advertise))
        parser.add_argument(
            "--inference-log",
            action=argparse.BooleanOptionalAction,
            default=env("HOTSWAP_INFERENCE_LOG", "1").lower() not in ("0", "false", "no", "off"),
            help="record every inference for pipeline.logs() (default on)",
        )
        parser.add_argument(
            "--log-dir",
            type=Path,
            default=env("HOTSWAP_LOG_DIR"),
            help="where inference log files go (default CACHE_DIR/inference-logs)",
        )
        parser.add_argument(
            "--log-memory-bytes",
            type=int,
            default=int(env("HOTSWAP_LOG_MEMORY_BYTES", str(d.log_memory_bytes))),
            help="inference log rows held in memory before the oldest are dropped (%(default)s)",
        )
        parser.add_argument(
            "--log-disk-bytes",
            type=int,
            default=int(env("HOTSWAP_LOG_DISK_BYTES", str(d.log_disk_bytes))),
            help="inference log files kept on disk, oldest dropped first (%(default)s)",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=int(env("HOTSWAP_METRICS_PORT", str(d.metrics_port))),
            help="serve Prometheus metrics on this port (0 = any free port, -1 = off; "
            "default %(default)s)",
        )
        add_server_flags(
            parser,
            env,
            metrics_host=d.metrics_host,
            max_concurrent_rpcs=d.max_concurrent_rpcs,
        )
        parser.add_argument(
            "--http-listen",
            default=env("HOTSWAP_ENGINE_HTTP_LISTEN", d.http_listen),
            help="also serve HTTP on host:port (0 = any free port): the Open Inference "
            "Protocol's REST binding and Wallaroo's formats, with the same tokens and limits "
            "(default: off)",
        )
        parser.add_argument(
            "--max-queued",
            type=int,
            default=int(env("HOTSWAP_MAX_QUEUED", str(d.max_queued))),
            help="requests waiting for an inference thread, beyond which they get "
            "RESOURCE_EXHAUSTED (%(default)s)",
        )
        parser.add_argument(
            "--processes",
            type=int,
            default=int(env("HOTSWAP_ENGINE_PROCESSES", str(d.processes))),
            help="processes serving this engine's port, each with its own event loop and "
            "sessions: use the host's core count to use every core (%(default)s)",
        )
        parser.add_argument(
            "--labels",
            type=parse_labels,
            default=parse_labels(env("HOTSWAP_ENGINE_LABELS", "")),
            help="where this engine runs, as key=value pairs (e.g. zone=a,host=n1): a "
            "deployment's replicas go to engines on distinct hosts, then zones",
        )
        parser.add_argument(
            "--drain-timeout",
            type=float,
            default=float(env("HOTSWAP_DRAIN_TIMEOUT", str(d.drain_timeout))),
            help="on SIGTERM, seconds to wait for the control plane to move this engine's "
            "pipelines to other engines before stopping (%(default)s)",
        )
        parser.add_argument(
            "--log-format",
            choices=("text", "json"),
            default=env("HOTSWAP_LOG_FORMAT", d.log_format),
            help="service log lines: readable text or one JSON object per line (%(default)s)",
        )
        parser.add_argument(
            "--allow-plaintext-token",
            action="store_true",
            default=env_flag(env("HOTSWAP_ALLOW_PLAINTEXT_TOKEN")),
            help="send the engine credential to a non-loopback control plane without TLS "
            "(refused otherwise: anyone on the network could read it)",
        )
        parser.add_argument("--address-file", type=Path, default=None, help=argparse.SUPPRESS)
        for flag, variable, text in (
            ("--tls-cert", "HOTSWAP_TLS_CERT", "PEM certificate to serve Infer over TLS"),
            ("--tls-key", "HOTSWAP_TLS_KEY", "PEM private key of --tls-cert"),
            ("--tls-client-ca", "HOTSWAP_TLS_CLIENT_CA", "require client certificates of this CA"),
            ("--control-ca", "HOTSWAP_CONTROL_CA", "CA that signed the control plane's cert"),
            ("--control-cert", "HOTSWAP_CONTROL_CERT", "client certificate for mutual TLS"),
            ("--control-key", "HOTSWAP_CONTROL_KEY", "private key of --control-cert"),
            ("--control-token-file", "HOTSWAP_CONTROL_TOKEN_FILE", "file with the engine token"),
        ):
            found = env(variable)
            parser.add_argument(flag, type=Path, default=Path(found) if found else None, help=text)
        args = parser.parse_args(list(argv))
        if args.processes < 1:
            parser.error("--processes must be at least 1")
        token = env("HOTSWAP_ENGINE_TOKEN", "")
        if args.control_token_file is not None:
            token = args.control_token_file.read_text().strip()
        return cls(
            control=args.control,
            listen=args.listen,
            name=args.name,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            threads=args.threads,
            isolate_above_mb=args.isolate_above_mb,
            workers=args.workers,
            max_rows=args.max_rows,
            inline_bytes=args.inline_bytes,
            heartbeat_interval=args.heartbeat_interval,
            retain_seconds=args.retain_seconds,
            retain_versions=args.retain_versions,
            advertise=args.advertise,
            address_file=args.address_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            control_ca=args.control_ca,
            control_cert=args.control_cert,
            control_key=args.control_key,
            control_token=token,
            allow_plaintext_token=args.allow_plaintext_token,
            inference_log=args.inference_log,
            log_dir=Path(args.log_dir) if args.log_dir else None,
            log_memory_bytes=args.log_memory_bytes,
            log_disk_bytes=args.log_disk_bytes,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_queued=args.max_queued,
            log_format=args.log_format,
            processes=args.processes,
            labels=args.labels,
            drain_timeout=args.drain_timeout,
            health_listen=args.health_listen,
            http_listen=args.http_listen,
        )

    def engine_name(self, port: int) -> str:
        return self.name or f"{socket.gethostname()}-{port}"


# A name as the control plane accepts one (workspace, pipeline, label key or value).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_LABELS = 16


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """``zone=a,host=n1`` as pairs, checked as the control plane will check them, so a bad
    label stops the engine at start rather than at every connect; argparse shows why."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not NAME.fullmatch(key) or not NAME.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"label {item[:60]!r} is not key=value with both 1-100 letters, digits, '.', "
                "'_' or '-'"
            )
        pairs.append((key, value))
    if len(pairs) > MAX_LABELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_LABELS} labels, not {len(pairs)}")
    return tuple(pairs)


_DEFAULTS = Settings()


def _megabytes_or_off(value: str) -> float | None:
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        megabytes = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a size in MiB nor 'off'") from None
    if not megabytes >= 0 or megabytes == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r}: give a size of 0 MiB or more, or 'off'")
    return megabytes
