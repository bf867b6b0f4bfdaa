//! The two images, built without a registry: a root filesystem assembled from
//! a binary, the shared libraries `ldd` lists for it, and a few /etc files,
//! then `docker import`ed. No base image, no Dockerfile, nothing pulled.
//!
//! - `xdplb-e2e/xdplb:dev`: the image `cargo xtask dist` ships (its root
//!   file system, made by the same code from the release build: the daemon,
//!   glibc, libgcc_s, libm), imported under this tag.
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

use anyhow::{Context as _, Result};

use crate::{
    cmd::run,
    dist::{copy_libraries, docker_import, fresh_dir, import_tar, tar_tree},
};

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

/// Builds both images: the daemon's from `xdplb_rootfs` (made by
/// `dist::image_rootfs`); `work` holds nginx's staging tree and caches its
/// package.
pub fn build(work: &Path, xdplb_rootfs: &Path) -> Result<()> {
    docker_import(xdplb_rootfs, XDPLB_IMAGE, &[label()])?;

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

/// `LABEL xdplb-e2e=1`: what cleanup and leftover detection look for.
fn label() -> String {
    format!("LABEL {}=1", super::LABEL)
}

/// `tar` the tree and `docker import` it, labelled as ours.
fn import(rootfs: &Path, image: &str, changes: &[&str]) -> Result<()> {
    let tar = rootfs.with_extension("tar");
    tar_tree(rootfs, &tar)?;
    let mut changes: Vec<String> = changes.iter().map(|c| (*c).to_string()).collect();
    changes.push(label());
    import_tar(&tar, image, &changes)?;
    fs::remove_file(&tar).ok();
    Ok(())
}
