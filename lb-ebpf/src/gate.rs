//! The rate limit of the data plane's log lines (`note`): per CPU, at
//! most one line per kind in `INTERVAL_NS`. A leaf, so the scratch can
//! hold it.

/// SNAT ports exhausted (`drop_snat_exhausted`).
pub const KIND_SNAT: usize = 0;
/// No route (`drop_no_route`).
pub const KIND_ROUTE: usize = 1;
/// The flood guard went on.
pub const KIND_FLOOD: usize = 2;
pub const KINDS: usize = 3;

/// `LogGate::pending` bits: the lines the log program writes.
pub const LINE_SNAT: u32 = 1 << KIND_SNAT;
pub const LINE_ROUTE: u32 = 1 << KIND_ROUTE;
pub const LINE_FLOOD_ON: u32 = 1 << KIND_FLOOD;
pub const LINE_FLOOD_OFF: u32 = 1 << 3;

/// At most one line per kind and CPU in this long.
pub const INTERVAL_NS: u64 = 10_000_000_000;

/// Per-CPU log state, kept in the scratch from packet to packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LogGate {
    /// When each kind was last logged (0: never).
    pub last_ns: [u64; KINDS],
    /// Events of each kind not logged since.
    pub held: [u32; KINDS],
    /// 1 from a logged "flood guard on" until its "off" line.
    pub flood_on: u32,
    /// `LINE_*` bits this packet's log program writes (0: none, no tail
    /// call), with what they need that the scratch does not keep.
    pub pending: u32,
    pub pending_held: u32,
    pub limit: u32,
    /// The hook's return value, which the log program returns.
    pub action: u32,
}

impl LogGate {
    /// May a line of `kind` go out at `now`? Returns how many events of the
    /// kind were held back since the last line, or `None` (and counts this
    /// one) while the interval runs.
    #[inline(always)]
    pub fn open(&mut self, kind: usize, now: u64) -> Option<u32> {
        let last = self.last_ns.get_mut(kind)?;
        let held = self.held.get_mut(kind)?;
        if *last != 0 && now.wrapping_sub(*last) < INTERVAL_NS {
            *held = held.saturating_add(1);
            return None;
        }
        *last = now;
        let n = *held;
        *held = 0;
        Some(n)
    }
}
