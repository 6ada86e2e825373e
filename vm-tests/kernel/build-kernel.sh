#!/bin/bash
# Build a test kernel with CACHEFILES_ONDEMAND and EROFS_FS_ONDEMAND from Debian's source package.
#
#   build-kernel.sh [--config-only] [--force] 6.12|6.1
#
# Recipe (the one ../shared/vm/bzImage-* were built with): `make tinyconfig`, merge
# kernel-fragment.config (next to this script) with scripts/kconfig/merge_config.sh, `make
# olddefconfig`, check the required options survived, `make bzImage`.
# Sources: linux-source-6.12 from bookworm-backports (a sources list file is added for it, on the
# Debian mirror this machine's apt sources already use), linux-source-6.1 from bookworm. Needs
# root for apt (packages are installed only if missing).
#
# Result, cached OUTSIDE the checkout and keyed by series and the fragment's sha256:
#   ${FSCACHED_KERNEL_CACHE:-/var/cache/fscached-kernels}/<series>-<sha256>/{bzImage,config,build-info}
# The last line on stdout is the bzImage's path (all progress goes to stderr). A cached result is
# reused as is; --force rebuilds. --config-only stops after the configuration check and prints the
# path of the generated .config instead (quick: proves the source download and the config step).

# --- apt sources (functions first: `source` this file to call them alone) --------------------
# The sources files apt reads: one-line .list files and deb822 .sources files ($APT_ETC: another
# directory than /etc/apt to read them from, for checking these functions against sample files).
apt_source_files() {
    local etc="${APT_ETC:-/etc/apt}" f
    for f in "$etc/sources.list" "$etc/sources.list.d/"*.list "$etc/sources.list.d/"*.sources; do
        [ -f "$f" ] && echo "$f"
    done
    return 0
}

