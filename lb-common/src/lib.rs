//! Types shared by the data plane (`lb-ebpf`) and the control plane (`lb-user`).
//!
//! Everything here is plain data: `#[repr(C)]`, `Copy`, explicit padding, no
//! `bool`/`Option`/enums inside map keys or values. A `const` assertion pins
//! every size so a layout change on one side cannot go unnoticed.
//!
//! Byte order: addresses are stored exactly as they appear on the wire
//! (`[u8; 16]`; IPv4 uses the first four bytes, the rest are zero). Ports that
//! are copied from or to packets are kept in network byte order and named
//! `*_be`; every other integer is in host byte order.
#![no_std]

pub mod csum;
pub mod decide;
pub mod hash;

use core::mem::size_of;

/// Bumped whenever a map layout or meaning changes. Userspace writes it into
/// [`Config::abi_version`] and refuses to adopt pinned maps that carry another.
pub const ABI_VERSION: u32 = 2;

// ---- map names (both sides use these) ---------------------------------------
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_MAGLEV: &str = "MAGLEV";
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_SNAT_ADDRS: &str = "SNAT_ADDRS";
pub const MAP_TX_PORTS: &str = "TX_PORTS";
pub const MAP_SERVICE_STATS: &str = "SERVICE_STATS";
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
pub const MAP_REASON_STATS: &str = "REASON_STATS";
/// Per backend index: when the backend last refused a connection (see
/// [`REFUSED_HOLD_NS`]).
pub const MAP_REFUSED: &str = "REFUSED";
/// Flows not established yet (see [`CONN_F_UNANSWERED`]): an LRU of their
/// own, so a flood of them never evicts an established flow from `CONNS`.
pub const MAP_UNANSWERED: &str = "UNANSWERED";
/// Per-CPU event counters, indexed like [`event::NAMES`].
pub const MAP_EVENT_STATS: &str = "EVENT_STATS";

/// Program arrays (not pinned) holding each hook's log program: the main
/// programs tail-call it when a packet has a rare line to log.
pub const MAP_LOG_XDP: &str = "LOG_XDP";
pub const MAP_LOG_TC: &str = "LOG_TC";
/// One bit per (protocol, port) some service listens on: the data plane's
/// first test of a packet (`service_port_bit`). Not pinned: rebuilt from
/// `SERVICES` at every load.
pub const MAP_SERVICE_PORTS: &str = "SERVICE_PORTS";
/// `SERVICE_PORTS` words: a bit per TCP port, then a bit per UDP port.
pub const SERVICE_PORT_WORDS: u32 = 2 * 65536 / 32;

/// The `SERVICE_PORTS` word index and bit of a protocol's port (host
/// order); every protocol but UDP shares TCP's half (services are TCP or
/// UDP).
#[inline(always)]
pub fn service_port_bit(proto: u8, port: u16) -> (u32, u32) {
    let i = ((proto == PROTO_UDP) as u32) << 16 | port as u32;
    (i >> 5, 1 << (i & 31))
}

/// Per service id: the `SERVICES` key the service is at, and whether an
/// established flow of it may skip the `SERVICES` lookup
/// ([`decide::still_at`]). Not pinned: rebuilt from `SERVICES` at every
/// load, like `SERVICE_PORTS`.
pub const MAP_SERVICE_AT: &str = "SERVICE_AT";

pub const PROG_XDP: &str = "xdplb_xdp";
pub const PROG_TC: &str = "xdplb_tc";
/// The log programs (never attached; see [`MAP_LOG_XDP`]).
pub const PROG_XDP_LOG: &str = "xdplb_xdp_log";
pub const PROG_TC_LOG: &str = "xdplb_tc_log";

// ---- load-time constants (read-only globals the loader sets) -----------------
/// How the TC program patches TCP/UDP checksums of IPv6 packets: one of the
/// `L4_CSUM_*` values, a `u32` fixed when the object is loaded (aya
/// `EbpfLoader::override_global`), so the verifier prunes the other paths.
pub const GLOBAL_L4_CSUM: &str = "L4_CSUM_MODE";
/// The bench's per-step breakdown (`cargo xtask bench`, §1b): a forwarded
/// packet's run ends, passed, after stage `BENCH_STOP_*` (0, the default and
/// the only value the daemon uses: never). A load-time constant like
/// `GLOBAL_L4_CSUM`, so the verifier removes the tests from a normal load.
pub const GLOBAL_BENCH_STOP: &str = "BENCH_STOP";
/// After parsing: the filter of `SERVICE_PORTS`, the scratch, Ethernet, IP,
/// TCP/UDP.
pub const BENCH_STOP_PARSE: u32 = 1;
/// After the service lookup (`SERVICES`, and its copy).
pub const BENCH_STOP_SERVICE: u32 = 2;
/// After the connection table (`CONNS`, `BACKENDS`, the flow's state).
pub const BENCH_STOP_CONNS: u32 = 3;
/// After the next hop (`NEXT_HOPS`, or `bpf_fib_lookup`).
pub const BENCH_STOP_ROUTE: u32 = 4;
/// After the rewrite (addresses, ports, checksums, TTL).
pub const BENCH_STOP_REWRITE: u32 = 5;
/// A new flow's stages (§1c). After the table misses (`CONNS`,
/// `UNANSWERED`) and the flood guard.
pub const BENCH_STOP_MISS: u32 = 6;
/// A new flow, after choosing its backend (flow hash, Maglev, `BACKENDS`,
/// `REFUSED`).
pub const BENCH_STOP_CHOOSE: u32 = 7;
/// A new flow, after its next hop.
pub const BENCH_STOP_NEW_ROUTE: u32 = 8;
/// A new flow, after reserving its SNAT port (the reverse entry).
pub const BENCH_STOP_RESERVE: u32 = 9;

