//! `cargo xtask dist`: the release artifacts, in `target/dist/`.
//!
//! From the release build of the daemon (`cargo build --release --package
//! lb-user`, the same command `bench` runs, so the two share the build), with
//! its debug info stripped:
//! - `xdplb-VERSION-ARCH-linux-gnu.tar.gz`: the binary, the systemd unit
//!   (`dist/xdplb.service`), the example config, man pages, completions;
//! - `xdplb_VERSION_DEBARCH.deb`: the same files where Debian keeps them,
//!   built with `dpkg-deb --build` from a staged tree (no cargo-deb: one
//!   more tool to install for what a control file and a tree do), with
//!   `Depends` from `dpkg-shlibdeps`, and the maintainer scripts in
//!   `dist/debian/`;
//! - `xdplb-VERSION-rootfs.tar`: the container image's root file system (the
//!   binary and the libraries `ldd` lists, nothing else), which `docker
//!   import` turns into an image without a base image or a registry. When an
//!   engine answers, it is imported as `xdplb:VERSION` and `xdplb:latest`;
//!   swarm-e2e imports the same file under its own tag;
//! - `SHA256SUMS`.
//!
//! Man pages and completions are written by the binary being shipped
//! (`xdplb generate man|completions DIR`, a hidden subcommand), so xtask
//! needs no dependency on lb-user and its eBPF build.
//!
//! [`check`] is what `cargo xtask test` asks of them: the .deb installs into
//! a scratch root, the binary there runs, the man pages and completions are
//! where the shells look, `systemd-analyze verify` accepts the unit, the
//! tarball holds the same files, and the image runs `xdplb --help`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    build::target_dir,
    cmd::{cargo, is_root, render, run, trace, which, workspace_root},
    setup::{self, Report, Scope},
    swarm::{
        self,
        docker::{docker, out, poll},
    },
};

/// Debian packages the artifacts and their check use, and why.
pub const DIST_PACKAGES: &[(&str, &str)] = &[
    (
        "dpkg-dev",
        "dpkg-shlibdeps: the .deb's Depends from the libraries the binary links",
    ),
    ("systemd", "systemd-analyze verify checks the unit file"),
    (
        "man-db",
        "man, which systemd-analyze runs for the unit's Documentation= pages",
    ),
];

/// Where the binary lives inside the image (README, "The image").
const IMAGE_BINARY: &str = "usr/local/bin/xdplb";

/// The completion files `xdplb generate completions` writes, and where
/// Debian's bash-completion, zsh and fish look for them.
const COMPLETIONS: [(&str, &str); 3] = [
    ("xdplb.bash", "usr/share/bash-completion/completions/xdplb"),
    ("_xdplb", "usr/share/zsh/vendor-completions/_xdplb"),
    (
        "xdplb.fish",
        "usr/share/fish/vendor_completions.d/xdplb.fish",
    ),
];

/// One man page per command of `xdplb --help` (a missing one means
/// `generate man` went wrong, not that a command was renamed: the check
/// below also compares the list with what was generated).
const MAN_PAGES: [&str; 2] = ["xdplb.1", "xdplb-run.1"];

/// What `dist` made.
pub struct Artifacts {
    pub version: String,
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub rootfs: PathBuf,
    /// The man pages generated (file names), for the check.
    man_pages: Vec<String>,
    /// The tag the image was imported as, or why there is none.
    pub image: Result<String, String>,
}

/// `cargo xtask dist [--check]`.
pub fn dist_verb(check_after: bool) -> Result<()> {
    setup::ensure(Scope::Toolchain, false, Report::Summary)?;
    let artifacts = build()?;
    if check_after {
        check(&artifacts)?;
    }
    Ok(())
}

