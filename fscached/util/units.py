"""Byte counts for people."""
from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """1536 -> "1.5 KiB"; below 1 KiB in bytes ("512 B"); None -> "-"."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
