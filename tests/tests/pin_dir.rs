//! Only xdplb's own files are touched: a pin directory that is not on bpffs,
//! not ours, or writable by others is refused before anything is created,
//! and `xdplb down` removes the pins xdplb made and nothing else. The lock
//! and status files under /run/xdplb are private.
//!
//! Root only, one test at a time, after building the daemon:
//! `cargo build -p lb-user && cargo test -p tests --test pin_dir -- --test-threads=1`

use std::{
    collections::BTreeSet,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use lb_user::{
    dataplane::{
        attach::{self, Hook, InstanceLock},
        maps::{DataPlane, LoadOptions},
    },
    status::Status,
};
use testkit::{bin::xdplb_bin, netns::NetNs};

const PREFIX: &str = "xdplb-pd-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A path `<parent>/xdplb-pd-<tag>-<pid>-<n>` that this test owns: whatever
/// is there on drop goes, with the lock and status files xdplb keeps for it,
/// also when the test panics.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &str, tag: &str) -> Self {
        testkit::netns::sweep_stale_dirs(Path::new(parent), PREFIX);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(parent).join(format!("{PREFIX}{tag}-{}-{n}", std::process::id()));
        let s = Self(path);
        s.remove();
        s
    }

    /// Creates the directory with `mode` and a symlink `keep` (to
    /// /etc/hostname) in it: bpffs has no regular files but takes symlinks.
    fn with_foreign(parent: &str, tag: &str, mode: u32) -> Self {
        let s = Self::new(parent, tag);
        std::fs::create_dir(&s.0).unwrap_or_else(|e| panic!("mkdir {}: {e}", s.0.display()));
        std::os::unix::fs::symlink("/etc/hostname", s.0.join("keep"))
            .unwrap_or_else(|e| panic!("symlink in {}: {e}", s.0.display()));
        chmod(&s.0, mode);
        s
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let lock = InstanceLock::lock_path(&self.0);
        let _ = std::fs::remove_file(lock.with_extension("status.json"));
        let _ = std::fs::remove_file(lock);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.remove();
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The names in `dir`, sorted; empty when it does not exist.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Runs `program args` (RUST_LOG=info, no colours) and returns its output;
/// kills it and panics after 20 s, so a `run` that got past its checks
/// cannot hang the test.
fn output(program: &Path, args: &[String]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("waiting for the child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting output");
            panic!(
                "`{} {}` still ran after 20 s (it should have stopped at once); output:\n{}{}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collecting output")
}

/// `xdplb ARGS`.
fn xdplb(args: &[String]) -> Output {
    output(&xdplb_bin().expect("the xdplb binary"), args)
}

fn down_args(pin_dir: &Path) -> Vec<String> {
    vec![
        "down".into(),
        "--pin-dir".into(),
        pin_dir.display().to_string(),
    ]
}

/// A valid `xdplb run` on `lo`, for a namespace of its own.
fn run_args(pin_dir: &Path) -> Vec<String> {
    [
        "run",
        "--iface",
        "lo",
        "--listen",
        "10.255.0.1:80",
        "--backends",
        "tasks.web.invalid:80",
        "--check",
        "none",
        "--pin-dir",
    ]
    .map(String::from)
    .into_iter()
    .chain([pin_dir.display().to_string()])
    .collect()
}

/// `xdplb run ... --pin-dir DIR` inside a namespace of its own (entered the
/// way the refusal recommends, `nsenter --net`), so a run that wrongly got
/// past its checks could not attach to the host's `lo`.
fn run_in_netns(ns: &NetNs, pin_dir: &Path) -> Output {
    let mut args = vec![
        format!("--net={}", ns.path().display()),
        xdplb_bin().expect("the xdplb binary").display().to_string(),
    ];
    args.extend(run_args(pin_dir));
    output(Path::new("nsenter"), &args)
}

/// Asserts that `what` failed with one line on stderr containing every
/// `needle`, and returns that line.
fn assert_refused(what: &str, out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "{what}: expected a refusal, saw success; stdout:\n{stdout}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: expected a one-line error, saw:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{what}: expected the error to contain `{n}`, saw: {stderr}"
        );
    }
    stderr
}