/// Builds every artifact (the release build first, if it is stale).
pub fn build() -> Result<Artifacts> {
    setup::ensure_packages(DIST_PACKAGES)?;
    let dist = target_dir().join("dist");
    let work = fresh_dir(&target_dir().join("dist-work"))?;
    fs::create_dir_all(&dist)?;

    let xdplb = shipped_binary(&work)?;
    let version = version_of(&xdplb)?;
    let man = work.join("man");
    let completions = work.join("completions");
    run(Command::new(&xdplb).arg("generate").arg("man").arg(&man))?;
    run(Command::new(&xdplb)
        .args(["generate", "completions"])
        .arg(&completions))?;
    let mut man_pages: Vec<String> = fs::read_dir(&man)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    man_pages.sort();
    for page in MAN_PAGES {
        if !man_pages.iter().any(|p| p == page) {
            bail!("`xdplb generate man` wrote no {page} (it wrote {man_pages:?})");
        }
    }
    let files = Files {
        xdplb: &xdplb,
        man: &man,
        man_pages: &man_pages,
        completions: &completions,
    };

    // Old versions' artifacts go: target/dist holds one release.
    for entry in fs::read_dir(&dist)?.filter_map(|e| e.ok()) {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(entry.path())?;
        }
    }
    let tarball = tarball(&files, &version, &work, &dist)?;
    let deb = deb(&files, &version, &work, &dist)?;
    let rootfs = dist.join(format!("xdplb-{version}-rootfs.tar"));
    image_rootfs(&xdplb, &work.join("rootfs"), &rootfs)?;
    let image = match swarm::engine_status() {
        Ok(engine) => {
            let tag = format!("xdplb:{version}");
            let id = |tag: &str| {
                poll(docker(["image", "inspect", "--format", "{{.Id}}", tag]))
                    .map(|id| id.trim().to_string())
            };
            let replaced = id(&tag).ok();
            docker_import(&rootfs, &tag, &[format!("LABEL {VERSION_LABEL}={version}")])?;
            out(docker(["tag", &tag, "xdplb:latest"]))?;
            // The image this one replaced would stay behind untagged, one
            // per run; unless a container still uses it, it goes.
            if let Some(old) = replaced.filter(|old| id(&tag).ok().as_ref() != Some(old)) {
                let _ = poll(docker(["image", "rm", &old]));
            }
            println!("image: {tag} and xdplb:latest ({engine})");
            Ok(tag)
        }
        Err(why) => {
            println!(
                "image: not imported ({why}); on a host with Docker: docker import --change \
                 'ENTRYPOINT [\"/{IMAGE_BINARY}\"]' {} xdplb:{version}",
                rootfs.display()
            );
            Err(why)
        }
    };
    let names: Vec<String> = [&tarball, &deb, &rootfs]
        .iter()
        .map(|p| file_name(p))
        .collect();
    let sums = capture(Command::new("sha256sum").args(&names).current_dir(&dist))?;
    fs::write(dist.join("SHA256SUMS"), sums)?;
    println!("\nin {}:", dist.display());
    for name in names
        .iter()
        .chain(std::iter::once(&"SHA256SUMS".to_string()))
    {
        let size = fs::metadata(dist.join(name))?.len();
        println!("  {name:<44} {:>8.1} MB", size as f64 / 1e6);
    }
    Ok(Artifacts {
        version,
        tarball,
        deb,
        rootfs,
        man_pages,
        image,
    })
}

/// The files every artifact carries, staged in the work directory.
struct Files<'a> {
    xdplb: &'a Path,
    man: &'a Path,
    man_pages: &'a [String],
    completions: &'a Path,
}

/// `cargo build --release --package lb-user`, then the binary with its debug
/// info stripped (the symbols stay, for backtraces) at `work/xdplb`.
fn shipped_binary(work: &Path) -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "--package", "lb-user"]))?;
    let built = target_dir().join("release").join("xdplb");
    let shipped = work.join("xdplb");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&built)
        .arg(&shipped))?;
    Ok(shipped)
}

