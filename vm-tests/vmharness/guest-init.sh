#!/bin/sh
# PID 1 of the QEMU guest started by vmharness.run_in_vm (see vmharness/qemu.py).
#
# The guest's root is the HOST's root, read-only over 9p, so this file, the venv's python and
# the project are visible at their host paths. The host passes one thing on the kernel command
# line: FSCACHED_VM_RUN=<host run dir> (the kernel hands unknown key=value parameters to init as
# environment variables). That directory holds `env`, a shell fragment written by the host with
# every value shell-quoted, defining:
#   VM_PYTHON, VM_SCRIPT       the interpreter and the guest script
#   VM_SCRATCH                 where the scratch ext4 disk (/dev/vda) is mounted (exists on host)
#   VM_RESULT_DIR              directory on the scratch disk for the result and the exit code
#   VM_TMP_SHARES              host paths under /tmp to re-expose over the guest's tmpfs /tmp
#   VM_EXTRA_ENV               name=value lines exported for the guest script (may be empty)
#   and `set -- <args>`        the guest script's arguments
# Never `set -e` here: whatever happens, the guest must reach `reboot -f` so QEMU exits.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
HOME=/root
export HOME

say() { echo "vm-init: $*" > /dev/console 2>/dev/null || echo "vm-init: $*"; }

finish() {
    sync
    # cachefiles commits cache objects at umount; a failed umount still leaves the result
    # readable once the filesystem is remounted read-only and synced.
    umount "$VM_SCRATCH" 2>/dev/null || mount -o remount,ro "$VM_SCRATCH" 2>/dev/null
    sync
    say "rebooting"
    reboot -f
    # systemd's reboot may be missing: fall back to sysrq, then to a kernel panic (panic=-1).
    echo b > /proc/sysrq-trigger 2>/dev/null
    exit 1
}

if [ -z "$FSCACHED_VM_RUN" ] || [ ! -r "$FSCACHED_VM_RUN/env" ]; then
    mount -t proc proc /proc 2>/dev/null
    say "FSCACHED_VM_RUN not set or $FSCACHED_VM_RUN/env unreadable"
    VM_SCRATCH=/mnt
    finish
fi
# Read before /tmp is covered by a tmpfs: the run dir usually lives in the host's /tmp.
. "$FSCACHED_VM_RUN/env"

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755 tmpfs /run
# Keep the host's /tmp reachable under /run, then cover /tmp with a writable tmpfs and bind
# back the host paths that must stay visible (the checkout, the venv or test data may be there).
mkdir -p /run/vmharness/hosttmp
mount --bind /tmp /run/vmharness/hosttmp
mount -t tmpfs -o mode=1777 tmpfs /tmp
for p in $VM_TMP_SHARES; do
    src="/run/vmharness/hosttmp/${p#/tmp/}"
    if [ -d "$src" ]; then
        mkdir -p "$p"
    else
        mkdir -p "$(dirname "$p")" && : > "$p"
    fi
    mount --bind "$src" "$p" || say "could not re-expose $p"
done

if ! mount -t ext4 /dev/vda "$VM_SCRATCH"; then
    say "cannot mount the scratch disk on $VM_SCRATCH"
    finish
fi
mkdir -p "$VM_RESULT_DIR"
ip link set lo up 2>/dev/null || say "could not bring up lo"
hostname vm 2>/dev/null

FSCACHED_VM_RESULT="$VM_RESULT_DIR/result.json"
FSCACHED_VM_SCRATCH="$VM_SCRATCH"
export FSCACHED_VM_RESULT FSCACHED_VM_SCRATCH
if [ -n "$VM_EXTRA_ENV" ]; then
    while IFS= read -r line; do
        [ -n "$line" ] && export "$line"
    done <<EOF
$VM_EXTRA_ENV
EOF
fi

cd "$VM_SCRATCH" || cd /
say "running $VM_SCRIPT"
"$VM_PYTHON" "$VM_SCRIPT" "$@" < /dev/null
rc=$?
echo "$rc" > "$VM_RESULT_DIR/rc"
say "guest script exited with $rc"
cd /
finish
