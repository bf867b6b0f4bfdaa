//! Attaching the data plane to interfaces, pinning the links, and the
//! one-instance-per-pin-directory lock.
//!
//! Links are pinned under `<pin_dir>/links/<iface>@<xdp|tc>`, so forwarding
//! goes on when the daemon dies (even `kill -9`). A restarted or upgraded
//! daemon finds the pinned link and swaps its own program in with
//! `bpf_link_update` (atomic; the pinned maps, connection table included,
//! stay as they are).
//!
//! Kernels without tcx (before 6.6; `probe::Feature::Tcx`) get the TC
//! program as a clsact ingress filter at a fixed priority and handle
//! instead (`clsact`). A filter cannot be pinned, so the record that we
//! attached one is the TC program pinned at `<pin_dir>/links/<iface>@clsact`:
//! a restart replaces the program in that filter (atomic), `down` deletes
//! exactly that filter.

use std::{
    fs::{File, OpenOptions, Permissions, TryLockError},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, Link as _, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    xdp::{XdpLink, XdpMode},
    LinkOrder, ProgramInfo, TcAttachType,
};

use crate::dataplane::{
    clsact,
    maps::DataPlane,
    probe::{self, Feature},
};

/// How the program is hooked to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn suffix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

/// `attach = "auto"`: XDP on physical NICs, TC on virtual interfaces.
///
/// XDP_TX/XDP_REDIRECT into a veth only delivers when the peer has NAPI (an
/// XDP program or GRO on the peer). Inside a Swarm container the peer lives in
/// Docker's namespace, out of our control, so virtual interfaces get TC with
/// `bpf_redirect_neigh`, which always works (DESIGN.md, toolchain facts).
///
/// "Physical" means the driver reports a bus address (PCI, virtio, ...)
/// through the ethtool ioctl; veth, bridge, vxlan and friends report none.
/// The ioctl, unlike /sys/class/net, answers for this process's network
/// namespace whatever sysfs shows.
pub fn auto_hook(iface: &str) -> (Hook, String) {
    if !probe::features().has(Feature::XdpLink) {
        return (
            Hook::Tc,
            format!(
                "{iface}: TC, because XDP links (Linux {}) are missing and an XDP program \
                 could not stay attached across restarts",
                Feature::XdpLink.kernel()
            ),
        );
    }
    match driver_info(iface) {
        Some((driver, bus)) if !bus.is_empty() => (
            Hook::Xdp,
            format!("{iface} is a physical device (driver {driver}, bus {bus}): XDP, the fastest hook"),
        ),
        Some((driver, _)) => (
            Hook::Tc,
            format!(
                "{iface} is a virtual device (driver {driver}): TC, because XDP redirect into a veth \
                 needs NAPI on a peer that may live in another namespace"
            ),
        ),
        None => (Hook::Tc, format!("{iface}: driver unknown, TC (works on every device)")),
    }
}

/// What XDP on `iface` needs that the daemon cannot arrange, for a warning
/// at start; `None` on a physical NIC.
///
/// XDP_TX/XDP_REDIRECT into a veth is delivered only when the receiving peer
/// has NAPI (GRO on, or an XDP program of its own), and the frames keep no
/// "checksum still to be finished" state, so senders on veths must not
/// offload their checksums (DESIGN.md, toolchain facts). Without both,
/// every forwarded frame is dropped and shows only as `xdp_tx_errors` in
/// `ethtool -S` or as bad checksums at the receiver.
pub fn xdp_caveat(iface: &str) -> Option<String> {
    let (driver, bus) = driver_info(iface)?;
    if !bus.is_empty() {
        return None;
    }
    Some(format!(
        "{iface}: XDP on a virtual device (driver {driver}): forwarded frames are dropped unless \
         the peer of every veth the balancer sends into has NAPI (`ethtool -K <peer> gro on`, or \
         an XDP program on the peer) and the senders' tx checksum offload is off (`ethtool -K \
         <dev> tx off`). Inside a container the peers are out of reach: use `--attach tc` (or \
         `auto`, which picks TC here)"
    ))
}

