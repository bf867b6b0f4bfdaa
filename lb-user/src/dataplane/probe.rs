//! Kernel feature probes, run once when the daemon starts.
//!
//! Each feature the daemon relies on is probed on the running kernel (never
//! guessed from its version: distributions backport). A missing feature
//! either selects a working fallback, logged at start, or ends the start
//! with one line that names the feature, the kernel that has it and what to
//! do ([`check`]).
//!
//! | feature | kernel | without it |
//! |---|---|---|
//! | tcx (TC BPF links) | 6.6 | clsact ingress filter through netlink (`attach`) |
//! | `BPF_F_IPV6` for `bpf_l4_csum_replace` | 6.16; stable 6.1.142 | IPv6 checksums patched without it, `skb->csum` corrected with `bpf_csum_update` (docs/DATAPLANE.md §5) |
//! | XDP BPF links | 5.9 | `attach = "xdp"` refused; `auto` picks TC |
//! | `bpf_redirect_neigh`, `bpf_fib_lookup`, `bpf_csum_update`, mmapable arrays, LRU hash, DEVMAP_HASH | 5.10, 4.18, 4.9, 5.5, 4.10, 5.4 | refused |
//!
//! `XDPLB_PRETEND_MISSING=tcx,bpf_f_ipv6` (a test knob, comma-separated
//! [`Feature::key`]s) makes the daemon treat features as missing, so the
//! fallbacks and the refusals can be exercised on a kernel that has
//! everything.

use std::{
    collections::BTreeSet,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::OnceLock,
};

use anyhow::{bail, Result};
use aya::{
    maps::MapType,
    programs::{tc::SchedClassifier, ProgramError, ProgramType, TcAttachType},
    sys::{is_helper_supported, is_map_supported, BpfHelper},
};

use crate::config::{AttachMode, Config};

/// The environment variable that hides features from the daemon (tests).
pub const PRETEND_ENV: &str = "XDPLB_PRETEND_MISSING";

/// A kernel feature the daemon relies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    Tcx,
    XdpLink,
    L4CsumIpv6,
    RedirectNeigh,
    FibLookup,
    CsumUpdate,
    MmapableArray,
    LruHash,
    DevmapHash,
}

impl Feature {
    pub const ALL: [Feature; 9] = [
        Feature::Tcx,
        Feature::XdpLink,
        Feature::L4CsumIpv6,
        Feature::RedirectNeigh,
        Feature::FibLookup,
        Feature::CsumUpdate,
        Feature::MmapableArray,
        Feature::LruHash,
        Feature::DevmapHash,
    ];