fn assert_untouched(dir: &Path, mode: u32, uid: u32) {
    let meta = std::fs::symlink_metadata(dir)
        .unwrap_or_else(|e| panic!("{} must still exist: {e}", dir.display()));
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid()),
        (mode, uid),
        "{}: expected mode {mode:o} and uid {uid} as the test left them",
        dir.display()
    );
    assert_eq!(
        entries(dir),
        set(&["keep"]),
        "{}: expected only the foreign `keep`",
        dir.display()
    );
    let target = std::fs::read_link(dir.join("keep")).expect("readlink keep");
    assert_eq!(target, Path::new("/etc/hostname"), "`keep` was changed");
}

fn assert_no_lock_file(dir: &Path) {
    let lock = InstanceLock::lock_path(dir);
    assert!(
        !lock.exists(),
        "a refused pin directory must not leave a lock file, saw {}",
        lock.display()
    );
}

#[test]
fn plain_directory_is_refused_and_kept() {
    let d = Scratch::new("/tmp", "plain");
    std::fs::create_dir(&d.0).expect("mkdir");
    std::fs::write(d.0.join("precious.txt"), "do not delete").expect("writing the file");
    let ns = NetNs::new("pd").expect("a namespace");

    let out = xdplb(&down_args(&d.0));
    assert_refused(
        "down on /tmp",
        &out,
        &["not on bpffs", "mount -t bpf bpf /sys/fs/bpf"],
    );
    let out = run_in_netns(&ns, &d.0);
    assert_refused(
        "run on /tmp",
        &out,
        &["not on bpffs", "mount -t bpf bpf /sys/fs/bpf"],
    );

    assert_eq!(
        entries(&d.0),
        set(&["precious.txt"]),
        "only the file may be there"
    );
    let text = std::fs::read_to_string(d.0.join("precious.txt")).expect("the file survives");
    assert_eq!(text, "do not delete", "the file's contents changed");
    assert_no_lock_file(&d.0);
}

#[test]
fn bpffs_hidden_by_ip_netns_exec_is_explained() {
    let d = Scratch::new("/sys/fs/bpf", "hidden");
    let ns = NetNs::new("pd").expect("a namespace");
    let bin = xdplb_bin().expect("the xdplb binary").display().to_string();
    let nsenter = format!("nsenter --net=/run/netns/{}", ns.name());
    for (what, args) in [("run", run_args(&d.0)), ("down", down_args(&d.0))] {
        let mut all = vec![
            "netns".to_string(),
            "exec".into(),
            ns.name().into(),
            bin.clone(),
        ];
        all.extend(args);
        let out = output(Path::new("ip"), &all);
        assert_refused(
            &format!("{what} under ip netns exec"),
            &out,
            &["not on bpffs", "ip netns exec", &nsenter],
        );
    }
    assert!(
        !d.0.exists(),
        "nothing may be created; saw {}",
        d.0.display()
    );
    assert_no_lock_file(&d.0);
}

#[test]
fn open_mode_is_refused_and_kept() {
    let d = Scratch::with_foreign("/sys/fs/bpf", "open", 0o777);
    let ns = NetNs::new("pd").expect("a namespace");
    let fix = format!("chmod 700 {}", d.0.display());

    let out = xdplb(&down_args(&d.0));
    assert_refused("down on mode 0777", &out, &["mode 0777", &fix]);
    let out = run_in_netns(&ns, &d.0);
    assert_refused("run on mode 0777", &out, &["mode 0777", &fix]);

    assert_untouched(&d.0, 0o777, 0);
    assert_no_lock_file(&d.0);
}

#[test]
fn foreign_owner_is_refused_and_kept() {
    let d = Scratch::with_foreign("/sys/fs/bpf", "owner", 0o700);
    std::os::unix::fs::lchown(&d.0, Some(65534), None).expect("chown 65534");
    let ns = NetNs::new("pd").expect("a namespace");

    let out = xdplb(&down_args(&d.0));
    assert_refused(
        "down on uid 65534's dir",
        &out,
        &["owned by uid 65534", "chown 0"],
    );
    let out = run_in_netns(&ns, &d.0);
    assert_refused(
        "run on uid 65534's dir",
        &out,
        &["owned by uid 65534", "chown 0"],
    );

    assert_untouched(&d.0, 0o700, 65534);
    assert_no_lock_file(&d.0);
}