/// `xdplb --version` says `xdplb 0.1.0`.
fn version_of(xdplb: &Path) -> Result<String> {
    let said = capture(Command::new(xdplb).arg("--version"))?;
    match said.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["xdplb", version] => Ok((*version).to_string()),
        _ => bail!("`{} --version` said {said:?}", xdplb.display()),
    }
}

/// `xdplb-VERSION-ARCH-linux-gnu/` with everything flat, as a .tar.gz.
fn tarball(files: &Files, version: &str, work: &Path, dist: &Path) -> Result<PathBuf> {
    let name = format!("xdplb-{version}-{}-linux-gnu", std::env::consts::ARCH);
    let top = work.join("tarball").join(&name);
    fs::create_dir_all(top.join("man"))?;
    fs::create_dir_all(top.join("completions"))?;
    copy(files.xdplb, &top.join("xdplb"), 0o755)?;
    let root = workspace_root();
    copy(
        &root.join("dist/xdplb.service"),
        &top.join("xdplb.service"),
        0o644,
    )?;
    copy(
        &root.join("docs/xdplb.example.toml"),
        &top.join("xdplb.example.toml"),
        0o644,
    )?;
    copy(&root.join("README.md"), &top.join("README.md"), 0o644)?;
    for page in files.man_pages {
        copy(&files.man.join(page), &top.join("man").join(page), 0o644)?;
    }
    for (file, _) in COMPLETIONS {
        copy(
            &files.completions.join(file),
            &top.join("completions").join(file),
            0o644,
        )?;
    }
    let tarball = dist.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "--sort=name"])
        .arg("-C")
        .arg(work.join("tarball"))
        .arg("-czf")
        .arg(&tarball)
        .arg(&name))?;
    Ok(tarball)
}

