//! A writer for the `newc` cpio format, the one the kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Written here rather than driving `cpio(1)`, because the archive needs
//! entries no host file stands for (`/dev/console`, files placed under
//! another path than the host's), and because building it needs no root.
//! Archives can be concatenated: the kernel unpacks one after the other,
//! which is how the cached base (tools, modules) and the per-run part (test
//! binaries) become one initrd.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context as _, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

pub struct Writer {
    out: BufWriter<File>,
    written: u64,
    ino: u32,
    /// Directories already in the archive (created on demand for every path).
    dirs: BTreeSet<String>,
}

impl Writer {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            ino: 1,
            dirs: BTreeSet::new(),
        })
    }

    /// A directory and, first, its missing parents. `path` is absolute in the guest.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | 0o755, 0, &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path, S_IFREG | (mode & 0o7777), 0, data)
    }

    /// A regular file with the contents of `host` (mode 0755 when the host
    /// file is executable, else 0644).
    pub fn copy(&mut self, path: &str, host: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let exec = std::fs::metadata(host)?.permissions().mode() & 0o111 != 0;
        self.file(path, if exec { 0o755 } else { 0o644 }, &data)
            .with_context(|| format!("archiving {}", host.display()))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path, S_IFLNK | 0o777, 0, target.as_bytes())
    }

    /// A character device node: the kernel opens `/dev/console` for init
    /// before anything could mount devtmpfs.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.parent(path)?;
        self.entry(path, S_IFCHR | 0o600, (major << 8) | minor, &[])
    }

    /// Writes the trailer and flushes; returns the archive's size.
    pub fn finish(mut self) -> Result<u64> {
        self.entry("TRAILER!!!", 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.written)
    }

    fn parent(&mut self, path: &str) -> io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    /// One header, name and data, each padded to 4 bytes. `rdev` packs
    /// major << 8 | minor.
    fn entry(&mut self, path: &str, mode: u32, rdev: u32, data: &[u8]) -> io::Result<()> {
        // Names are stored relative ("bin/sh"), as `find . | cpio -o` writes them.
        let name = path.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        let ino = self.ino;
        self.ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{path}: newc cannot hold 4 GiB")))?;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime: fixed, so the same inputs give the same bytes
            size,
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check (only for the crc format)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let path = std::env::temp_dir().join(format!("xtask-cpio-{}.cpio", std::process::id()));
        let mut w = Writer::create(&path).unwrap();
        w.file("/a/b/c.txt", 0o644, b"hello").unwrap();
        w.symlink("/a/link", "b/c.txt").unwrap();
        let size = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(size as usize, bytes.len());
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        let names: Vec<usize> = ["a\0", "a/b\0", "a/b/c.txt\0", "a/link\0", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).unwrap_or_else(|| panic!("{n:?} missing")))
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "order: {names:?}");
        // The file's header: mode 0100644, size 5.
        let at = names[2] - 110 + 6;
        assert_eq!(&text[at + 8..at + 16], "000081a4");
        assert_eq!(&text[at + 48..at + 56], "00000005");
    }
}
