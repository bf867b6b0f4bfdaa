//! The pin directory: where it may live, who may own it, and which of its
//! entries xdplb removes.
//!
//! Pins are only as safe as the directory that holds them: whoever can write
//! to it can put their own map or link in place of ours and steer traffic.
//! So the directory must be on bpffs (elsewhere pinning fails half-way),
//! owned by us and writable by nobody else; xdplb creates it mode 0700 and
//! refuses anything else before it creates a file anywhere. Removal is by
//! name: the maps in [`crate::dataplane::maps::PINNED_MAPS`] and the links
//! `links/<iface>@xdp|tc`, then `links/` and the directory once empty.
//! Anything else stays, and the directories that hold it with it.

use std::{
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use nix::sys::statfs::{statfs, FsType, BPF_FS_MAGIC, SYSFS_MAGIC};

/// Where bpffs is mounted by convention (systemd, iproute2, bpftool).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// What a look at a pin directory found.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The path looked at: the pin directory or, while that does not exist,
    /// its nearest existing ancestor.
    pub path: PathBuf,
    /// `path` is the pin directory itself.
    pub exists: bool,
    /// statfs `f_type` of `path`.
    pub fs: FsType,
    /// `st_mode` of `path`: file type and permission bits.
    pub mode: u32,
    /// Owner of `path`.
    pub uid: u32,
    /// The name `ip netns` knows this process's network namespace by, if any.
    pub netns: Option<String>,
}

/// Why a pin directory is refused; each message says what to do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "pin directory {dir} is not on bpffs ({seen} is on a filesystem of type {fs:#x}): mount \
         bpffs (`mount -t bpf bpf /sys/fs/bpf`) and choose a --pin-dir under it",
        dir = .dir.display(), seen = .seen.display()
    )]
    NotBpffs {
        dir: PathBuf,
        seen: PathBuf,
        fs: i64,
    },
    /// `/sys/fs/bpf` is sysfs's own empty directory: bpffs is not mounted in
    /// this mount namespace, which is what `ip netns exec` leaves (it mounts
    /// a fresh /sys for the network namespace and nothing on top of it).
    #[error("{}", hidden(.dir, .netns.as_deref()))]
    BpffsHidden { dir: PathBuf, netns: Option<String> },
    #[error(
        "pin directory {dir} exists and is not a directory: choose another --pin-dir",
        dir = .dir.display()
    )]
    NotDirectory { dir: PathBuf },
    #[error(
        "pin directory {dir} is owned by uid {uid}, not by us (uid {ours}), so its owner could \
         replace our pins: `chown {ours} {dir}` if it holds xdplb's state, else choose another \
         --pin-dir",
        dir = .dir.display()
    )]
    ForeignOwner { dir: PathBuf, uid: u32, ours: u32 },
    #[error(
        "pin directory {dir} has mode {mode:04o}, writable by group or others, who could replace \
         our pins: `chmod 700 {dir}`",
        dir = .dir.display()
    )]
    Writable { dir: PathBuf, mode: u32 },
}

fn hidden(dir: &Path, netns: Option<&str>) -> String {
    let dir = dir.display();
    match netns {
        Some(ns) => format!(
            "pin directory {dir} is not on bpffs: {BPFFS_ROOT} here is sysfs's empty directory, as \
             `ip netns exec {ns}` leaves it (it remounts /sys without bpffs): run xdplb under \
             `nsenter --net=/run/netns/{ns}` instead, which keeps the host's /sys/fs/bpf"
        ),
        None => format!(
            "pin directory {dir} is not on bpffs: nothing is mounted on {BPFFS_ROOT}: `mount -t \
             bpf bpf {BPFFS_ROOT}` (under `ip netns exec`, which remounts /sys without it, use \
             `nsenter --net=/run/netns/NAME` instead)"
        ),
    }
}