# "URI SUITE" for every active deb entry of the given files (default: apt_source_files), in order.
apt_entries() {
    local files=("$@")
    [ "${#files[@]}" -gt 0 ] || mapfile -t files < <(apt_source_files)
    [ "${#files[@]}" -gt 0 ] || return 0
    local f
    for f in "${files[@]}"; do
        case "$f" in
        *.sources)  # deb822: stanzas split by blank lines; Types/URIs/Suites/Enabled
            awk '
                function flush(   i, j, k, nt, nu, ns, t, u, su) {
                    if (types != "" && tolower(enabled) != "no") {
                        nt = split(types, t, /[ \t]+/); nu = split(uris, u, /[ \t]+/); ns = split(suites, su, /[ \t]+/)
                        for (i = 1; i <= nt; i++) if (t[i] == "deb")
                            for (j = 1; j <= nu; j++) if (u[j] != "") for (k = 1; k <= ns; k++) if (su[k] != "")
                                print u[j], su[k]
                    }
                    types = uris = suites = enabled = ""; field = ""
                }
                /^#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { if (field == "uris") uris = uris " " $0; else if (field == "suites") suites = suites " " $0; next }
                {
                    name = tolower(substr($0, 1, index($0, ":") - 1)); value = substr($0, index($0, ":") + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", value); field = name
                    if (name == "types") types = value
                    else if (name == "uris") uris = value
                    else if (name == "suites") suites = value
                    else if (name == "enabled") enabled = value
                }
                END { flush() }' "$f" ;;
        *)  # one-line: deb [options] URI SUITE [COMPONENT...]
            awk '
                { sub(/#.*/, "") }
                $1 != "deb" { next }
                {
                    i = 2
                    if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if (i + 1 <= NF) print $i, $(i + 1)
                }' "$f" ;;
        esac
    done
}

# The first Debian mirror of this machine's apt sources (or of the files given): the URI of the
# first deb entry whose suite is a Debian release (bookworm, bookworm-updates, stable, sid...):
# not a security archive, a CD-ROM or a third-party repository (their suites are not releases).
find_mirror() {
    local mirror
    mirror="$(apt_entries "$@" | awk '
        $1 ~ /^cdrom:/ { next }
        {
            suite = $2; sub(/-(updates|backports|backports-sloppy|proposed-updates)$/, "", suite)
            if (suite ~ /^(buzz|rex|bo|hamm|slink|potato|woody|sarge|etch|lenny|squeeze|wheezy|jessie|stretch|buster|bullseye|bookworm|trixie|forky|duke|sid|stable|oldstable|oldoldstable|testing|unstable)$/) {
                sub(/\/+$/, "", $1); print $1; exit
            }
        }')"
    if [ -z "$mirror" ]; then
        local searched="${*:-$(apt_source_files | paste -sd' ')}"
        echo "build-kernel: error: no Debian mirror (a deb entry for a Debian release such as bookworm)" \
             "in ${searched:-none of ${APT_ETC:-/etc/apt}/sources.list, sources.list.d/*.list, sources.list.d/*.sources}:" \
             "add one (deb <mirror URI> bookworm main) and run again" >&2
        return 1
    fi
    echo "$mirror"
}

# Whether an active deb entry of the apt sources has this suite.
has_suite() { apt_entries | awk -v want="$1" '$2 == want { found = 1 } END { exit !found }'; }

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    return 0  # sourced: the functions only
fi
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/kernel-fragment.config"
cache_root="${FSCACHED_KERNEL_CACHE:-/var/cache/fscached-kernels}"
jobs="${FSCACHED_KERNEL_JOBS:-$(nproc)}"
config_only=0
force=0
series=""

log() { echo "build-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --config-only) config_only=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        6.12|6.1) series="$1" ;;
        *) die "unknown argument $1 (usage: build-kernel.sh [--config-only] [--force] 6.12|6.1)" ;;
    esac
    shift
done
[ -n "$series" ] || die "which kernel? 6.12 or 6.1"
[ -r "$fragment" ] || die "$fragment missing"

sha="$(sha256sum "$fragment" | cut -d' ' -f1)"
out="$cache_root/$series-$sha"
# One build per series at a time (parallel test runs share the cache and the work tree).
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$series"
flock 9
if [ "$force" = 0 ] && [ "$config_only" = 0 ] && [ -s "$out/bzImage" ]; then
    log "cached: $out/bzImage"
    echo "$out/bzImage"
    exit 0
fi

# Options without which the VM tests are pointless: fail the build if olddefconfig drops one.
required=(CACHEFILES CACHEFILES_ONDEMAND EROFS_FS EROFS_FS_ONDEMAND FSCACHE EXT4_FS 9P_FS NET_9P_VIRTIO
          VIRTIO_PCI VIRTIO_BLK SERIAL_8250_CONSOLE DEVTMPFS TMPFS BINFMT_SCRIPT HW_RANDOM_VIRTIO)

apt_env=(env DEBIAN_FRONTEND=noninteractive)
need_root() { [ "$(id -u)" = 0 ] || die "$* needs root"; }

# --- build dependencies ---------------------------------------------------------------------
deps=(build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    need_root "installing ${missing[*]}"
    log "installing build dependencies: ${missing[*]}"
    "${apt_env[@]}" apt-get update -qq >&2
    "${apt_env[@]}" apt-get install -y -qq "${missing[@]}" >&2
fi

# --- source package -------------------------------------------------------------------------
pkg="linux-source-$series"
if [ "$series" = 6.12 ]; then
    list=/etc/apt/sources.list.d/fscached-bookworm-backports.list
    if ! has_suite bookworm-backports; then
        need_root "adding bookworm-backports"
        mirror="$(find_mirror)" || exit 1
        log "adding $list (bookworm-backports from $mirror)"
        echo "deb $mirror bookworm-backports main" > "$list"
    fi
fi
candidate() { apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
pkg_version="$(candidate)"
if [ -z "$pkg_version" ] || [ "$pkg_version" = "(none)" ]; then
    need_root "apt-get update"
    log "apt-get update"
    "${apt_env[@]}" apt-get update -qq >&2
    pkg_version="$(candidate)"
fi
[ -n "$pkg_version" ] && [ "$pkg_version" != "(none)" ] || die "no candidate for $pkg (apt sources?)"

work="$cache_root/work/$series"
mkdir -p "$work"
cd "$work"
deb="$(ls -1 "${pkg}_"*.deb 2>/dev/null | head -n1 || true)"
want_deb="${pkg}_$(echo "$pkg_version" | sed 's/:/%3a/')_all.deb"
if [ "$deb" != "$want_deb" ]; then
    rm -f "${pkg}_"*.deb
    log "apt-get download $pkg=$pkg_version"
    apt-get download -q "$pkg=$pkg_version" >&2
    deb="$(ls -1 "${pkg}_"*.deb | head -n1)"
fi
log "source package: $deb"

src="$work/linux-$pkg_version"
if [ ! -f "$src/.fscached-extracted" ]; then
    rm -rf "$work/extract" "$src"
    mkdir -p "$work/extract"
    dpkg-deb -x "$deb" "$work/extract"
    tarball="$(ls -1 "$work/extract/usr/src/"linux-source-*.tar.* | head -n1)"
    [ -n "$tarball" ] || die "no source tarball in $deb"
    log "extracting $(basename "$tarball")"
    mkdir -p "$src"
    tar -xf "$tarball" -C "$src" --strip-components=1
    rm -rf "$work/extract"
    touch "$src/.fscached-extracted"
fi

# --- configuration --------------------------------------------------------------------------
cd "$src"
log "configuring (tinyconfig + $(basename "$fragment") + olddefconfig)"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >&2
lost=()
for opt in "${required[@]}"; do
    grep -q "^CONFIG_$opt=y$" .config || lost+=("CONFIG_$opt")
done
[ "${#lost[@]}" -eq 0 ] || die "olddefconfig dropped ${lost[*]} (dependencies missing from the fragment?)"
# Anything else of the fragment that did not survive is worth a warning, not a failure.
while IFS= read -r line; do
    # (symbols unknown to this kernel version, such as CONFIG_XATTR, leave no trace at all)
    case "$line" in CONFIG_*=y)
        name="${line%%=*}"
        if ! grep -qx "$line" .config && grep -Eq "^($name=|# $name is not set)" .config; then
            log "warning: $line did not survive olddefconfig"
        fi ;;
    esac
done < "$fragment"
log "config ok: CONFIG_CACHEFILES_ONDEMAND=y CONFIG_EROFS_FS_ONDEMAND=y"
if [ "$config_only" = 1 ]; then
    echo "$src/.config"
    exit 0
fi

# --- build ----------------------------------------------------------------------------------
log "make -j$jobs bzImage (about 10 minutes on 2 cores)"
start=$(date +%s)
make -s -j"$jobs" bzImage >&2
log "built in $(( $(date +%s) - start )) s"
tmp="$(mktemp -d "$cache_root/.tmp-$series-XXXXXX")"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
cat > "$tmp/build-info" <<EOF
series=$series
source_package=$pkg
source_version=$pkg_version
fragment_sha256=$sha
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
compiler=$(gcc --version | head -n1)
EOF
rm -rf "$out"
mv "$tmp" "$out"
log "cached: $out/bzImage"
echo "$out/bzImage"