    /// The name in logs and in [`PRETEND_ENV`].
    pub fn key(self) -> &'static str {
        match self {
            Feature::Tcx => "tcx",
            Feature::XdpLink => "xdp_link",
            Feature::L4CsumIpv6 => "bpf_f_ipv6",
            Feature::RedirectNeigh => "redirect_neigh",
            Feature::FibLookup => "fib_lookup",
            Feature::CsumUpdate => "csum_update",
            Feature::MmapableArray => "mmapable_array",
            Feature::LruHash => "lru_hash",
            Feature::DevmapHash => "devmap_hash",
        }
    }

    /// What it is, for an operator.
    pub fn what(self) -> &'static str {
        match self {
            Feature::Tcx => "tcx (TC BPF links)",
            Feature::XdpLink => "XDP BPF links",
            Feature::L4CsumIpv6 => "BPF_F_IPV6 for bpf_l4_csum_replace",
            Feature::RedirectNeigh => "the bpf_redirect_neigh helper",
            Feature::FibLookup => "the bpf_fib_lookup helper",
            Feature::CsumUpdate => "the bpf_csum_update helper",
            Feature::MmapableArray => "mmapable BPF arrays",
            Feature::LruHash => "LRU hash maps",
            Feature::DevmapHash => "DEVMAP_HASH maps",
        }
    }

    /// The first mainline kernel with it (and the stable series that got it).
    /// Versions as BCC's docs/kernel-versions.md lists them; commits: tcx
    /// e420bed02507, XDP links aa8d3a716b59, BPF_F_IPV6 ead7f9b8de65
    /// (backported to 6.1.142), bpf_redirect_neigh b4ab31414970,
    /// bpf_fib_lookup 87f5fc7e48dd, BPF_F_MMAPABLE fc9702273e2e, LRU hash
    /// 29ba732acbee, DEVMAP_HASH 6f9d451ab1a3.
    pub fn kernel(self) -> &'static str {
        match self {
            Feature::Tcx => "6.6",
            Feature::XdpLink => "5.9",
            Feature::L4CsumIpv6 => "6.16; stable 6.1.142, Debian 6.1.147-1",
            Feature::RedirectNeigh => "5.10",
            Feature::FibLookup => "4.18",
            Feature::CsumUpdate => "4.9",
            Feature::MmapableArray => "5.5",
            Feature::LruHash => "4.10",
            Feature::DevmapHash => "5.4",
        }
    }

    /// What xdplb uses it for (completes "which ...").
    fn used_for(self) -> &'static str {
        match self {
            Feature::Tcx => "attaches TC programs as pinnable links",
            Feature::XdpLink => "XDP mode needs to keep its program attached across restarts",
            Feature::L4CsumIpv6 => "patches IPv6 TCP/UDP checksums in TC",
            Feature::RedirectNeigh => "TC forwarding (and XDP mode's slow path) needs",
            Feature::FibLookup => "forwarding needs to find the egress interface",
            Feature::CsumUpdate => "the IPv6 checksum fallback needs",
            Feature::MmapableArray => "the Maglev table map is created with",
            Feature::LruHash => "the connection table is",
            Feature::DevmapHash => "the XDP redirect map is",
        }
    }

    /// When the probe itself fails (an unexpected error), assume what works
    /// everywhere: no tcx (netlink works on every kernel), no BPF_F_IPV6 (the
    /// fallback is correct everywhere); the rest is assumed present, and
    /// loading or attaching then fails with the kernel's own error.
    fn assume_on_error(self) -> bool {
        !matches!(self, Feature::Tcx | Feature::L4CsumIpv6)
    }
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    Yes,
    No,
    /// The probe failed; the text says how.
    Unknown(String),
}

/// What the running kernel supports.
#[derive(Clone, Debug)]
pub struct Features {
    /// `uname -r`.
    pub release: String,
    probed: Vec<(Feature, Probed)>,
    /// Hidden by [`PRETEND_ENV`].
    pretend: BTreeSet<Feature>,
    /// Names in [`PRETEND_ENV`] that are no feature.
    unknown_pretend: Vec<String>,
}

impl Features {
    /// Probes the running kernel and applies [`PRETEND_ENV`].
    pub fn detect() -> Self {
        let probed = Feature::ALL.iter().map(|&f| (f, probe(f))).collect();
        let (pretend, unknown_pretend) =
            parse_pretend(&std::env::var(PRETEND_ENV).unwrap_or_default());
        Self {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            probed,
            pretend,
            unknown_pretend,
        }
    }

    /// A kernel with exactly `have` (unit tests).
    pub fn synthetic(release: &str, have: &[Feature]) -> Self {
        Self {
            release: release.into(),
            probed: Feature::ALL
                .iter()
                .map(|&f| {
                    (
                        f,
                        if have.contains(&f) {
                            Probed::Yes
                        } else {
                            Probed::No
                        },
                    )
                })
                .collect(),
            pretend: BTreeSet::new(),
            unknown_pretend: Vec::new(),
        }
    }

    pub fn probed(&self, f: Feature) -> &Probed {
        self.probed
            .iter()
            .find(|(g, _)| *g == f)
            .map(|(_, p)| p)
            .unwrap_or(&Probed::No)
    }

    /// Whether the daemon may use `f`.
    pub fn has(&self, f: Feature) -> bool {
        if self.pretend.contains(&f) {
            return false;
        }
        match self.probed(f) {
            Probed::Yes => true,
            Probed::No => false,
            Probed::Unknown(_) => f.assume_on_error(),
        }
    }

