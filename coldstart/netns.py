"""A network like a node's: the registry in a network namespace of its own, behind a veth pair
shaped with tc (pyroute2), and a counter of the bytes that crossed it.

    with RegistryNetwork(workdir, "100mbit") as net:      # netns + veth + qdiscs + registry
        net.host                                          # "10.213.X.2:PORT", plain http
        net.rx_bytes()                                    # bytes received from the registry side
        with net.sampling() as samples:                   # (time.monotonic(), rx bytes) every 20 ms
            ...

Layout: namespace `fscd-<pid>`, veth `fscd-<pid>-h` (root netns, 10.213.X.1/30) and
`fscd-<pid>-r` (in the namespace, 10.213.X.2/30), X the first /24 with no address of ours yet.
Profiles (PROFILES): `unshaped` (no qdisc), `1gbit` and `100mbit`: a token bucket (tbf) at that
rate on the registry side's egress (what clients download) under a netem delay of 1 ms, and a
netem delay of 1 ms on the host side's egress: 2 ms round trip. A kernel without netem (this
project's host kernel has tbf but no netem) gets the delay from a relay process in the namespace
instead (`delay_mode == "relay"`): the registry listens on the namespace's loopback and the relay,
on the veth address, forwards what clients send 2 ms late (a connection's first bytes 4 ms: the
handshake's round trip too) and the responses at once, through the tbf. Request latency is then
that of a 2 ms link; what it does not model is TCP's own reaction to a long path (slow start over
the RTT), which at 2 ms costs little.

The counter is the host-side veth's rx_bytes: every byte fetched from the registry, by anyone
(containerd, fscached, skopeo), Ethernet/IP/TCP headers included.

Teardown (`stop()`, the context manager's exit, also after an exception): the registry, then the
namespace (which takes the veth pair with it), then the host end if it is still there. At start,
leftovers of an earlier run that was killed (names `fscd-<pid>*` whose pid is dead) are removed.
"""
from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from coldstart import ColdstartError, pid_alive
from coldstart.registry import RegistryRunner

PREFIX = "fscd-"
SUBNET = "10.213"
SAMPLE_INTERVAL = 0.02
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class Profile:
    name: str
    rate_bit: int | None   # bits/s on the registry side's egress; None = no limit
    delay_ms: float        # one-way netem delay on each side (RTT = 2 x this)

    @property
    def shaped(self) -> bool:
        return self.rate_bit is not None or self.delay_ms > 0


PROFILES: dict[str, Profile] = {
    "unshaped": Profile("unshaped", None, 0.0),
    "1gbit": Profile("1gbit", 1_000_000_000, 1.0),
    "100mbit": Profile("100mbit", 100_000_000, 1.0),
}


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ColdstartError(f"network profile {name!r} is unknown (choose {', '.join(PROFILES)})") from None


