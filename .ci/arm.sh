#!/usr/bin/env bash
# The ARM step of .ci/run: the README's install, `edgenode demo` and the
# suite in an emulated Debian bookworm (the Debian release Raspberry Pi OS
# Bookworm is built on; Python 3.11) for one architecture.
#
#   .ci/arm.sh ARCH full               the README's demo and test commands
#   .ci/arm.sh ARCH subset TEST...     the README's demo command, its install
#                                      line, then pytest on the named tests
#   .ci/arm.sh ARCH prepare            only build (or check) the cached chroot:
#                                      .ci/run does this in the background
#                                      while the native steps run
#
# ARCH is arm64 (64-bit Raspberry Pi OS: Pi 3, 4, 5, Zero 2 W) or armhf
# (32-bit Raspberry Pi OS; emulated as a Cortex-A7, as on a Pi 2 or a Pi 3
# running a 32-bit kernel). Run as root: it uses qemu-user-static and
# binfmt_misc (installed and switched on if missing), debootstrap, chroot
# and mounts.
#
# The chroot has Debian's minimal base, python3 and ca-certificates (which
# every Raspberry Pi OS image has), plus exactly the packages the README's
# Raspberry Pi OS section tells a user of that architecture to install (no
# compiler unless the README asks for one, never Rust), plus the two MQTT
# brokers the uplink's tests run against, as on the host.
# pip inside sees PyPI only (no host wheel folder, no piwheels).
#
# Chroots are cached in $EDGENODE_ARM_CACHE (default
# /var/cache/edgenode-ci/arm), one per architecture, rebuilt when the
# package list changes; pip's cache inside them is kept, as a board keeps
# it. The project is copied in fresh on every run (its tracked and
# untracked, non-ignored files, as a clone has them) and installed by the
# README's own commands. Whatever is mounted is unmounted on exit, failure
# and interruption included. The mirror is the machine's own Debian mirror
# (from apt's sources), or $EDGENODE_ARM_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

suite=bookworm
cache=${EDGENODE_ARM_CACHE:-/var/cache/edgenode-ci/arm}

die() { echo "arm: $*" >&2; exit 1; }
say() { printf '%s  arm %s: %s\n' "$(date +%T)" "${arch:-?}" "$*"; }

[ $# -ge 2 ] || die "usage: .ci/arm.sh arm64|armhf full | subset TEST... | prepare"
arch=$1 mode=$2
shift 2
case "$arch" in
    arm64) qemu_name=aarch64 qemu_cpu= ;;
    # qemu-arm's default CPU is an ARMv8 core, whose uname says armv8l; pip
    # then finds no armv7l wheel at all. A Cortex-A7 says armv7l, as a Pi
    # with a 32-bit kernel does.
    armhf) qemu_name=arm qemu_cpu=cortex-a7 ;;
    *) die "unknown architecture $arch (expected arm64 or armhf)" ;;
esac
case "$mode" in
    full) [ $# -eq 0 ] || die "full takes no test names" ;;
    subset) [ $# -gt 0 ] || die "subset needs test names" ;;
    prepare) [ $# -eq 0 ] || die "prepare takes no test names" ;;
    *) die "unknown mode $mode (expected full, subset or prepare)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mounts, binfmt_misc)"

# -- the README's commands and packages ----------------------------------------

readme_line() { # PATTERN WHAT: the first README line matching PATTERN
    local line
    line=$(grep -m 1 -E "$1" README.md) || die "README.md has no $2 (pattern: $1)"
    printf '%s\n' "$line"
}
demo_command=$(readme_line '^python3 -m venv .*/edgenode demo$' "demo command")
test_command=$(readme_line '^python3 -m venv .* -m pytest$' "test command")
install_command=${test_command% && *}
# The Raspberry Pi OS section: one apt line for every board, and one for
# 32-bit ARM without piwheels, on the line after its "# 32-bit ARM" comment.
apt_all=$(readme_line '^sudo apt install -y ' "apt install line")
apt_32=$(grep -A 1 -m 1 -E '^# 32-bit ARM' README.md | sed -n 2p)
case "$apt_32" in
    "sudo apt install -y "*) ;;
    *) die "README.md has no 'sudo apt install -y' line after its '# 32-bit ARM' comment" ;;