    /// Whether `f` is missing only because [`PRETEND_ENV`] says so.
    pub fn pretended(&self, f: Feature) -> bool {
        self.pretend.contains(&f)
    }

    /// "kernel 6.1.0-37-cloud-amd64 lacks X (Linux 6.6)", or the pretence.
    fn lacks(&self, f: Feature) -> String {
        if self.pretended(f) {
            format!(
                "{PRETEND_ENV} hides {} (Linux {}) on kernel {}",
                f.what(),
                f.kernel(),
                self.release
            )
        } else {
            format!(
                "kernel {} lacks {} (Linux {})",
                self.release,
                f.what(),
                f.kernel()
            )
        }
    }

    /// One line: every feature and its probe result.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = Feature::ALL
            .iter()
            .map(|&f| {
                let v = match (self.pretended(f), self.probed(f)) {
                    (true, _) => "no (pretend)".to_string(),
                    (false, Probed::Yes) => "yes".into(),
                    (false, Probed::No) => "no".into(),
                    (false, Probed::Unknown(e)) => format!(
                        "unknown ({e}; assumed {})",
                        if f.assume_on_error() { "yes" } else { "no" }
                    ),
                };
                format!("{} {v}", f.key())
            })
            .collect();
        format!("kernel {}: {}", self.release, parts.join(", "))
    }
}

/// The probed features of this kernel (probed on first use).
pub fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(Features::detect)
}

fn parse_pretend(v: &str) -> (BTreeSet<Feature>, Vec<String>) {
    let mut set = BTreeSet::new();
    let mut unknown = Vec::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match Feature::ALL.iter().find(|f| f.key() == name) {
            Some(&f) => {
                set.insert(f);
            }
            None => unknown.push(name.to_string()),
        }
    }
    (set, unknown)
}

/// What a configuration asks of the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Some interface is attached with XDP (`attach = "xdp"`; `auto` falls
    /// back to TC by itself).
    pub xdp: bool,
    /// Some service listens on IPv6.
    pub ipv6: bool,
}

impl Needs {
    pub fn of(cfg: &Config) -> Self {
        Self {
            xdp: cfg.attach == AttachMode::Xdp,
            ipv6: cfg.services.iter().any(|s| s.listen.addr.is_ipv6()),
        }
    }
}

/// Decides what `needs` can do on `f`: the log lines for the fallbacks
/// taken, or one line saying what is missing and what to do.
pub fn decide(f: &Features, needs: Needs) -> Result<Vec<String>, String> {
    if !f.unknown_pretend.is_empty() {
        let known: Vec<&str> = Feature::ALL.iter().map(|f| f.key()).collect();
        return Err(format!(
            "{PRETEND_ENV}: unknown feature {} (known: {})",
            f.unknown_pretend.join(", "),
            known.join(", ")
        ));
    }
    let mut missing = Vec::new();
    for feature in [
        Feature::RedirectNeigh,
        Feature::FibLookup,
        Feature::CsumUpdate,
        Feature::MmapableArray,
        Feature::LruHash,
        Feature::DevmapHash,
    ] {
        if !f.has(feature) {
            missing.push(format!(
                "{}, which {}",
                f.lacks(feature),
                feature.used_for()
            ));
        }
    }
    if needs.xdp && !f.has(Feature::XdpLink) {
        missing.push(format!(
            "{}, which {}: use attach = \"tc\" (--attach tc)",
            f.lacks(Feature::XdpLink),
            Feature::XdpLink.used_for()
        ));
    }
    if !missing.is_empty() {
        return Err(format!(
            "{}; xdplb needs Linux 6.1 or newer (see README, Supported kernels)",
            missing.join("; ")
        ));
    }
    let mut log = Vec::new();
    if !f.has(Feature::Tcx) {
        log.push(format!(
            "{}: TC programs are attached as clsact ingress filters (netlink, priority {}, \
             handle {:#x}) instead of pinned tcx links",
            f.lacks(Feature::Tcx),
            crate::dataplane::clsact::PRIORITY,
            crate::dataplane::clsact::HANDLE
        ));
    }
    if !f.has(Feature::XdpLink) {
        log.push(format!(
            "{}: attach = \"auto\" picks TC on every interface",
            f.lacks(Feature::XdpLink)
        ));
    }
    if !f.has(Feature::L4CsumIpv6) {
        let services = if needs.ipv6 {
            "IPv6 services"
        } else {
            "IPv6 services (none configured)"
        };
        log.push(format!(
            "{}: {services} in TC get their TCP/UDP checksums patched without it, and \
             bpf_csum_update corrects skb->csum",
            f.lacks(Feature::L4CsumIpv6)
        ));
    }
    Ok(log)
}