/// The Debian package: a staged tree with `DEBIAN/`, then `dpkg-deb --build`.
fn deb(files: &Files, version: &str, work: &Path, dist: &Path) -> Result<PathBuf> {
    let tree = work.join("deb");
    let root = workspace_root();
    copy(files.xdplb, &tree.join("usr/bin/xdplb"), 0o755)?;
    copy(
        &root.join("dist/xdplb.service"),
        &tree.join("lib/systemd/system/xdplb.service"),
        0o644,
    )?;
    // The example goes to the docs, not to /etc/xdplb/xdplb.toml: it names
    // interfaces and addresses that are not this host's, and the unit
    // starts only once that file exists (ConditionPathExists).
    let doc = tree.join("usr/share/doc/xdplb");
    copy(
        &root.join("docs/xdplb.example.toml"),
        &doc.join("examples/xdplb.example.toml"),
        0o644,
    )?;
    fs::write(
        doc.join("copyright"),
        "xdplb\n\nLicense: MIT OR Apache-2.0 (Cargo.toml `license`).\n",
    )?;
    fs::create_dir_all(tree.join("etc/xdplb"))?;
    let man1 = tree.join("usr/share/man/man1");
    for page in files.man_pages {
        copy(&files.man.join(page), &man1.join(page), 0o644)?;
    }
    run(Command::new("gzip")
        .arg("-9n")
        .args(files.man_pages.iter().map(|p| man1.join(p))))?;
    for (file, dest) in COMPLETIONS {
        copy(&files.completions.join(file), &tree.join(dest), 0o644)?;
    }

    let control = tree.join("DEBIAN");
    fs::create_dir_all(&control)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &root.join("dist/debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let depends = shlib_depends(&tree.join("usr/bin/xdplb"), work)?;
    let installed_kib = capture(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(&tree),
    )?
    .split_whitespace()
    .next()
    .context("du printed nothing")?
    .to_string();
    fs::write(
        control.join("control"),
        format!(
            "Package: xdplb\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: xdplb maintainers <xdplb@invalid>\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}\n\
             Section: net\n\
             Priority: optional\n\
             Description: L4 load balancer for Docker Swarm hosts (XDP/TC eBPF)\n \
             xdplb resolves tasks.<service> through Docker's DNS, health-checks\n \
             every task, and steers connections to healthy tasks from an XDP or\n \
             TC program (Maglev hashing, a connection table, full NAT), without\n \
             proxying them through userspace.\n"
        ),
    )?;
    let mut sums = String::new();
    for dir in ["usr", "lib"] {
        sums.push_str(&capture(
            Command::new("find")
                .args([dir, "-type", "f", "-exec", "md5sum", "{}", "+"])
                .current_dir(&tree),
        )?);
    }
    fs::write(control.join("md5sums"), sums)?;

    let deb = dist.join(format!("xdplb_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(&deb))?;
    Ok(deb)
}

/// `Depends` for the binary, from `dpkg-shlibdeps` (the symbol versions it
/// uses give the floor, e.g. `libc6 (>= 2.34)`). It wants a
/// `debian/control` to read, so it runs in a throwaway source tree.
fn shlib_depends(binary: &Path, work: &Path) -> Result<String> {
    let src = work.join("shlibdeps");
    fs::create_dir_all(src.join("debian"))?;
    fs::write(
        src.join("debian/control"),
        "Source: xdplb\n\nPackage: xdplb\nArchitecture: any\n",
    )?;
    let said = capture(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(binary)
            .current_dir(&src),
    )?;
    said.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {said:?}"))
}

/// The image's root file system as a tar: `xdplb` at [`IMAGE_BINARY`], the
/// libraries `ldd` lists for it at their paths, an empty `/run` (instance
/// lock, status file) and `/tmp`. Owned by root, whoever runs this.
pub fn image_rootfs(xdplb: &Path, staging: &Path, tar: &Path) -> Result<()> {
    let rootfs = fresh_dir(staging)?;
    copy(xdplb, &rootfs.join(IMAGE_BINARY), 0o755)?;
    copy_libraries(xdplb, &rootfs)?;
    for dir in ["run", "tmp"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    tar_tree(&rootfs, tar)
}

/// [`image_rootfs`] of the current release build, made as `dist` makes it,
/// at `tar` (in `work`): what swarm-e2e imports, so it runs the image `dist`
/// ships. Its own file: target/dist/ stays as `dist` left it (SHA256SUMS).
pub fn release_rootfs(work: &Path, tar: &Path) -> Result<()> {
    fs::create_dir_all(work)?;
    let xdplb = shipped_binary(work)?;
    image_rootfs(&xdplb, &work.join("rootfs-xdplb"), tar)
}

/// The label carrying the version on the images `dist` imports.
const VERSION_LABEL: &str = "org.opencontainers.image.version";

/// `docker import` of an image root file system made by [`image_rootfs`],
/// with its entry point and environment, plus `extra` changes (`LABEL ...`).
pub fn docker_import(tar: &Path, tag: &str, extra: &[String]) -> Result<()> {
    let mut changes = vec![
        format!(r#"ENTRYPOINT ["/{IMAGE_BINARY}"]"#),
        "ENV RUST_LOG=info".to_string(),
    ];
    changes.extend(extra.iter().cloned());
    import_tar(tar, tag, &changes)
}

/// `docker import --change ... TAR TAG`.
pub fn import_tar(tar: &Path, tag: &str, changes: &[String]) -> Result<()> {
    let mut args = vec!["import".to_string()];
    for change in changes {
        args.push("--change".into());
        args.push(change.clone());
    }
    args.push(tar.to_string_lossy().into_owned());
    args.push(tag.into());
    out(docker(args)).map(drop)
}

/// `tar` of `tree`'s contents, owned by root.
pub fn tar_tree(tree: &Path, tar: &Path) -> Result<()> {
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(tree)
        .arg("-cf")
        .arg(tar)
        .arg("."))
}

/// What `check` found, for the packet layer that runs next.
pub struct Checked {
    /// `/usr/bin/xdplb` of the installed .deb: the upgrade test starts it.
    pub installed_xdplb: PathBuf,
}

/// Installs the .deb into a scratch root and checks what it installed; then
/// the tarball and the image. Fails on the first problem, naming it.
pub fn check(a: &Artifacts) -> Result<Checked> {
    println!("\n==> checking the artifacts");
    setup::ensure_packages(DIST_PACKAGES)?;
    let scratch = fresh_dir(&target_dir().join("dist-check"))?;
    let root = scratch.join("root");
    install_deb(&a.deb, &root)?;

    let xdplb = root.join("usr/bin/xdplb");
    let said = capture(Command::new(&xdplb).arg("--version"))?;
    if said.trim() != format!("xdplb {}", a.version) {
        bail!(
            "{} --version said {said:?}, expected `xdplb {}`",
            xdplb.display(),
            a.version
        );
    }
    println!("installed: {} says {}", xdplb.display(), said.trim());
    let man1 = root.join("usr/share/man/man1");
    for page in &a.man_pages {
        let gz = man1.join(format!("{page}.gz"));
        if !gz.is_file() {
            bail!("the .deb installed no {}", gz.display());
        }
    }
    // man finds and renders the page from the installed tree.
    let rendered = capture(
        Command::new("man")
            .env("MANPATH", root.join("usr/share/man"))
            .env("MANWIDTH", "80")
            .args(["-P", "cat", "xdplb-run"]),
    )?;
    if !rendered.contains("--persist") {
        bail!("`man xdplb-run` from the installed tree does not mention --persist");
    }
    for (_, dest) in COMPLETIONS {
        let path = root.join(dest);
        let len = fs::metadata(&path)
            .with_context(|| format!("the .deb installed no {}", path.display()))?
            .len();
        if len == 0 {
            bail!("{} is empty", path.display());
        }
    }
    run(Command::new("bash")
        .arg("-n")
        .arg(root.join(COMPLETIONS[0].1)))?;
    println!(
        "installed: {} man pages in {}, completions for bash, zsh, fish",
        a.man_pages.len(),
        man1.display()
    );
    verify_unit(&root, &scratch)?;
    check_tarball(a)?;
    check_image(a)?;
    Ok(Checked {
        installed_xdplb: xdplb,
    })
}

/// As root, `dpkg --root` installs it for real into an empty dpkg database
/// (maintainer scripts included, which leave this host alone when
/// `DPKG_ROOT` is set), installs it again (the upgrade path of postinst),
/// and removes and re-installs it once more; without root, `dpkg -x`
/// unpacks it.
fn install_deb(deb: &Path, root: &Path) -> Result<()> {
    if !is_root() {
        println!("not root: unpacking the .deb with dpkg -x instead of installing it");
        return run(Command::new("dpkg").arg("-x").arg(deb).arg(root));
    }
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(dir))?;
    }
    fs::write(admin.join("status"), "")?;
    let dpkg = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("dpkg");
        // Scripts run without chroot (the scratch root has no shell); the
        // scratch database knows no libc6, so Depends cannot be met there.
        cmd.arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .arg("--log=/dev/null")
            .args(args);
        run(&mut cmd)
    };
    let deb = deb.to_string_lossy();
    dpkg(&["--install", &deb])?;
    dpkg(&["--install", &deb])?;
    dpkg(&["--remove", "xdplb"])?;
    if root.join("usr/bin/xdplb").exists() {
        bail!("dpkg --remove left usr/bin/xdplb in {}", root.display());
    }
    dpkg(&["--install", &deb])
}

/// `systemd-analyze verify` of the installed unit. It checks that
/// ExecStart's binary exists on this host and runs `man` for every
/// Documentation= page, so it sees a copy whose /usr/bin/xdplb points into
/// the scratch root, with MANPATH there too: the pages it finds are the
/// installed ones.
fn verify_unit(root: &Path, scratch: &Path) -> Result<()> {
    if which("systemd-analyze").is_none() {
        bail!("no systemd-analyze (Debian package `systemd`) to verify the unit with");
    }
    let unit = fs::read_to_string(root.join("lib/systemd/system/xdplb.service"))
        .context("the .deb installed no lib/systemd/system/xdplb.service")?;
    let dir = scratch.join("unit");
    fs::create_dir_all(&dir)?;
    let copy = dir.join("xdplb.service");
    fs::write(
        &copy,
        unit.replace(
            "/usr/bin/xdplb",
            &root.join("usr/bin/xdplb").to_string_lossy(),
        ),
    )?;
    let mut cmd = Command::new("systemd-analyze");
    cmd.env("MANPATH", root.join("usr/share/man"))
        .arg("verify")
        .arg(&copy);
    println!("$ {}", render(&cmd));
    let output = cmd.stdin(Stdio::null()).output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify of the unit ({}): {}",
            output.status,
            said.trim()
        );
    }
    println!("systemd-analyze verify: no complaint");
    Ok(())
}