/// (driver, bus_info) from ETHTOOL_GDRVINFO.
fn driver_info(iface: &str) -> Option<(String, String)> {
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    fn text(b: &[u8]) -> String {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    }
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: all-zero is a valid DrvInfo and ifreq (plain C structs).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    nix::ioctl_readwrite_bad!(ethtool, libc::SIOCETHTOOL, libc::ifreq);
    // A datagram socket only for the ioctl, closed when dropped.
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live DrvInfo.
    let rc = unsafe { ethtool(sock.as_raw_fd(), &mut req) };
    rc.is_ok()
        .then(|| (text(&info.driver), text(&info.bus_info)))
}

/// bpffs refuses names with a dot (reserved for its own files), so a dot in
/// an interface name (`eth0.100`) is written as `%2e`.
fn link_path(pin_dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    pin_path(pin_dir, iface, hook.suffix())
}

/// The record of our clsact filter on `iface`: the TC program, pinned.
fn clsact_record(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_path(pin_dir, iface, CLSACT_SUFFIX)
}

const CLSACT_SUFFIX: &str = "clsact";

fn pin_path(pin_dir: &Path, iface: &str, suffix: &str) -> PathBuf {
    let name = iface.replace('%', "%25").replace('.', "%2e");
    pin_dir.join("links").join(format!("{name}@{suffix}"))
}

fn ifindex(iface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(iface)
        .map_err(|_| anyhow::anyhow!("interface {iface} does not exist"))
}

/// Attaches (or re-attaches, adopting pinned links) the data plane on
/// `iface`. Returns the ifindex attached to, and sentences for the log.
///
/// XDP mode attaches the TC program as well: XDP forwards what it can send
/// itself (known neighbour, interface in TX_PORTS) and leaves the rest,
/// untouched, to TC on the same interface, whose `bpf_redirect_neigh`
/// resolves neighbours (docs/DATAPLANE.md §7).
pub fn attach(dp: &mut DataPlane, iface: &str, hook: Hook) -> Result<(u32, Vec<String>)> {
    let idx = ifindex(iface)?;
    let pin_dir = dp.pin_dir().to_path_buf();
    let links = pin_dir.join("links");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&links)
        .with_context(|| format!("creating {}", links.display()))?;
    let mut log = Vec::new();
    match hook {
        Hook::Tc => {
            // From XDP mode to TC mode: the XDP link goes.
            let xdp = link_path(&pin_dir, iface, Hook::Xdp);
            if xdp.exists() {
                std::fs::remove_file(&xdp)
                    .with_context(|| format!("removing {}", xdp.display()))?;
                log.push(format!("{iface}: XDP link removed (TC mode now)"));
            }
            log.push(attach_one(dp, iface, idx, Hook::Tc)?);
        }
        Hook::Xdp => {
            dp.add_tx_port(idx)?;
            log.push(attach_one(dp, iface, idx, Hook::Tc)?);
            log.push(attach_one(dp, iface, idx, Hook::Xdp)?);
        }
    }
    Ok((idx, log))
}

