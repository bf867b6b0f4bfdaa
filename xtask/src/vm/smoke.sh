#!/bin/sh
# Dual-stack smoke through the real daemon, run inside the test VM by
# `cargo xtask vm-test` (xtask/src/vm.rs). Usage: smoke.sh MODE... (tc, xdp).
#
# The namespace testbed of the `tests` crate speaks IPv4 only (its DNS
# answers A records), so IPv6 through the daemon is covered here, with
# IPv4 beside it in the same daemon:
#
#   vm-c                 vm-lb                               vm-ovl        vm-b0, vm-b1
#   eth0 10.10.0.2   ── eth0 10.10.0.1    fd00:10::1  (VIPs)
#        fd00:10::2      eth1 10.20.0.1   fd00:20::1 ───── br0 ─────── eth0 10.20.0.1N
#                        dnsmasq 127.0.0.11:53                              fd00:20::1N
#                        xdplb run --config (web4, web6)                    busybox httpd :80
#
# dnsmasq answers tasks.web with two A records and tasks.web6 with two AAAA
# records; each backend's page is its name. For every mode and family:
# 20 requests on new connections through the VIP must all answer, from
# both backends. One line per check:
#   XDPLB-VM-CHECK ipv4-tc ok 20/20 answered, by b0 b1

set -u
IP=/usr/sbin/ip
ETHTOOL=/usr/sbin/ethtool
SYSCTL=/usr/sbin/sysctl
CURL=/usr/bin/curl
DNSMASQ=/usr/sbin/dnsmasq
XDPLB=${XDPLB_BIN:-/t/xdplb}
W=/tmp/smoke
REQUESTS=20
READY_SECS=60

NS="vm-c vm-lb vm-ovl vm-b0 vm-b1"
failed=0

check() {
    echo "XDPLB-VM-CHECK $1 $2 $3"
    [ "$2" = ok ] || failed=1
}

in_ns() {
    ns=$1
    shift
    $IP netns exec "$ns" "$@"
}

build() {
    mode=$1
    for ns in $NS; do
        $IP netns add "$ns"
        $IP -n "$ns" link set lo up
    done
    $IP link add eth0 netns vm-c type veth peer name eth0 netns vm-lb
    $IP -n vm-ovl link add br0 type bridge mcast_snooping 0
    $IP -n vm-ovl link set br0 up
    $IP link add eth1 netns vm-lb type veth peer name l1 netns vm-ovl
    $IP -n vm-ovl link set l1 master br0 up
    $IP -n vm-c addr add 10.10.0.2/24 dev eth0
    $IP -n vm-c addr add fd00:10::2/64 dev eth0 nodad
    $IP -n vm-c link set eth0 up
    $IP -n vm-c route add default via 10.10.0.1
    $IP -n vm-c -6 route add default via fd00:10::1
    $IP -n vm-lb addr add 10.10.0.1/24 dev eth0
    $IP -n vm-lb addr add fd00:10::1/64 dev eth0 nodad
    $IP -n vm-lb addr add 10.20.0.1/24 dev eth1
    $IP -n vm-lb addr add fd00:20::1/64 dev eth1 nodad
    $IP -n vm-lb addr add 127.0.0.11/32 dev lo
    $IP -n vm-lb link set eth0 up
    $IP -n vm-lb link set eth1 up
    in_ns vm-lb $SYSCTL -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv4.conf.eth0.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0
    mkdir -p "$W"
    : > "$W/hosts"
    for i in 0 1; do
        $IP link add eth0 netns "vm-b$i" type veth peer name "b$i" netns vm-ovl
        $IP -n vm-ovl link set "b$i" master br0 up
        $IP -n "vm-b$i" addr add "10.20.0.1$i/24" dev eth0
        $IP -n "vm-b$i" addr add "fd00:20::1$i/64" dev eth0 nodad
        $IP -n "vm-b$i" link set eth0 up
        mkdir -p "$W/www-b$i"
        echo "b$i" > "$W/www-b$i/index.html"
        echo "10.20.0.1$i tasks.web" >> "$W/hosts"
        echo "fd00:20::1$i tasks.web6" >> "$W/hosts"
        # busybox httpd on [::]:80 takes IPv4 too (bindv6only is 0). Started
        # from a subshell, so the shell reports no "Killed" job at teardown.
        (in_ns "vm-b$i" busybox httpd -f -p 80 -h "$W/www-b$i" &)
    done
    if [ "$mode" = xdp ]; then
        # As the testbed does (tests/src/testbed.rs): NAPI on the peers that
        # receive XDP_TX/REDIRECT, and full checksums from the senders.
        # (ethtool lists every feature that changed with it: not shown.)
        in_ns vm-c $ETHTOOL -K eth0 gro on tx off > /dev/null
        in_ns vm-ovl $ETHTOOL -K l1 gro on > /dev/null
        for i in 0 1; do
            in_ns "vm-b$i" $ETHTOOL -K eth0 tx off > /dev/null
        done
    fi
    (in_ns vm-lb $DNSMASQ --keep-in-foreground --conf-file=/dev/null --user=root \
        --no-resolv --no-hosts --addn-hosts="$W/hosts" --listen-address=127.0.0.11 \
        --bind-interfaces --pid-file="$W/dnsmasq.pid" > "$W/dnsmasq.log" 2>&1 &)
    cat > "$W/xdplb.toml" <<EOF
interfaces = ["eth0", "eth1"]
attach = "$mode"
pin_dir = "/sys/fs/bpf/vm-smoke"

[[service]]
name = "web4"
listen = "10.10.0.1:80/tcp"
backends = "tasks.web:80"
check = "tcp"
check_interval = "500ms"
check_timeout = "400ms"
rise = 1

[[service]]
name = "web6"
listen = "[fd00:10::1]:80/tcp"
backends = "tasks.web6:80"
check = "tcp"
check_interval = "500ms"
check_timeout = "400ms"
rise = 1
EOF
}

