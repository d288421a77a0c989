"""A small LAN of network namespaces on this machine, for tests of several hosts.

``Lan`` makes a server namespace holding a switch (a Linux bridge) and, per host, a
namespace joined to the switch by a veth pair; the test's own (root) namespace joins it
too, so the test reaches what runs there. Addresses are ``198.18.<n>.0/24`` (RFC 2544's
benchmark range, never routed), with ``n`` picked per LAN among the subnets no interface
here uses. A process started on a host also gets a UTS namespace of its own
(``unshare --uts``) with the host's name, so ``socket.gethostname()`` differs per host.

Taking a host down (``kill_host``) stops every process in its namespace (SIGSTOP to all,
then SIGKILL to all: none of them acts on another's death first) - a power cut as the
other hosts and Redis see it. Needs root and iproute2 (``available()`` says why not).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def available() -> str | None:
    """None when network namespaces can be made here, else why not (one line)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    probe = f"flprobe{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    try:
        a, b = f"{probe[-8:]}a", f"{probe[-8:]}b"
        r = _ip("-n", probe, "link", "add", a, "type", "veth", "peer", "name", b, check=False)
        if r.returncode:
            return f"no veth pairs here: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", f"{probe[-8:]}s", "type", "bridge", check=False)
        if r.returncode:
            return f"no bridges here: {r.stderr.strip()}"
        r = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode:
            return f"`unshare --uts` fails here: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One namespace on the LAN: its name, address and host name."""

    netns: str
    ip: str
    hostname: str


@dataclass
class Lan:
    """The switch and its hosts; ``close()`` ends every process in them and removes them."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    subnet: int = 0  # the n of 198.18.n.0/24; 0: picked on open()
    hosts: list[Host] = field(default_factory=list)
    server: Host | None = None
    root_ip: str = ""

    def open(self) -> Lan:
        """The server namespace with the switch (its address ``.1``) and the root namespace on it (``.2``)."""
        if not self.subnet:
            used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
            self.subnet = random.choice([n for n in range(1, 255) if f"198.18.{n}." not in used])
        ns = f"fl{self.tag}-srv"
        _ip("netns", "add", ns)
        self.server = Host(ns, self._addr(1), f"srv-{self.tag}")
        sw = f"fl{self.tag}sw"
        _ip("-n", ns, "link", "add", sw, "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{self.server.ip}/24", "dev", sw)
        _ip("-n", ns, "link", "set", sw, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.root_ip = self._addr(2)
        self._plug(None, f"fl{self.tag}r", self.root_ip)
        return self

    def add_host(self, name: str) -> Host:
        """A host namespace on the switch, addresses ``.3`` on; ``name`` (a letter or two) ends its names."""
        n = len(self.hosts) + 3
        host = Host(f"fl{self.tag}-{name}", self._addr(n), f"host-{name}-{self.tag}")
        _ip("netns", "add", host.netns)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        self._plug(host.netns, f"fl{self.tag}h{n}", host.ip)
        self.hosts.append(host)
        return host

    def popen(self, host: Host, argv: list[str], **kwargs: object) -> subprocess.Popen:
        """``argv`` in ``host``'s network namespace under its host name (a UTS namespace of its
        own). The pid is the command's own: ``ip netns exec``, ``unshare`` and ``sh`` exec it."""
        wrapped = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--", "sh", "-c",
                   'hostname "$0" && exec "$@"', host.hostname, *argv]
        return subprocess.Popen(wrapped, **kwargs)  # type: ignore[call-overload]

    def pids(self, host: Host) -> list[int]:
        """Every process in ``host``'s network namespace."""
        out = _ip("netns", "pids", host.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_host(self, host: Host, timeout_s: float = 10.0) -> list[int]:
        """Every process of ``host`` stopped at once, then killed; returns their pids once all are gone."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout_s
        while pids := self.pids(host):
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            killed += [p for p in pids if p not in killed]
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {host.netns} outlived SIGKILL: {pids}")
            time.sleep(0.02)
        return killed

    def close(self) -> None:
        if self.root_ip:  # at once, not when the kernel frees the server's namespace later
            _ip("link", "del", f"fl{self.tag}r", check=False)
        for host in [*self.hosts, *([self.server] if self.server else [])]:
            try:
                self.kill_host(host)
            finally:
                _ip("netns", "del", host.netns, check=False)  # its veth ends go with it, and their peers

    def _addr(self, n: int) -> str:
        return f"198.18.{self.subnet}.{n}"

    def _plug(self, netns: str | None, name: str, ip: str) -> None:
        """A veth pair: ``name`` in ``netns`` (None: the root namespace) with ``ip``, its peer on the switch."""
        assert self.server is not None
        srv, peer = self.server.netns, f"{name}p"
        _ip("link", "add", name, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", srv)
        _ip("-n", srv, "link", "set", peer, "master", f"fl{self.tag}sw")
        _ip("-n", srv, "link", "set", peer, "up")
        if netns is not None:
            _ip("link", "set", name, "netns", netns)
        where = ["-n", netns] if netns is not None else []
        _ip(*where, "addr", "add", f"{ip}/24", "dev", name)
        _ip(*where, "link", "set", name, "up")