fn attach_one(dp: &mut DataPlane, iface: &str, idx: u32, hook: Hook) -> Result<String> {
    if hook == Hook::Tc && !probe::features().has(Feature::Tcx) {
        return attach_clsact(dp, iface, idx);
    }
    let path = link_path(dp.pin_dir(), iface, hook);
    if path.exists() {
        match adopt(dp, &path, hook) {
            Ok(()) => {
                return Ok(format!(
                    "{iface}: adopted pinned {hook} link, program replaced atomically"
                ))
            }
            // The interface the link was made for is gone (a container's veth
            // after a restart: "Link has been severed"), or the pin is not a
            // link of ours: drop it and attach afresh.
            Err(e) => {
                tracing::warn!(
                    "{iface}: pinned {hook} link {} is unusable ({e:#}); replacing it",
                    path.display()
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing stale pin {}", path.display()))?;
            }
        }
    }
    let fd: FdLink = match hook {
        Hook::Xdp => {
            let prog = dp.xdp();
            let id = prog
                .attach_to_if_index(idx, XdpMode::default())
                .with_context(|| format!("attaching XDP to {iface}"))?;
            prog.take_link(id)?
                .try_into()
                .context("XDP link is not an fd link (kernel too old?)")?
        }
        Hook::Tc => {
            let prog = dp.tc();
            let id = prog
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching TC (tcx ingress) to {iface}"))?;
            prog.take_link(id)?
                .try_into()
                .context("TC link is not an fd link (kernel without tcx?)")?
        }
    };
    fd.pin(&path)
        .with_context(|| format!("pinning link at {}", path.display()))?;
    // From a clsact filter (a kernel upgrade): the tcx program runs first
    // and ends every packet's TC path, so the filter can go after it.
    let gone = if hook == Hook::Tc && clsact_record(dp.pin_dir(), iface).exists() {
        remove_clsact(dp.pin_dir(), iface)?;
        "; the clsact filter of a kernel without tcx removed"
    } else {
        ""
    };
    Ok(format!(
        "{iface}: attached {hook} (ingress), link pinned at {}{gone}",
        path.display()
    ))
}

/// TC on a kernel without tcx: our clsact ingress filter (module `clsact`),
/// created, or adopted with the program replaced, and recorded by pinning
/// the program at [`clsact_record`].
fn attach_clsact(dp: &mut DataPlane, iface: &str, idx: u32) -> Result<String> {
    let pin_dir = dp.pin_dir().to_path_buf();
    let why = if probe::features().pretended(Feature::Tcx) {
        format!("tcx hidden by {}", probe::PRETEND_ENV)
    } else {
        format!(
            "tcx not supported by this kernel (needs {})",
            Feature::Tcx.kernel()
        )
    };
    // From tcx (XDPLB_PRETEND_MISSING on a tcx kernel): the tcx link goes,
    // or both programs would see every packet.
    let tcx = link_path(&pin_dir, iface, Hook::Tc);
    let mut also = String::new();
    if tcx.exists() {
        std::fs::remove_file(&tcx).with_context(|| format!("removing {}", tcx.display()))?;
        also = format!(" (its tcx link {} removed)", tcx.display());
    }
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "adding the clsact qdisc to {iface} (the kernel needs sch_ingress, \
                     CONFIG_NET_SCH_INGRESS, and cls_bpf, CONFIG_NET_CLS_BPF)"
                )
            })
        }
    }
    let record = clsact_record(&pin_dir, iface);
    let recorded = std::fs::symlink_metadata(&record).is_ok_and(|m| m.is_file());
    let place = format!(
        "priority {}, handle {:#x}",
        clsact::PRIORITY,
        clsact::HANDLE
    );
    let existing = clsact::at_our_place(idx)
        .with_context(|| format!("listing the clsact ingress filters of {iface}"))?;
    let what = match existing {
        Some(f) if f.is_ours() => {
            // Re-created in place on the same priority and handle, without
            // NLM_F_EXCL: cls_bpf swaps the program in atomically.
            let link = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                clsact::PRIORITY,
                TcHandle::from(clsact::HANDLE),
                None,
            )
            .with_context(|| format!("finding {iface}"))?;
            let id = dp.tc().attach_to_link(link).with_context(|| {
                format!("replacing the program of the clsact filter on {iface}")
            })?;
            keep_attached(dp.tc().take_link(id)?);
            if recorded {
                format!("adopted its clsact ingress filter ({place}), program replaced atomically")
            } else {
                format!(
                    "found an xdplb clsact ingress filter ({place}) that the pin directory has \
                     no record of; program replaced atomically"
                )
            }
        }
        Some(f) => bail!(
            "{iface}: the clsact ingress place xdplb uses ({place}) is taken by another filter \
             ({} {}); remove it (`tc filter del dev {iface} ingress pref {} handle {:#x} {}`) \
             or free that place",
            f.kind,
            f.name.as_deref().unwrap_or("without a name"),
            f.priority,
            f.handle,
            f.kind
        ),
        None => {
            let id = dp
                .tc()
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: clsact::PRIORITY,
                        handle: TcHandle::from(clsact::HANDLE),
                        classid: None,
                    }),
                )
                .with_context(|| format!("attaching TC (clsact ingress filter) to {iface}"))?;
            keep_attached(dp.tc().take_link(id)?);
            format!("attached a clsact ingress filter (netlink, {place}) instead")
        }
    };
    if recorded {
        std::fs::remove_file(&record)
            .with_context(|| format!("removing the old record {}", record.display()))?;
    }
    dp.tc()
        .pin(&record)
        .with_context(|| format!("recording the clsact filter at {}", record.display()))?;
    Ok(format!(
        "{iface}: {why}: {what}{also}; recorded at {}",
        record.display()
    ))
}