/// `bpf_l4_csum_replace` with `BPF_F_IPV6` (Linux 6.16; stable 6.1.142,
/// Debian 6.1.147-1). The object's default.
pub const L4_CSUM_IPV6_FLAG: u32 = 0;
/// Kernels without `BPF_F_IPV6`: the helper runs without it, which also
/// subtracts the address change from a CHECKSUM_COMPLETE `skb->csum`, and
/// `bpf_csum_update` adds it back (docs/DATAPLANE.md §5).
pub const L4_CSUM_COMPENSATE: u32 = 1;
/// Fault injection for tests only: every `bpf_l4_csum_replace` call gets a
/// flag no kernel knows, so the helper fails (-EINVAL) the way it does on a
/// kernel that lacks a flag we pass. Never set by the daemon.
pub const L4_CSUM_FAULT: u32 = 2;

/// How long the data plane uses a next hop it cached (egress interface,
/// MACs: `NEXT_HOPS`, per CPU) before it asks the FIB again. A neighbour
/// whose MAC changes (a task re-created at the same address: Docker no
/// longer derives MACs from IPs), a route that moves or an interface that
/// goes is seen at most this late (plus a tick of the coarse clock). A new
/// task at a reused address takes longer than this to pass DNS and health
/// checks; a flow to a departed one fails either way.
pub const NEXT_HOP_TTL_NS: u64 = 50_000_000;

// ---- capacities ---------------------------------------------------------------
/// Service ids index the per-service counters; 0 is never used.
pub const MAX_SERVICES: u32 = 1024;
/// Backend indexes point into `BACKENDS`; index 0 means "no backend".
pub const MAX_BACKENDS: u32 = 65536;
/// Default Maglev table size per half (prime, well above 100x the backends).
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Default `MAGLEV` capacity: room for 16 services at the default size, both
/// halves. Userspace may resize it at load time (`set_max_entries`).
pub const DEFAULT_MAGLEV_CAPACITY: u32 = 16 * 2 * DEFAULT_MAGLEV_SIZE;
/// Default connection-table capacity (two entries per flow). Resizable at load.
pub const DEFAULT_CONNS_CAPACITY: u32 = 262_144;
/// Default `UNANSWERED` capacity (two entries per flow). Resizable at load.
pub const DEFAULT_UNANSWERED_CAPACITY: u32 = 131_072;
pub const MAX_SNAT_ADDRS: u32 = 64;
pub const MAX_TX_PORTS: u32 = 64;
/// How many Maglev slots a new flow may look at before it gives up on finding
/// an `active` backend (the table normally holds only active ones; this covers
/// the window between a state change and the next table flip).
pub const MAGLEV_PROBES: u32 = 8;
/// How many SNAT ports a new flow tries. A range no longer than this is
/// searched exhaustively, so exhaustion is exact for small ranges.
pub const SNAT_PROBES: u32 = 32;

// ---- constants for fields ----------------------------------------------------
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

pub const BACKEND_EMPTY: u8 = 0;
pub const BACKEND_ACTIVE: u8 = 1;
pub const BACKEND_DRAINING: u8 = 2;
pub const BACKEND_DOWN: u8 = 3;

/// `Conn::flags`: this entry translates replies (backend -> client).
pub const CONN_F_REVERSE: u8 = 1;
/// `Conn::flags` of a reverse entry: the backend has sent something other
/// than a RST (for TCP, its SYN-ACK). A RST before that is a refusal.
pub const CONN_F_REPLIED: u8 = 2;
/// `Conn::flags`: the entry lives in `UNANSWERED`, not `CONNS`: its flow is
/// not established yet ([`forward_establishes`], [`reply_establishes`]) and
/// expires after `Config::unanswered_timeout_ns`.
pub const CONN_F_UNANSWERED: u8 = 4;
/// `Conn::flags`: the flow began with a client's fresh SYN ([`is_fresh_syn`]).
/// Only such a flow's RST before any other answer is a refusal.
pub const CONN_F_SYN: u8 = 8;
/// `Conn::flags` of a reverse entry: `Conn::seq` holds the sequence number
/// of the backend's SYN-ACK.
pub const CONN_F_SYNACK: u8 = 16;