/// Whether a pin directory seen as `seen` may hold our pins, for a process
/// running as `ours`. A directory still to be created only needs to be on
/// bpffs (its nearest ancestor is what `seen` describes).
pub fn judge(dir: &Path, seen: &Seen, ours: u32) -> Result<(), Refusal> {
    if seen.fs != BPF_FS_MAGIC {
        if seen.fs == SYSFS_MAGIC && dir.starts_with(BPFFS_ROOT) {
            return Err(Refusal::BpffsHidden {
                dir: dir.into(),
                netns: seen.netns.clone(),
            });
        }
        return Err(Refusal::NotBpffs {
            dir: dir.into(),
            seen: seen.path.clone(),
            fs: seen.fs.0,
        });
    }
    if !seen.exists {
        return Ok(());
    }
    if seen.mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Refusal::NotDirectory { dir: dir.into() });
    }
    if seen.uid != ours {
        return Err(Refusal::ForeignOwner {
            dir: dir.into(),
            uid: seen.uid,
            ours,
        });
    }
    if seen.mode & 0o022 != 0 {
        return Err(Refusal::Writable {
            dir: dir.into(),
            mode: seen.mode & 0o7777,
        });
    }
    Ok(())
}

/// Refuses `dir` unless it may hold our pins ([`judge`]). Creates nothing.
pub fn check(dir: &Path) -> Result<()> {
    let seen = look(dir)?;
    judge(dir, &seen, nix::unistd::geteuid().as_raw())?;
    Ok(())
}

/// [`check`]s `dir`, creates it (mode 0700, missing parents too) and checks
/// it again, so a directory that appeared in between is judged as well.
pub fn create(dir: &Path) -> Result<()> {
    check(dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    check(dir)
}

fn look(dir: &Path) -> Result<Seen> {
    let mut path = dir;
    let meta = loop {
        match std::fs::metadata(path) {
            Ok(m) => break m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                path = match path.parent() {
                    Some(p) if p.as_os_str().is_empty() => Path::new("."),
                    Some(p) => p,
                    None => return Err(e).context("looking for the pin directory's parent"),
                };
            }
            Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
        }
    };
    let fs = statfs(path)
        .with_context(|| format!("statfs {}", path.display()))?
        .filesystem_type();
    Ok(Seen {
        path: path.to_path_buf(),
        exists: path == dir,
        fs,
        mode: meta.mode(),
        uid: meta.uid(),
        netns: if fs == SYSFS_MAGIC {
            netns_name()
        } else {
            None
        },
    })
}

