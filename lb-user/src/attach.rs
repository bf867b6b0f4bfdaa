//! Attaching the data plane to interfaces, pinning the links, and the
//! one-instance-per-pin-directory lock.
//!
//! Links are pinned under `<pin_dir>/links/<iface>@<xdp|tc>`, so forwarding
//! goes on when the daemon dies (even `kill -9`). A restarted or upgraded
//! daemon finds the pinned link and swaps its own program in with
//! `bpf_link_update` (atomic; the pinned maps, connection table included,
//! stay as they are).

use std::{
    fs::{File, OpenOptions, Permissions, TryLockError},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::{XdpLink, XdpMode},
    LinkOrder, TcAttachType,
};

use crate::maps::DataPlane;

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
    // SAFETY: a datagram socket only used for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live DrvInfo.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut req) };
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    (rc == 0).then(|| (text(&info.driver), text(&info.bus_info)))
}

/// bpffs refuses names with a dot (reserved for its own files), so a dot in
/// an interface name (`eth0.100`) is written as `%2e`.
fn link_path(pin_dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    let name = iface.replace('%', "%25").replace('.', "%2e");
    pin_dir
        .join("links")
        .join(format!("{name}@{}", hook.suffix()))
}

fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        bail!("interface {iface} does not exist");
    }
    Ok(idx)
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
    Ok(format!(
        "{iface}: attached {hook} (ingress), link pinned at {}",
        path.display()
    ))
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
    for (p, _, _) in &links {
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
    crate::pin_dir::remove_dirs(pin_dir)?;
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
    for hook in [Hook::Xdp, Hook::Tc] {
        let path = link_path(pin_dir, iface, hook);
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
        .map(|(_, iface, hook)| (iface, hook))
        .collect())
}

/// The pins under `<pin_dir>/links` that [`link_path`] names: regular files
/// (on bpffs, pins) called `<iface>@xdp` or `<iface>@tc`. Anything else
/// there is not ours.
fn link_pins(pin_dir: &Path) -> Result<Vec<(PathBuf, String, Hook)>> {
    let links = pin_dir.join("links");
    let mut out = Vec::new();
    if !links.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let (iface, hook) = match name.rsplit_once('@') {
            Some((iface, "xdp")) => (iface, Hook::Xdp),
            Some((iface, "tc")) => (iface, Hook::Tc),
            _ => continue,
        };
        if e.file_type().is_ok_and(|t| t.is_file()) {
            let iface = iface.replace("%2e", ".").replace("%25", "%");
            out.push((e.path(), iface, hook));
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
