//! Kernel feature probes (`lb_user::dataplane::probe`): what they find on this kernel,
//! and what the real daemon does when a feature is missing. Missing
//! features are simulated with `XDPLB_PRETEND_MISSING`, since this kernel
//! has them all.
//!
//! Root only, one test at a time, after building the daemon:
//! `cargo build -p lb-user && cargo test -p tests --test kernel_features -- --test-threads=1 --nocapture`

use std::time::Duration;

use lb_user::dataplane::probe::{self, Feature, Probed};
use tests::testbed::{Mode, Testbed};

/// "6.1.0-37-cloud-amd64" -> (6, 1).
fn major_minor(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Every probe answers, and every feature that mainline had by this
/// kernel's version is found (a newer one may be there too: backports).
#[test]
fn probes_answer_and_agree_with_the_kernel_version() {
    tests::packet::require_root();
    let f = probe::features();
    eprintln!("{}", f.summary());
    let running = major_minor(&f.release);
    for feature in Feature::ALL {
        let p = f.probed(feature);
        assert!(
            !matches!(p, Probed::Unknown(_)),
            "the {} probe failed on {}: {p:?}",
            feature.key(),
            f.release
        );
        let since = major_minor(feature.kernel());
        if running >= since {
            assert_eq!(
                *p,
                Probed::Yes,
                "{} is in mainline since {}, and this is {}",
                feature.what(),
                feature.kernel(),
                f.release
            );
        }
    }
}

fn testbed() -> Testbed {
    Testbed::new(Mode::Tc, 1).unwrap_or_else(|e| panic!("building the testbed: {e:#}"))
}

/// A missing feature with no fallback ends the start with one line naming
/// it, the kernel that has it and what to do; nothing is left attached.
#[test]
fn a_missing_requirement_ends_the_start_in_one_line() {
    let tb = testbed();
    let args = tb.daemon_args().expect("config");
    let mut d = tb
        .start_daemon_env(&args, &[("XDPLB_PRETEND_MISSING", "redirect_neigh")])
        .expect("starting the daemon");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("xdplb: error:"))
        .collect();
    eprintln!("exit {status}: {}", errors.join("\n"));
    assert!(!status.success(), "the start must fail; log:\n{log}");
    let want = "xdplb: error: XDPLB_PRETEND_MISSING hides the bpf_redirect_neigh helper (Linux \
                5.10) on kernel ";
    let tail = ", which TC forwarding (and XDP mode's slow path) needs; xdplb needs Linux 6.1 or \
                newer (see README, Supported kernels)";
    assert!(
        errors.len() == 1 && errors[0].starts_with(want) && errors[0].ends_with(tail),
        "expected one line `{want}<release>{tail}`; log:\n{log}"
    );
    assert!(!tb.pins_exist(), "a refused start must leave no pins");
    let filters = tb
        .lb()
        .exec(&["tc", "filter", "show", "dev", "eth0", "ingress"])
        .expect("tc filter show");
    assert!(!filters.contains("xdplb"), "nothing attached: {filters}");
}

/// XDP mode without XDP links is refused, naming the way out.
#[test]
fn xdp_mode_without_xdp_links_is_refused() {
    let tb = Testbed::new(Mode::Xdp, 1).unwrap_or_else(|e| panic!("building the testbed: {e:#}"));
    let args = tb.daemon_args().expect("config");
    let mut d = tb
        .start_daemon_env(&args, &[("XDPLB_PRETEND_MISSING", "xdp_link")])
        .expect("starting the daemon");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("xdplb: error:"))
        .unwrap_or_default();
    eprintln!("exit {status}: {line}");
    assert!(
        !status.success()
            && line.contains("hides XDP BPF links (Linux 5.9)")
            && line.contains("use attach = \"tc\" (--attach tc)"),
        "log:\n{log}"
    );
    assert!(!tb.pins_exist(), "a refused start must leave no pins");
}

/// A missing feature with a fallback is logged, and the daemon runs.
#[test]
fn a_missing_bpf_f_ipv6_selects_the_fallback() {
    let tb = testbed();
    let args = tb.daemon_args().expect("config");
    let mut d = tb
        .start_daemon_env(&args, &[("XDPLB_PRETEND_MISSING", "bpf_f_ipv6")])
        .expect("starting the daemon");
    d.wait_ready().unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("hides BPF_F_IPV6"))
        .unwrap_or_else(|| panic!("no fallback line; log:\n{log}"));
    eprintln!("{line}");
    assert!(
        line.contains("BPF_F_IPV6 for bpf_l4_csum_replace (Linux 6.16; stable 6.1.142")
            && line.contains(
                "TCP/UDP checksums patched without it, and bpf_csum_update corrects skb->csum"
            ),
        "{line}"
    );
    assert!(
        log.contains("bpf_f_ipv6 no (pretend)"),
        "the probe summary must say it; log:\n{log}"
    );
    let r = tb.get();
    assert!(
        r.is_ok(),
        "the daemon must forward: {r:?}\n{}",
        tb.diagnostics()
    );
}

/// A typo in the knob is refused rather than ignored.
#[test]
fn an_unknown_pretend_name_is_refused() {
    let tb = testbed();
    let args = tb.daemon_args().expect("config");
    let mut d = tb
        .start_daemon_env(&args, &[("XDPLB_PRETEND_MISSING", "tcx,tcxx")])
        .expect("starting the daemon");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = d.log();
    assert!(
        !status.success()
            && log.contains("XDPLB_PRETEND_MISSING: unknown feature tcxx (known: tcx,"),
        "log:\n{log}"
    );
}