/// The tarball holds the binary, the unit, the config, the pages and completions.
fn check_tarball(a: &Artifacts) -> Result<()> {
    let listing = capture(Command::new("tar").arg("-tzf").arg(&a.tarball))?;
    let mut want = vec![
        "xdplb".to_string(),
        "xdplb.service".into(),
        "xdplb.example.toml".into(),
    ];
    want.extend(a.man_pages.iter().map(|p| format!("man/{p}")));
    want.extend(COMPLETIONS.iter().map(|(f, _)| format!("completions/{f}")));
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !listing.lines().any(|l| l.ends_with(&format!("/{w}"))))
        .collect();
    if !missing.is_empty() {
        bail!("{} lacks {missing:?}", a.tarball.display());
    }
    println!("tarball: {} files as expected", want.len());
    Ok(())
}

/// `docker run IMAGE --help` answers with the usage; skipped, with the
/// reason, when no engine answers.
fn check_image(a: &Artifacts) -> Result<()> {
    let tag = match &a.image {
        Ok(tag) => tag,
        Err(why) => {
            println!("image: skipped `docker run {{image}} --help`: {why}");
            return Ok(());
        }
    };
    let help = out(docker(["run", "--rm", "--network", "none", tag, "--help"]))?;
    if !help.contains("Usage: xdplb") {
        bail!("`docker run {tag} --help` printed no usage: {help:?}");
    }
    println!(
        "image: `docker run {tag} --help` prints the usage (/{IMAGE_BINARY} from {})",
        file_name(&a.rootfs)
    );
    Ok(())
}

