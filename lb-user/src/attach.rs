//! Attaching the data plane to interfaces, pinning the links, and the
//! one-instance-per-pin-directory lock.
//!
//! Links are pinned under `<pin_dir>/links/<iface>.<xdp|tc>`, so forwarding
//! goes on when the daemon dies (even `kill -9`). A restarted or upgraded
//! daemon finds the pinned link and swaps its own program in with
//! `bpf_link_update` (atomic; the pinned maps, connection table included,
//! stay as they are).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    LinkOrder, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::{XdpLink, XdpMode},
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
pub fn auto_hook(iface: &str) -> (Hook, String) {
    let sys = Path::new("/sys/class/net").join(iface);
    if sys.join("device").exists() {
        (Hook::Xdp, format!("{iface} is a physical device: XDP (fastest)"))
    } else {
        (
            Hook::Tc,
            format!(
                "{iface} is a virtual device (veth/bridge/overlay): TC, because XDP redirect into \
                 a veth needs NAPI on a peer we may not control"
            ),
        )
    }
}

fn link_path(pin_dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    pin_dir.join("links").join(format!("{iface}.{}", hook.suffix()))
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

/// Attaches (or re-attaches, adopting a pinned link) the data plane on
/// `iface`. Returns a sentence for the log.
pub fn attach(dp: &mut DataPlane, iface: &str, hook: Hook) -> Result<String> {
    let idx = ifindex(iface)?;
    let pin_dir = dp.pin_dir().to_path_buf();
    std::fs::create_dir_all(pin_dir.join("links"))?;
    // A link of the other kind on this interface (attach mode changed) goes.
    let other = link_path(&pin_dir, iface, if hook == Hook::Xdp { Hook::Tc } else { Hook::Xdp });
    if other.exists() {
        std::fs::remove_file(&other).with_context(|| format!("removing {}", other.display()))?;
    }
    let path = link_path(&pin_dir, iface, hook);
    if hook == Hook::Xdp {
        dp.add_tx_port(idx)?;
    }
    if path.exists() {
        let fd: FdLink = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?
            .into();
        match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(fd).context("pinned link is not an XDP link")?;
                dp.xdp().attach_to_link(link).context("replacing the program on the XDP link")?;
            }
            Hook::Tc => {
                let link = SchedClassifierLink::try_from(fd).context("pinned link is not a TC link")?;
                dp.tc().attach_to_link(link).context("replacing the program on the TC link")?;
            }
        }
        return Ok(format!("{iface}: adopted pinned {hook} link, program replaced atomically"));
    }
    let fd: FdLink = match hook {
        Hook::Xdp => {
            let prog = dp.xdp();
            let id = prog
                .attach_to_if_index(idx, XdpMode::default())
                .with_context(|| format!("attaching XDP to {iface}"))?;
            prog.take_link(id)?.try_into().context("XDP link is not an fd link (kernel too old?)")?
        }
        Hook::Tc => {
            let prog = dp.tc();
            let id = prog
                .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .with_context(|| format!("attaching TC (tcx ingress) to {iface}"))?;
            prog.take_link(id)?.try_into().context("TC link is not an fd link (kernel without tcx?)")?
        }
    };
    fd.pin(&path).with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(format!("{iface}: attached {hook} (ingress), link pinned at {}", path.display()))
}

/// Removes every pinned link (the kernel detaches each program once no fd
/// refers to it) and then the pinned maps.
pub fn teardown(pin_dir: &Path) -> Result<()> {
    let links = pin_dir.join("links");
    if links.exists() {
        for e in std::fs::read_dir(&links)? {
            let p = e?.path();
            std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
        }
    }
    DataPlane::unpin_all(pin_dir)
}

/// The interfaces with pinned links, and their hooks.
pub fn pinned_links(pin_dir: &Path) -> Result<Vec<(String, Hook)>> {
    let links = pin_dir.join("links");
    let mut out = Vec::new();
    if !links.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&links)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some((iface, kind)) = name.rsplit_once('.') {
            let hook = if kind == "xdp" { Hook::Xdp } else { Hook::Tc };
            out.push((iface.to_string(), hook));
        }
    }
    Ok(out)
}

/// An exclusive lock per pin directory: a second `xdplb run` on the same host
/// (same pins) is refused instead of fighting over the maps.
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    pub fn lock_path(pin_dir: &Path) -> PathBuf {
        let tag: String = pin_dir
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("/run/xdplb").join(format!("{tag}.lock"))
    }

    pub fn acquire(pin_dir: &Path) -> Result<Self> {
        let path = Self::lock_path(pin_dir);
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/run")))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another xdplb instance (pid {}) is running with pin directory {}; stop it first \
                 (or use another --pin-dir)",
                holder.trim(),
                pin_dir.display()
            );
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file, path })
    }

    /// Is some process holding the lock right now?
    pub fn is_held(pin_dir: &Path) -> bool {
        let path = Self::lock_path(pin_dir);
        let Ok(file) = File::open(&path) else {
            return false;
        };
        // SAFETY: flock on an fd we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        rc != 0
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
