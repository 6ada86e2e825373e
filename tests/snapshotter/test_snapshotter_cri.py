"""The CRI path: crictl runs a pod (the busybox pause image as its sandbox) and a container of the
nydus image served by fscached's `nydusd fuse`, through containerd's CRI plugin and the real
nydus-snapshotter."""
from __future__ import annotations

import json
from typing import Callable

import pytest

from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack

from snaphelpers import AppImage, wait_for

pytestmark = pytest.mark.root


def test_crictl_pod_runs_the_nydus_image(stacks: Callable[..., SnapshotterStack], app_image: AppImage) -> None:
    stack = stacks(SnapshotterConfig(daemon_mode="dedicated"))
    stack.crictl("pull", app_image.ref)
    pod = stack.run_pod("app")
    images = json.loads(stack.crictl("images", "-o", "json").stdout)["images"]
    tags = {tag for image in images for tag in image.get("repoTags") or []}
    assert stack.sandbox_image in tags, f"the pod's sandbox is not our busybox pause image: {tags}"
    cid = stack.create_container(pod, "app", app_image.ref,
                                 ["/bin/sh", "-c", "cat /etc/hello; sha256sum /data/big; sleep 1000"])
    stack.start_container(cid)
    wait_for("the container's two lines in crictl logs", lambda: len(stack.logs(cid).splitlines()) >= 2, 60)
    lines = stack.logs(cid).splitlines()
    assert lines[0].encode() + b"\n" == app_image.hello, lines
    assert lines[1].split()[0] == app_image.big_sha256, lines
    assert any(m.fstype == "erofs" for m in stack.mounts()), stack.mounts()
    stack.stop_pod(pod)
    stack.remove_pod(pod)
    assert stack.crictl("pods", "-q").stdout.split() == []