class NetnsRegistry(RegistryRunner):
    """RegistryRunner started inside network namespace `ns`, listening on `address`."""

    def __init__(self, workdir: Path, ns: str, address: str, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.ns = ns
        self.address = address

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def _write_config(self) -> Path:
        config = super()._write_config()
        text = config.read_text()
        loopback = f"addr: 127.0.0.1:{self.port}"
        if loopback not in text:
            raise ColdstartError(f"{config}: no '{loopback}' line to rebind (RegistryRunner changed?)")
        config.write_text(text.replace(loopback, f"addr: {self.address}:{self.port}"))
        return config

    def start(self) -> NetnsRegistry:
        """Fork docker-registry from this thread while it sits in the namespace (setns is per
        thread): the registry lives there, and so does the readiness probe."""
        netns.pushns(self.ns)
        try:
            super().start()
        finally:
            netns.popns()
        return self


class RegistryNetwork:
    """The namespace, the shaped veth pair and the registry; see the module docstring."""

    def __init__(self, workdir: Path, profile: str | Profile = "unshaped") -> None:
        self.workdir = Path(workdir)
        self.profile = profile if isinstance(profile, Profile) else profile_named(profile)
        tag = f"{PREFIX}{_pid_tag()}"
        self.ns = tag
        self.host_if, self.reg_if = f"{tag}-h", f"{tag}-r"
        self.host_ip = self.reg_ip = ""
        self.registry: NetnsRegistry | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_port = 0
        self.delay_mode = "none"  # "netem", "relay" (a user-space delay relay: no netem), "none"
        self._made_ns = False

    @property
    def host(self) -> str:
        """host:port clients use for the registry (through the veth, shaped)."""
        if self.relay is not None:
            return f"{self.reg_ip}:{self.relay_port}"
        assert self.registry is not None
        return self.registry.host

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> RegistryNetwork:
        cleanup_leftovers()
        try:
            self._create_link()
            self._shape()
            relay = self.delay_mode == "relay"
            self.registry = NetnsRegistry(self.workdir / "registry", self.ns,
                                          "127.0.0.1" if relay else self.reg_ip)
            self.registry.start()
            if relay:
                self._start_relay()
            self._check_reachable()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_relay_and_registry(self.relay, self.registry)
        self.relay, self.registry = None, None
        if self._made_ns:
            _remove_ns(self.ns)
            self._made_ns = False
        _remove_link(self.host_if)

    def __enter__(self) -> RegistryNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- set-up -------------------------------------------------------------------------------
    def _create_link(self) -> None:
        try:
            netns.create(self.ns)
        except OSError as exc:
            raise ColdstartError(f"network namespace {self.ns}: cannot create it: {exc.strerror or exc}") from None
        self._made_ns = True
        net = _free_subnet()
        self.host_ip, self.reg_ip = str(net[1]), str(net[2])
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_if, kind="veth", peer={"ifname": self.reg_if, "net_ns_fd": self.ns})
            idx = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=idx, address=self.host_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with NetNS(self.ns) as ns:
            for name, address in (("lo", None), (self.reg_if, self.reg_ip)):
                i = ns.link_lookup(ifname=name)[0]
                if address is not None:
                    ns.addr("add", index=i, address=address, prefixlen=30)
                ns.link("set", index=i, state="up")

    def _shape(self) -> None:
        p = self.profile
        if p.delay_ms > 0:
            self.delay_mode = "netem" if _has_netem(self.ns) else "relay"
        with NetNS(self.ns) as ns:
            idx = ns.link_lookup(ifname=self.reg_if)[0]
            if self.delay_mode == "netem":
                ns.tc("add", "netem", index=idx, handle="1:0", delay=int(p.delay_ms * 1000), limit=100_000)
            if p.rate_bit is not None:
                _add_tbf(ns, idx, p.rate_bit, "1:1" if self.delay_mode == "netem" else None)
        if self.delay_mode == "netem":
            with IPRoute() as ipr:
                ipr.tc("add", "netem", index=ipr.link_lookup(ifname=self.host_if)[0], handle="1:0",
                       delay=int(p.delay_ms * 1000), limit=100_000)

    def _start_relay(self) -> None:
        """No netem in this kernel: a relay in the namespace on reg_ip delays what clients send
        by the round trip (a connection's first bytes by two: its handshake), responses flow
        undelayed through the tbf."""
        assert self.registry is not None
        self.relay_port = self.registry.port + 1 if self.registry.port < 65535 else self.registry.port - 1
        rtt = 2 * self.profile.delay_ms / 1000
        log = open(self.workdir / "relay.log", "ab")
        netns.pushns(self.ns)
        try:
            self.relay = subprocess.Popen(
                [sys.executable, "-m", "coldstart.netns", "relay", self.reg_ip, str(self.relay_port),
                 str(self.registry.port), repr(rtt)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            netns.popns()
            log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.relay.poll() is not None:
                raise ColdstartError(f"delay relay exited {self.relay.returncode}: "
                                     f"{(self.workdir / 'relay.log').read_text(errors='replace')[-300:]}")
            try:
                socket.create_connection((self.reg_ip, self.relay_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise ColdstartError(f"delay relay did not listen on {self.reg_ip}:{self.relay_port} within 10 s")

    def _check_reachable(self) -> None:
        host, _, port = self.host.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except OSError as exc:
            raise ColdstartError(f"registry at {self.host} in netns {self.ns} is not reachable "
                                 f"from the host: {exc}") from None

    # -- measuring ----------------------------------------------------------------------------
    def rx_bytes(self) -> int:
        """Bytes received by the host end (= sent by the registry side), headers included."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def request_seconds(self, attempts: int = 5) -> float:
        """The fastest of `attempts` `GET /v2/` on a new connection each: connect + one request
        (two round trips through the shaped link)."""
        best = float("inf")
        for _ in range(attempts):
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=5) as resp:
                resp.read()
            best = min(best, time.perf_counter() - t0)
        return best

    @contextlib.contextmanager
    def sampling(self, interval: float = SAMPLE_INTERVAL) -> Iterator[list[tuple[float, int]]]:
        """(time.monotonic(), rx_bytes) every `interval` s while the block runs (the list fills
        as it goes; a last sample is taken at exit)."""
        sampler = Sampler(self.rx_bytes, interval)
        sampler.start()
        try:
            yield sampler.samples
        finally:
            sampler.stop()


class Sampler(threading.Thread):
    def __init__(self, read: Any, interval: float) -> None:
        super().__init__(daemon=True, name="rx-sampler")
        self.read = read
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.read()))
            if self._stop_event.wait(self.interval):
                break

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.samples.append((time.monotonic(), self.read()))


def _add_tbf(ipr: Any, index: int, rate_bit: int, parent: str | None) -> None:
    burst = max(256 << 10, rate_bit // 8 // 250)  # >= a 64 KiB GSO packet; 4 ms of rate
    where = {"parent": parent, "handle": "10:0"} if parent else {}
    ipr.tc("add", "tbf", index=index, rate=f"{rate_bit}bit", burst=burst, latency="100ms", **where)


def _has_netem(ns: str) -> bool:
    """Whether this kernel has the netem qdisc (tried on the namespace's loopback)."""
    with NetNS(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.tc("add", "netem", index=lo, handle="1:0", delay=0)
        except NetlinkError:
            return False
        ipr.tc("del", index=lo, handle="1:0")
        return True


# --------------------------------------------------------------------------- names, leftovers


def _pid_tag() -> str:
    import os

    return str(os.getpid())


_OURS = re.compile(rf"{re.escape(PREFIX)}(\d+)(?:-[hr])?$")


def stop_relay_and_registry(relay: subprocess.Popen[bytes] | None, registry: NetnsRegistry | None) -> None:
    """Stop a registry's delay relay (killed) and the registry in its namespace, either absent."""
    if relay is not None:
        if relay.poll() is None:
            relay.kill()
        relay.wait()
    if registry is not None:
        registry.stop()


def remove_leftovers(ours: re.Pattern[str]) -> list[str]:
    """Remove the namespaces and host links whose name `ours` matches with a dead pid in its
    first group (a harness process that did not clean up); what was removed."""
    def dead(name: str) -> bool:
        m = ours.match(name)
        return m is not None and not pid_alive(int(m.group(1)))

    removed = []
    if NETNS_DIR.is_dir():
        for name in netns.listnetns():
            if dead(name):
                _remove_ns(name)
                removed.append(name)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name and dead(name):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])
                removed.append(name)
    return removed


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and host links named fscd-<pid>* whose pid is dead; what was removed."""
    return remove_leftovers(_OURS)


def _remove_ns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def _remove_link(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            with contextlib.suppress(Exception):
                ipr.link("del", index=found[0])


def _free_subnet() -> ipaddress.IPv4Network:
    """The first 10.213.X.0/30 whose /24 has no address on this host yet."""
    with IPRoute() as ipr:
        used = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
    taken = {ipaddress.ip_address(a) for a in used if a}
    for x in range(256):
        net = ipaddress.IPv4Network(f"{SUBNET}.{x}.0/30")
        block = ipaddress.IPv4Network(f"{SUBNET}.{x}.0/24")
        if not any(a in block for a in taken):
            return net
    raise ColdstartError(f"no free {SUBNET}.X.0/24 for the registry's veth pair")


# --------------------------------------------------------------------------- the delay relay


async def _pipe(reader: Any, writer: Any, delay: float, first_extra: float) -> None:
    """Copy reader -> writer, each chunk written `delay` s after it arrived (in order); the first
    chunk `first_extra` s later still."""
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def feed() -> None:
        extra = first_extra
        while data := await reader.read(1 << 18):
            await queue.put((loop.time() + delay + extra, data))
            extra = 0.0
        await queue.put((loop.time() + delay, b""))

    feeder = asyncio.ensure_future(feed())
    try:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    finally:
        feeder.cancel()
        with contextlib.suppress(Exception):
            writer.write_eof()


async def _serve_relay(listen: str, port: int, upstream: int, rtt: float) -> None:
    import asyncio

    async def handle(c_reader: Any, c_writer: Any) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, u_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # requests carry the round trip (and the first one the handshake's); responses do not
        up = asyncio.ensure_future(_pipe(c_reader, u_writer, rtt, rtt))
        down = asyncio.ensure_future(_pipe(u_reader, c_writer, 0.0, 0.0))
        await asyncio.gather(up, down, return_exceptions=True)
        for w in (c_writer, u_writer):
            w.close()

    server = await asyncio.start_server(handle, listen, port, backlog=512)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """`python -m coldstart.netns relay LISTEN_IP PORT UPSTREAM_PORT RTT_SECONDS`."""
    import asyncio

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] != "relay":
        print("usage: python -m coldstart.netns relay LISTEN_IP PORT UPSTREAM_PORT RTT_SECONDS",
              file=sys.stderr)
        return 2
    asyncio.run(_serve_relay(args[1], int(args[2]), int(args[3]), float(args[4])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