/// Print `cmd` (with `--verbose` only), run it, and return its stdout; fail with its stderr.
fn capture(cmd: &mut Command) -> Result<String> {
    trace(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", render(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            render(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Copies `from` to `to` (creating its directory) with mode `mode`.
fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().expect("a file path has a directory"))?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An empty directory at `dir` (what was there goes).
pub fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Copies every library `ldd` lists for `binary` (and the dynamic loader)
/// into `rootfs` at the same path.
pub fn copy_libraries(binary: &Path, rootfs: &Path) -> Result<()> {
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

    #[test]
    fn the_unit_runs_the_packaged_binary_with_the_capabilities_readme_lists() {
        let unit = fs::read_to_string(workspace_root().join("dist/xdplb.service"))
            .expect("reading dist/xdplb.service");
        let value = |key: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("dist/xdplb.service has no {key}="))
        };
        assert_eq!(
            value("ExecStart"),
            "/usr/bin/xdplb run --persist --config /etc/xdplb/xdplb.toml",
            "restarts and upgrades adopt the state only with --persist"
        );
        assert!(
            value("ExecReload").starts_with("/usr/bin/xdplb reload"),
            "`systemctl reload` should wait for the daemon's verdict like `xdplb reload`"
        );
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
            assert_eq!(
                value(key),
                "CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
                "{key}: README's Capabilities section measured exactly these"
            );
        }
    }
}
