#!/bin/busybox sh
# PID 1 of the xdplb test VM, written into the initramfs by `cargo xtask
# vm-test` (xtask/src/vm.rs). It mounts what the tests expect, loads the
# kernel modules, runs the steps of /vm/steps.sh, and powers off.
#
# The host reads the serial console. Lines starting with XDPLB-VM- are the
# protocol (everything else is shown, not parsed, except libtest's
# "test result:" lines inside a step):
#   XDPLB-VM-BOOTED kernel=<uname -r>
#   XDPLB-VM-WARN <text>
#   XDPLB-VM-BEGIN <step>
#   XDPLB-VM-CHECK <name> ok|FAILED <detail>     (from the smoke script)
#   XDPLB-VM-END <step> rc=<exit status>         (137: killed by its time limit)
#   XDPLB-VM-DONE

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp NO_COLOR=1 RUST_BACKTRACE=1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
# /var/run is a link to /run: iproute2 keeps namespaces in /run/netns, the
# testbed opens them as /var/run/netns/NAME.
mkdir -p /run/netns

echo "XDPLB-VM-BOOTED kernel=$(uname -r)"

while read -r m; do
    [ -n "$m" ] || continue
    insmod "/vm/modules/$m.ko" || echo "XDPLB-VM-WARN insmod $m failed"
done < /vm/modules.order

# step NAME SECONDS PROGRAM ARGS...: runs one step under a time limit.
step() {
    name=$1
    limit=$2
    shift 2
    echo "XDPLB-VM-BEGIN $name"
    timeout -s KILL "$limit" "$@" < /dev/null 2>&1
    echo "XDPLB-VM-END $name rc=$?"
}

. /vm/steps.sh

echo "XDPLB-VM-DONE"
sync
poweroff -f
# poweroff -f should not return; if it does, a panic (with panic=-1) ends qemu.
echo o > /proc/sysrq-trigger
