"""Boot a kernel under QEMU/TCG with the host's root over 9p and run one guest script.

The guest sees the host's root filesystem read-only at the same paths (so the venv, the
project and the guest script need no copying), a tmpfs on /tmp and /run, and a fresh scratch
ext4 disk mounted on `scratch_mount` (a directory that must exist on the host, /mnt by default:
the guest's root is read-only so it cannot create one). The guest script writes its JSON result
with `vmharness.guest.write_result` (path in $FSCACHED_VM_RESULT, on the scratch disk); the host
reads it back with debugfs once QEMU has exited.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

HARNESS_DIR = Path(__file__).resolve().parent
VM_TESTS_DIR = HARNESS_DIR.parent
REPO_ROOT = VM_TESTS_DIR.parent
INIT_SCRIPT = HARNESS_DIR / "guest-init.sh"
RESULT_DIR = "/.vmharness"  # on the scratch disk

QEMU = "qemu-system-x86_64"


class VmError(RuntimeError):
    """QEMU could not be run, or the guest gave no usable answer."""

    def __init__(self, message: str, console: str = ""):
        tail = "\n".join(console.splitlines()[-40:])
        super().__init__(f"{message}\n--- console tail ---\n{tail}" if console else message)
        self.console = console


class VmTimeout(VmError):
    """The guest did not power off in time; QEMU was killed."""


@dataclass
class VmResult:
    returncode: int | None  # the guest script's exit status (None: it never finished)
    result: dict  # what the guest script wrote with write_result ({} when nothing)
    console: str  # everything on the guest's serial console (kernel + script output)
    duration: float  # seconds from starting QEMU to QEMU's exit
    extra: dict = field(default_factory=dict)

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def guest_python() -> Path:
    """The interpreter the guest runs: the venv running us (not resolved: keep the venv)."""
    return Path(sys.executable).absolute()


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def _under(path: Path, top: str) -> bool:
    return path == Path(top) or Path(top) in path.parents


def _tmp_shares(paths: Sequence[Path]) -> list[str]:
    """Host paths that the guest's tmpfs /tmp would hide, deduplicated, outermost first."""
    out: list[Path] = []
    for p in sorted({Path(os.path.abspath(p)) for p in paths}, key=lambda p: len(p.parts)):
        if not _under(p, "/tmp") or p == Path("/tmp"):
            continue
        if any(_under(p, str(o)) for o in out):
            continue
        if not p.exists():
            raise VmError(f"shared path {p} does not exist on the host")
        out.append(p)
    return [str(p) for p in out]


def _debugfs_cat(image: Path, path: str) -> bytes | None:
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)],
        capture_output=True,
    )
    if proc.returncode != 0 or b"File not found" in proc.stderr:
        return None
    return proc.stdout


