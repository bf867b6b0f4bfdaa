//! The two images, built without a registry: a root filesystem assembled from
//! a binary, the shared libraries `ldd` lists for it, and a few /etc files,
//! then `docker import`ed. No base image, no Dockerfile, nothing pulled.
//!
//! - `xdplb-e2e/xdplb:dev`: the daemon from `target/debug` (debug info
//!   stripped: 130 MB -> 30 MB), glibc, libgcc_s, libm.
//! - `xdplb-e2e/nginx:dev`: nginx from Debian's own `nginx` package
//!   (`apt-get download`, unpacked with `dpkg-deb -x`, never installed on the
//!   host, where it would start a server on port 80), its libraries, and a
//!   config that answers `GET /` with `<hostname> <address>` and `/healthz`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::docker::{docker, out};
use crate::cmd::{run, trace};

pub const XDPLB_IMAGE: &str = "xdplb-e2e/xdplb:dev";
pub const NGINX_IMAGE: &str = "xdplb-e2e/nginx:dev";

/// The backend: `GET /` names the task, `/healthz` is for xdplb's check.
/// Access logs off: thousands of requests a minute would only fill
/// json-file logs.
const NGINX_CONF: &str = r#"daemon off;
user www-data;
worker_processes 1;
error_log stderr notice;
pid /run/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    server {
        listen 80;
        location = /healthz { return 200 "ok\n"; }
        location / { return 200 "$hostname $server_addr\n"; }
    }
}
"#;

/// Builds both images from the daemon binary `xdplb`; `work` holds the
/// staging trees and caches the nginx package.
pub fn build(work: &Path, xdplb: &Path) -> Result<()> {
    let rootfs = fresh_dir(&work.join("rootfs-xdplb"))?;
    let bin = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin)?;
    // Debug info is most of the binary and no use inside the image.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(xdplb)
        .arg(bin.join("xdplb")))?;
    copy_libraries(xdplb, &rootfs)?;
    // /run/xdplb holds the instance lock and the status file; /tmp for luck.
    for dir in ["run", "tmp"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    import(
        &rootfs,
        XDPLB_IMAGE,
        &[
            r#"ENTRYPOINT ["/usr/local/bin/xdplb"]"#,
            "ENV RUST_LOG=info",
        ],
    )?;

    let deb = nginx_package(work)?;
    let unpacked = fresh_dir(&work.join("nginx-deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let rootfs = fresh_dir(&work.join("rootfs-nginx"))?;
    let nginx = unpacked.join("usr/sbin/nginx");
    fs::create_dir_all(rootfs.join("usr/sbin"))?;
    fs::copy(&nginx, rootfs.join("usr/sbin/nginx"))
        .with_context(|| format!("copying {}", nginx.display()))?;
    copy_libraries(&nginx, &rootfs)?;
    // nginx opens /var/log/nginx/error.log before it reads the config, and
    // creates its temp directories under /var/lib/nginx (Debian's build paths).
    for dir in ["etc/nginx", "var/lib/nginx", "var/log/nginx", "run", "tmp"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::write(rootfs.join("etc/nginx/nginx.conf"), NGINX_CONF)?;
    // Workers run as www-data; glibc (2.34+) resolves it from /etc/passwd
    // without loading an NSS module.
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\n\
         www-data:x:33:33:www-data:/var/www:/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    )?;
    fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n",
    )?;
    // `docker import --change` on Engine 20.10 takes no STOPSIGNAL; the
    // service sets `--stop-signal SIGQUIT` (nginx's graceful stop) instead.
    import(
        &rootfs,
        NGINX_IMAGE,
        &[
            r#"CMD ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"]"#,
            "EXPOSE 80",
        ],
    )
}

fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Debian's nginx package, downloaded once into `work` (`apt-get download`
/// fetches the .deb for this release without installing anything).
fn nginx_package(work: &Path) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        Ok(fs::read_dir(work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nginx_") && n.ends_with(".deb"))
            }))
    };
    if let Some(deb) = find()? {
        println!("nginx package: {} (cached)", deb.display());
        return Ok(deb);
    }
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "nginx"])
            .current_dir(work))
    };
    if download().is_err() {
        // Empty or stale package lists (a fresh machine): refresh, try again.
        run(Command::new("apt-get").arg("update"))?;
        download().context(
            "fetching Debian's nginx package (apt-get download nginx); the backend image needs it",
        )?;
    }
    find()?.context("apt-get download nginx succeeded but left no nginx_*.deb")
}

/// Copies every library `ldd` lists for `binary` (and the dynamic loader)
/// into `rootfs` at the same path.
fn copy_libraries(binary: &Path, rootfs: &Path) -> Result<()> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary);
    trace(&cmd);
    let output = cmd.output().context("running ldd")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    if listing.contains("not a dynamic executable") || listing.contains("statically linked") {
        return Ok(());
    }
    if !output.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let missing: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("not found"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} needs libraries this host lacks: {}",
            binary.display(),
            missing.join("; ")
        );
    }
    for lib in library_paths(&listing) {
        let dest = rootfs.join(lib.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().expect("a library path has a directory"))?;
        // fs::copy follows symlinks: the soname path gets the real file.
        fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x..)`
/// and the loader's own `/lib64/ld-linux-x86-64.so.2 (0x..)`.
fn library_paths(ldd: &str) -> Vec<&str> {
    ldd.lines()
        .filter_map(|line| {
            let after = line.split_once("=>").map_or(line, |(_, a)| a);
            after
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
        })
        .collect()
}

/// `tar` the tree (owned by root, whoever runs this) and `docker import` it.
fn import(rootfs: &Path, image: &str, changes: &[&str]) -> Result<()> {
    let tar = rootfs.with_extension("tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    let mut args = vec!["import".to_string()];
    for change in changes {
        args.push("--change".into());
        args.push((*change).into());
    }
    args.push("--change".into());
    args.push(format!("LABEL {}=1", super::LABEL));
    args.push(tar.to_string_lossy().into_owned());
    args.push(image.into());
    out(docker(args))?;
    fs::remove_file(&tar).ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_paths_come_from_both_kinds_of_ldd_line() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f08)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f08)\n";
        assert_eq!(
            library_paths(ldd),
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }
}