/// TCP header flags, as the data plane collects them from a segment.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// A SYN that starts a connection: no ACK, RST or FIN beside it. A client
/// never sends one on an established connection; SYN+FIN and SYN+RST are
/// no connection start (Linux discards them) and count as non-SYN segments.
#[inline(always)]
pub fn is_fresh_syn(flags: u8) -> bool {
    flags & (tcp::SYN | tcp::ACK | tcp::RST | tcp::FIN) == tcp::SYN
}

/// The TCP state of an entry after a segment with `flags`: RST resets it
/// (no TIME_WAIT follows, so the port is freed soon), FIN closes it.
#[inline(always)]
pub fn tcp_state_after(old: u8, flags: u8) -> u8 {
    if flags & tcp::RST != 0 {
        TCP_STATE_RESET
    } else if flags & tcp::FIN != 0 && old == TCP_STATE_OPEN {
        TCP_STATE_CLOSING
    } else {
        old
    }
}

/// Does a backend's segment establish its unanswered TCP flow? A segment
/// with neither SYN nor RST: a TCP stack sends one only on a connection it
/// has accepted (to a forged ACK or a half-open flow it answers RST, to a
/// SYN it answers SYN-ACK, which a spoofed client never acknowledges). UDP
/// flows are established on the forward path ([`forward_establishes`]).
#[inline(always)]
pub fn reply_establishes(proto: u8, flags: u8) -> bool {
    proto == PROTO_TCP && flags & (tcp::SYN | tcp::RST) == 0
}

/// Does the client's packet establish its unanswered flow, whose reverse
/// entry is `rev`? UDP: the backend has answered, and the client speaks
/// again (a one-shot exchange such as a DNS query stays unanswered and goes
/// soon). TCP: an ACK (without SYN or RST) that acknowledges exactly the
/// backend's SYN-ACK, which only a client that received it can know.
#[inline(always)]
pub fn forward_establishes(proto: u8, flags: u8, ack_seq: u32, rev: &Conn) -> bool {
    if proto != PROTO_TCP {
        return rev.flags & CONN_F_REPLIED != 0;
    }
    flags & (tcp::SYN | tcp::RST | tcp::ACK) == tcp::ACK
        && rev.flags & CONN_F_SYNACK != 0
        && ack_seq == rev.seq.wrapping_add(1)
}

/// For how long new flows avoid a backend after it refused a connection
/// (answered a SYN with RST: its server is gone, the task is dying). The
/// data plane sees this on the first refused SYN, long before DNS or failed
/// checks take the task out of rotation; each later refusal renews it. If
/// every candidate in the probe sequence refused, the first one is used
/// anyway.
pub const REFUSED_HOLD_NS: u64 = 1_000_000_000;

/// Is a refusal recorded at `at` (a `REFUSED` value; 0: none) still inside
/// [`REFUSED_HOLD_NS`] at `now` (both `bpf_ktime_get_coarse_ns`)? One definition for
/// the data plane and for `xdplb explain`.
#[inline(always)]
pub fn refused_within_hold(at: u64, now: u64) -> bool {
    at != 0 && now >= at && now - at < REFUSED_HOLD_NS
}

pub const TCP_STATE_OPEN: u8 = 0;
/// FIN seen: the entry expires after `Config::closing_timeout_ns`.
pub const TCP_STATE_CLOSING: u8 = 1;
/// RST seen: the entry expires after `Config::unanswered_timeout_ns`. A RST
/// leaves no TIME_WAIT, so the SNAT port is free again soon; until then
/// every packet refreshes it, so a forged RST cannot cut a live connection.
pub const TCP_STATE_RESET: u8 = 2;

/// Runtime settings the data plane reads on every packet (`CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub abi_version: u32,
    /// Union of all services' SNAT ranges (host order): a reply can only be
    /// ours if its destination port lies inside. 0/0 disables the reply path.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Idle timeouts (CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_coarse_ns`).
    pub tcp_timeout_ns: u64,
    pub closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    /// Flows not established yet (`UNANSWERED`), and TCP flows after a RST.
    pub unanswered_timeout_ns: u64,
    /// The flood guard: new flows per second, on one CPU, above which it is
    /// on (see [`FloodWindow`]); 0: never.
    pub flood_new_flows_per_cpu: u32,
    pub _pad: u32,
    /// The SipHash-1-3 key of the flow hash ([`hash::flow_hash`]): from the
    /// configuration (`flow_hash_secret`), or generated on the first start
    /// and kept here for the next ones. Every instance that must make the
    /// same choices (Swarm global mode) needs the same key.
    pub hash_key: [u64; 2],
}
const _: () = assert!(size_of::<Config>() == 64);

