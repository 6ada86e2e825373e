"""N nodes starting one container image at the same moment (issue 16): through Dragonfly, or
each straight from the registry, on the same network.

    profile = record_profile(workload, workdir)               # once: what start-up reads
    r = run_fleet(workload, 8, "dragonfly", workdir, profile=profile)
    r.median, r.worst, r.registry_egress, r.lan_bytes, r.warm

A run is a fresh coldstart.dragonfly.DragonflyCluster of `nodes` nodes (the registry behind a
100 Mbit/s, 2 ms uplink, a 1 Gbit/s LAN; with `via="dragonfly"` the scheduler, a seed peer and
a dfdaemon per node, else no peer at all), the workload's nydus form pushed to its registry (and
the start-up profile beside it, when given). On every node a fresh `fscached` (the real CLI, an
API socket, an empty cache) runs in the node's network namespace before t0, as on a node. One
containerd (with state of its own) runs every node's container: at t0 every node binds the image
at once (API `PUT /api/v2/blobs` with `ref`, its `mountpoint` and, through Dragonfly, the node's
dfdaemon socket in `dragonfly`), then runs the workload's command with `ctr run --rootfs` on an
overlay over its own mount. Measured per node: seconds from t0 to the container's first output
line (checked to be the workload's), the bind's seconds; per run: the registry's egress (its
veth) and the bytes the nodes and the seed sent over the LAN from t0 to the last container's
exit.

`warm`: then, page cache dropped, the same N containers run again at once on the mounts whose
cache files are now filled: no network at all. Their spread is what N nodes' start-up costs on
this machine's CPUs and disk (all N nodes share 2 cores here): the part of the cold spread that
is not the network.
"""
from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coldstart import ColdstartError, drop_caches, one_line, run as run_cmd, unmount_under
from coldstart.containerd import Containerd, RunResult
from coldstart.dragonfly import DragonflyCluster
from coldstart.scenario import FSID, Daemon
from coldstart.workload import TAG, Workload

VIAS = ("dragonfly", "registry")
REPO = "coldstart/fleet"
RECORD_SECONDS = 60.0


@dataclass
class NodeStart:
    node: str
    seconds: float          # t0 -> the container's first output line
    bind_seconds: float     # t0 -> the bind answered (the bootstrap pulled, the image mounted)
    exit_seconds: float     # t0 -> the container exited


@dataclass
class FleetResult:
    nodes: int
    via: str
    profile: bool
    starts: list[NodeStart]
    registry_egress: int    # bytes the registry sent from t0 to the last exit (its veth)
    lan_bytes: int          # bytes the nodes and the seed sent over the LAN meanwhile
    image_bytes: int        # the nydus image in the registry (blobs + bootstrap)
    warm: list[float] = field(default_factory=list)  # the same starts again, no network
    cluster_seconds: float = 0.0  # the cluster's start (network, registry, scheduler, peers, seed round)
    registry_by_agent: dict[str, int] = field(default_factory=dict)  # the egress by user agent (access log)

    @property
    def seconds(self) -> list[float]:
        return [s.seconds for s in self.starts]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def worst(self) -> float:
        return max(self.seconds)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(median=self.median, worst=self.worst)
        if self.warm:
            doc.update(warm_median=statistics.median(self.warm), warm_worst=max(self.warm))
        return doc


def _push_nydus(workload: Workload, registry_host: str) -> str:
    ref = f"{registry_host}/{REPO}:nydus"
    run_cmd(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{workload.nydus / 'oci'}:{TAG}",
             f"docker://{ref}"], f"skopeo copy of the workload to {ref}", timeout=1800)
    return ref


def _push_profile(profile: Path, ref: str) -> None:
    run_cmd([sys.executable, "-m", "erofs_image.cli", "profile", "push", str(profile), ref, "--plain-http"],
            f"fscached-image profile push to {ref}", timeout=300)


def record_profile(workload: Workload, workdir: Path) -> Path:
    """A recording node (straight from the registry: what start-up reads does not depend on
    where the bytes come from): bind with record_profile, run, unbind; the profile, copied to
    `workdir/profile.json`."""
    workdir.mkdir(parents=True, exist_ok=True)
    with DragonflyCluster(workdir / "cluster", nodes=1, peers=False, uplink="unshaped", lan="unshaped") as cluster:
        ref = _push_nydus(workload, cluster.registry_host)
        daemon = Daemon(workdir / "rec")
        try:
            with cluster.inside("node1"):
                daemon.start()
            with Containerd(workdir / "ctd") as ctd:
                mnt = workdir / "rec" / "mnt"
                daemon.bind(ref, mnt, record_profile=RECORD_SECONDS, profile="none")
                with ctd.overlay_rootfs(mnt) as rootfs:
                    result = ctd.run(workload.command, rootfs=rootfs)
                workload.check_output(result.lines, "recording run")
                daemon.unbind()
            recorded = daemon.work_dir / "profiles" / f"{FSID}.json"
            deadline = time.monotonic() + 30
            while not recorded.exists():
                if time.monotonic() > deadline:
                    raise ColdstartError(f"no profile at {recorded} within 30 s of the unbind: "
                                         f"{one_line(daemon.log_tail())}")
                time.sleep(0.05)
            shutil.copy(recorded, workdir / "profile.json")
        finally:
            daemon.stop()
    return workdir / "profile.json"