esac
# What every Raspberry Pi OS image has that matters here; the rest comes
# from the README's own apt lines, run as written (less sudo) in the chroot.
base_packages="python3 ca-certificates"
apt_lines=("$apt_all")
[ "$arch" = armhf ] && apt_lines+=("$apt_32")

# -- the host: qemu-user-static, binfmt_misc, debootstrap ------------------------

host_setup() {
    local missing=()
    [ -x "/usr/libexec/qemu-binfmt/$qemu_name-binfmt-P" ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} with apt-get"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
    if ! [ -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            die "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc"
    fi
    if ! grep -qx enabled "/proc/sys/fs/binfmt_misc/qemu-$qemu_name" 2>/dev/null; then
        update-binfmts --enable "qemu-$qemu_name" ||
            die "cannot register qemu-$qemu_name with binfmt_misc"
    fi
    # F (fix binary): the kernel holds qemu open, so the chroot needs no copy.
    grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/qemu-$qemu_name" ||
        die "qemu-$qemu_name is registered without the F flag: the chroot cannot find qemu"
}

# The machine's own Debian mirror: the first Debian (not security) archive
# that apt uses, as apt-cache policy lists it.
host_mirror() {
    if [ -n "${EDGENODE_ARM_MIRROR:-}" ]; then
        echo "$EDGENODE_ARM_MIRROR"
        return
    fi
    apt-cache policy | awk '
        $1 ~ /^[0-9]+$/ && $2 ~ /^[a-z]+:\/\// { uri = $2; next }
        $1 == "release" && uri != "" && $2 ~ /(^|,)o=Debian,/ && $2 ~ /(^|,)l=Debian,/ \
            && $2 ~ /(^|,)c=main(,|$)/ { print uri; exit }
        { uri = "" }'
}

# -- the chroot ------------------------------------------------------------------

root=$cache/$arch-$suite
recipe="suite=$suite arch=$arch variant=minbase base=$base_packages apt=${apt_lines[*]}"
mounted=()

unmount_all() {
    local i
    for (( i = ${#mounted[@]} - 1; i >= 0; i-- )); do
        umount -R "${mounted[$i]}" 2>/dev/null || umount -R -l "${mounted[$i]}" ||
            echo "arm: could not unmount ${mounted[$i]}" >&2
    done
    mounted=()
}
trap unmount_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_tree() { # DIR: unmount whatever is mounted under it, then delete it
    local dir=$1 target
    [ -e "$dir" ] || return 0
    while read -r target; do
        umount -R "$target" 2>/dev/null || umount -R -l "$target"
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system "$dir"
}

mount_into() { # TARGET MOUNT-ARGS...
    local target=$1
    shift
    mkdir -p "$target"
    mount "$@" "$target"
    mounted+=("$target")
}

build_chroot() {
    local mirror new=$root.new
    mirror=$(host_mirror)
    [ -n "$mirror" ] ||
        die "no Debian mirror in apt's sources (apt-cache policy): set EDGENODE_ARM_MIRROR"
    say "building a $suite chroot in $root from $mirror: minbase, $base_packages"
    remove_tree "$new"
    mkdir -p "$cache"
    local log=$cache/$arch-debootstrap.log line
    if ! debootstrap --arch="$arch" --variant=minbase --include="${base_packages// /,}" \
        "$suite" "$new" "$mirror" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        [ -f "$new/debootstrap/debootstrap.log" ] && tail -n 30 "$new/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (log: $log)"
    fi
    for line in "${apt_lines[@]}"; do
        say "\$ $line"
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
            ${qemu_cpu:+QEMU_CPU=$qemu_cpu} \
            chroot "$new" /bin/sh -c "apt-get update -q >/dev/null && ${line#sudo } -q" >>"$log" 2>&1 ||
            { tail -n 30 "$log" >&2; die "in the chroot, '$line' failed (log: $log)"; }
    done
    chroot "$new" apt-get clean
    printf '%s\n' "$recipe" >"$new/.edgenode-chroot"
    remove_tree "$root"
    mv "$new" "$root"
}

host_setup
# One run per chroot at a time (CI and a developer may share the machine).
mkdir -p "$cache"
exec 9>"$cache/$arch.lock"
if ! flock -n 9; then
    say "waiting for another .ci/arm.sh $arch to finish with $root"
    flock 9
fi
started=$(date +%s)
if [ "$(cat "$root/.edgenode-chroot" 2>/dev/null)" != "$recipe" ]; then
    build_chroot
    say "chroot built in $(( $(date +%s) - started )) s"
else
    say "reusing the cached chroot $root (${apt_lines[*]})"
fi
# The brokers the uplink's tests start on loopback (tests/uplink/conftest.py),
# the same Debian packages .ci/run installs on the host. They are servers,
# not libraries: pip and the README's install never see them, and they are
# added after the chroot is built from the README's lines (and checked).
test_packages="mosquitto nats-server"
if ! [ -x "$root/usr/sbin/mosquitto" ] || ! [ -x "$root/usr/sbin/nats-server" ]; then
    say "installing the uplink tests' brokers: $test_packages"
    # Nothing starts a service in the chroot (invoke-rc.d asks policy-rc.d).
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        ${qemu_cpu:+QEMU_CPU=$qemu_cpu} \
        chroot "$root" /bin/sh -c "apt-get update -q >/dev/null &&
            apt-get install -y -q --no-install-recommends $test_packages" \
        >>"$cache/$arch-debootstrap.log" 2>&1 ||
        { tail -n 30 "$cache/$arch-debootstrap.log" >&2; die "in the chroot, installing $test_packages failed"; }
    rm -f "$root/usr/sbin/policy-rc.d"
    chroot "$root" apt-get clean
fi
[ "$mode" = prepare ] && exit 0

# What the host trusts, the chroot trusts (a proxy's CA, if this machine has
# one); and the host's resolver.
# update-ca-certificates takes minutes emulated: only when a certificate changed.
ca_changed=0
for crt in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$crt" ] || continue
    if ! cmp -s "$crt" "$root/usr/local/share/ca-certificates/${crt##*/}"; then
        cp "$crt" "$root/usr/local/share/ca-certificates/"
        ca_changed=1
    fi
done
[ "$ca_changed" = 0 ] || chroot "$root" update-ca-certificates >/dev/null 2>&1
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# debootstrap writes no /etc/hosts; Raspberry Pi OS ships this one (so
# `localhost` resolves, as the tests of peers named by host name expect).
printf '%s\n' '127.0.0.1	localhost' '::1		localhost ip6-localhost ip6-loopback' \
    'ff02::1		ip6-allnodes' 'ff02::2		ip6-allrouters' '' '127.0.1.1	raspberrypi' \
    >"$root/etc/hosts"

# Nothing that builds Rust, and a compiler only where the README asks for one.
for tool in rustc cargo; do
    [ -z "$(chroot "$root" sh -c "command -v $tool" || true)" ] || die "$tool is in the chroot"
done
case " ${apt_lines[*]} " in
    *" gcc "*) ;;
    *) [ -z "$(chroot "$root" sh -c 'command -v cc gcc' || true)" ] ||
        die "a C compiler is in the chroot but the README does not install one for $arch" ;;
esac

mount_into "$root/proc" -t proc proc
mount_into "$root/sys" --rbind /sys
mount --make-rslave "$root/sys"
mount_into "$root/dev" --rbind /dev
mount --make-rslave "$root/dev"

# The project, fresh: the files a clone has (tracked, and untracked but not
# ignored), none of the host's venvs or caches.
work=/root/edgenode
remove_tree "${root:?}$work"
mkdir -p "$root$work"
git ls-files -z --cached --others --exclude-standard |
    tar -C "$repo" --null -T - -cf - | tar -C "$root$work" -xf -

in_chroot() { # COMMAND: run it in the project's copy, as a new user's shell would
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" \
        ${qemu_cpu:+QEMU_CPU=$qemu_cpu} \
        nice -n 10 chroot "$root" /bin/bash -c "cd $work && $1"
}

say "$(in_chroot 'printf "%s, %s" "$(uname -m)" "$(python3 --version)"')"
step_start=$(date +%s)
say "\$ $demo_command"
in_chroot "$demo_command"
say "demo (with the install) took $(( $(date +%s) - step_start )) s"
in_chroot '.venv/bin/pip list --format=freeze | tr "\n" " "'
echo

step_start=$(date +%s)
if [ "$mode" = full ]; then
    say "\$ $test_command"
    in_chroot "$test_command"
else
    say "\$ $install_command && .venv/bin/python -m pytest $*"
    in_chroot "$install_command && .venv/bin/python -m pytest $*"
fi
say "suite ($mode) took $(( $(date +%s) - step_start )) s"