def run_in_vm(
    kernel: Path,
    guest_script: Path,
    args: Sequence[str] = (),
    timeout: float = 300.0,
    scratch_size: str = "1G",
    share: Sequence[Path] = (),
    *,
    memory_mb: int = 1024,
    smp: int = 2,
    env: Mapping[str, str] | None = None,
    scratch_mount: str = "/mnt",
    python: Path | None = None,
    network: bool = False,
    extra_qemu_args: Sequence[str] = (),
    keep_dir: Path | None = None,
    kernel_args: Sequence[str] = (),
) -> VmResult:
    """Boot `kernel`, run `<python> guest_script *args` as root in the guest, power off.

    share: host paths the guest must see at the same path. Everything outside /tmp and /run
    is visible anyway (read-only); paths under /tmp are bound back over the guest's tmpfs /tmp.
    The guest script, the repo and the interpreter's prefix are always shared.
    env: extra environment variables for the guest script.
    kernel_args: more kernel command line parameters (no whitespace in any), e.g. the TSC's rate.
    network: give the guest a user-mode NIC (host reachable at 10.0.2.2); loopback is always up.
    Raises VmTimeout (QEMU killed) or VmError (QEMU failed to start, or the guest never ran the
    script); a failing guest script is NOT an exception: check VmResult.returncode / result.
    """
    kernel = Path(kernel).absolute()
    guest_script = Path(guest_script).absolute()
    py = Path(python) if python else guest_python()
    qemu = qemu_binary()
    if qemu is None:
        raise VmError(f"{QEMU} not found (Debian package qemu-system-x86)")
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} not found (Debian package e2fsprogs)")
    if not kernel.is_file():
        raise VmError(f"kernel {kernel} does not exist")
    if not guest_script.is_file():
        raise VmError(f"guest script {guest_script} does not exist")
    if not os.access(INIT_SCRIPT, os.X_OK):
        raise VmError(f"{INIT_SCRIPT} must be executable (it is the guest's init): chmod +x it")
    if not Path(scratch_mount).is_dir():
        raise VmError(f"scratch mount point {scratch_mount} must exist on the host (guest root is read-only)")
    for k in env or {}:
        if not k.isidentifier():
            raise VmError(f"bad environment variable name {k!r}")
        if "\n" in (env or {})[k]:
            raise VmError(f"environment variable {k} contains a newline")

    run_dir = Path(tempfile.mkdtemp(prefix="vmharness-"))
    try:
        disk = run_dir / "scratch.ext4"
        subprocess.run(["truncate", "-s", scratch_size, str(disk)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(disk)], check=True)

        shares = [run_dir, guest_script, REPO_ROOT, Path(sys.prefix), Path(sys.base_prefix), INIT_SCRIPT, py, *share]
        env_lines = [
            f"VM_PYTHON={shlex.quote(str(py))}",
            f"VM_SCRIPT={shlex.quote(str(guest_script))}",
            f"VM_SCRATCH={shlex.quote(scratch_mount)}",
            f"VM_RESULT_DIR={shlex.quote(scratch_mount.rstrip('/') + RESULT_DIR)}",
            f"VM_TMP_SHARES={shlex.quote(' '.join(_tmp_shares(shares)))}",
            "VM_EXTRA_ENV=" + shlex.quote("\n".join(f"{k}={v}" for k, v in (env or {}).items())),
            "set -- " + " ".join(shlex.quote(str(a)) for a in args),
        ]
        if any(" " in s for s in _tmp_shares(shares)):
            raise VmError("shared paths under /tmp must not contain spaces")
        (run_dir / "env").write_text("\n".join(env_lines) + "\n")
        run_dir.chmod(0o755)

        append = " ".join(
            [
                "console=ttyS0",
                "root=hostroot",
                "rootfstype=9p",
                "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose",
                "ro",
                f"init={INIT_SCRIPT}",
                "panic=-1",
                "loglevel=4",
                f"FSCACHED_VM_RUN={run_dir}",
                *kernel_args,
            ]
        )
        if any(c.isspace() for c in str(run_dir) + str(INIT_SCRIPT) + "".join(kernel_args)):
            raise VmError("the harness paths must not contain whitespace (kernel command line)")
        cmd = [
            qemu,
            "-accel", "tcg",
            "-m", str(memory_mb),
            "-smp", str(smp),
            "-nographic",
            "-no-reboot",
            "-kernel", str(kernel),
            "-drive", f"file={disk},if=virtio,format=raw",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-rng-pci",
            *(["-nic", "user,model=virtio-net-pci"] if network else ["-nic", "none"]),
            "-append", append,
            *extra_qemu_args,
        ]
        console_path = run_dir / "console.log"
        start = time.monotonic()
        with open(console_path, "wb") as console_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console_f, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                console = console_path.read_text(errors="replace")
                raise VmTimeout(f"guest did not finish within {timeout:.0f} s; QEMU killed", console) from None
        duration = time.monotonic() - start
        console = console_path.read_text(errors="replace")
        if proc.returncode != 0:
            raise VmError(f"QEMU exited with status {proc.returncode}", console)

        rc_raw = _debugfs_cat(disk, f"{RESULT_DIR}/rc")
        returncode = int(rc_raw.strip()) if rc_raw and rc_raw.strip().lstrip(b"-").isdigit() else None
        if returncode is None and "vm-init: running" not in console:
            raise VmError("the guest never ran the script (boot or init failure)", console)
        raw = _debugfs_cat(disk, f"{RESULT_DIR}/result.json")
        result: dict = {}
        if raw:
            try:
                result = json.loads(raw)
            except ValueError as e:
                raise VmError(f"guest result is not JSON ({e}): {raw[:200]!r}", console) from None
        return VmResult(returncode=returncode, result=result, console=console, duration=duration)
    finally:
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            for name in ("console.log", "env", "scratch.ext4"):
                if (run_dir / name).exists():
                    shutil.move(str(run_dir / name), keep_dir / name)
        shutil.rmtree(run_dir, ignore_errors=True)