teardown() {
    if [ -n "${daemon:-}" ]; then
        kill "$daemon" 2>/dev/null
        # SIGTERM detaches and unpins; give it a moment, then insist.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$daemon" 2>/dev/null || break
            sleep 1
        done
        kill -9 "$daemon" 2>/dev/null
        wait "$daemon" 2>/dev/null
    fi
    daemon=
    # Every process still running in a namespace (httpd, dnsmasq) goes.
    for ns in $NS; do
        for pid in $($IP netns pids "$ns" 2>/dev/null); do
            kill "$pid" 2>/dev/null
        done
    done
    wait 2>/dev/null
    for ns in $NS; do
        $IP netns del "$ns" 2>/dev/null
    done
    rm -rf /sys/fs/bpf/vm-smoke "$W"
}

# One request from the client; prints the backend's name.
get() {
    in_ns vm-c $CURL -g -s -m 3 "$1" 2>/dev/null
}

daemon_alive() {
    kill -0 "$daemon" 2>/dev/null
}

# The last lines of the daemon's log, indented, for a failing check; while
# it still runs, also its main thread's state (R for a start that never
# ends: in the verifier, BPF_PROG_LOAD runs on the caller's thread).
log_tail() {
    tail -n 25 "$W/xdplb-$mode.log" 2>/dev/null | sed 's/^/    daemon: /'
    if daemon_alive; then
        echo "    daemon: still running; main thread state $(cut -d' ' -f3 /proc/$daemon/stat)"
    fi
}

run_mode() {
    mode=$1
    echo "== smoke: $mode mode, IPv4 and IPv6 through xdplb"
    build "$mode"
    RUST_LOG=info nsenter --net=/run/netns/vm-lb "$XDPLB" run --config "$W/xdplb.toml" \
        > "$W/xdplb-$mode.log" 2>&1 &
    daemon=$!
    deadline=$(($(date +%s) + READY_SECS))
    for fam in ipv4 ipv6; do
        if [ $fam = ipv4 ]; then url=http://10.10.0.1/; else url="http://[fd00:10::1]/"; fi
        # By the clock (a request that times out takes 3 s), one budget for
        # both families from the daemon's start.
        since=$(date +%s)
        first=
        while [ "$(date +%s)" -lt $deadline ] && daemon_alive; do
            first=$(get "$url")
            case "$first" in b0 | b1) break ;; esac
            sleep 1
        done
        waited=$(($(date +%s) - since))
        if ! daemon_alive; then
            [ $fam = ipv4 ] && log_tail
            check "$fam-$mode" FAILED "the daemon exited: $(grep -m1 -i 'error' "$W/xdplb-$mode.log" | cut -c1-300)"
            continue
        fi
        case "$first" in
            b0 | b1) ;;
            *)
                [ $fam = ipv4 ] && log_tail
                check "$fam-$mode" FAILED "no answer through $url within ${READY_SECS} s of the daemon's start"
                continue
                ;;
        esac
        ok=0
        seen=
        n=0
        while [ $n -lt $REQUESTS ]; do
            name=$(get "$url")
            case "$name" in
                b0 | b1)
                    ok=$((ok + 1))
                    case " $seen " in *" $name "*) ;; *) seen="$seen $name" ;; esac
                    ;;
            esac
            n=$((n + 1))
        done
        seen=$(echo $seen | tr ' ' '\n' | sort | tr '\n' ' ')
        detail="$ok/$REQUESTS answered, by ${seen% } (ready after ${waited} s)"
        if [ $ok -eq $REQUESTS ] && [ "${seen% }" = "b0 b1" ]; then
            check "$fam-$mode" ok "$detail"
        else
            log_tail
            check "$fam-$mode" FAILED "$detail"
        fi
    done
    teardown
}

daemon=
trap teardown EXIT
for mode in "$@"; do
    run_mode "$mode"
done
trap - EXIT
exit $failed
