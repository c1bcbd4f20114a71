#!/bin/bash
# A second libvirt node on this machine (how and why: docs/libvirt-notes.rst,
# "Moving a VM to another node"): run as `unshare --mount --uts --fork bash tests/node-b.sh ROOT
# IMAGES PORT [NAME]` (NAME, its host name, node-b by default: node C is one more). In its own mount and UTS namespace it gets its own
# /etc/libvirt (no hooks, no autostart, its own host UUID, TCP on
# 127.0.0.1:PORT without auth -- loopback, tests only), its own
# /var/lib|log|cache/libvirt, a private /run and its own IMAGES folder
# (ROOT/images bound over IMAGES: the same path shows other files than on
# node A). The daemons stay in the namespace after this script ends.
set -euo pipefail
ROOT=$1 IMAGES=$2 PORT=$3 NAME=${4:-node-b}
hostname "$NAME"
mount --make-rprivate /
mkdir -p "$ROOT"/{lib,log,cache,images,run} "$IMAGES"
rm -rf "$ROOT/etc"
cp -a /etc/libvirt "$ROOT/etc"
rm -rf "$ROOT/etc/hooks" "$ROOT/etc/qemu/autostart" "$ROOT/etc/qemu/networks/autostart"
rm -f "$ROOT"/etc/qemu/*.xml
cat >> "$ROOT/etc/libvirtd.conf" <<CONF
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
listen_tcp = 1
listen_tls = 0
tcp_port = "$PORT"
listen_addr = "127.0.0.1"
auth_tcp = "none"
CONF
cat >> "$ROOT/etc/qemu.conf" <<CONF
migration_port_min = $((PORT + 100))
migration_port_max = $((PORT + 163))
cgroup_controllers = [ ]
CONF
mount --bind "$ROOT/etc" /etc/libvirt
mount --bind "$ROOT/lib" /var/lib/libvirt
mount --bind "$ROOT/log" /var/log/libvirt
mount --bind "$ROOT/cache" /var/cache/libvirt
mount --bind "$ROOT/images" "$IMAGES"
mount -t tmpfs tmpfs /run
mkdir -p /run/libvirt /run/lock
virtlogd -d
libvirtd -d --listen
for _ in $(seq 100); do
    [ -S /run/libvirt/libvirt-sock ] && exit 0
    sleep 0.1
done
echo "$NAME's libvirtd did not start" >&2
exit 1