/// At start: logs the probe results and the fallbacks taken, or fails with
/// one line naming what is missing.
pub fn check(cfg: &Config) -> Result<()> {
    let f = features();
    tracing::info!("{}", f.summary());
    if !f.pretend.is_empty() {
        let hidden: Vec<&str> = f.pretend.iter().map(|p| p.key()).collect();
        tracing::warn!(
            "{PRETEND_ENV}={}: treating these features as missing (a test knob)",
            hidden.join(",")
        );
    }
    match decide(f, Needs::of(cfg)) {
        Ok(lines) => {
            for l in lines {
                tracing::info!("{l}");
            }
            Ok(())
        }
        Err(line) => bail!("{line}"),
    }
}

// ---- the probes -----------------------------------------------------------------

fn probe(f: Feature) -> Probed {
    let r: io::Result<bool> = match f {
        Feature::Tcx => probe_tcx(),
        Feature::XdpLink => probe_xdp_link(),
        Feature::L4CsumIpv6 => probe_l4_csum_ipv6(),
        Feature::RedirectNeigh => helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_redirect_neigh,
        ),
        Feature::FibLookup => helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_fib_lookup)
            .and_then(|tc| Ok(tc && helper(ProgramType::Xdp, BpfHelper::BPF_FUNC_fib_lookup)?)),
        Feature::CsumUpdate => helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_csum_update,
        ),
        Feature::MmapableArray => probe_mmapable(),
        Feature::LruHash => is_map_supported(MapType::LruHash).map_err(io::Error::other),
        Feature::DevmapHash => is_map_supported(MapType::DevMapHash).map_err(io::Error::other),
    };
    match r {
        Ok(true) => Probed::Yes,
        Ok(false) => Probed::No,
        Err(e) => Probed::Unknown(e.to_string()),
    }
}

fn helper(prog: ProgramType, h: BpfHelper) -> io::Result<bool> {
    is_helper_supported(prog, h).map_err(io::Error::other)
}

/// tcx: a `BPF_PROG_QUERY` for tcx ingress on `lo`. Kernels before 6.6 do
/// not know the attach type (-EINVAL); 6.6 and later answer, with nothing
/// changed.
fn probe_tcx() -> io::Result<bool> {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => Ok(true),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
            Ok(false)
        }
        Err(e) => Err(io::Error::other(e)),
    }
}

