"""Helpers of the Dragonfly cluster tests."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def push_layout(cluster: Any, oci: Path, repo: str, tag: str = "v1") -> str:
    """skopeo copy of an OCI layout to the cluster's registry; the reference."""
    index = json.loads((oci / "index.json").read_text())
    layout_tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    ref = f"{cluster.registry_host}/{repo}:{tag}"
    r = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:{layout_tag}", f"docker://{ref}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return ref
