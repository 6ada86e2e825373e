"""A real Dragonfly P2P cluster on one machine: network namespaces, veth pairs, a bridge, tc.

    with DragonflyCluster(workdir, nodes=3) as cluster:   # registry, scheduler, seed, 3 nodes
        cluster.registry_host                             # "10.214.X.10:PORT", plain http
        cluster.socket("node1")                           # node1's dfdaemon gRPC unix socket
        cluster.proxy_url("node1")                        # node1's dfdaemon HTTP proxy
        with cluster.inside("node1"):                     # processes started here (Popen) live
            ...                                           # in node1's network namespace
        cluster.registry_egress(), cluster.lan_bytes()    # byte counters (veths)
        cluster.kill_dfdaemon("node1"); cluster.start_dfdaemon("node1")   # faults, restarts

Hosts, each a network namespace `fdf<pid>-<name>` with its own IP (and its own dfdaemon
`host.hostname` / `host.ip`, so the scheduler sees distinct peers: host id "<ip>-<name>"),
joined by a bridge `fdf<pid>b` (10.214.X.1/24 in the root namespace, so this process reaches
every host) through veth pairs (`fdf<pid>h<i>` on the bridge, `eth0` inside):

| host | IP | runs |
|---|---|---|
| reg | .10 | Debian's docker-registry (coldstart.registry), behind the uplink |
| sched | .11 | the Dragonfly scheduler (v2.5.1, no manager: a local dynconfig) |
| seed | .12 | dfdaemon as a super seed peer (`seed=False`: none) |
| node1..nodeN | .21.. | dfdaemon, a normal peer; the node's fscached runs here too |

Shaping (tbf, `_add_tbf` of coldstart.netns): the registry's uplink (what it sends, default
100 Mbit/s) plus a 2 ms round trip (netem when the kernel has it, else coldstart.netns's delay
relay in the registry's namespace); every other host's link at the LAN rate (default 1 Gbit/s)
both ways. Counters: `registry_egress()` = rx_bytes of the registry's bridge-side veth (every
byte the registry sent, to anyone, headers included); `lan_bytes()` = what the seed and the
nodes sent into the bridge (pieces between peers, plus their small requests).

Configs are generated with every path under `workdir/<host>/` (storage, sockets, logs,
plugins, cache, dynconfig): nothing in /var/lib, /var/run, /var/log, /etc or /usr/local.
Start order is the one Dragonfly needs: registry, scheduler (its grpc health SERVING), then the
dfdaemons (which exit without a serving scheduler), each until `GET :4003/healthy` answers 200.
A dfdaemon started again right after a kill -9 fails for up to ~60 s with EADDRINUSE (its
storage port 4005, bound without SO_REUSEADDR, still has connections in TIME_WAIT):
`start_dfdaemon` retries until `restart_timeout`.

The scheduler puts a seed peer into its hash ring only at its health round, every 30 s from its
own start; until then normal peers download from the registry themselves. `wait_seed_usable()`
waits for the first round after the seed announced itself (it is called by `start()`; again
after a restart of the seed or the scheduler).

Everything stops by itself: `stop()` (the context manager's exit, also after an exception)
stops every process (SIGTERM, SIGKILL after 10 s), removes the namespaces, veths and the
bridge; every process gets SIGKILL if the thread that started it dies (PR_SET_PDEATHSIG: start
and stop the cluster from one thread); the leftovers of a killed run (names with a dead pid)
are removed at the next start.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pyroute2 import IPRoute, NetNS, netns

from coldstart import ColdstartError, one_line
from coldstart.netns import (NetnsRegistry, _add_tbf, _has_netem, _remove_link, _remove_ns, remove_leftovers,
                             stop_relay_and_registry)

PREFIX = "fdf"
SUBNET = "10.214"
RATES = {"100mbit": 100_000_000, "1gbit": 1_000_000_000, "10gbit": 10_000_000_000, "unshaped": None}
DELAY_MS = 1.0  # one way: the uplink's round trip is 2 ms
SCHEDULER_PORT = 8002
SEED_REFRESH_SECONDS = 30.0  # the scheduler's SeedPeerRefreshInterval (not configurable)
PORTS = {"upload": 4000, "proxy": 4001, "metrics": 4002, "health": 4003, "stats": 4004,
         "storage_tcp": 4005, "storage_quic": 4006}
ADDR_IN_USE = "Address already in use"
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class ClusterError(ColdstartError):
    """A cluster step that failed, in one line."""


def rate_bits(name: str) -> int | None:
    try:
        return RATES[name]
    except KeyError:
        raise ClusterError(f"link rate {name!r} is unknown (choose {', '.join(RATES)})") from None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it goes away."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Host:
    name: str
    index: int          # position on the bridge (the veth's name)
    ip: str
    ns: str
    host_if: str        # the veth end on the bridge, in the root namespace
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: list[dict[str, Any]] = field(default_factory=list)  # every start: attempts, seconds

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class DragonflyCluster:
    """See the module docstring."""

    def __init__(self, workdir: Path, nodes: int = 3, *, uplink: str = "100mbit", lan: str = "1gbit",
                 seed: bool = True, restart_timeout: float = 120.0,
                 back_to_source_concurrency: int | None = None, log_level: str = "info",
                 registry_users: dict[str, str] | None = None, peers: bool = True) -> None:
        """peers=False: the same network and registry, no scheduler and no dfdaemon (nodes that
        fetch straight from the registry, to compare with)."""
        if not 1 <= nodes <= 16:
            raise ClusterError(f"nodes must be 1..16, not {nodes}")
        self.workdir = Path(workdir).resolve()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.uplink, self.lan = uplink, lan
        self.uplink_bits, self.lan_bits = rate_bits(uplink), rate_bits(lan)
        self.with_peers = peers
        self.with_seed = seed and peers
        self.restart_timeout = restart_timeout
        self.back_to_source_concurrency = back_to_source_concurrency
        self.log_level = log_level
        self.registry_users = dict(registry_users or {})
        tag = f"{PREFIX}{os.getpid()}"
        self.tag = tag
        self.bridge = f"{tag}b"
        self.hosts: dict[str, Host] = {}
        self.registry: NetnsRegistry | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.relay_port = 0
        self.delay_mode = "none"
        self.scheduler_started = 0.0  # time.monotonic() of the scheduler's last start
        self.timings: dict[str, float] = {}
        self.scheduler_bin: Path | None = None
        self.dfdaemon_bin: Path | None = None
        self._net: ipaddress.IPv4Network | None = None
        self._made: list[str] = []  # namespaces we created

    # -- addresses ------------------------------------------------------------------------------
    @property
    def registry_host(self) -> str:
        """host:port of the registry as every host reaches it (through the uplink)."""
        reg = self.hosts["reg"]
        if self.relay is not None:
            return f"{reg.ip}:{self.relay_port}"
        if self.registry is None:
            raise ClusterError("the cluster is not started")
        return self.registry.host

    def blob_url(self, repo: str, digest_hex: str) -> str:
        return f"http://{self.registry_host}/v2/{repo}/blobs/sha256:{digest_hex}"

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload `data` as a blob of `repo` (POST + PUT, as a client would); its sha256 hex."""
        assert self.registry is not None
        digest = hashlib.sha256(data).hexdigest()
        base = f"http://{self.registry_host}"
        auth = self.registry.auth_header()
        req = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", data=b"", method="POST", headers=auth)
        with urllib.request.urlopen(req, timeout=60) as resp:
            location = urllib.parse.urljoin(base + "/", resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        req = urllib.request.Request(f"{location}{sep}digest=sha256:{digest}", data=data, method="PUT",
                                     headers={**auth, "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            if resp.status != 201:
                raise ClusterError(f"push of blob {digest} to {repo}: HTTP {resp.status}")
        return digest

    def ip(self, name: str) -> str:
        return self._host(name).ip

    def socket(self, name: str) -> Path:
        """The dfdaemon's gRPC unix socket of `name` (a node or the seed)."""
        return self._host(name).dir / "dfdaemon.sock"

    def proxy_url(self, name: str) -> str:
        return f"http://{self.ip(name)}:{PORTS['proxy']}"

    def health_url(self, name: str) -> str:
        return f"http://{self.ip(name)}:{PORTS['health']}/healthy"

    def metrics_url(self, name: str) -> str:
        return f"http://{self.ip(name)}:{PORTS['metrics']}/metrics"

    def peers(self) -> list[str]:
        """The hosts running a dfdaemon: the seed (if any) and the nodes."""
        if not self.with_peers:
            return []
        return (["seed"] if self.with_seed else []) + self.nodes

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise ClusterError(f"no host {name!r} in the cluster ({', '.join(self.hosts) or 'not started'})") from None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> DragonflyCluster:
        from coldstart.peers import binary

        t0 = time.monotonic()
        cleanup_leftovers()
        try:
            if self.with_peers:
                self.scheduler_bin = binary("scheduler")
                self.dfdaemon_bin = binary("dfdaemon")
            self._network()
            self.timings["network"] = time.monotonic() - t0
            self._start_registry()
            self.timings["registry"] = time.monotonic() - t0
            if self.with_peers:
                self.start_scheduler()
                self.timings["scheduler"] = time.monotonic() - t0
                self._start_peers(self.peers())
                self.timings["dfdaemons"] = time.monotonic() - t0
            if self.with_seed:
                self.wait_seed_usable()
                self.timings["seed_usable"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> DragonflyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Idempotent: every process, then the namespaces, veths and the bridge."""
        for host in self.hosts.values():
            if host.name != "reg":
                self._stop_proc(host, signal.SIGTERM)
        stop_relay_and_registry(self.relay, self.registry)
        self.relay, self.registry = None, None
        for ns in self._made:
            _remove_ns(ns)
        self._made = []
        for host in self.hosts.values():
            _remove_link(host.host_if)
        _remove_link(self.bridge)

    # -- the network ------------------------------------------------------------------------------
    def _network(self) -> None:
        self._net = net = _free_subnet()
        plan = [("reg", 10)] + ([("sched", 11)] if self.with_peers else []) + ([("seed", 12)] if self.with_seed else [])
        plan += [(name, 20 + i) for i, name in enumerate(self.nodes, start=1)]
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=br, address=str(net[1]), prefixlen=24)
            ipr.link("set", index=br, state="up")
        for i, (name, last) in enumerate(plan):
            host = Host(name, i, str(net[last]), f"{self.tag}-{name}", f"{self.tag}h{i}", self.workdir / name)
            shutil.rmtree(host.dir, ignore_errors=True)  # an earlier run's logs would be read as ours
            host.dir.mkdir(parents=True)
            self.hosts[name] = host
            self._add_host(host, str(net[1]))
        self._shape()

    def _add_host(self, host: Host, gateway: str) -> None:
        try:
            netns.create(host.ns)
        except OSError as exc:
            raise ClusterError(f"network namespace {host.ns}: cannot create it: {exc.strerror or exc}") from None
        self._made.append(host.ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=host.host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host.ns})
            idx = ipr.link_lookup(ifname=host.host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=self.bridge)[0])
            ipr.link("set", index=idx, state="up")
        with NetNS(host.ns) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            eth = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth, address=host.ip, prefixlen=24)
            ns.link("set", index=eth, state="up")
            ns.route("add", dst="default", gateway=gateway)

    def _shape(self) -> None:
        """The uplink: the registry's egress at the uplink rate (+ the delay); every other
        host's link at the LAN rate, both ways. Traffic between the root namespace and a host
        crosses the host's veth too (this process's probes: negligible)."""
        reg = self.hosts["reg"]
        if self.uplink_bits is not None:
            self.delay_mode = "netem" if _has_netem(reg.ns) else "relay"
        with NetNS(reg.ns) as ns:
            idx = ns.link_lookup(ifname="eth0")[0]
            if self.delay_mode == "netem":
                ns.tc("add", "netem", index=idx, handle="1:0", delay=int(DELAY_MS * 1000), limit=100_000)
            if self.uplink_bits is not None:
                _add_tbf(ns, idx, self.uplink_bits, "1:1" if self.delay_mode == "netem" else None)
        if self.delay_mode == "netem":
            with IPRoute() as ipr:
                ipr.tc("add", "netem", index=ipr.link_lookup(ifname=reg.host_if)[0], handle="1:0",
                       delay=int(DELAY_MS * 1000), limit=100_000)
        if self.lan_bits is None:
            return
        for host in self.hosts.values():
            if host.name == "reg":
                continue
            with NetNS(host.ns) as ns:
                _add_tbf(ns, ns.link_lookup(ifname="eth0")[0], self.lan_bits, None)
            with IPRoute() as ipr:
                _add_tbf(ipr, ipr.link_lookup(ifname=host.host_if)[0], self.lan_bits, None)

    # -- processes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """Processes this thread starts in the block live in `name`'s network namespace (only
        the network: the mount namespace stays the caller's, so their mounts are everyone's)."""
        netns.pushns(self._host(name).ns)
        try:
            yield
        finally:
            netns.popns()

    def popen(self, name: str, args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        """`args` started in `name`'s namespace, output appended to `log`; SIGKILLed if this
        thread dies."""
        with self.inside(name), open(log, "ab") as out:
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent, **kwargs)

    def _stop_proc(self, host: Host, sig: int, timeout: float = 10.0) -> None:
        proc = host.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        host.proc = None

    def _start_registry(self) -> None:
        reg = self.hosts["reg"]
        relay = self.delay_mode == "relay"
        self.registry = NetnsRegistry(reg.dir, reg.ns, "127.0.0.1" if relay else reg.ip, access_log=True,
                                      log_level="info", users=self.registry_users)
        self.registry.start()
        if relay:
            self.relay_port = self.registry.port + 1 if self.registry.port < 65535 else self.registry.port - 1
            self.relay = self.popen("reg", [sys.executable, "-m", "coldstart.netns", "relay", reg.ip,
                                            str(self.relay_port), str(self.registry.port), repr(2 * DELAY_MS / 1000)],
                                    reg.dir / "relay.log", cwd=str(Path(__file__).resolve().parent.parent))
            _wait(lambda: _connects(reg.ip, self.relay_port), 10, "the registry's delay relay",
                  lambda: self.relay is not None and self.relay.poll() is not None)

    # -- the scheduler --------------------------------------------------------------------------------
    def _scheduler_config(self) -> Path:
        host = self.hosts["sched"]
        d = host.dir
        config = d / "scheduler.yaml"
        config.write_text(f"""\
# scheduler --config {config} --dynconfig {d / 'dynconfig.yaml'}   (d7y.io/dragonfly/v2 v2.5.1)
# no manager block (a local dynconfig), no database.redis.addrs (no Redis)
server:
  advertiseIP: {host.ip}
  advertisePort: {SCHEDULER_PORT}
  listenIP: 0.0.0.0
  port: {SCHEDULER_PORT}
  host: sched
  logDir: {d / 'log'}
  pluginDir: {d / 'plugins'}
  logLevel: {self.log_level}
scheduler:
  algorithm: default
  backToSourceCount: 200
  retryBackToSourceLimit: 4
  retryLimit: 5
  retryInterval: 500ms
  gc:
    pieceDownloadTimeout: 30m
    peerGCInterval: 10s
    peerTTL: 24h
    taskGCInterval: 30m
    hostGCInterval: 5m
    hostTTL: 1h
dynConfig:
  refreshInterval: 10s
seedPeer:
  taskDownloadTimeout: 1h
metrics:
  enable: true
  addr: ":8000"
console: false
""")
        dyn = d / "dynconfig.yaml"
        if not dyn.exists():
            dyn.write_text("seedPeerClusterConfig: {loadLimit: 2000}\n"
                           "schedulerClusterConfig: {candidateParentLimit: 3, filterParentLimit: 15}\n"
                           "schedulerClusterClientConfig: {loadLimit: 200}\n")
        return config

    def start_scheduler(self, timeout: float = 30.0) -> float:
        """Start the scheduler and wait for its grpc health; the seconds it took."""
        host = self.hosts["sched"]
        if host.pid is not None:
            raise ClusterError("the scheduler is running already")
        config = self._scheduler_config()
        t0 = time.monotonic()
        host.proc = self.popen("sched", [str(self.scheduler_bin), "--config", str(config), "--dynconfig",
                                         str(host.dir / "dynconfig.yaml")], host.dir / "stdout.log")
        self.scheduler_started = t0
        proc = host.proc
        _wait(lambda: _grpc_serving(f"{host.ip}:{SCHEDULER_PORT}"), timeout, "the scheduler's grpc health",
              lambda: proc.poll() is not None, lambda: self.log_tail("sched"))
        seconds = time.monotonic() - t0
        host.starts.append({"attempts": 1, "seconds": round(seconds, 3)})
        return seconds

    def stop_scheduler(self, sig: int = signal.SIGTERM) -> None:
        self._stop_proc(self.hosts["sched"], sig)

    def scheduler_log(self) -> Path:
        return self.hosts["sched"].dir / "log" / "scheduler" / "core.log"

    def scheduler_records(self) -> list[dict[str, Any]]:
        """The scheduler's log records (JSON lines), oldest first."""
        records = []
        try:
            text = self.scheduler_log().read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def tasks(self) -> dict[str, dict[str, Any]]:
        """What the scheduler registered, by task id: {"urls": {...}, "hosts": {...}, "peers":
        n, "seed_triggers": n, "ranges": {...}} from its log (every RegisterPeerRequest names its
        url, range, host, task and peer; every trigger of the seed names its task)."""
        tasks: dict[str, dict[str, Any]] = {}
        for r in self.scheduler_records():
            msg = str(r.get("msg", ""))
            if msg.startswith("receive RegisterPeerRequest, url: "):
                task = tasks.setdefault(r["taskID"], {"urls": set(), "hosts": set(), "peers": 0,
                                                      "seed_triggers": 0, "ranges": set()})
                task["urls"].add(msg.split("url: ", 1)[1].split(",", 1)[0])
                task["hosts"].add(r.get("hostID", ""))
                task["peers"] += 1
                m = re.search(r"Start:(0x[0-9a-f]+), Length:(0x[0-9a-f]+)", msg)
                task["ranges"].add((int(m.group(1), 16), int(m.group(2), 16)) if m else None)
            m = re.match(r"selected seed peer \S+ for task ([0-9a-f]{64})", msg)
            if m:
                tasks.setdefault(m.group(1), {"urls": set(), "hosts": set(), "peers": 0, "seed_triggers": 0,
                                              "ranges": set()})["seed_triggers"] += 1
        return tasks

    def wait_seed_usable(self, timeout: float = 3 * SEED_REFRESH_SECONDS) -> float:
        """Wait for the scheduler's first seed health round after the seed announced itself
        (the seed's last start); ClusterError if that round did not take it. The seconds waited."""
        seed = self._host("seed")
        if not seed.starts or seed.pid is None:
            raise ClusterError("the seed peer is not running")
        announced = seed.starts[-1]["healthy_at"]
        rounds = max(1, int((announced - self.scheduler_started) // SEED_REFRESH_SECONDS) + 1)
        due = self.scheduler_started + rounds * SEED_REFRESH_SECONDS + 0.5
        if due - time.monotonic() > timeout:
            raise ClusterError(f"the scheduler's next seed round is {due - time.monotonic():.0f} s away")
        t0 = time.monotonic()
        skip = len(self.scheduler_records())
        # the round's health check of the seed: its errors, or the warning that none announced
        while time.monotonic() < due:
            time.sleep(min(0.5, max(0.0, due - time.monotonic())))
        bad = [str(r.get("msg")) for r in self.scheduler_records()[skip:]
               if "no seed peer found" in str(r.get("msg")) or "failed to check the healthy for seed peer"
               in str(r.get("msg"))]
        if bad:
            raise ClusterError(f"the scheduler did not take the seed peer at its round: {one_line(bad[-1], 300)}")
        return time.monotonic() - t0

    # -- dfdaemons ------------------------------------------------------------------------------------
    def _dfdaemon_config(self, name: str) -> Path:
        host = self._host(name)
        d = host.dir
        seed = name == "seed"
        concurrency = (f"\n  backToSourceConcurrentPieceCount: {self.back_to_source_concurrency}"
                       if self.back_to_source_concurrency else "")
        config = d / "dfdaemon.yaml"
        config.write_text(f"""\
# dfdaemon --config {config} --dynconfig {d / 'dynconfig.yaml'} --log-dir {d / 'log'}   (dragonfly-client 1.5.10)
host:
  hostname: {name}
  ip: {host.ip}
server:
  pluginDir: {d / 'plugins'}
  cacheDir: {d / 'cache'}
download:
  server:
    socketPath: {self.socket(name)}{concurrency}
upload:
  server:
    port: {PORTS['upload']}
storage:
  dir: {d / 'storage'}
  keep: false
  server:
    tcpPort: {PORTS['storage_tcp']}
    quicPort: {PORTS['storage_quic']}
proxy:
  server:
    port: {PORTS['proxy']}
  # no rules: only requests with X-Dragonfly-Use-P2P: true go through P2P
health:
  server:
    port: {PORTS['health']}
metrics:
  server:
    port: {PORTS['metrics']}
stats:
  server:
    port: {PORTS['stats']}
seedPeer:
  enable: {'true' if seed else 'false'}
  type: super
dynconfig:
  refreshInterval: 10s
scheduler:
  announceInterval: 30s
""")
        (d / "dynconfig.yaml").write_text(f"scheduler:\n  addrs: ['{self.hosts['sched'].ip}:{SCHEDULER_PORT}']\n")
        return config

    def _start_peers(self, names: list[str]) -> None:
        """Start several dfdaemons at once (each takes ~2 s to be healthy): spawned from this
        thread (they die with the thread that started them), waited for in threads; one that
        met EADDRINUSE is started again by start_dfdaemon's retry loop."""
        errors: dict[str, BaseException] = {}
        for name in names:
            self._spawn_dfdaemon(name)
        waits = [threading.Thread(target=self._wait_dfdaemon_recorded, args=(name, errors), daemon=True,
                                  name=f"wait-{name}") for name in names]
        for t in waits:
            t.start()
        for t in waits:
            t.join()
        for name in [n for n in errors if ADDR_IN_USE in self.dfdaemon_output(n)]:
            del errors[name]
            self._stop_proc(self._host(name), signal.SIGKILL)
            self.start_dfdaemon(name)
        if errors:
            raise next(iter(errors.values()))

    def _wait_dfdaemon_recorded(self, name: str, errors: dict[str, BaseException]) -> None:
        host = self._host(name)
        t0 = host.starts[-1]["spawned_at"]
        try:
            self._wait_dfdaemon(name)
        except BaseException as exc:
            errors[name] = exc
            return
        now = time.monotonic()
        host.starts[-1].update(seconds=round(now - t0, 3), healthy_at=now)

    def _spawn_dfdaemon(self, name: str) -> None:
        host = self._host(name)
        if host.pid is not None:
            raise ClusterError(f"{name}'s dfdaemon is running already")
        config = self._dfdaemon_config(name)
        out = host.dir / "stdout.log"
        offset = out.stat().st_size if out.exists() else 0
        host.proc = self.popen(name, [str(self.dfdaemon_bin), "--config", str(config), "--dynconfig",
                                      str(host.dir / "dynconfig.yaml"), "--log-dir", str(host.dir / "log")], out)
        host.starts.append({"attempts": 1, "spawned_at": time.monotonic(), "out_offset": offset})

    def _wait_dfdaemon(self, name: str, timeout: float = 30.0) -> None:
        host = self._host(name)
        proc = host.proc
        assert proc is not None
        url = self.health_url(name)
        _wait(lambda: _http_ok(url), timeout, f"{name}'s dfdaemon ({url})", lambda: proc.poll() is not None,
              lambda: " | ".join(self.dfdaemon_output(name).splitlines()[-4:]))

    def start_dfdaemon(self, name: str) -> dict[str, Any]:
        """Start `name`'s dfdaemon and wait until it is healthy; while it exits with
        EADDRINUSE (a restart right after a kill), start it again every 2 s until
        `restart_timeout`. Returns {"attempts", "seconds"}."""
        host = self._host(name)
        t0 = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            if host.pid is None:
                self._spawn_dfdaemon(name)
            try:
                self._wait_dfdaemon(name)
                break
            except ClusterError as exc:
                self._stop_proc(host, signal.SIGKILL)
                if ADDR_IN_USE not in self.dfdaemon_output(name) or time.monotonic() - t0 > self.restart_timeout:
                    raise ClusterError(f"{name}'s dfdaemon did not start ({attempts} attempts in "
                                       f"{time.monotonic() - t0:.0f} s): {exc}") from None
                time.sleep(2.0)
        now = time.monotonic()
        host.starts[-1].update(attempts=attempts, seconds=round(now - t0, 3), healthy_at=now)
        return {"attempts": attempts, "seconds": now - t0}

    def kill_dfdaemon(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop `name`'s dfdaemon with `sig` (SIGKILL: a crash; SIGTERM: a clean stop)."""
        host = self._host(name)
        if host.pid is None:
            raise ClusterError(f"{name}'s dfdaemon is not running")
        self._stop_proc(host, sig)

    def dfdaemon_running(self, name: str) -> bool:
        return self._host(name).pid is not None

    def dfdaemon_output(self, name: str) -> str:
        """What `name`'s dfdaemon printed since its last start (its fatal errors go there), without
        the lines grpc's fork handlers print in the child before it execs."""
        host = self._host(name)
        offset = host.starts[-1].get("out_offset", 0) if host.starts else 0
        try:
            with open(host.dir / "stdout.log", "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(line for line in text.splitlines() if line.strip() and not _GRPC_FORK_NOISE.match(line))

    def log_tail(self, name: str, file: str = "stdout.log", n: int = 6) -> str:
        try:
            lines = (self._host(name).dir / file).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-n:])

    def dfdaemon_logs(self, name: str) -> str:
        """Everything `name`'s dfdaemon logged (its log dir's files, oldest first)."""
        d = self._host(name).dir / "log"
        parts = []
        for path in sorted(d.rglob("*")) if d.is_dir() else []:
            if path.is_file() and "dfdaemon" in path.name:
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def downloads(self, name: str, url: str | None = None) -> list[dict[str, Any]]:
        """The DownloadTask requests `name`'s dfdaemon started (gRPC and proxy alike), oldest
        first, from its log ("download task started: Download { url, range, ... }"): url, range
        ((start, length) or None), prefetch, is_prefetch, task_id, header_range ((first, last)
        of a Range request header, or None). Only those of `url` if given.
        (dfdaemon logs each request's headers there too, Authorization included.)"""
        found = []
        for m in _DOWNLOAD_STARTED.finditer(self.dfdaemon_logs(name)):
            if url is not None and m.group("url") != url:
                continue
            rng = (int(m.group("start")), int(m.group("length"))) if m.group("start") else None
            header = _HEADER_RANGE.search(m.group("headers"))
            found.append({"url": m.group("url"), "range": rng, "prefetch": m.group("prefetch") == "true",
                          "is_prefetch": m.group("is_prefetch") == "true", "task_id": m.group("task"),
                          # the proxy's requests carry their range as a header
                          "header_range": (int(header.group(1)), int(header.group(2))) if header else None})
        return found

    # -- counters -------------------------------------------------------------------------------------
    def registry_egress(self) -> int:
        """Bytes the registry sent (its veth's bridge end received them), headers included."""
        return _rx(self.hosts["reg"].host_if)

    def lan_bytes(self) -> int:
        """Bytes the seed and the nodes sent into the LAN (pieces to each other, requests)."""
        senders = (["seed"] if self.with_seed else []) + self.nodes
        return sum(_rx(self.hosts[name].host_if) for name in senders)

    def registry_blob_gets(self) -> dict[str, int]:
        """blob digest hex -> how many GETs of it the registry's access log shows (the stat
        `Range: bytes=0-0` of every new task included)."""
        counts: dict[str, int] = {}
        for digest, _status, _size, _agent in self._access_log():
            counts[digest] = counts.get(digest, 0) + 1
        return counts

    def registry_blob_bytes(self) -> dict[str, dict[str, int]]:
        """blob digest hex -> {user agent: body bytes the registry sent for it}, from its access
        log. dfdaemon says `dragonfly/<version>` when it goes back to source for a task started
        over gRPC, but forwards its client's own headers for a task its HTTP proxy started (so a
        seed peer fetching for a proxy user shows that user's agent); fscached's own registry
        reads show aiohttp's."""
        sent: dict[str, dict[str, int]] = {}
        for digest, status, size, agent in self._access_log():
            if status in (200, 206):
                per = sent.setdefault(digest, {})
                per[agent] = per.get(agent, 0) + size
        return sent

    def _access_log(self) -> list[tuple[str, int, int, str]]:
        try:
            text = (self.hosts["reg"].dir / "registry.log").read_text(errors="replace")
        except (OSError, KeyError):
            return []
        return [(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)) for m in _ACCESS.finditer(text)]


# --------------------------------------------------------------------------- helpers

_ACCESS = re.compile(r'"GET /v2/[^" ]*/blobs/sha256:([0-9a-f]{64}) HTTP/[\d.]+" (\d{3}) (\d+) "[^"]*" "([^"]*)"')
_GRPC_FORK_NOISE = re.compile(r"[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.cc:\d+\]")
_DOWNLOAD_STARTED = re.compile(
    r'download task started: Download \{ url: "(?P<url>[^"]*)", range: (?:None|Some\(Range \{ start: '
    r'(?P<start>\d+), length: (?P<length>\d+) \}\)), .*?prefetch: (?P<prefetch>true|false), '
    r'is_prefetch: (?P<is_prefetch>true|false), .*?request_header: \{(?P<headers>[^}]*)\}.*?'
    r'task_id="(?P<task>[0-9a-f]+)"')
_HEADER_RANGE = re.compile(r'"range": "bytes=(\d+)-(\d+)"', re.IGNORECASE)


def _rx(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/rx_bytes").read_text())


def _wait(ready: Any, timeout: float, what: str, dead: Any = None, why: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if dead is not None and dead():
            raise ClusterError(f"{what}: the process exited: {one_line(why() if why else '', 300)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not ready within {timeout:g} s: {one_line(why() if why else '', 300)}")
        time.sleep(0.05)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _grpc_serving(target: str) -> bool:
    """grpc.health.v1.Health/Check answers SERVING (raw bytes: an empty request; the answer
    `status: SERVING` is field 1 = 1, b"\\x08\\x01"). With the authority option: dfdaemon's h2
    server resets streams whose :authority is not a plain host name (grpc-python sends a unix
    socket's path there), and it does no harm elsewhere."""
    import grpc

    try:
        with grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")]) as ch:
            check = ch.unary_unary("/grpc.health.v1.Health/Check")
            return bool(check(b"", timeout=1) == b"\x08\x01")
    except grpc.RpcError:
        return False


def _free_subnet() -> ipaddress.IPv4Network:
    """The first 10.214.X.0/24 with no address on this host yet."""
    with IPRoute() as ipr:
        used = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
    taken = {ipaddress.ip_address(a) for a in used if a}
    for x in range(256):
        net = ipaddress.IPv4Network(f"{SUBNET}.{x}.0/24")
        if not any(a in net for a in taken):
            return net
    raise ClusterError(f"no free {SUBNET}.X.0/24 for the cluster's bridge")


_OURS = re.compile(rf"{PREFIX}(\d+)(?:-[a-z0-9]+|b|h\d+)$")


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and links named fdf<pid>* whose pid is dead; what was removed."""
    return remove_leftovers(_OURS)
