"""Two hosts on one machine: two Linux network namespaces joined by a veth pair with addresses of
their own, made by the test and removed with every process in them. No traffic leaves the namespaces:
neither has a route anywhere but to the other and to its own loopback.

Needs root (or CAP_NET_ADMIN) and iproute2; `TwoHosts.make()` raises NamespacesUnavailable with the
reason when they cannot be made, which the tests turn into a skip.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from fedemb.os_processes import alive


class NamespacesUnavailable(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class TwoHosts:
    server: str  # namespace names
    device: str
    server_ip: str
    device_ip: str

    @classmethod
    def make(cls) -> "TwoHosts":
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("iproute2's `ip` is not installed")
        if os.geteuid() != 0:
            raise NamespacesUnavailable("making network namespaces needs root")
        tag = secrets.token_hex(3)
        subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
        hosts = cls(f"fedemb-s-{tag}", f"fedemb-d-{tag}", f"{subnet}.1", f"{subnet}.2")
        try:
            hosts._build(tag)
        except subprocess.CalledProcessError as exc:
            hosts.remove()
            raise NamespacesUnavailable(f"`{' '.join(exc.cmd)}` failed: {exc.stderr.strip()}") from None
        return hosts

    def _build(self, tag: str) -> None:
        link_s, link_d = f"fes{tag}", f"fed{tag}"  # interface names: at most 15 characters
        _ip("netns", "add", self.server)
        _ip("netns", "add", self.device)
        _ip("link", "add", link_s, "type", "veth", "peer", "name", link_d)
        _ip("link", "set", link_s, "netns", self.server)
        _ip("link", "set", link_d, "netns", self.device)
        for ns, link, address in ((self.server, link_s, self.server_ip), (self.device, link_d, self.device_ip)):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, namespace: str, argv: list[str]) -> list[str]:
        """`argv` run inside `namespace` (ip netns exec replaces itself with it: the PID is argv's)."""
        return ["ip", "netns", "exec", namespace, *argv]

    def pids(self, namespace: str) -> list[int]:
        done = _ip("netns", "pids", namespace, check=False)
        return [int(p) for p in done.stdout.split() if p.strip().isdigit() and alive(int(p))]

    def remove(self) -> list[int]:
        """Kill whatever still runs in the namespaces, then delete them (and with them the veth pair).
        Returns the PIDs that were still running."""
        left = []
        for ns in (self.server, self.device):
            for pid in self.pids(ns) if _exists(ns) else []:
                left.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_exists(ns) and self.pids(ns) for ns in (self.server, self.device)):
            time.sleep(0.2)
        for ns in (self.server, self.device):
            if _exists(ns):
                _ip("netns", "del", ns, check=False)
        return left


def _exists(namespace: str) -> bool:
    return os.path.exists(f"/run/netns/{namespace}")