/// XDP links: `BPF_LINK_CREATE` of a trivial XDP program on `lo` in native
/// (driver) mode. `lo` has no native XDP, so 5.9 and later refuse with
/// -EOPNOTSUPP (`dev_xdp_attach`, "Underlying driver does not support XDP
/// in native mode") and nothing is attached; older kernels do not know the
/// attach type (-EINVAL).
fn probe_xdp_link() -> io::Result<bool> {
    let prog = load(BPF_PROG_TYPE_XDP, BPF_XDP, &RETURN_0)?;
    let lo = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: lo,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    match bpf(BPF_LINK_CREATE, &mut attr) {
        // Unexpected, but a link it is: closing the fd detaches it.
        Ok(fd) => {
            drop(fd);
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(_) => Ok(true),
    }
}

/// BPF_F_IPV6: a TC program that calls `bpf_l4_csum_replace(skb, 0, 0, 0,
/// BPF_F_PSEUDO_HDR | BPF_F_IPV6)` and returns the helper's result, run once
/// with `BPF_PROG_TEST_RUN`. The helper checks its flags before anything
/// else: -EINVAL on a kernel without the flag, 0 with it.
fn probe_l4_csum_ipv6() -> io::Result<bool> {
    const BPF_F_PSEUDO_HDR: i32 = 1 << 4;
    const BPF_F_IPV6: i32 = 1 << 7;
    const BPF_FUNC_L4_CSUM_REPLACE: i32 = 11;
    let insns = [
        Insn::mov_imm(2, 0),
        Insn::mov_imm(3, 0),
        Insn::mov_imm(4, 0),
        Insn::mov_imm(5, BPF_F_PSEUDO_HDR | BPF_F_IPV6),
        Insn::call(BPF_FUNC_L4_CSUM_REPLACE),
        Insn::exit(),
    ];
    let prog = load(BPF_PROG_TYPE_SCHED_CLS, 0, &insns)?;
    // Ethernet + IPv6 + UDP, all zero but the ethertype and version.
    let mut frame = [0u8; 14 + 40 + 8];
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    frame[14] = 0x60;
    frame[14 + 6] = 17;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    match attr.retval as i32 {
        0 => Ok(true),
        rc if rc == -libc::EINVAL => Ok(false),
        rc => Err(io::Error::other(format!(
            "the probe's bpf_l4_csum_replace returned {rc}"
        ))),
    }
}

/// Mmapable arrays: create a one-slot array with `BPF_F_MMAPABLE` (unknown
/// flag before 5.5: -EINVAL).
fn probe_mmapable() -> io::Result<bool> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: BPF_F_MMAPABLE,
    };
    match bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(_map) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

// ---- just enough of bpf(2) for the probes aya has no public call for ---------------
// (uapi linux/bpf.h; each attr struct is the leading part of `union bpf_attr`
// for its command, and the kernel zero-fills the rest).

const BPF_MAP_CREATE: u32 = 0;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_LINK_CREATE: u32 = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_MMAPABLE: u32 = 1 << 10;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn mov_imm(dst: u8, imm: i32) -> Self {
        // BPF_ALU64 | BPF_MOV | BPF_K
        Self {
            code: 0xb7,
            regs: dst,
            off: 0,
            imm,
        }
    }
    const fn call(helper: i32) -> Self {
        // BPF_JMP | BPF_CALL
        Self {
            code: 0x85,
            regs: 0,
            off: 0,
            imm: helper,
        }
    }
    const fn exit() -> Self {
        // BPF_JMP | BPF_EXIT
        Self {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        }
    }
}

/// `r0 = 0; exit`.
const RETURN_0: [Insn; 2] = [Insn::mov_imm(0, 0), Insn::exit()];

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}
const _: () = assert!(size_of::<ProgLoadAttr>() == 72);

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}
const _: () = assert!(size_of::<TestRunAttr>() == 40);

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn load(prog_type: u32, expected_attach_type: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"xdplb_probe\0");
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr)
        .map(|fd| fd.expect("BPF_PROG_LOAD returns an fd"))
        .map_err(|e| io::Error::new(e.kind(), format!("loading a probe program: {e}")))
}