#[test]
fn down_with_nothing_there_succeeds() {
    let d = Scratch::new("/sys/fs/bpf", "none");
    let out = xdplb(&down_args(&d.0));
    // Logs go to stderr.
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "down on a missing pin dir: expected exit 0, saw {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("nothing to remove"),
        "expected `nothing to remove` in the log, saw:\n{stdout}"
    );
    assert!(!d.0.exists(), "down must not create {}", d.0.display());
}

#[test]
fn down_removes_only_our_pins() {
    let d = Scratch::new("/sys/fs/bpf", "pins");
    let ns = NetNs::new("pd").expect("a namespace");
    let link_id;
    {
        let _inside = ns.enter().expect("entering the namespace");
        let mut dp = DataPlane::load(&LoadOptions::new(&d.0)).expect("loading the data plane");
        attach::attach(&mut dp, "lo", Hook::Tc).expect("attaching TC to lo");
        let link: FdLink = PinnedLink::from_pin(d.0.join("links/lo@tc"))
            .expect("the pinned TC link")
            .into();
        link_id = link.info().expect("link info").id();
    }
    for (dir, what) in [(&d.0, "pin dir"), (&d.0.join("links"), "links/")] {
        let mode = std::fs::metadata(dir).expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o700, "{what} {}: expected mode 0700", dir.display());
    }
    // Someone else's entries: a symlink beside the maps, a directory beside the link.
    std::os::unix::fs::symlink("/etc/hostname", d.0.join("keep")).expect("symlink");
    std::fs::create_dir(d.0.join("links/mine")).expect("mkdir links/mine");

    let out = xdplb(&down_args(&d.0));
    // Logs go to stderr.
    let stdout = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "down: expected exit 0, saw {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        entries(&d.0),
        set(&["keep", "links"]),
        "expected every map pin gone and the foreign entries kept"
    );
    assert_eq!(
        entries(&d.0.join("links")),
        set(&["mine"]),
        "links/ after down"
    );
    let warning = format!("kept {}: it holds keep and 1 more", d.0.display());
    assert!(
        stdout.contains(&warning),
        "expected one warning `{warning} ...`, saw:\n{stdout}"
    );
    let alive: Vec<u32> = aya::programs::loaded_links()
        .filter_map(|l| l.ok().map(|l| l.id()))
        .collect();
    assert!(
        !alive.contains(&link_id),
        "the TC link {link_id} must be gone after down; loaded links: {alive:?}"
    );
}

#[test]
fn lock_and_status_files_are_private() {
    let d = Scratch::new("/sys/fs/bpf", "lock");
    let lock_path = InstanceLock::lock_path(&d.0);
    let lock = InstanceLock::acquire(&d.0).expect("the first lock");
    let mode = std::fs::metadata(&lock_path).expect("stat lock").mode() & 0o777;
    assert_eq!(
        mode,
        0o600,
        "lock file {}: expected mode 0600",
        lock_path.display()
    );
    assert!(InstanceLock::is_held(&d.0), "is_held while locked");
    assert!(
        InstanceLock::acquire(&d.0).is_err(),
        "a second lock must be refused while the first is held"
    );
    drop(lock);
    assert!(
        lock_path.exists(),
        "the lock file must stay (unlinking it races with the next locker)"
    );
    assert!(!InstanceLock::is_held(&d.0), "is_held after release");
    drop(InstanceLock::acquire(&d.0).expect("locking again after release"));

    let status = lock_path.with_extension("status.json");
    // From JSON, so fields added later (with serde defaults) need no change here.
    let snapshot: Status = serde_json::from_value(serde_json::json!({
        "version": lb_user::status::STATUS_VERSION,
        "pid": std::process::id(),
        "written_ms": 0,
        "pin_dir": d.0,
        "services": [],
    }))
    .expect("a minimal status");
    snapshot.write(&status).expect("writing the status file");
    let mode = std::fs::metadata(&status).expect("stat status").mode() & 0o777;
    assert_eq!(
        mode,
        0o600,
        "status file {}: expected mode 0600",
        status.display()
    );
}