/// A netlink filter stays until it is deleted, but aya deletes it when its
/// link object is dropped: forgetting the object (a few integers) keeps the
/// filter, which is what a pinned link does for tcx.
fn keep_attached(link: SchedClassifierLink) {
    std::mem::forget(link);
}

/// Deletes our clsact filter on `iface` (if the interface and the filter
/// exist and the filter runs `xdplb_tc`), then its record. Returns whether a
/// filter was deleted.
fn remove_clsact(pin_dir: &Path, iface: &str) -> Result<bool> {
    let mut deleted = false;
    match ifindex(iface) {
        Ok(idx) => match clsact::at_our_place(idx)
            .with_context(|| format!("listing the clsact ingress filters of {iface}"))?
        {
            Some(f) if f.is_ours() => {
                SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Ingress,
                    clsact::PRIORITY,
                    TcHandle::from(clsact::HANDLE),
                    None,
                )
                .with_context(|| format!("finding {iface}"))?
                .detach()
                .with_context(|| format!("deleting the clsact filter on {iface}"))?;
                deleted = true;
            }
            Some(f) => tracing::warn!(
                "{iface}: the filter at xdplb's clsact place runs {:?}, not {}; left alone",
                f.name,
                lb_common::PROG_TC
            ),
            None => {}
        },
        Err(_) => tracing::warn!(
            "{iface}: no such interface in this network namespace, so no clsact filter to \
             delete here; if it exists in another one, delete it there (`tc filter del dev \
             {iface} ingress pref {} handle {:#x} bpf`)",
            clsact::PRIORITY,
            clsact::HANDLE
        ),
    }
    let record = clsact_record(pin_dir, iface);
    match std::fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("unpinning {}", record.display()));
        }
        _ => {}
    }
    Ok(deleted)
}

/// Swaps our program into the pinned link at `path`.
fn adopt(dp: &mut DataPlane, path: &Path, hook: Hook) -> Result<()> {
    let fd: FdLink = PinnedLink::from_pin(path)
        .with_context(|| format!("opening pinned link {}", path.display()))?
        .into();
    match hook {
        Hook::Xdp => {
            let link = XdpLink::try_from(fd).context("pinned link is not an XDP link")?;
            dp.xdp()
                .attach_to_link(link)
                .context("replacing the program on the XDP link")?;
        }
        Hook::Tc => {
            let link = SchedClassifierLink::try_from(fd).context("pinned link is not a TC link")?;
            dp.tc()
                .attach_to_link(link)
                .context("replacing the program on the TC link")?;
        }
    }
    Ok(())
}