pub const DEFAULT_TCP_TIMEOUT_NS: u64 = 3600 * 1_000_000_000;
/// 65 s: longer than Linux's 60 s TIME_WAIT. A closed flow keeps its SNAT
/// port reserved until the backend has forgotten the old connection; reused
/// earlier, a new SYN from the same (SNAT port, backend) pair can meet the
/// backend's TIME_WAIT socket and be refused (PAWS, random per-connection
/// timestamps).
pub const DEFAULT_CLOSING_TIMEOUT_NS: u64 = 65 * 1_000_000_000;
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
/// 5 s: a TCP handshake (SYN retransmits come after 1 s and 3 s) or a UDP
/// exchange is answered well within it; a flood's entries go this soon.
pub const DEFAULT_UNANSWERED_TIMEOUT_NS: u64 = 5 * 1_000_000_000;

impl Config {
    /// Is `port` (host order) in the SNAT range, so that a packet to a SNAT
    /// address on it may be a backend's reply? The reply test of the data
    /// plane and of `xdplb explain`; an unset range (0) holds no port.
    #[inline(always)]
    pub fn in_snat_range(&self, port: u16) -> bool {
        self.snat_port_min != 0 && port >= self.snat_port_min && port <= self.snat_port_max
    }

    pub const fn with_defaults() -> Self {
        Self {
            abi_version: ABI_VERSION,
            snat_port_min: 0,
            snat_port_max: 0,
            tcp_timeout_ns: DEFAULT_TCP_TIMEOUT_NS,
            closing_timeout_ns: DEFAULT_CLOSING_TIMEOUT_NS,
            udp_timeout_ns: DEFAULT_UDP_TIMEOUT_NS,
            unanswered_timeout_ns: DEFAULT_UNANSWERED_TIMEOUT_NS,
            flood_new_flows_per_cpu: 0,
            _pad: 0,
            hash_key: [0; 2],
        }
    }
}

/// `SERVICES` key. An all-zero `addr` is the wildcard ("any local address").
/// 4-byte aligned (its size stays 20): the data plane zeroes `addr` a word
/// at a time instead of calling a byte-by-byte `memset`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

impl ServiceKey {
    /// Makes this the wildcard key of its port, protocol and family: the
    /// address all zero, a word at a time (a plain `= [0; 16]` becomes a
    /// byte-by-byte `memset` call on BPF; volatile keeps LLVM from turning
    /// the loop back into one).
    #[inline(always)]
    pub fn clear_addr(&mut self) {
        let p = self.addr.as_mut_ptr() as *mut u32;
        let mut i = 0;
        while i < 4 {
            // SAFETY: inside `addr`, at offset 0 of a 4-byte aligned struct.
            unsafe { core::ptr::write_volatile(p.add(i), 0) };
            i += 1;
        }
    }
}

/// `SERVICES` value. Replacing the whole value is atomic for readers, which is
/// how a Maglev table flip (`active_half`) becomes visible in one step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service counters, 1..MAX_SERVICES.
    pub id: u32,
    /// Reserved, 0.
    pub flags: u32,
    /// First `MAGLEV` slot of half 0; half 1 starts at `maglev_base + maglev_size`.
    pub maglev_base: u32,
    pub maglev_size: u32,
    /// 0 or 1: which half new flows use.
    pub active_half: u32,
    /// SNAT source port range, inclusive, host order.
    pub snat_port_lo: u16,
    pub snat_port_hi: u16,
    /// SNAT source address (the balancer's own address on the backend side).
    pub snat_addr: [u8; 16],
}
const _: () = assert!(size_of::<Service>() == 40);

/// `SERVICE_AT` value, by service id: where the service is, so the packet
/// of an established flow finds its service through the flow's id (an
/// array slot) instead of the `SERVICES` hash ([`decide::still_at`]).
/// Written by the daemon only, a byte of `flags` at a time once the key
/// is in place (see `DataPlane::set_service`), so a reader racing a write
/// never sees a torn `SERVICE_AT_LIVE` entry.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceAt {
    pub key: ServiceKey,
    /// `SERVICE_AT_*` bits, all in the lowest byte.
    pub flags: u32,
}
const _: () = assert!(size_of::<ServiceAt>() == 24);

/// The service is in `SERVICES` at `key` (0: the slot is free, or being
/// rewritten).
pub const SERVICE_AT_LIVE: u32 = 1;
/// A wildcard service some exact-address service of the same port,
/// protocol and family may take packets from (an exact match wins):
/// its flows' packets take the `SERVICES` lookup.
pub const SERVICE_AT_SHADOWED: u32 = 2;

/// `BACKENDS` value, indexed by backend index (0 is never a backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub family: u8,
    /// One of `BACKEND_*`.
    pub state: u8,
    /// Owning service id, so a slot reused for another service is detectable.
    pub service: u32,
}
const _: () = assert!(size_of::<Backend>() == 24);

/// `SNAT_ADDRS` key: addresses the data plane uses as SNAT sources. A packet
/// to one of them, on a port in the SNAT range, may be a reply to translate.
/// 4-byte aligned (its size stays 20), like [`ServiceKey`].
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// Are two addresses equal? Without an early exit (two 8-byte words XORed
/// and ORed), so the eBPF verifier walks one path instead of one per byte
/// block: `==` on arrays becomes a chain of compares and branches.
#[inline(always)]
pub fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    addr_diff(a, b) == 0
}

