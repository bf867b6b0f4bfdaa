//! Hostile traffic for the hostile layer (tests/tests/under_attack.rs) and
//! the bench's "under attack" section, sent from the testbed's client
//! namespace: hping3 floods (Debian's hping3, installed by `cargo xtask
//! setup`) and forged ICMP errors written with etherparse through a raw
//! socket (hping3 cannot sweep the ports quoted inside an ICMP error).
//!
//! Everything goes to addresses inside the testbed's namespaces; a flood is
//! killed when its handle is dropped, also when a test panics.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
use nix::{
    errno::Errno,
    sys::socket::{
        sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    },
};
use testkit::netns::NetNs;

/// Fails with a clear line when hping3 is not installed.
pub fn require_hping3() -> Result<()> {
    match Command::new("hping3").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) => bail!("hping3 is not installed ({e}); `cargo xtask setup` installs it"),
    }
}

/// What a flood sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloodKind {
    /// SYNs from random sources (`hping3 -S --flood --rand-source`).
    Syn,
    /// Bare ACKs from random sources (`hping3 -A --flood --rand-source`).
    Ack,
}

impl FloodKind {
    pub fn label(self) -> &'static str {
        match self {
            FloodKind::Syn => "SYN flood",
            FloodKind::Ack => "ACK flood",
        }
    }
}

/// A running hping3; killed on drop.
pub struct Hping {
    child: Option<Child>,
    out: PathBuf,
    started: Instant,
    what: String,
}

/// What an hping3 run sent.
#[derive(Clone, Debug)]
pub struct Sent {
    pub packets: u64,
    pub secs: f64,
}

impl Sent {
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.secs.max(1e-3)
    }
}

impl Hping {
    /// Starts `hping3 ARGS` in `ns`, its output into `dir/<file>`.
    pub fn start(ns: &NetNs, dir: &std::path::Path, file: &str, args: &[String]) -> Result<Self> {
        let out = dir.join(file);
        let f = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["--", "hping3"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting hping3 (`cargo xtask setup` installs it)")?;
        Ok(Self {
            child: Some(child),
            out,
            started: Instant::now(),
            what: args.join(" "),
        })
    }

    /// A flood of `kind` at `to:port` from random sources, as fast as
    /// hping3 goes.
    pub fn flood(
        ns: &NetNs,
        dir: &std::path::Path,
        kind: FloodKind,
        to: Ipv4Addr,
        port: u16,
    ) -> Result<Self> {
        let flag = match kind {
            FloodKind::Syn => "-S",
            FloodKind::Ack => "-A",
        };
        let args = [
            flag,
            "--flood",
            "--rand-source",
            "-p",
            &port.to_string(),
            &to.to_string(),
        ]
        .map(String::from);
        Self::start(ns, dir, &format!("hping3-{kind:?}.log"), &args)
    }

    /// Stops the flood (SIGINT: hping3 prints its count) and returns what
    /// it sent.
    pub fn stop(mut self) -> Result<Sent> {
        let secs = self.started.elapsed().as_secs_f64();
        let mut child = self.child.take().context("already stopped")?;
        // Our own child, not reaped yet.
        let _ = crate::testbed::signal(child.id(), crate::testbed::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
        self.sent(secs)
    }

    /// Waits for a run with a count (`-c`) to end.
    pub fn wait(mut self, timeout: Duration) -> Result<Sent> {
        let mut child = self.child.take().context("already stopped")?;
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("hping3 {} did not end within {timeout:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = self.started.elapsed().as_secs_f64();
        self.sent(secs)
    }

    fn sent(&self, secs: f64) -> Result<Sent> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // "123456 packets transmitted, 0 packets received, 100% packet loss"
        let packets = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted").map(|(n, _)| n.trim()))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("hping3 {} printed no count:\n{text}", self.what))?;
        Ok(Sent { packets, secs })
    }
}

impl Drop for Hping {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Forged segments or datagrams "from" a task (`from:from_port`) to every
/// port of `ports` on `to` (the SNAT side), sent from `ns` (the client
/// side): what an outsider who guesses a flow's reverse tuple would send.
/// `tcp_flags`: hping3's flag options (e.g. `-R`), or `None` for UDP.
pub fn spoof_sweep(
    ns: &NetNs,
    dir: &std::path::Path,
    from: Ipv4Addr,
    from_port: u16,
    to: Ipv4Addr,
    ports: std::ops::RangeInclusive<u16>,
    tcp_flags: Option<&str>,
) -> Result<Sent> {
    let count = (ports.end() - ports.start()) as u32 + 1;
    let mut args: Vec<String> = match tcp_flags {
        Some(f) => vec![f.into()],
        None => vec!["--udp".into()],
    };
    args.extend(
        [
            "-a",
            &from.to_string(),
            "-s",
            &from_port.to_string(),
            // "-k": keep the source port; "++N": the destination port
            // counts up from N with every packet.
            "-k",
            "-p",
            &format!("++{}", ports.start()),
            "-c",
            &count.to_string(),
            "-i",
            "u50",
            &to.to_string(),
        ]
        .map(String::from),
    );
    let kind = if tcp_flags.is_some() { "tcp" } else { "udp" };
    Hping::start(ns, dir, &format!("hping3-spoof-{kind}-{from}.log"), &args)?
        .wait(Duration::from_secs(30))
}

/// Forged ICMP port-unreachables, "from" `from` (a task) to `to` (the
/// SNAT address), each quoting a packet `to:p -> from:from_port` for every
/// `p` in `ports`, sent through a raw socket from `ns`: a forged error for
/// every reverse tuple a live flow could have.
pub fn forged_icmp_sweep(
    ns: &NetNs,
    from: Ipv4Addr,
    from_port: u16,
    to: Ipv4Addr,
    ports: std::ops::RangeInclusive<u16>,
    proto_tcp: bool,
) -> Result<u64> {
    ns.run_in(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .context("raw socket")?;
        let dest = SockaddrIn::from(SocketAddrV4::new(to, 0));
        let mut sent = 0u64;
        let mut result = Ok(());
        for p in ports {
            let quoted = quoted_packet(to, p, from, from_port, proto_tcp);
            let mut payload = Vec::new();
            payload.extend_from_slice(&quoted);
            let b = PacketBuilder::ipv4(from.octets(), to.octets(), 64).icmpv4(
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
            );
            let mut pkt = Vec::with_capacity(b.size(payload.len()));
            if let Err(e) = b.write(&mut pkt, &payload) {
                result = Err(anyhow::anyhow!("building an ICMP error: {e}"));
                break;
            }
            match sendto(fd.as_raw_fd(), &pkt, &dest, MsgFlags::empty()) {
                Ok(_) => sent += 1,
                Err(Errno::ENOBUFS) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => {
                    result = Err(anyhow::anyhow!("sending a forged ICMP error: {e}"));
                    break;
                }
            }
        }
        result.map(|()| sent)
    })
}

/// The IPv4 header and first 8 bytes of a segment `src:sport -> dst:dport`:
/// what an ICMP error quotes.
fn quoted_packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, tcp: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if tcp {
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .tcp(sport, dport, 1, 64240)
            .ack(1);
        let _ = b.write(&mut out, &[]);
    } else {
        let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
        let _ = b.write(&mut out, &[]);
    }
    out.truncate(28);
    out
}
