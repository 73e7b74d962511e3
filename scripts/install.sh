#!/usr/bin/env bash
# Install everything virtman needs on Debian (system packages and a Python virtual
# environment in .venv). Idempotent: run it again after a pull.
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu-utils: qemu-img, qemu-io, qemu-nbd (tests and the benchmark's baseline)
# libnbd-bin: nbdinfo, nbdcopy (tests, benchmark client); nbdkit (benchmark baseline)
# fio: 4 KiB random-read benchmark (its nbd engine); python3-venv: the virtual env
# iproute2: ip netns, veth, bridges and tc for the emulated hosts of bench scale
# qemu-system-x86, linux-image-amd64, busybox-static, e2fsprogs: real guests and the
#   bootable test image; libvirt-clients + libxml2-utils: virt-xml-validate (it calls
#   xmllint) for `virtman vm xml`
PACKAGES=(qemu-utils libnbd-bin nbdkit fio python3-venv iproute2 qemu-system-x86
          linux-image-amd64 busybox-static e2fsprogs libvirt-clients libxml2-utils
          # chromium: tests/test_ui.py loads Volt's live view in a real (headless) browser
          chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    echo "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# dev: the test tools; bench: the benchmarks and the simulator (`virtman bench`, with
# matplotlib for its plots), the second distribution in tools/bench. The services need
# neither. One pip call, so the extra's pin on virtman-bench resolves to ./tools/bench.
.venv/bin/python -m pip install -q -e '.[dev,bench]' -e ./tools/bench
echo "virtman installed: $(.venv/bin/virtman --version)"
