#!/usr/bin/env python3
"""Remote fetching benchmarks, each printed as a ratio against a baseline from the same run.

Host side, with a real registry (Debian's docker-registry on loopback) and the kernel simulator
(the same bytes as the kernel, so request counts are exact; times are host times):
  random : random 4 KiB READs over a 1 GiB image from the registry: registry requests per READ
           (goal: well below 1, thanks to read windows and joined fetches) and bytes fetched
           per byte read
  peer   : reading a whole blob through the stand-in Dragonfly peer vs straight from the
           registry (goal: the gRPC path costs < 15 %)
In the VM (--vm), the real kernel:
  cold   : cat of a 256 MiB file through fscached from the registry vs `curl` of the same blob
           from the same registry (goal >= 0.8)
Usage: bench/fetch.py [--image-mib 1024] [--reads 2000] [--vm] [--kernel 6.12]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "fscached"), str(REPO / "vm-tests")]

from erofs_image.builder import convert  # noqa: E402
from erofs_image.reader import Bootstrap  # noqa: E402
from fscached.config import ImageSpec, RegistrySpec  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from simdaemon import Running  # noqa: E402  (fscached on a thread, answering the simulator)
from standins.kernel_simulator import KernelSimulator  # noqa: E402


def make_image(work: Path, mib: int, compressor: str) -> Path:
    tree = work / f"tree-{mib}"
    if not tree.exists():
        tree.mkdir()
        for i in range(max(mib // 64, 1)):  # 64 MiB files of incompressible data
            with open(tree / f"part{i:03}.bin", "wb") as f:
                for _ in range(min(64, mib)):
                    f.write(os.urandom(1 << 20))
    out = work / f"image-{mib}-{compressor}"
    if not out.exists():
        convert(tree, out, compressor=compressor)
    return out


def push_blobs(registry: RegistryServer, image: Path, repo: str) -> None:
    for blob in (image / "blobs").iterdir():
        registry.push_blob(repo, blob.read_bytes())


def random_reads(work: Path, registry: RegistryServer, mib: int, reads: int) -> None:
    image = make_image(work, mib, "zstd")
    push_blobs(registry, image, "bench/random")
    boot = Bootstrap.open(image / "image.boot")
    spec = ImageSpec("rnd", image / "image.boot", None,
                     registry=RegistrySpec(registry.host, "bench/random", "http"))
    rng = random.Random(1)
    with KernelSimulator(work / "kernel-rnd") as sim:
        daemon = Running(sim, [spec], work / "cache-rnd")
        objects = [sim.mount("erofs,rnd", b.blob_id.encode()) for b in boot.blobs]
        start = time.monotonic()
        # a start-up-like pattern: reads cluster in a few hot regions, with some scattered ones
        hot = [rng.randrange(0, boot.blobs[0].uncompressed_size // 4096) for _ in range(reads // 20 or 1)]
        for _ in range(reads):
            obj = rng.choice(objects)
            size = obj.copen_result
            if rng.random() < 0.8:
                block = min(rng.choice(hot) + rng.randrange(0, 64), size // 4096 - 1)
            else:
                block = rng.randrange(0, size // 4096)
            sim.read(obj, block * 4096, 4096)
        elapsed = time.monotonic() - start
        counters = daemon.counters()
        daemon.stop()
    requests = sum(v for k, v in counters.items() if k.startswith("source:registry") and k.endswith(":ok"))
    print(f"random 4 KiB reads over a {mib} MiB zstd image from the registry ({reads} READs, {elapsed:.1f}s):")
    print(f"  registry requests per READ: {requests / reads:.3f} (goal: well below 1)")
    print(f"  bytes fetched per byte read: {counters.get('fetched_bytes', 0) / (reads * 4096):.1f} "
          f"(the 1 MiB read window's price; joined chunks: {counters.get('joined_chunks', 0)})")


def whole_blob_seconds(work: Path, spec: ImageSpec, blob_id: str, name: str) -> float:
    with KernelSimulator(work / f"kernel-{name}") as sim:
        daemon = Running(sim, [spec], work / f"cache-{name}")
        obj = sim.mount(f"erofs,{spec.fsid}", blob_id.encode())
        start = time.monotonic()
        step = 1 << 20
        for off in range(0, obj.copen_result, step):
            sim.read(obj, off, min(step, obj.copen_result - off))
        elapsed = time.monotonic() - start
        daemon.stop()
    return elapsed


def peer_overhead(work: Path, registry: RegistryServer, mib: int) -> None:
    from standins.dfdaemon import start_standin

    image = make_image(work, mib, "none")
    push_blobs(registry, image, "bench/peer")
    blob_id = Bootstrap.open(image / "image.boot").blobs[0].blob_id
    reg = RegistrySpec(registry.host, "bench/peer", "http")
    direct = ImageSpec("direct", image / "image.boot", None, registry=reg)
    socket_path = work / "df.sock"
    peer = start_standin(str(socket_path))
    try:
        via_peer = ImageSpec("peer", image / "image.boot", None, registry=reg, dragonfly_socket=socket_path)
        # one warm-up each, then best of 3, alternating
        times: dict[str, list[float]] = {"registry": [], "peer": []}
        for _ in range(3):
            times["registry"].append(whole_blob_seconds(work, direct, blob_id, "direct"))
            times["peer"].append(whole_blob_seconds(work, via_peer, blob_id, "peer"))
    finally:
        peer.stop()
    best = {k: min(v) for k, v in times.items()}
    print(f"whole {mib} MiB blob through the daemon: registry {best['registry']:.2f}s, "
          f"stand-in peer {best['peer']:.2f}s; gRPC path overhead {100 * (best['peer'] / best['registry'] - 1):+.1f}% (goal < 15%)")


def cold_vm(work: Path, registry_dir: Path, kernel_series: str) -> None:
    from vmharness import find_kernel, run_scenario

    kernel = find_kernel(kernel_series)
    if kernel is None:
        print(f"no kernel {kernel_series}: skipping the VM benchmark")
        return
    image = make_image(work, 256, "none")
    with RegistryServer(registry_dir) as registry:
        push_blobs(registry, image, "bench/cold")
    blob_id = Bootstrap.open(image / "image.boot").blobs[0].blob_id
    res = run_scenario(kernel, "bench_fetch", {
        "storage": str(registry_dir / "storage"), "bootstrap": str(image / "image.boot"),
        "repo": "bench/cold", "blob_id": blob_id, "file": "/part000.bin",
    }, timeout=3600, share=[work], scratch_size="4G", memory_mb=2048)
    r = res.result
    print(f"cold read in the VM ({kernel.series}): curl of the blob {r['curl_seconds']:.2f}s, "
          f"cat through fscached {r['fscached_seconds']:.2f}s, ratio {r['curl_seconds'] / r['fscached_seconds']:.2f} (goal >= 0.8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-mib", type=int, default=1024)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--peer-mib", type=int, default=256)
    parser.add_argument("--vm", action="store_true", help="also the cold-read ratio in a real kernel")
    parser.add_argument("--kernel", default="6.12")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fscached-bench-fetch-", dir="/var/tmp"))
    try:
        with RegistryServer(work / "registry") as registry:
            random_reads(work, registry, args.image_mib, args.reads)
            peer_overhead(work, registry, args.peer_mib)
        if args.vm:
            cold_vm(work, work / "registry-vm", args.kernel)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
