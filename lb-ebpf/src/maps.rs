//! Every map of the data plane. Names and capacities come from lb-common so
//! userspace opens the same ones; maps are pinned by name so a daemon restart
//! or a program upgrade keeps the connection table.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, Config, Conn, Counters, FlowKey, Service, ServiceAt, ServiceKey,
    DEFAULT_CONNS_CAPACITY, DEFAULT_MAGLEV_CAPACITY, DEFAULT_UNANSWERED_CAPACITY, MAX_BACKENDS,
    MAX_SERVICES, MAX_SNAT_ADDRS, MAX_TX_PORTS,
};

#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Not preallocated (`BPF_F_NO_PREALLOC`): an update swaps in a new element
/// instead of rewriting the old one in place (with preallocation the kernel
/// recycles the replaced element for the next update at once:
/// kernel/bpf/hashtab.c, `extra_elems`, commit 8c290e60fa2a). The old
/// element is freed to the BPF allocator, which since 6.1 may reuse it
/// before an RCU grace period ends, so the data plane copies the value
/// right after its lookup (`core::service`) and reads only the copy: one
/// consistent version per packet, which is what makes a Maglev flip atomic.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::pinned(MAX_SERVICES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Where each service is, by id (`lb_common::ServiceAt`): an established
/// flow's packet finds its service here, through the id its entry holds,
/// instead of the `SERVICES` hash lookup (`conntrack::established`).
/// Written by the daemon beside `SERVICES` (`DataPlane::set_service`); not
/// pinned, rebuilt from `SERVICES` at every load.
#[map(name = "SERVICE_AT")]
pub static SERVICE_AT: Array<ServiceAt> = Array::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(DEFAULT_MAGLEV_CAPACITY, BPF_F_MMAPABLE);

/// Established flows. Shared (not per-CPU) LRU: a reply may be processed on
/// another CPU than the request that created the flow. Only a flow whose
/// backend accepted it gets here (`conntrack::promote`), so a flood of
/// forged packets never evicts one of these entries.
///
/// LRU elements are recycled without an RCU grace period: once evicted, an
/// element can hold another flow's entry at any moment. The data plane
/// copies a value right after its lookup and keeps no reference into it past
/// the next helper call.
#[map(name = "CONNS")]
pub static CONNS: LruHashMap<FlowKey, Conn> = LruHashMap::pinned(DEFAULT_CONNS_CAPACITY, 0);

/// Flows not established yet (`CONN_F_UNANSWERED`): an LRU of their own.
/// A SYN flood churns this table, never `CONNS`.
#[map(name = "UNANSWERED")]
pub static UNANSWERED: LruHashMap<FlowKey, Conn> =
    LruHashMap::pinned(DEFAULT_UNANSWERED_CAPACITY, 0);

#[map(name = "SNAT_ADDRS")]
pub static SNAT_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_SNAT_ADDRS, 0);

#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

/// `bpf_ktime_get_ns` of the backend's last refusal, by backend index (0:
/// never). Written from the reply path, read when picking.
#[map(name = "REFUSED")]
pub static REFUSED: Array<u64> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "REASON_STATS")]
pub static REASON_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(lb_common::reason::COUNT, 0);

#[map(name = "EVENT_STATS")]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(lb_common::event::COUNT, 0);

/// Until when (`bpf_ktime_get_ns`) some CPU's flood guard is on: the
/// guard then holds on every CPU (`conntrack::forward`). A flood arriving
/// on one receive queue is counted by one CPU, while the SNAT ports it
/// holds are shared by all. Written only under a flood, at most a few
/// times per window.
#[map(name = "FLOOD_UNTIL")]
pub static FLOOD_UNTIL: Array<u64> = Array::with_max_entries(1, 0);

/// The SYN challenge under the flood guard (`conntrack::challenge`): when
/// a fresh SYN was last dropped, by flow (`lb_common::syn_stamp`), and
/// when a source last passed, by source. Not pinned: a restart starts the
/// challenge over, which costs a vouched client one retransmitted SYN.
#[map(name = "SYN_PENDING")]
pub static SYN_PENDING: Array<u32> = Array::with_max_entries(lb_common::SYN_PENDING_SLOTS, 0);
#[map(name = "SYN_SOURCES")]
pub static SYN_SOURCES: Array<u32> = Array::with_max_entries(lb_common::SYN_SOURCE_SLOTS, 0);

/// A bit per (protocol, port) some service listens on
/// (`lb_common::service_port_bit`): a packet for no such port and outside
/// the SNAT range is passed after this one array lookup (`core::run`).
/// Written by the daemon before a service is added and after one is
/// removed.
#[map(name = "SERVICE_PORTS")]
pub static SERVICE_PORTS: Array<u32> = Array::with_max_entries(lb_common::SERVICE_PORT_WORDS, 0);

/// Next hops as `bpf_fib_lookup` found them (`fwd::route`), cached per CPU
/// for `NEXT_HOP_TTL_NS`: the lookup was the largest single cost of a
/// forwarded packet. Direct-mapped: a destination's slot is picked by a
/// multiplicative hash of its address and the ingress interface, and holds
/// both to be checked (the lookup's other inputs: the source is one of our
/// own addresses, the length is checked against `ok_len`). Two
/// destinations on one slot take turns, each costing the other a lookup;
/// an array lookup and a compare are what a hit costs, where a hash map's
/// lookup cost as much as the FIB's. Not pinned: a restart starts it empty.
#[map(name = "NEXT_HOPS")]
pub static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(1 << NEXT_HOPS_BITS, 0);

/// `NEXT_HOPS` has 2^this slots per CPU (56 bytes each).
pub const NEXT_HOPS_BITS: u32 = 12;

/// A `NEXT_HOPS` slot: the destination it is for, and what `fwd::route`
/// and the hook's `send` read from `bpf_fib_lookup`.
#[repr(C)]
pub struct NextHop {
    pub addr: [u32; 4],
    pub ingress: u32,
    pub family: u32,
    /// `clock::now` of the lookup (0: none).
    pub at_ns: u64,
    pub ifindex: u32,
    /// The lookup's code: `BPF_FIB_LKUP_RET_SUCCESS` or `_NO_NEIGH`.
    pub rc: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The IP length of the packet the lookup was made for: the MTU check
    /// passed for it, so it holds for packets no longer. A GSO packet in
    /// TC (its IP length is the whole super-packet) is always looked up.
    pub ok_len: u16,
    /// 1: the egress is the ingress or in `TX_PORTS` (XDP can send there).
    pub tx_port: u16,
}

impl NextHop {
    /// Is this slot the one of the destination `addr` (`fwd::words`) seen
    /// from `ingress`?
    #[inline(always)]
    pub fn is_for(&self, addr: &[u32; 4], ingress: u32, family: u32) -> bool {
        self.addr == *addr && self.ingress == ingress && self.family == family
    }
}

/// This CPU's copy of the packet's `SERVICES` value (`core::service`).
#[map(name = "SVC_COPY")]
pub static SVC_COPY: PerCpuArray<Service> = PerCpuArray::with_max_entries(1, 0);