/// Is the address all zero (a wildcard service's)? Without an early exit,
/// like [`same_addr`].
#[inline(always)]
pub fn is_zero_addr(a: &[u8; 16]) -> bool {
    addr_diff(a, &[0; 16]) == 0
}

/// Zero exactly when the addresses are equal (see [`same_addr`]).
#[inline(always)]
fn addr_diff(a: &[u8; 16], b: &[u8; 16]) -> u64 {
    let w = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    (w(a, 0) ^ w(b, 0)) | (w(a, 8) ^ w(b, 8))
}

/// `CONNS` and `UNANSWERED` key: the 5-tuple as the packet carries it on
/// arrival. 8-byte aligned (its size stays 40), so the flow hash reads the
/// addresses a word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

impl FlowKey {
    /// `==` without early exits (see [`same_addr`]).
    #[inline(always)]
    pub fn same(&self, o: &FlowKey) -> bool {
        let ports = |k: &FlowKey| {
            k.sport_be as u64
                | (k.dport_be as u64) << 16
                | (k.proto as u64) << 32
                | (k.family as u64) << 40
        };
        (addr_diff(&self.src, &o.src) | addr_diff(&self.dst, &o.dst) | (ports(self) ^ ports(o)))
            == 0
    }

    /// The key a packet travelling the other way would carry.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// `CONNS` value. Both directions have the same shape: a matching packet gets
/// source := (`new_src`, `new_sport_be`) and destination := (`new_dst`,
/// `new_dport_be`). Forward entries (client -> VIP) rewrite to SNAT -> backend;
/// reverse entries (backend -> SNAT) rewrite to VIP -> client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub new_src: [u8; 16],
    pub new_dst: [u8; 16],
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// Backend index the flow is pinned to.
    pub backend: u32,
    /// Service id.
    pub service: u32,
    /// `CONN_F_*`.
    pub flags: u8,
    /// `TCP_STATE_*` (0 for UDP).
    pub tcp_state: u8,
    pub _pad: [u8; 2],
    /// The interface this direction's packets arrive on. Forward entry: the
    /// one the client's first packet came in by. Reverse entry: the one the
    /// backend is reached by (the FIB's egress for the forward direction);
    /// the backend's packets, and ICMP errors about what we sent it, are
    /// accepted only there.
    pub ifindex: u32,
    /// Reverse entry with `CONN_F_SYNACK`: the sequence number of the
    /// backend's SYN-ACK (host order).
    pub seq: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_coarse_ns` when the flow was created.
    pub created_ns: u64,
}
const _: () = assert!(size_of::<Conn>() == 72);

impl Conn {
    /// The idle time after which this entry is forgotten: a flow not
    /// established yet or a TCP flow after a RST (`unanswered`), UDP, TCP
    /// after FIN (`closing`), or open TCP. One definition for the data plane
    /// and for the CLI, which must agree on what counts as a live flow.
    #[inline(always)]
    pub fn idle_timeout_ns(&self, proto: u8, cfg: &Config) -> u64 {
        if self.flags & CONN_F_UNANSWERED != 0
            || (proto == PROTO_TCP && self.tcp_state == TCP_STATE_RESET)
        {
            cfg.unanswered_timeout_ns
        } else if proto != PROTO_TCP {
            cfg.udp_timeout_ns
        } else if self.tcp_state == TCP_STATE_CLOSING {
            cfg.closing_timeout_ns
        } else {
            cfg.tcp_timeout_ns
        }
    }

    /// Does this reverse entry translate replies for the flow whose forward
    /// key is `fwd` (it may have been taken over by another flow since)?
    #[inline(always)]
    pub fn points_back_to(&self, fwd: &FlowKey) -> bool {
        same_addr(&self.new_dst, &fwd.src) && self.new_dport_be == fwd.sport_be
    }

    /// Has the entry been idle longer than its timeout at `now_ns`
    /// (CLOCK_MONOTONIC, as `bpf_ktime_get_coarse_ns`)?
    #[inline(always)]
    pub fn expired(&self, proto: u8, cfg: &Config, now_ns: u64) -> bool {
        now_ns > self.last_seen_ns && now_ns - self.last_seen_ns > self.idle_timeout_ns(proto, cfg)
    }
}

/// How long the flood guard counts new flows before it starts over, and how
/// long it stays on after the last new flow above its threshold.
pub const FLOOD_WINDOW_NS: u64 = 1_000_000_000;

/// The SYN challenge under the flood guard (docs/DATAPLANE.md §8): a SYN
/// that comes again between these two ages of its first copy passes.
pub const SYN_RETRY_MIN_NS: u64 = 500_000_000;
pub const SYN_RETRY_MAX_NS: u64 = 10_000_000_000;
/// How long a source that passed the challenge passes at once (refreshed by
/// each of its SYNs that passes).
pub const SOURCE_VOUCHED_NS: u64 = 60_000_000_000;
/// Slots of the challenge's tables (`SYN_PENDING`, by flow; `SYN_SOURCES`,
/// by source): powers of two. 8 MiB and 256 KiB.
pub const SYN_PENDING_SLOTS: u32 = 1 << 21;
pub const SYN_SOURCE_SLOTS: u32 = 1 << 16;

/// A challenge slot: when (`bpf_ktime_get_coarse_ns` in 2^24 ns ticks, 20 bits:
/// wraps after 4.9 h) and a 12-bit tag of the hash that chose the slot
/// (another flow or source in the same slot is not taken for this one).
#[inline(always)]
pub fn syn_stamp(now_ns: u64, hash: u32) -> u32 {
    (((now_ns >> 24) as u32 & 0xf_ffff) << 12) | (hash >> 20)
}

/// The age of a slot written by [`syn_stamp`], if it holds `hash`'s tag.
#[inline(always)]
pub fn syn_stamp_age(stamp: u32, now_ns: u64, hash: u32) -> Option<u64> {
    if stamp == 0 || stamp & 0xfff != hash >> 20 {
        return None;
    }
    let ticks = ((now_ns >> 24) as u32).wrapping_sub(stamp >> 12) & 0xf_ffff;
    Some((ticks as u64) << 24)
}

/// The flood guard's state on one CPU (the data plane keeps one per CPU, so
/// counting costs no atomic operation): new flows counted in the current
/// one-second window, and until when the guard is on. Like Katran's
/// `is_under_flood`, a CPU judges by its own share of the load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    pub start_ns: u64,
    pub until_ns: u64,
    pub count: u32,
    pub _pad: u32,
}

impl FloodWindow {
    /// Counts a new flow seen at `now` (`bpf_ktime_get_coarse_ns`) against `limit`
    /// new flows per window (0: the guard is off); returns whether the guard
    /// is on for it. Once over the limit, the guard stays on until a whole
    /// window has passed without another new flow above it, so a sustained
    /// flood keeps it on and it is off at most two windows after one ends.
    #[inline(always)]
    pub fn count(&mut self, now: u64, limit: u32) -> bool {
        if limit == 0 {
            return false;
        }
        if now.wrapping_sub(self.start_ns) >= FLOOD_WINDOW_NS {
            self.start_ns = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        if self.count > limit {
            self.until_ns = now + FLOOD_WINDOW_NS;
        }
        now < self.until_ns
    }
}

/// Per-CPU counters, one slot per service, backend, or reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// New flows (service/backend slots); unused for reasons.
    pub new_flows: u64,
}
const _: () = assert!(size_of::<Counters>() == 24);

/// Defines a set of numbered codes (`pub const NAME: u32`) with their
/// stable names, in one place: `COUNT`, and `NAMES` indexed by code. The
/// build fails when the codes are not exactly 0..COUNT (a duplicate leaves a
/// gap, a gap leaves an empty name) or when two names are the same.
macro_rules! codes {
    ($( $(#[$doc:meta])* $code:ident = $value:literal => $name:literal, )*) => {
        $( $(#[$doc])* pub const $code: u32 = $value; )*
        pub const COUNT: u32 = [$($value),*].len() as u32;

        /// Stable, machine-friendly names (used by the CLI, JSON and
        /// metrics), indexed by code.
        pub const NAMES: [&str; COUNT as usize] = {
            let mut names = [""; COUNT as usize];
            $( names[$value as usize] = $name; )*
            names
        };

        const _: () = {
            let mut i = 0;
            while i < NAMES.len() {
                assert!(!NAMES[i].is_empty(), "codes must run from 0 to COUNT - 1");
                let mut j = 0;
                while j < i {
                    assert!(!$crate::same_str(NAMES[i], NAMES[j]), "two codes share a name");
                    j += 1;
                }
                i += 1;
            }
        };
    };
}

/// `a == b`, usable in a constant.
#[doc(hidden)]
pub const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Why a packet took the path it took; the index into `REASON_STATS`.
///
/// `PASS_*` packets go to the stack unchanged, `FWD_*` packets were rewritten
/// and forwarded (or handed to the stack rewritten), `DROP_*` were dropped.
pub mod reason {
    codes! {
        PASS_NOT_IP = 0 => "pass_not_ip",
        PASS_TRUNCATED = 1 => "pass_truncated",
        PASS_BAD_HEADER = 2 => "pass_bad_header",
        PASS_IP_OPTIONS = 3 => "pass_ip_options",
        PASS_IPV6_EXT = 4 => "pass_ipv6_ext_header",
        PASS_FRAGMENT = 5 => "pass_fragment",
        PASS_OTHER_PROTO = 6 => "pass_other_protocol",
        PASS_NO_SERVICE = 7 => "pass_no_service",
        /// The destination is a SNAT address and port, and no flow holds it.
        /// Dropped, not passed: the stack would answer with a RST or a port
        /// unreachable, and a backend whose flow's entries were lost would
        /// reset a live connection (the SNAT range belongs to the data plane).
        DROP_REPLY_NO_CONN = 8 => "drop_reply_no_conn",
        PASS_ICMP_NO_FLOW = 9 => "pass_icmp_no_flow",
        PASS_TTL_EXPIRED = 10 => "pass_ttl_expired",
        FWD_TX = 11 => "fwd_tx",
        FWD_REDIRECT = 12 => "fwd_redirect",
        /// XDP: no neighbour entry yet; the packet goes on untouched to the TC
        /// program attached beside it, whose `bpf_redirect_neigh` resolves it.
        PASS_XDP_NO_NEIGH = 13 => "pass_xdp_no_neigh",
        /// XDP: the FIB gave no direct route (needs fragmentation, unreachable,
        /// ...); the packet goes on untouched to TC, which decides.
        PASS_XDP_FIB = 14 => "pass_xdp_fib",
        /// The packet does not fit the egress MTU (TC checks GSO packets per
        /// segment). Dropped: handing a rewritten packet to the stack would be
        /// dropped there anyway (its source is one of our own addresses).
        DROP_FRAG_NEEDED = 15 => "drop_frag_needed",
        FWD_ICMP = 16 => "fwd_icmp_translated",
        DROP_NO_BACKEND = 17 => "drop_no_backend",
        DROP_SNAT_EXHAUSTED = 18 => "drop_snat_exhausted",
        DROP_CONN_INSERT = 19 => "drop_conn_insert",
        /// XDP: the egress interface is not in TX_PORTS; untouched, to TC.
        PASS_XDP_NO_TXPORT = 20 => "pass_xdp_no_txport",
        /// The FIB has no usable route to the rewritten destination.
        DROP_NO_ROUTE = 21 => "drop_no_route",
        /// A checksum helper failed after the headers were rewritten (TC:
        /// `bpf_l4_csum_replace` or `bpf_csum_update` returned an error, e.g. a
        /// flag the kernel does not know). Dropped: the packet would leave with
        /// a stale checksum, and a rewritten packet never goes to the stack.
        DROP_CSUM_FAILED = 22 => "drop_csum_failed",
        /// A packet to a flow's SNAT address and port that arrived on another
        /// interface than the one its backend is reached by (`Conn::ifindex`):
        /// forged, or misrouted. Dropped; the flow is not touched.
        DROP_REPLY_WRONG_IFACE = 23 => "drop_reply_wrong_iface",
        /// An ICMP error about a flow that arrived from the other side than the
        /// one it quotes, or whose flow has expired. Dropped untranslated.
        DROP_ICMP_REJECTED = 24 => "drop_icmp_rejected",
        /// A TCP segment other than a fresh SYN that misses the connection table
        /// while the flood guard is on: no state, no SNAT port, no backend.
        DROP_FLOOD_GUARD = 25 => "drop_flood_guard",
        /// A TCP segment with RST that misses the connection table: there is
        /// nothing to reset, so no flow (and no SNAT port) is made for it.
        DROP_RST_NO_CONN = 26 => "drop_rst_no_conn",
        /// Under the flood guard, a fresh SYN from a source that has not shown
        /// it is real yet: dropped, and remembered; the same SYN sent again
        /// (a real client retransmits after 1 s) passes and vouches for its
        /// source (docs/DATAPLANE.md §8).
        DROP_SYN_CHALLENGE = 27 => "drop_syn_challenge",
    }
}

/// Things the data plane counts beside a packet's fate: `REASON_STATS`
/// counts every packet once, under one reason; these count events, any
/// number per packet. The index into `EVENT_STATS`.
pub mod event {
    codes! {
        /// A flow became established (moved from `UNANSWERED` to `CONNS`).
        ESTABLISHED = 0 => "established",
        /// A TCP segment other than a fresh SYN missed the connection table: a
        /// flow whose entries were lost (it starts an unanswered flow again), or
        /// a forged packet. Under the flood guard it is dropped.
        NON_SYN_MISS = 1 => "non_syn_miss",
        /// An unanswered flow was found expired or half gone: its client came
        /// back after `unanswered_timeout`, or a new flow took its SNAT port.
        UNANSWERED_EXPIRED = 2 => "unanswered_expired",
        /// A RST ended an unanswered flow and freed its SNAT port at once.
        RST_FREED = 3 => "rst_freed",
        /// A table miss (a would-be new flow) while the flood guard was on.
        FLOOD_GUARD_ACTIVE = 4 => "flood_guard_active",
        /// Under the flood guard a new flow found every probed SNAT port held
        /// and took the one of the longest-idle unanswered flow.
        FLOOD_PORT_TAKEN = 5 => "flood_port_taken",
        /// Under the flood guard a SYN came again in time: its source is
        /// vouched for (its SYNs pass at once for `SOURCE_VOUCHED_NS`).
        SOURCE_VOUCHED = 6 => "source_vouched",
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], Copy, made only of integers and
    // byte arrays, with explicit padding fields, so any bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceAt {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn flood_guard_turns_on_above_the_limit_and_off_a_window_after() {
        let mut w = FloodWindow::default();
        let t0 = 100 * S;
        for i in 0..10 {
            assert!(!w.count(t0 + i, 10), "flow {i} of 10 is under the limit");
        }
        assert!(
            w.count(t0 + 10, 10),
            "the 11th new flow in the window is over"
        );
        // A new window starts counting afresh, but the guard stays on for a
        // window after the last flow over the limit.
        assert!(w.count(t0 + S + 5, 10));
        assert_eq!(w.count, 1);
        assert!(!w.count(t0 + 10 + S, 10), "off once a whole window passed");
        // A sustained flood keeps it on in every window.
        let mut w = FloodWindow::default();
        let on = (0..5 * 100u64)
            .filter(|i| w.count(t0 + i * (S / 100), 50))
            .count();
        assert!(
            on > 400,
            "{on} of 500 flows at 100/s against a limit of 50/s"
        );
        assert!(!FloodWindow::default().count(t0, 0), "limit 0: never");
    }

    #[test]
    fn tcp_states_and_fresh_syns() {
        use tcp::*;
        assert!(is_fresh_syn(SYN));
        for f in [SYN | ACK, SYN | RST, SYN | FIN, ACK, RST, 0] {
            assert!(!is_fresh_syn(f), "{f:#x} is no connection start");
        }
        assert_eq!(tcp_state_after(TCP_STATE_OPEN, ACK), TCP_STATE_OPEN);
        assert_eq!(
            tcp_state_after(TCP_STATE_OPEN, FIN | ACK),
            TCP_STATE_CLOSING
        );
        assert_eq!(tcp_state_after(TCP_STATE_CLOSING, RST), TCP_STATE_RESET);
        assert_eq!(tcp_state_after(TCP_STATE_RESET, FIN), TCP_STATE_RESET);
    }

    #[test]
    fn what_establishes_a_flow() {
        use tcp::*;
        let mut rev = Conn {
            flags: CONN_F_REVERSE | CONN_F_UNANSWERED | CONN_F_REPLIED | CONN_F_SYNACK,
            seq: u32::MAX,
            ..Default::default()
        };
        assert!(
            forward_establishes(PROTO_TCP, ACK, 0, &rev),
            "ISN + 1 wraps"
        );
        assert!(
            !forward_establishes(PROTO_TCP, ACK, 1, &rev),
            "a guessed ACK"
        );
        assert!(!forward_establishes(PROTO_TCP, ACK | RST, 0, &rev));
        assert!(forward_establishes(PROTO_UDP, 0, 0, &rev));
        rev.flags &= !(CONN_F_REPLIED | CONN_F_SYNACK);
        assert!(
            !forward_establishes(PROTO_TCP, ACK, 0, &rev),
            "no SYN-ACK yet"
        );
        assert!(!forward_establishes(PROTO_UDP, 0, 0, &rev), "no answer yet");
        assert!(reply_establishes(PROTO_TCP, ACK));
        assert!(reply_establishes(PROTO_TCP, ACK | FIN));
        for f in [SYN | ACK, RST, RST | ACK] {
            assert!(!reply_establishes(PROTO_TCP, f), "{f:#x}");
        }
        assert!(!reply_establishes(PROTO_UDP, 0));
    }

    #[test]
    fn timeouts_by_table_protocol_and_state() {
        let cfg = Config {
            unanswered_timeout_ns: 5,
            udp_timeout_ns: 60,
            closing_timeout_ns: 65,
            tcp_timeout_ns: 3600,
            ..Config::with_defaults()
        };
        let c = |flags, tcp_state| Conn {
            flags,
            tcp_state,
            ..Default::default()
        };
        let t = |c: Conn, proto| c.idle_timeout_ns(proto, &cfg);
        assert_eq!(t(c(0, TCP_STATE_OPEN), PROTO_TCP), 3600);
        assert_eq!(t(c(0, TCP_STATE_CLOSING), PROTO_TCP), 65);
        assert_eq!(t(c(0, TCP_STATE_RESET), PROTO_TCP), 5);
        assert_eq!(t(c(0, 0), PROTO_UDP), 60);
        assert_eq!(t(c(CONN_F_UNANSWERED, TCP_STATE_OPEN), PROTO_TCP), 5);
        assert_eq!(t(c(CONN_F_UNANSWERED, 0), PROTO_UDP), 5);
        let e = Conn {
            last_seen_ns: 10,
            ..c(CONN_F_UNANSWERED, 0)
        };
        assert!(!e.expired(PROTO_UDP, &cfg, 15) && e.expired(PROTO_UDP, &cfg, 16));
    }

    #[test]
    fn every_reason_and_event_has_a_name() {
        assert_eq!(reason::NAMES.len(), reason::COUNT as usize);
        assert_eq!(event::NAMES.len(), event::COUNT as usize);
        assert_eq!(
            reason::NAMES[reason::DROP_FLOOD_GUARD as usize],
            "drop_flood_guard"
        );
    }
}