/// Removes our pinned links (the kernel detaches each program once no fd
/// refers to it), then our pinned maps and the emptied directories (only
/// what xdplb made: see `pin_dir`), and waits until the kernel has really
/// let go of the links: a link released through bpffs is freed from a
/// workqueue (`bpf_link_put`, kernel/bpf/syscall.c), so the program can keep
/// forwarding for a moment after its pin is gone. Returns how many pins went.
pub fn teardown(pin_dir: &Path) -> Result<usize> {
    let mut ids = Vec::new();
    let mut prog_ids = Vec::new();
    let links = link_pins(pin_dir)?;
    for (p, iface, _, kind) in &links {
        if *kind == PinKind::Clsact {
            if let Ok(info) = ProgramInfo::from_pin(p) {
                prog_ids.push(info.id());
            }
            remove_clsact(pin_dir, iface)?;
            continue;
        }
        // The ids first, with the fd closed again before the unpin.
        if let Ok(info) = PinnedLink::from_pin(p)
            .map(FdLink::from)
            .and_then(|l| l.info())
        {
            ids.push(info.id());
            prog_ids.push(info.program_id());
        }
        std::fs::remove_file(p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    let removed = links.len() + DataPlane::unpin_maps(pin_dir)?;
    crate::dataplane::pin_dir::remove_dirs(pin_dir)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let alive: Vec<u32> = aya::programs::loaded_links()
            .filter_map(|l| l.ok().map(|l| l.id()))
            .filter(|id| ids.contains(id))
            .collect();
        if alive.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the kernel still holds links {alive:?} 5 s after their pins were removed");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The kernel frees a link's id *before* it detaches the program (the
    // detach waits for the RTNL lock), so a packet can still meet the
    // program for a moment. The program goes only after the detach: wait for
    // that too. Bounded, and no error: something else (an `xdplb` process
    // still holding the object) may keep a program loaded, detached.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < deadline
        && aya::programs::loaded_programs()
            .filter_map(|p| p.ok().map(|p| p.id()))
            .any(|id| prog_ids.contains(&id))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(removed)
}

/// Removes the pins of `iface`'s links. For an interface that went away:
/// the kernel severed its links with the device, and a pin would only keep
/// the dead link (and the program) alive.
pub fn unpin_links(pin_dir: &Path, iface: &str) -> Result<()> {
    let paths = [
        link_path(pin_dir, iface, Hook::Xdp),
        link_path(pin_dir, iface, Hook::Tc),
        clsact_record(pin_dir, iface),
    ];
    for path in paths {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("unpinning {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The interfaces with pinned links, and their hooks.
pub fn pinned_links(pin_dir: &Path) -> Result<Vec<(String, Hook)>> {
    Ok(link_pins(pin_dir)?
        .into_iter()
        .map(|(_, iface, hook, _)| (iface, hook))
        .collect())
}

/// What a pin under `<pin_dir>/links` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PinKind {
    /// A BPF link (`<iface>@xdp`, `<iface>@tc`).
    Link,
    /// The record of a clsact filter: the TC program (`<iface>@clsact`).
    Clsact,
}

/// The pins under `<pin_dir>/links` that [`link_path`] and
/// [`clsact_record`] name: regular files (on bpffs, pins) called
/// `<iface>@xdp`, `<iface>@tc` or `<iface>@clsact`. Anything else there is
/// not ours.
fn link_pins(pin_dir: &Path) -> Result<Vec<(PathBuf, String, Hook, PinKind)>> {
    let links = pin_dir.join("links");
    let mut out = Vec::new();
    if !links.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let (iface, hook, kind) = match name.rsplit_once('@') {
            Some((iface, "xdp")) => (iface, Hook::Xdp, PinKind::Link),
            Some((iface, "tc")) => (iface, Hook::Tc, PinKind::Link),
            Some((iface, CLSACT_SUFFIX)) => (iface, Hook::Tc, PinKind::Clsact),
            _ => continue,
        };
        if e.file_type().is_ok_and(|t| t.is_file()) {
            let iface = iface.replace("%2e", ".").replace("%25", "%");
            out.push((e.path(), iface, hook, kind));
        }
    }
    Ok(out)
}

/// An exclusive lock per pin directory: a second `xdplb run` on the same host
/// (same pins) is refused instead of fighting over the maps.
///
/// The lock is `flock` on `/run/xdplb/<pin dir>.lock` (mode 0600, in a
/// directory created 0700), which holds the holder's pid. The file is never
/// removed: unlinking it before the lock is released would let a second
/// process lock the unlinked inode while a third creates a new file at the
/// path and locks that, two "exclusive" holders at once. The kernel releases
/// the lock when the holder's fd closes, however it dies.
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    pub fn lock_path(pin_dir: &Path) -> PathBuf {
        // Normalised, so `/sys/fs/bpf/xdplb/` and `/sys/fs/bpf/xdplb` agree.
        let pin_dir: PathBuf = pin_dir.components().collect();
        let tag: String = pin_dir
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("/run/xdplb").join(format!("{tag}.lock"))
    }

    pub fn acquire(pin_dir: &Path) -> Result<Self> {
        let path = Self::lock_path(pin_dir);
        let dir = path.parent().unwrap_or(Path::new("/run"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another xdplb instance (pid {}) is running with pin directory {}; stop it \
                     first (or use another --pin-dir)",
                    holder.trim(),
                    pin_dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        // Older versions left it 0644.
        file.set_permissions(Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", path.display()))?;
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }

    /// Is some process holding the lock right now?
    pub fn is_held(pin_dir: &Path) -> bool {
        let Ok(file) = File::open(Self::lock_path(pin_dir)) else {
            return false;
        };
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }
}
