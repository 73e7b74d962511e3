#!/bin/sh
# Run a command as on a machine without /dev/kvm, to check that virtman (and its tests)
# work there:   sudo scripts/without-kvm.sh bash scripts/test.sh
# The script re-runs itself in a new private mount namespace (unshare(1) from
# util-linux) and only there lays a tmpfs over /dev holding the few nodes QEMU and
# Python need; nothing changes outside that namespace.
set -eu
if [ "${1:-}" != "--in-private-namespace" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "$0: needs root (for unshare --mount)" >&2
        exit 2
    fi
    exec unshare --mount --propagation private -- "$0" --in-private-namespace "$@"
fi
shift
dev=$(mktemp -d)
mount -t tmpfs virtman-nokvm "$dev"
for node in null zero urandom random full tty; do
    touch "$dev/$node"
    mount --bind "/dev/$node" "$dev/$node"
done
mkdir "$dev/shm" "$dev/pts"
mount --bind /dev/shm "$dev/shm"
mount --bind /dev/pts "$dev/pts"
ln -s /proc/self/fd "$dev/fd"
mount --bind "$dev" /dev
umount --lazy "$dev"  # /dev keeps the tmpfs; the directory can go
rmdir "$dev"
exec "$@"