/// What `ip netns identify` prints: the entry of /run/netns that is our
/// network namespace.
fn netns_name() -> Option<String> {
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find_map(|e| {
            let m = std::fs::metadata(e.path()).ok()?;
            (m.dev() == ours.dev() && m.ino() == ours.ino())
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// Removes `<dir>/links` and `dir` once xdplb's pins are gone from them.
/// Whatever else is there stays, and so do the directories holding it; one
/// warning names it. Returns whether `dir` is gone.
pub fn remove_dirs(dir: &Path) -> Result<bool> {
    for d in [dir.join("links"), dir.to_path_buf()] {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                tracing::warn!(
                    "kept {}: it holds {}, which xdplb did not create (it removes only its own pins)",
                    dir.display(),
                    leftovers(dir)
                );
                return Ok(false);
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
        }
    }
    Ok(true)
}

/// The entries left under `dir` (those of `links/` as `links/NAME`), for a log line.
fn leftovers(dir: &Path) -> String {
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let mut left = Vec::new();
    for name in names(dir) {
        let sub = dir.join(&name);
        if name == "links" && sub.is_dir() {
            left.extend(names(&sub).into_iter().map(|n| format!("links/{n}")));
        } else {
            left.push(name);
        }
    }
    match left.as_slice() {
        [] => "entries it could not list".to_string(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::statfs::TMPFS_MAGIC;

    use super::*;

    const DIR: &str = "/sys/fs/bpf/xdplb";
    const ROOT: u32 = 0;

    /// An existing directory on bpffs, owned by root, mode 0700.
    fn good() -> Seen {
        Seen {
            path: DIR.into(),
            exists: true,
            fs: BPF_FS_MAGIC,
            mode: libc::S_IFDIR | 0o700,
            uid: ROOT,
            netns: None,
        }
    }

    fn judged(seen: Seen) -> Result<(), Refusal> {
        judge(Path::new(DIR), &seen, ROOT)
    }

    #[test]
    fn a_private_directory_on_bpffs_is_accepted() {
        assert_eq!(judged(good()), Ok(()));
        let mode = libc::S_IFDIR | 0o755;
        assert_eq!(
            judged(Seen { mode, ..good() }),
            Ok(()),
            "0755 (older xdplb)"
        );
    }

    #[test]
    fn a_missing_directory_is_judged_by_its_ancestor_filesystem() {
        // /sys/fs/bpf itself is root's 1777 on some hosts: not ours to judge.
        let parent = Seen {
            path: BPFFS_ROOT.into(),
            exists: false,
            mode: libc::S_IFDIR | 0o1777,
            ..good()
        };
        assert_eq!(judged(parent), Ok(()));
    }

    #[test]
    fn a_directory_elsewhere_is_refused_naming_bpffs() {
        let dir = Path::new("/tmp/pins");
        let seen = Seen {
            path: dir.into(),
            fs: TMPFS_MAGIC,
            ..good()
        };
        let err = judge(dir, &seen, ROOT).expect_err("tmpfs must be refused");
        assert_eq!(
            err,
            Refusal::NotBpffs {
                dir: dir.into(),
                seen: dir.into(),
                fs: TMPFS_MAGIC.0
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("not on bpffs") && text.contains("mount -t bpf bpf /sys/fs/bpf"),
            "expected the fix named, got: {text}"
        );
    }

    #[test]
    fn bpffs_hidden_by_ip_netns_exec_suggests_nsenter() {
        let seen = Seen {
            path: BPFFS_ROOT.into(),
            exists: false,
            fs: SYSFS_MAGIC,
            netns: Some("lb".into()),
            ..good()
        };
        let text = judged(seen.clone())
            .expect_err("sysfs must be refused")
            .to_string();
        assert!(
            text.contains("ip netns exec lb") && text.contains("nsenter --net=/run/netns/lb"),
            "expected the namespace named and nsenter suggested, got: {text}"
        );
        let text = judged(Seen {
            netns: None,
            ..seen
        })
        .expect_err("sysfs must be refused")
        .to_string();
        assert!(
            text.contains("mount -t bpf bpf /sys/fs/bpf") && text.contains("nsenter --net="),
            "expected both fixes, got: {text}"
        );
    }

    #[test]
    fn a_file_is_refused() {
        let mode = libc::S_IFREG | 0o600;
        assert_eq!(
            judged(Seen { mode, ..good() }),
            Err(Refusal::NotDirectory { dir: DIR.into() })
        );
    }

    #[test]
    fn another_owner_is_refused() {
        let err = judged(Seen {
            uid: 65534,
            ..good()
        })
        .expect_err("uid 65534 must be refused");
        assert_eq!(
            err,
            Refusal::ForeignOwner {
                dir: DIR.into(),
                uid: 65534,
                ours: ROOT
            }
        );
        assert!(
            err.to_string().contains("`chown 0 /sys/fs/bpf/xdplb`"),
            "{err}"
        );
    }

    #[test]
    fn group_or_world_writable_is_refused() {
        for perm in [0o777, 0o720, 0o702, 0o1777] {
            let mode = libc::S_IFDIR | perm;
            assert_eq!(
                judged(Seen { mode, ..good() }),
                Err(Refusal::Writable {
                    dir: DIR.into(),
                    mode: perm
                }),
                "mode {perm:o}"
            );
        }
        let err = judged(Seen {
            mode: libc::S_IFDIR | 0o777,
            ..good()
        })
        .expect_err("0777");
        assert!(
            err.to_string().contains("`chmod 700 /sys/fs/bpf/xdplb`"),
            "{err}"
        );
    }
}