def _image_bytes(workload: Workload) -> int:
    return workload.nydus_blob_bytes + workload.bootstrap_bytes


def run_fleet(workload: Workload, nodes: int, via: str, workdir: Path, *, profile: Path | None = None,
              warm: bool = True, progress: Any = None, **cluster_options: Any) -> FleetResult:
    """See the module docstring. `workdir` must not exist yet (it is removed afterwards);
    `cluster_options` go to DragonflyCluster (uplink, lan, back_to_source_concurrency)."""
    if via not in VIAS:
        raise ColdstartError(f"via {via!r}: choose {', '.join(VIAS)}")
    say = progress or (lambda _m: None)
    workdir.mkdir(parents=True)
    t_cluster = time.monotonic()
    cluster = DragonflyCluster(workdir / "c", nodes=nodes, peers=via == "dragonfly", **cluster_options)
    daemons: dict[str, Daemon] = {}
    try:
        cluster.start()
        cluster_seconds = time.monotonic() - t_cluster
        say(f"{nodes} node(s) via {via}: cluster up in {cluster_seconds:.0f} s")
        ref = _push_nydus(workload, cluster.registry_host)
        if profile is not None:
            _push_profile(profile, ref)
        for node in cluster.nodes:
            daemons[node] = Daemon(workdir / node)
            with cluster.inside(node):
                daemons[node].start()
        with Containerd(workdir / "ctd") as ctd:
            starts, egress, lan = _cold(cluster, ctd, daemons, workload, ref, via, profile is not None)
            by_agent: dict[str, int] = {}
            for per in cluster.registry_blob_bytes().values():
                for agent, n in per.items():
                    by_agent[agent] = by_agent.get(agent, 0) + n
            warm_seconds = _warm(ctd, daemons, workload) if warm else []
        return FleetResult(nodes, via, profile is not None, starts, egress, lan, _image_bytes(workload),
                           warm_seconds, round(cluster_seconds, 1), by_agent)
    finally:
        for daemon in daemons.values():
            daemon.stop()
        cluster.stop()
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_nodes(names: list[str], one: Any) -> dict[str, Any]:
    """one(name) for every name at once (a thread each); their results, or the first error."""
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            results[name] = one(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(n,), name=f"node-{n}") for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _cold(cluster: DragonflyCluster, ctd: Containerd, daemons: dict[str, Daemon], workload: Workload, ref: str,
          via: str, profile: bool) -> tuple[list[NodeStart], int, int]:
    lock = threading.Lock()
    with contextlib.ExitStack() as overlays:
        drop_caches()
        egress0, lan0 = cluster.registry_egress(), cluster.lan_bytes()
        t0 = time.monotonic()

        def start(node: str) -> NodeStart:
            extra: dict[str, Any] = {"profile": "auto" if profile else "none"}
            if via == "dragonfly":
                extra["dragonfly"] = str(cluster.socket(node))
            mnt = daemons[node].workdir / "mnt"
            daemons[node].bind(ref, mnt, **extra)
            bound = time.monotonic()
            with lock:  # one ExitStack for every node's overlay, entered from their threads
                rootfs = overlays.enter_context(ctd.overlay_rootfs(mnt, name=f"{node}-cold"))
            result = ctd.run(workload.command, rootfs=rootfs, container_id=f"{node}-cold-{id(ctd)}")
            return _started(node, t0, bound, result, workload)

        starts = _run_nodes(list(daemons), start)
        egress, lan = cluster.registry_egress() - egress0, cluster.lan_bytes() - lan0
    return [starts[n] for n in daemons], egress, lan


def _warm(ctd: Containerd, daemons: dict[str, Daemon], workload: Workload) -> list[float]:
    """The same containers again at once, their images' cache files filled: no network."""
    lock = threading.Lock()
    with contextlib.ExitStack() as overlays:
        drop_caches()
        t0 = time.monotonic()

        def start(node: str) -> NodeStart:
            with lock:
                rootfs = overlays.enter_context(ctd.overlay_rootfs(daemons[node].workdir / "mnt",
                                                                   name=f"{node}-warm"))
            result = ctd.run(workload.command, rootfs=rootfs, container_id=f"{node}-warm-{id(ctd)}")
            return _started(node, t0, t0, result, workload)

        starts = _run_nodes(list(daemons), start)
    return [starts[n].seconds for n in daemons]


def _started(node: str, t0: float, bound: float, result: RunResult, workload: Workload) -> NodeStart:
    if result.exit_code != 0:
        raise ColdstartError(f"{node}: ctr run exited {result.exit_code}: "
                             f"{one_line(result.stderr or ' | '.join(result.lines))}")
    workload.check_output(result.lines, f"{node}'s container")
    assert result.first_line_at is not None  # check_output saw a line
    return NodeStart(node, round(result.first_line_at - t0, 3), round(bound - t0, 3),
                     round(result.ended_at - t0, 3))


__all__ = ["VIAS", "FleetResult", "NodeStart", "record_profile", "run_fleet"]
