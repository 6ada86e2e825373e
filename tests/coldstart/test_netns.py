"""The registry's network: shaping is real, the counter counts, teardown is complete."""
from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from coldstart.netns import PREFIX, RegistryNetwork, cleanup_leftovers
from netcheck import download_seconds, random_bytes, upload_blob

pytestmark = pytest.mark.root


def _gone(net: RegistryNetwork) -> None:
    assert net.ns not in netns.listnetns()
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=net.host_if)


def test_100mbit_profile_is_shaped(coldstart_host: None, tmp_path: Path) -> None:
    data = random_bytes(8 << 20)
    with RegistryNetwork(tmp_path, "100mbit") as net:
        digest = upload_blob(net.host, "t/blob", data)
        rx0 = net.rx_bytes()
        with net.sampling() as samples:
            seconds = download_seconds(net.host, "t/blob", digest, len(data))
        fetched = net.rx_bytes() - rx0
        mbit = len(data) * 8 / seconds / 1e6
        assert 60 < mbit < 105, f"{mbit:.0f} Mbit/s through a 100 Mbit/s link"
        # connect + GET: two round trips of a 2 ms RTT link
        request = net.request_seconds()
        assert request >= 0.004, f"a new-connection request took {request * 1000:.2f} ms (< 2 RTT)"
        assert len(data) <= fetched < len(data) * 1.1
        assert len(samples) >= 10 and samples[-1][1] - samples[0][1] >= len(data)
        assert all(b2 >= b1 for (_, b1), (_, b2) in itertools.pairwise(samples))
    _gone(net)


def test_unshaped_is_fast_and_torn_down_after_an_error(coldstart_host: None, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with RegistryNetwork(tmp_path, "unshaped") as net:
            assert net.request_seconds() < 0.004
            assert net.delay_mode == "none"
            raise RuntimeError("boom")
    _gone(net)
    assert not net.registry


def test_leftovers_of_a_dead_run_are_removed(coldstart_host: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{PREFIX}{dead.pid}"
    netns.create(name)
    with IPRoute() as ipr:
        ipr.link("add", ifname=f"{name}-h", kind="veth", peer={"ifname": f"{name}-r", "net_ns_fd": name})
    try:
        removed = cleanup_leftovers()
        assert name in removed
        assert name not in netns.listnetns()
        with IPRoute() as ipr:
            assert not ipr.link_lookup(ifname=f"{name}-h")
    finally:
        if name in netns.listnetns():
            netns.remove(name)