/// `bpf(cmd, attr, sizeof attr)`. For commands that return a file
/// descriptor, `Some` owns it.
fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<Option<OwnedFd>> {
    // SAFETY: `attr` is a live #[repr(C)] prefix of `union bpf_attr` for
    // `cmd`, `size_of::<T>()` bytes long; every pointer inside it points at
    // memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            size_of::<T>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let returns_fd = matches!(cmd, BPF_MAP_CREATE | BPF_PROG_LOAD | BPF_LINK_CREATE);
    // SAFETY: these commands return a new file descriptor that nothing else
    // owns.
    Ok(returns_fd.then(|| unsafe { OwnedFd::from_raw_fd(rc as i32) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_but(without: &[Feature]) -> Vec<Feature> {
        Feature::ALL
            .iter()
            .copied()
            .filter(|f| !without.contains(f))
            .collect()
    }

    #[test]
    fn everything_present_means_no_fallback() {
        let f = Features::synthetic("6.18.0", &Feature::ALL);
        assert_eq!(
            decide(
                &f,
                Needs {
                    xdp: true,
                    ipv6: true
                }
            ),
            Ok(vec![])
        );
    }

    #[test]
    fn debian_6_1_falls_back_to_clsact_and_the_csum_correction() {
        let f = Features::synthetic(
            "6.1.0-37-cloud-amd64",
            &all_but(&[Feature::Tcx, Feature::L4CsumIpv6]),
        );
        let lines = decide(
            &f,
            Needs {
                xdp: true,
                ipv6: true,
            },
        )
        .expect("6.1 runs");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("kernel 6.1.0-37-cloud-amd64 lacks tcx (TC BPF links) (Linux 6.6): TC programs are attached as clsact ingress filters"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("BPF_F_IPV6")
                && lines[1].contains("6.1.142")
                && lines[1].contains("bpf_csum_update"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn a_missing_requirement_is_one_line_with_kernel_and_advice() {
        let f = Features::synthetic(
            "5.4.0",
            &all_but(&[Feature::RedirectNeigh, Feature::XdpLink]),
        );
        let line = decide(
            &f,
            Needs {
                xdp: true,
                ipv6: false,
            },
        )
        .expect_err("5.4 cannot run");
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("kernel 5.4.0 lacks the bpf_redirect_neigh helper (Linux 5.10)"),
            "{line}"
        );
        assert!(
            line.contains("XDP BPF links (Linux 5.9)") && line.contains("attach = \"tc\""),
            "{line}"
        );
        assert!(
            line.ends_with("xdplb needs Linux 6.1 or newer (see README, Supported kernels)"),
            "{line}"
        );
    }

    #[test]
    fn xdp_links_matter_only_in_xdp_mode() {
        let f = Features::synthetic("5.8.0", &all_but(&[Feature::XdpLink]));
        let lines = decide(
            &f,
            Needs {
                xdp: false,
                ipv6: false,
            },
        )
        .expect("TC works without XDP links");
        assert!(lines.iter().any(|l| l.contains("picks TC")), "{lines:?}");
        assert!(decide(
            &f,
            Needs {
                xdp: true,
                ipv6: false
            }
        )
        .is_err());
    }

    #[test]
    fn pretending_hides_a_feature_and_says_so() {
        let mut f = Features::synthetic("6.18.0", &Feature::ALL);
        let (set, unknown) = parse_pretend(" tcx, redirect_neigh ,");
        assert!(unknown.is_empty());
        f.pretend = set;
        assert!(!f.has(Feature::Tcx) && f.has(Feature::XdpLink));
        let line = decide(&f, Needs::default()).expect_err("redirect_neigh is required");
        assert!(
            line.starts_with("XDPLB_PRETEND_MISSING hides the bpf_redirect_neigh helper (Linux 5.10) on kernel 6.18.0"),
            "{line}"
        );
        assert!(f.summary().contains("tcx no (pretend)"), "{}", f.summary());
    }

    #[test]
    fn an_unknown_pretend_name_is_refused() {
        let mut f = Features::synthetic("6.18.0", &Feature::ALL);
        let (_, unknown) = parse_pretend("tcx,tcxx");
        f.unknown_pretend = unknown;
        let line = decide(&f, Needs::default()).expect_err("typo");
        assert!(line.contains("unknown feature tcxx"), "{line}");
    }

    #[test]
    fn a_failed_probe_assumes_what_works_everywhere() {
        let mut f = Features::synthetic("6.18.0", &Feature::ALL);
        for (_, p) in &mut f.probed {
            *p = Probed::Unknown("EPERM".into());
        }
        assert!(!f.has(Feature::Tcx), "netlink works on every kernel");
        assert!(
            !f.has(Feature::L4CsumIpv6),
            "the correction is right on every kernel"
        );
        assert!(
            f.has(Feature::RedirectNeigh),
            "let the real load say what is wrong"
        );
    }
}
