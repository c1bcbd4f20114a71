#!/usr/bin/env bash
# Bring a fresh Debian 12 machine to a working libvirt node for vdsm-blockops:
# Debian packages, a started libvirtd, and a virtualenv (.venv) with the
# project and its test extras. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: systemd-analyze verifies the units the tool writes (tests);
# man-db: the packaging test reads the installed manual page (man, lexgrog).
PACKAGES=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
          libvirt-dev pkg-config gcc python3-dev python3-venv systemd man-db)

need_install=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || need_install+=("$pkg")
done
if ((${#need_install[@]})); then
    echo "== installing ${need_install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_install[@]}"
fi

# libvirt re-probes QEMU's capabilities (~4 s a time, ~10 times per VM start)
# whenever /dev/kvm is usable by root but not by the QEMU user: its cache
# check finds "KVM was enabled when probing, but it is not available now".
# Give /dev/kvm the usual Debian owner and mode (group kvm, 0660).
if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi

# Start the daemons when no init system did (containers, CI machines).
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "== starting virtlogd and libvirtd"
    pgrep -x virtlogd >/dev/null || /usr/sbin/virtlogd -d
    pgrep -x libvirtd >/dev/null || /usr/sbin/libvirtd -d
    for _ in $(seq 50); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.2
    done
    virsh -c qemu:///system version >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
# (Re)install when setup.py or this script changed since the last install into this venv.
stamp=$(cat setup.py "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ] ||
        ! .venv/bin/python -c "import vdsm_blockops, libvirt, pytest, ansible" 2>/dev/null; then
    echo "== installing vdsm-blockops into .venv"
    .venv/bin/pip install -q --upgrade pip
    # compat: a .pth naming the checkout; the default editable finder costs
    # every command ~8 ms of start-up (measured with python -X importtime).
    # setuptools calls the mode deprecated: fall back to the default if it goes.
    .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null ||
        .venv/bin/pip install -q -e '.[test]'
    echo "$stamp" > .venv/.setup-stamp
fi
