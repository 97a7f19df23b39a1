"""Hosts on one machine: Linux network namespaces joined by a bridge, for multi-host tests.

Each `Network` makes a switch (a namespace holding a bridge) and hosts (namespaces with one
veth into that bridge), addressed from one random /24 of 198.18.0.0/15, the range set aside
for benchmarking networks (RFC 2544), so no test traffic can reach anything else. The test
process itself joins as the operator's host (a veth in its own namespace) to make the calls a
person would. Faults are real: a link set down (a cable pulled: packets vanish, no RST),
blackhole routes between two hosts (a partition), a host's processes killed. `close()`
removes every process, namespace and interface it made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

RANGE = ipaddress.IPv4Network("198.18.0.0/15")
ROOT = Path(__file__).resolve().parents[2]


def skip_unless_possible() -> None:
    """Skips the calling test, saying why, where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("multi-host tests need iproute2's `ip`")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    port: str  # its veth's name in the switch namespace
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Runs `python args...` on this host (cwd: the repository), output to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, sys.executable, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.processes.append(process)
        return process

    def run(self, args: list[str], env: dict[str, str] | None = None) -> str:
        """Runs `python args...` on this host to its end; returns what it printed."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespace, sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(sig)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)


class Network:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        # A random /24 of the range: concurrent runs on one machine do not collide.
        subnets: list[ipaddress.IPv4Network] = list(RANGE.subnets(new_prefix=24))
        self.subnet = subnets[secrets.randbelow(len(subnets))]
        self._next_host = 1
        self.switch = f"hs{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._operator = f"hs{self.tag}op"
        self._made: list[str] = []  # namespaces, for close()
        self._blackholes: list[tuple[str, str]] = []
        self._etc: list[Path] = []  # /etc/netns/<ns> folders made by hosts_file

    def _address(self) -> str:
        address = str(self.subnet[self._next_host])
        self._next_host += 1
        return address

    def __enter__(self) -> Network:
        try:
            _ip("netns", "add", self.switch)
            self._made.append(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            # The operator: this process's namespace, on the bridge like any host.
            peer = f"hs{self.tag}opp"
            _ip("link", "add", self._operator, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            operator = str(self.subnet[254])
            _ip("addr", "add", f"{operator}/24", "dev", self._operator)
            _ip("link", "set", self._operator, "up")
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, name: str) -> Host:
        namespace = f"hs{self.tag}-{name}"
        port = f"p{self.tag}{len(self.hosts)}"
        address = self._address()
        _ip("netns", "add", namespace)
        self._made.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port)
        _ip("-n", namespace, "link", "set", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(name, namespace, address, port)
        self.hosts[name] = host
        return host

    def hosts_file(self, host: Host, entries: list[tuple[str, str]]) -> None:
        """Gives `host` its own /etc/hosts (`ip netns exec` mounts /etc/netns/<ns>/hosts
        over it): a name with several addresses, as a headless Service's DNS answers."""
        folder = Path("/etc/netns") / host.namespace
        folder.mkdir(parents=True, exist_ok=True)
        self._etc.append(folder)
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for address, name in entries)]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    # -- faults ---------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Pulls the host's cable: its packets vanish, both ways, and nobody is told."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def partition(self, a: Host, b: Host) -> None:
        """Drops everything between `a` and `b` (blackhole routes both ways); each still
        reaches every other host."""
        for one, other in ((a, b), (b, a)):
            _ip("-n", one.namespace, "route", "add", "blackhole", f"{other.address}/32")
            self._blackholes.append((one.namespace, other.address))

    def unpartition(self, a: Host, b: Host) -> None:
        for one, other in ((a, b), (b, a)):
            _ip("-n", one.namespace, "route", "del", "blackhole", f"{other.address}/32")
            self._blackholes.remove((one.namespace, other.address))

    # -- cleanup --------------------------------------------------------------------------

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self._operator)  # its peer goes with it
        for namespace in reversed(self._made):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", namespace)
        self._made.clear()
        for folder in self._etc:
            shutil.rmtree(folder, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def namespaces_left(tag: str) -> list[str]:
    """Namespaces of network `tag` that still exist (for the cleanup test)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(f"hs{tag}")]
