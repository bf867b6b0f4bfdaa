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
pub mod hash;

use core::mem::size_of;

/// Bumped whenever a map layout or meaning changes. Userspace writes it into
/// [`Config::abi_version`] and refuses to adopt pinned maps that carry another.
pub const ABI_VERSION: u32 = 1;

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

pub const PROG_XDP: &str = "xdplb_xdp";
pub const PROG_TC: &str = "xdplb_tc";

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

/// For how long new flows avoid a backend after it refused a connection
/// (answered a SYN with RST: its server is gone, the task is dying). The
/// data plane sees this on the first refused SYN, long before DNS or failed
/// checks take the task out of rotation; each later refusal renews it. If
/// every candidate in the probe sequence refused, the first one is used
/// anyway.
pub const REFUSED_HOLD_NS: u64 = 1_000_000_000;

/// Is a refusal recorded at `at` (a `REFUSED` value; 0: none) still inside
/// [`REFUSED_HOLD_NS`] at `now` (both `bpf_ktime_get_ns`)? One definition for
/// the data plane and for `xdplb explain`.
#[inline(always)]
pub fn refused_within_hold(at: u64, now: u64) -> bool {
    at != 0 && now >= at && now - at < REFUSED_HOLD_NS
}

pub const TCP_STATE_OPEN: u8 = 0;
/// FIN or RST seen: the entry expires after `Config::closing_timeout_ns`.
pub const TCP_STATE_CLOSING: u8 = 1;

/// Runtime settings the data plane reads on every packet (`CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub abi_version: u32,
    /// Union of all services' SNAT ranges (host order): a reply can only be
    /// ours if its destination port lies inside. 0/0 disables the reply path.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Idle timeouts (CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns`).
    pub tcp_timeout_ns: u64,
    pub closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
}
const _: () = assert!(size_of::<Config>() == 32);

pub const DEFAULT_TCP_TIMEOUT_NS: u64 = 3600 * 1_000_000_000;
/// 65 s: longer than Linux's 60 s TIME_WAIT. A closed flow keeps its SNAT
/// port reserved until the backend has forgotten the old connection; reused
/// earlier, a new SYN from the same (SNAT port, backend) pair can meet the
/// backend's TIME_WAIT socket and be refused (PAWS, random per-connection
/// timestamps).
pub const DEFAULT_CLOSING_TIMEOUT_NS: u64 = 65 * 1_000_000_000;
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 60 * 1_000_000_000;

impl Config {
    pub const fn with_defaults() -> Self {
        Self {
            abi_version: ABI_VERSION,
            snat_port_min: 0,
            snat_port_max: 0,
            tcp_timeout_ns: DEFAULT_TCP_TIMEOUT_NS,
            closing_timeout_ns: DEFAULT_CLOSING_TIMEOUT_NS,
            udp_timeout_ns: DEFAULT_UDP_TIMEOUT_NS,
        }
    }
}

/// `SERVICES` key. An all-zero `addr` is the wildcard ("any local address").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// `CONNS` key: the 5-tuple as the packet carries it on arrival.
#[repr(C)]
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
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` when the flow was created.
    pub created_ns: u64,
}
const _: () = assert!(size_of::<Conn>() == 64);

impl Conn {
    /// The idle time after which this entry is forgotten: UDP, TCP after FIN
    /// or RST (`closing`), or open TCP. One definition for the data plane and
    /// for the CLI, which must agree on what counts as a live flow.
    #[inline(always)]
    pub fn idle_timeout_ns(&self, proto: u8, cfg: &Config) -> u64 {
        if proto != PROTO_TCP {
            cfg.udp_timeout_ns
        } else if self.tcp_state == TCP_STATE_CLOSING {
            cfg.closing_timeout_ns
        } else {
            cfg.tcp_timeout_ns
        }
    }

    /// Has the entry been idle longer than its timeout at `now_ns`
    /// (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`)?
    #[inline(always)]
    pub fn expired(&self, proto: u8, cfg: &Config, now_ns: u64) -> bool {
        now_ns > self.last_seen_ns && now_ns - self.last_seen_ns > self.idle_timeout_ns(proto, cfg)
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

/// Why a packet took the path it took; the index into `REASON_STATS`.
///
/// `PASS_*` packets go to the stack unchanged, `FWD_*` packets were rewritten
/// and forwarded (or handed to the stack rewritten), `DROP_*` were dropped.
pub mod reason {
    pub const PASS_NOT_IP: u32 = 0;
    pub const PASS_TRUNCATED: u32 = 1;
    pub const PASS_BAD_HEADER: u32 = 2;
    pub const PASS_IP_OPTIONS: u32 = 3;
    pub const PASS_IPV6_EXT: u32 = 4;
    pub const PASS_FRAGMENT: u32 = 5;
    pub const PASS_OTHER_PROTO: u32 = 6;
    pub const PASS_NO_SERVICE: u32 = 7;
    pub const PASS_REPLY_NO_CONN: u32 = 8;
    pub const PASS_ICMP_NO_FLOW: u32 = 9;
    pub const PASS_TTL_EXPIRED: u32 = 10;
    pub const FWD_TX: u32 = 11;
    pub const FWD_REDIRECT: u32 = 12;
    /// XDP: no neighbour entry yet; the packet goes on untouched to the TC
    /// program attached beside it, whose `bpf_redirect_neigh` resolves it.
    pub const PASS_XDP_NO_NEIGH: u32 = 13;
    /// XDP: the FIB gave no direct route (needs fragmentation, unreachable,
    /// ...); the packet goes on untouched to TC, which decides.
    pub const PASS_XDP_FIB: u32 = 14;
    /// The packet does not fit the egress MTU (TC checks GSO packets per
    /// segment). Dropped: handing a rewritten packet to the stack would be
    /// dropped there anyway (its source is one of our own addresses).
    pub const DROP_FRAG_NEEDED: u32 = 15;
    pub const FWD_ICMP: u32 = 16;
    pub const DROP_NO_BACKEND: u32 = 17;
    pub const DROP_SNAT_EXHAUSTED: u32 = 18;
    pub const DROP_CONN_INSERT: u32 = 19;
    /// XDP: the egress interface is not in TX_PORTS; untouched, to TC.
    pub const PASS_XDP_NO_TXPORT: u32 = 20;
    /// The FIB has no usable route to the rewritten destination.
    pub const DROP_NO_ROUTE: u32 = 21;
    pub const COUNT: u32 = 22;

    /// Stable, machine-friendly names (used by the CLI, JSON and metrics).
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_truncated",
        "pass_bad_header",
        "pass_ip_options",
        "pass_ipv6_ext_header",
        "pass_fragment",
        "pass_other_protocol",
        "pass_no_service",
        "pass_reply_no_conn",
        "pass_icmp_no_flow",
        "pass_ttl_expired",
        "fwd_tx",
        "fwd_redirect",
        "pass_xdp_no_neigh",
        "pass_xdp_fib",
        "drop_frag_needed",
        "fwd_icmp_translated",
        "drop_no_backend",
        "drop_snat_exhausted",
        "drop_conn_insert",
        "pass_xdp_no_txport",
        "drop_no_route",
    ];
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
