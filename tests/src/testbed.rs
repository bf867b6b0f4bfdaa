//! The end-to-end testbed: a Docker Swarm host built from network namespaces,
//! running the real `xdplb` daemon.
//!
//! ```text
//!   client ns                 lb ns                          ovl ns             backend ns (xN)
//!  ┌───────────────┐        ┌─────────────────────────┐     ┌──────────┐      ┌──────────────────┐
//!  │ eth0 10.10.0.2├─veth───┤eth0 10.10.0.1 (the VIP) │     │  br0     │      │ eth0 10.20.0.1N  │
//!  │ default via   │        │eth1 10.20.0.1 (SNAT)    ├veth─┤l1    bN  ├─veth─┤ :80 HTTP         │
//!  │   10.10.0.1   │        │DNS 127.0.0.11:53 udp+tcp│     └──────────┘      │ :5353 UDP echo   │
//!  └───────────────┘        │xdplb run (setns'd here) │                       └──────────────────┘
//!                           └─────────────────────────┘
//! ```
//!
//! - The VIP is the balancer's client-facing address, like a Swarm service
//!   published in host mode: `10.10.0.1:80/tcp` and `10.10.0.1:5353/udp`.
//! - `br0` plays the overlay network. Backend `i` is `b{i}` at
//!   `10.20.0.(10+i)`; backends need no route back (full NAT: they answer
//!   `10.20.0.1`).
//! - The DNS server answers `tasks.web` with the backends the test lists
//!   ([`Testbed::set_tasks`], [`Dns::set`]); at start, all of them.
//! - Every server socket is bound by a thread that entered its namespace, and
//!   then served by one shared tokio runtime (a socket keeps its namespace).
//!   The client is a thread that lives in the client namespace.
//! - The daemon runs as a child process that `setns`es into `lb` before
//!   `exec` (never `ip netns exec`, which remounts `/sys` and would hide the
//!   host's bpffs, and with it the pins a restart must find).
//!
//! Two optional extras ([`Topology`]):
//!
//! - **many tasks**: one more namespace on `br0` holding N addresses
//!   `10.20.1.1`... with one HTTP server that answers as whichever address
//!   was dialled ([`ManyTasks`]): a service with hundreds of replicas in one
//!   namespace. The balancer routes `10.20.1.0/24` out of `eth1`.
//! - **a PMTU router**: `rtr` on `br0` (`10.20.0.250`) forwards to one more
//!   backend, `pm` at `10.30.0.2`, over a link with MTU 1280. `pm`'s routes
//!   carry `advmss 1460`, so its SYN-ACK still invites full-size segments
//!   (as a host whose MSS was clamped up, or behind a tunnel, would): the
//!   client sends 1,500-byte packets, the router answers "fragmentation
//!   needed" to the SNAT source, and the data plane must translate that
//!   back to the client (docs/DATAPLANE.md §6).
//!
//! ```text
//!   ovl br0 ── r0 ─ eth0 10.20.0.250 [rtr] eth1 10.30.0.1 ── mtu 1280 ── eth0 10.30.0.2 [pm]
//!           └─ m0 ─ eth0 10.20.1.1..N/16 [many]  (one server on 0.0.0.0:80)
//! ```
//!
//! Everything is removed on drop, also when a test panics: daemons are
//! killed, the pin directory is removed (which detaches the programs), the
//! namespaces are deleted. A run that was killed before its destructors ran
//! is cleaned up by the next [`Testbed::new`] (names carry the pid), and a
//! daemon never outlives the thread that started it (`PR_SET_PDEATHSIG`).
//!
//! XDP mode turns GRO on at the veth peers of the balancer's interfaces (the
//! client's `eth0`, the bridge port `l1`): `XDP_TX`/`XDP_REDIRECT` into a
//! veth only delivers when the receiving end has NAPI (DESIGN.md, toolchain
//! facts).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use lb_common::{
    event, reason, Conn, Counters, FlowKey, MAP_CONNS, MAP_EVENT_STATS, MAP_REASON_STATS,
    MAP_UNANSWERED,
};
use nix::sched::CloneFlags;

pub mod backend;
pub mod client;
pub mod dns;
pub mod keepalive;
pub mod many;

pub use backend::{Backend, BackendStats, HTTP_PORT, UDP_PORT};
pub use client::{Client, Load, LoadHandle, LoadReport, Outcome, SlowRequest};
pub use dns::{Dns, DnsMode, DnsStats};
pub use keepalive::{KeepAlive, KeepAliveReport, KeptRequest};
pub use many::{many_task_addr, ManyTasks, MAX_MANY_TASKS};
pub use nix::sys::signal::Signal;
use testkit::{
    bin::xdplb_bin,
    netns::{self, NetNs},
};

/// Every namespace, pin directory and log directory of a testbed starts with
/// this (then the pid and a counter).
pub const PREFIX: &str = "xdplb-tb-";
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// The balancer's client-facing address: the VIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
/// The balancer's address on the overlay (the SNAT source).
pub const LB_OVERLAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);
/// The DNS name of the backends.
pub const SERVICE: &str = "tasks.web";
/// The PMTU router's address on the overlay.
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 250);
/// The backend behind the PMTU router.
pub const PMTU_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 2);
/// The MTU of the router's link towards that backend.
pub const PMTU_HOP_MTU: u32 = 1280;

/// Progress lines (testbed built, daemon started, ready, killed) go to
/// stderr unless [`set_quiet`] turned them off.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences the testbed's progress lines (the demo prints its own story).
/// Warnings and the logs of failing tests are still printed.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// `eprintln!` unless quiet.
macro_rules! progress {
    ($($arg:tt)*) => {
        if !QUIET.load(Ordering::Relaxed) {
            eprintln!($($arg)*);
        }
    };
}

/// Where the daemon's start is waited for at most (loading and verifying the
/// program takes a few seconds on a slow machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Backend `i`'s address: `10.20.0.(10+i)`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + i).expect("at most 245 backends");
    Ipv4Addr::new(10, 20, 0, last)
}

/// How the daemon attaches, and so how the testbed prepares the veths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tc,
    Xdp,
}

impl Mode {
    /// The `--attach` / `attach =` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tc => "tc",
            Mode::Xdp => "xdp",
        }
    }
}

/// The daemon's settings in the testbed: the knobs of
/// `docs/xdplb.example.toml`, with intervals short enough for tests.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// `attach`: "tc", "xdp" or "auto"; default: the testbed's mode.
    pub attach: String,
    /// DNS poll interval of every service.
    pub dns_interval: Duration,
    /// `check` of the TCP service: "tcp", "http:/healthz" or "none".
    pub check: String,
    pub check_interval: Duration,
    pub check_timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub drain_timeout: Duration,
    pub closing_timeout: Duration,
    /// Also balance `10.10.0.1:5353/udp` to the backends' UDP echo (service
    /// `web-udp`, no health checks, as UDP services default to).
    pub udp: bool,
    /// Top-level settings written before everything else (e.g.
    /// `backend_slots = 4`), one per line.
    pub extra_top: String,
    /// Settings added to `[conntrack]` (e.g.
    /// `flood_new_flows_per_second = 2`), one per line.
    pub extra_conntrack: String,
}

impl DaemonConfig {
    fn new(mode: Mode) -> Self {
        Self {
            attach: mode.as_str().to_owned(),
            dns_interval: Duration::from_millis(200),
            check: "tcp".to_owned(),
            check_interval: Duration::from_millis(200),
            check_timeout: Duration::from_millis(150),
            rise: 2,
            fall: 2,
            drain_timeout: Duration::from_secs(3),
            closing_timeout: Duration::from_secs(10),
            udp: true,
            extra_top: String::new(),
            extra_conntrack: String::new(),
        }
    }

    /// The config file.
    pub fn toml(&self) -> String {
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let mut s = String::new();
        let _ = writeln!(s, "interfaces = [\"eth0\", \"eth1\"]");
        let _ = writeln!(s, "attach = \"{}\"", self.attach);
        s.push_str(&self.extra_top);
        let _ = writeln!(s, "\n[conntrack]");
        let _ = writeln!(s, "closing_timeout = {}", ms(self.closing_timeout));
        s.push_str(&self.extra_conntrack);
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "name = \"web\"");
        let _ = writeln!(s, "listen = \"{VIP}:{HTTP_PORT}/tcp\"");
        let _ = writeln!(s, "backends = \"{SERVICE}:{HTTP_PORT}\"");
        let _ = writeln!(s, "nameserver = \"{}\"", dns::DNS_ADDR);
        let _ = writeln!(s, "interval = {}", ms(self.dns_interval));
        let _ = writeln!(s, "check = \"{}\"", self.check);
        let _ = writeln!(s, "check_interval = {}", ms(self.check_interval));
        let _ = writeln!(s, "check_timeout = {}", ms(self.check_timeout));
        let _ = writeln!(s, "rise = {}", self.rise);
        let _ = writeln!(s, "fall = {}", self.fall);
        let _ = writeln!(s, "drain_timeout = {}", ms(self.drain_timeout));
        if self.udp {
            let _ = writeln!(s, "\n[[service]]");
            let _ = writeln!(s, "name = \"web-udp\"");
            let _ = writeln!(s, "listen = \"{VIP}:{UDP_PORT}/udp\"");
            let _ = writeln!(s, "backends = \"{SERVICE}:{UDP_PORT}\"");
            let _ = writeln!(s, "nameserver = \"{}\"", dns::DNS_ADDR);
            let _ = writeln!(s, "interval = {}", ms(self.dns_interval));
            let _ = writeln!(s, "drain_timeout = {}", ms(self.drain_timeout));
        }
        s
    }
}

/// What to build: how many ordinary backends, and the optional extras of the
/// module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Topology {
    /// Backends `b0`.. in their own namespaces, all of them in DNS at start.
    pub backends: usize,
    /// Addresses of the many-tasks namespace (0: none). Not in DNS at start.
    pub many_tasks: usize,
    /// The router with a small-MTU hop and the backend `pm` behind it. Not
    /// in DNS at start.
    pub pmtu_router: bool,
}

impl Topology {
    pub fn new(backends: usize) -> Self {
        Self {
            backends,
            ..Self::default()
        }
    }

    pub fn many_tasks(mut self, n: usize) -> Self {
        self.many_tasks = n;
        self
    }

    pub fn pmtu_router(mut self) -> Self {
        self.pmtu_router = true;
        self
    }
}

/// The testbed. See the module documentation.
pub struct Testbed {
    id: String,
    mode: Mode,
    /// Logs and config files.
    dir: PathBuf,
    pin_dir: PathBuf,
    daemons: AtomicU32,
    configs: AtomicU32,
    /// Pids of daemons started and not yet reaped.
    live: Arc<Mutex<BTreeSet<u32>>>,
    // Dropped in this order: the client thread, the servers, the namespaces,
    // and last the runtime that served them.
    client: Client,
    dns: Dns,
    backends: Vec<Backend>,
    many: Option<ManyTasks>,
    pmtu_backend: Option<Backend>,
    router: Option<NetNs>,
    client_ns: NetNs,
    lb: NetNs,
    ovl: NetNs,
    rt: tokio::runtime::Runtime,
}

static TESTBEDS: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    /// Builds the topology with `backends` backends, all of them in DNS.
    pub fn new(mode: Mode, backends: usize) -> Result<Self> {
        Self::build(mode, Topology::new(backends))
    }

    /// Builds `topology`; the ordinary backends are in DNS.
    pub fn build(mode: Mode, topology: Topology) -> Result<Self> {
        let backends = topology.backends;
        if topology.many_tasks > MAX_MANY_TASKS {
            bail!("at most {MAX_MANY_TASKS} many-tasks addresses");
        }
        sweep();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            TESTBEDS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pin_dir = Path::new("/sys/fs/bpf").join(&id);

        let client_ns = NetNs::new("tb-c")?;
        let lb = NetNs::new("tb-lb")?;
        let ovl = NetNs::new("tb-ovl")?;
        let backend_ns = (0..backends)
            .map(|i| NetNs::new(&format!("tb-b{i}")))
            .collect::<Result<Vec<_>>>()?;

        // client eth0 <-> lb eth0
        veth(&client_ns, "eth0", &lb, "eth0")?;
        client_ns.ip(&["addr", "add", "10.10.0.2/24", "dev", "eth0"])?;
        client_ns.ip(&["link", "set", "eth0", "up"])?;
        client_ns.ip(&["route", "add", "default", "via", "10.10.0.1"])?;
        lb.ip(&["addr", "add", "10.10.0.1/24", "dev", "eth0"])?;
        lb.ip(&["link", "set", "eth0", "up"])?;
        // the overlay bridge, lb eth1 <-> l1 on it
        ovl.ip(&["link", "add", "br0", "type", "bridge"])?;
        ovl.ip(&["link", "set", "br0", "up"])?;
        bridge_port(&ovl, &lb, "eth1", "l1")?;
        lb.ip(&["addr", "add", "10.20.0.1/24", "dev", "eth1"])?;
        lb.ip(&["link", "set", "eth1", "up"])?;
        // backend i: eth0 <-> b{i} on the bridge
        for (i, ns) in backend_ns.iter().enumerate() {
            let port = format!("b{i}");
            bridge_port(&ovl, ns, "eth0", &port)?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(i)),
                "dev",
                "eth0",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        let many_ns = if topology.many_tasks > 0 {
            Some(setup_many(&lb, &ovl, &id, &dir, topology.many_tasks)?)
        } else {
            None
        };
        let (router, pm_ns) = if topology.pmtu_router {
            let (r, pm) = setup_router(&lb, &ovl)?;
            (Some(r), Some(pm))
        } else {
            (None, None)
        };
        // The balancer routes between its two sides; replies of rewritten
        // flows arrive with addresses that strict rp_filter would reject.
        lb.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
            "net.ipv4.conf.eth1.rp_filter=0",
        ])?;
        if mode == Mode::Xdp {
            // NAPI on the receiving ends of the balancer's XDP_TX/REDIRECT.
            client_ns.exec(&["ethtool", "-K", "eth0", "gro", "on"])?;
            ovl.exec(&["ethtool", "-K", "l1", "gro", "on"])?;
            // Full checksums from the senders. With tx checksum offload on, a
            // veth hands the skb over with CHECKSUM_PARTIAL: the TCP/UDP
            // checksum field holds only the pseudo-header sum, and the skb
            // carries "finish this later". XDP sees bytes, not that flag;
            // once a frame is XDP_REDIRECTed into another veth it becomes a
            // plain frame again (CHECKSUM_NONE), and the receiver verifies
            // the unfinished checksum and drops the segment. Measured here:
            // 86 SYNs redirected, 86 TcpInCsumErrors at the backends, no
            // connection ever established. A physical NIC never delivers
            // CHECKSUM_PARTIAL frames to XDP, so this is a property of
            // veth-to-veth testing, not a data-plane bug. TC mode keeps the
            // skb (and the flag) and needs none of this.
            client_ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
            for ns in backend_ns.iter().chain(&many_ns).chain(&pm_ns) {
                ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
            }
            if let Some(r) = &router {
                // It forwards pm's segments unchanged (their checksums too).
                r.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
                r.exec(&["ethtool", "-K", "eth1", "tx", "off"])?;
            }
        }

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testbed-servers")
            .enable_all()
            .build()
            .context("starting the testbed runtime")?;
        let dns = dns::start(&lb, rt.handle())?;
        dns.set(SERVICE, (0..backends).map(backend_addr));
        let backends = backend_ns
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                let b = Backend::new(
                    format!("b{i}"),
                    backend_addr(i),
                    format!("b{i}"),
                    ns,
                    rt.handle().clone(),
                );
                b.start()?;
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        let many = many_ns
            .map(|ns| {
                let addrs = (0..topology.many_tasks).map(many_task_addr).collect();
                ManyTasks::start(ns, addrs, rt.handle())
            })
            .transpose()?;
        let pmtu_backend = pm_ns
            .map(|ns| {
                let b = Backend::new(
                    "pm".into(),
                    PMTU_BACKEND_ADDR,
                    "rtr".into(),
                    ns,
                    rt.handle().clone(),
                );
                b.start()?;
                Ok::<_, anyhow::Error>(b)
            })
            .transpose()?;
        let client = Client::start(client_ns.path())?;
        let mut extras = String::new();
        if let Some(m) = &many {
            let _ = write!(
                extras,
                ", {} many-tasks in {}",
                m.addrs().len(),
                m.ns().name()
            );
        }
        if let (Some(r), Some(b)) = (&router, &pmtu_backend) {
            let _ = write!(
                extras,
                ", PMTU router {} -> {} in {}",
                r.name(),
                b.addr(),
                b.ns().name()
            );
        }
        progress!(
            "testbed {id}: {} mode, {} backends{extras}, namespaces {} / {} / {}, pins {}, logs {}",
            mode.as_str(),
            backends.len(),
            client_ns.name(),
            lb.name(),
            ovl.name(),
            pin_dir.display(),
            dir.display()
        );
        Ok(Self {
            id,
            mode,
            dir,
            pin_dir,
            daemons: AtomicU32::new(0),
            configs: AtomicU32::new(0),
            live: Arc::default(),
            client,
            dns,
            backends,
            many,
            pmtu_backend,
            router,
            client_ns,
            lb,
            ovl,
            rt,
        })
    }

    /// The many-tasks namespace, if the topology has one.
    pub fn many_tasks(&self) -> Option<&ManyTasks> {
        self.many.as_ref()
    }

    /// The backend behind the PMTU router (`pm`, `10.30.0.2`), if any.
    pub fn pmtu_backend(&self) -> Option<&Backend> {
        self.pmtu_backend.as_ref()
    }

    /// The PMTU router's namespace, if any.
    pub fn router(&self) -> Option<&NetNs> {
        self.router.as_ref()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The pin directory every daemon of this testbed gets (`--pin-dir`).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether anything is pinned (maps or links).
    pub fn pins_exist(&self) -> bool {
        self.pin_dir.exists()
    }

    /// The directory with the daemons' logs and config files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lb(&self) -> &NetNs {
        &self.lb
    }

    pub fn client_ns(&self) -> &NetNs {
        &self.client_ns
    }

    /// Lets the client reuse its TIME_WAIT ports for new connections
    /// (`tcp_tw_reuse=1`), as a load generator needs. The client is one
    /// address opening thousands of connections a second, not a crowd of
    /// clients. Behind an L4 balancer it speaks TCP with the task itself, and
    /// with `Connection: close` it is often the first to close, so the
    /// TIME_WAIT sockets pile up on its side (behind HAProxy they are
    /// HAProxy's). Without reuse its ~14k connect ports run out within
    /// seconds and wrk's rate collapses: measured 2.4k req/s with 14k client
    /// TIME_WAITs, 7.7k req/s with reuse, same balancer. The tests leave it
    /// off: their checks want distinct source ports.
    pub fn client_reuses_time_wait(&self) -> Result<()> {
        self.client_ns
            .exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            .map(|_| ())
    }

    pub fn ovl(&self) -> &NetNs {
        &self.ovl
    }

    /// Deletes the balancer's backend-side `eth1` (its peer `l1` on br0 goes
    /// with it), as a reconnect, a bond rebuild or a re-plumbed container
    /// veth does. [`recreate_eth1`](Self::recreate_eth1) brings it back.
    pub fn delete_eth1(&self) -> Result<()> {
        self.lb.ip(&["link", "del", "eth1"])?;
        Ok(())
    }

    /// Re-creates `eth1` as [`build`](Self::build) made it: a veth whose
    /// peer `l1` is a port of br0 (GRO on `l1` in XDP mode), with
    /// 10.20.0.1/24, up. A new device: new ifindex, new MAC. Routes that
    /// extras added through `eth1` (many tasks) are not restored.
    pub fn recreate_eth1(&self) -> Result<()> {
        bridge_port(&self.ovl, &self.lb, "eth1", "l1")?;
        if self.mode == Mode::Xdp {
            self.ovl.exec(&["ethtool", "-K", "l1", "gro", "on"])?;
        }
        self.lb
            .exec(&["sysctl", "-qw", "net.ipv4.conf.eth1.rp_filter=0"])?;
        let addr = format!("{LB_OVERLAY_ADDR}/24");
        self.lb.ip(&["addr", "add", &addr, "dev", "eth1"])?;
        self.lb.ip(&["link", "set", "eth1", "up"])?;
        Ok(())
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }

    pub fn dns(&self) -> &Dns {
        &self.dns
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn backend(&self, i: usize) -> &Backend {
        &self.backends[i]
    }

    /// The backend called `name` (`b3`).
    pub fn backend_named(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name() == name)
    }

    /// `http://10.10.0.1<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{VIP}:{HTTP_PORT}{path}")
    }

    /// The UDP service: `10.10.0.1:5353`.
    pub fn udp_vip(&self) -> SocketAddr {
        SocketAddr::from((VIP, UDP_PORT))
    }

    /// `tasks.web` answers with the backends `indices`.
    pub fn set_tasks(&self, indices: &[usize]) {
        self.dns
            .set(SERVICE, indices.iter().map(|&i| backend_addr(i)));
    }

    /// `GET /` through the VIP.
    pub fn get(&self) -> Result<(String, Duration)> {
        self.client.get(&self.url("/"))
    }

    /// `count` requests to `/`, `concurrency` at a time.
    pub fn load(&self, count: u64, concurrency: usize) -> LoadReport {
        self.client
            .load(&self.url("/"), Load::Count(count), concurrency)
    }

    /// Starts `GET /slow?ms=N` through the VIP.
    pub fn slow(&self, ms: u64) -> SlowRequest {
        self.client.slow(
            &self.url(&format!("/slow?ms={ms}")),
            Duration::from_millis(ms) + Duration::from_secs(5),
        )
    }

    /// A UDP round trip through the VIP; the answering backend's name.
    pub fn udp(&self, msg: &str) -> Result<String> {
        self.client.udp(self.udp_vip(), msg)
    }

    /// The default settings for this testbed (short intervals).
    pub fn daemon_config(&self) -> DaemonConfig {
        DaemonConfig::new(self.mode)
    }

    /// Writes `cfg` to a new file in [`dir`](Self::dir) and returns the
    /// `run` arguments that use it: `["--config", FILE]`.
    pub fn config_args(&self, cfg: &DaemonConfig) -> Result<Vec<String>> {
        let n = self.configs.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("xdplb-{n}.toml"));
        std::fs::write(&path, cfg.toml()).with_context(|| format!("writing {}", path.display()))?;
        Ok(vec!["--config".into(), path.display().to_string()])
    }

    /// `--config FILE` with [`daemon_config`](Self::daemon_config).
    pub fn daemon_args(&self) -> Result<Vec<String>> {
        self.config_args(&self.daemon_config())
    }

    /// The short form for one service, with the daemon's default intervals
    /// (1 s DNS polls and checks, rise 2, fall 3, 30 s drain).
    pub fn daemon_args_short(&self) -> Vec<String> {
        [
            "--iface",
            "eth0",
            "--iface",
            "eth1",
            "--listen",
            "10.10.0.1:80",
            "--backends",
            "tasks.web:80",
            "--check",
            "tcp",
            "--attach",
            self.mode.as_str(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// A command for the `xdplb` binary that runs inside the `lb` namespace.
    fn xdplb_command(&self) -> Result<Command> {
        self.command_in_lb(&[xdplb_bin()?.into()])
    }

    /// `argv` (a program and its first arguments) as a command that runs
    /// inside the `lb` namespace.
    fn command_in_lb(&self, argv: &[std::ffi::OsString]) -> Result<Command> {
        let (program, first) = argv.split_first().context("an empty command line")?;
        let mut cmd = Command::new(program);
        cmd.args(first);
        let ns = File::open(self.lb.path())
            .with_context(|| format!("opening {}", self.lb.path().display()))?;
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        // SAFETY: the closure makes only async-signal-safe system calls
        // (setns, prctl) between fork and exec; `ns` stays open (it is moved
        // into the closure, which the Command keeps).
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
                // Killed when the thread that started it exits, so a test run
                // that dies (even by SIGKILL) leaves no daemon behind.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Starts `xdplb run ARGS --pin-dir PIN_DIR` inside `lb`, with stdout and
    /// stderr in a log file. The daemon dies with the calling thread.
    pub fn start_daemon<S: AsRef<str>>(&self, args: &[S]) -> Result<Daemon> {
        self.start_daemon_env(args, &[])
    }

    /// [`Self::start_daemon`] with extra environment variables (test knobs
    /// such as `XDPLB_PRETEND_MISSING`).
    pub fn start_daemon_env<S: AsRef<str>>(
        &self,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        self.start_daemon_via(&[xdplb_bin()?.into()], args, env)
    }

    /// [`Self::start_daemon_env`] with another command line before `run`:
    /// another binary (an upgrade), or a launcher that execs it in place,
    /// such as `setpriv ... -- /path/to/xdplb`, so the pid is the daemon's.
    pub fn start_daemon_via<S: AsRef<str>>(
        &self,
        argv: &[std::ffi::OsString],
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let n = self.daemons.fetch_add(1, Ordering::Relaxed);
        let log_path = self.dir.join(format!("daemon-{n}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = self.command_in_lb(argv)?;
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .args(args.iter().map(AsRef::as_ref))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .stdout(log.try_clone()?)
            .stderr(log);
        let line = format!("{cmd:?}");
        let child = cmd.spawn().with_context(|| format!("starting {line}"))?;
        let label = format!("daemon {n} (pid {})", child.id());
        progress!("{label}: {line}, log {}", log_path.display());
        self.live.lock().expect("live lock").insert(child.id());
        Ok(Daemon {
            child,
            status: None,
            log: log_path,
            label,
            live: Arc::clone(&self.live),
        })
    }

    /// Runs `xdplb ARGS` inside `lb` to completion.
    pub fn xdplb(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.xdplb_command()?;
        cmd.args(args);
        let line = format!("{cmd:?}");
        cmd.output().with_context(|| format!("running {line}"))
    }

    /// `xdplb down --pin-dir PIN_DIR`; fails unless it exits 0.
    pub fn down(&self) -> Result<String> {
        let pin_dir = self.pin_dir.display().to_string();
        let out = self.xdplb(&["down", "--pin-dir", &pin_dir])?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("xdplb down failed ({}): {text}", out.status);
        }
        Ok(text)
    }

    /// `xdplb stats --pin-dir PIN_DIR`: the operator's table.
    pub fn stats_text(&self) -> Result<String> {
        self.xdplb_text(&["stats"])
    }

    /// `xdplb backends --pin-dir PIN_DIR`: the daemon's view of every task.
    pub fn backends_text(&self) -> Result<String> {
        self.xdplb_text(&["backends"])
    }

    /// `xdplb backends --json --pin-dir PIN_DIR`, parsed.
    pub fn backends_json(&self) -> Result<serde_json::Value> {
        let text = self.xdplb_text(&["backends", "--json"])?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing `xdplb backends --json`: {text}"))
    }

    /// `xdplb ARGS --pin-dir PIN_DIR`'s stdout; fails unless it exits 0.
    fn xdplb_text(&self, args: &[&str]) -> Result<String> {
        let pin_dir = self.pin_dir.display().to_string();
        let mut all = args.to_vec();
        all.extend(["--pin-dir", &pin_dir]);
        let out = self.xdplb(&all)?;
        if !out.status.success() {
            bail!(
                "xdplb {} failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Packets per reason (`REASON_STATS`, summed over CPUs), the non-zero
    /// ones, read from the pinned map.
    pub fn reason_stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let path = self.pin_dir.join(MAP_REASON_STATS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        let mut out = BTreeMap::new();
        for r in 0..reason::COUNT {
            let packets: u64 = map.get(&r, 0)?.iter().map(|c| c.packets).sum();
            if packets > 0 {
                out.insert(reason::NAMES[r as usize], packets);
            }
        }
        Ok(out)
    }

    /// Events (`EVENT_STATS`, summed over CPUs: flows established, misses
    /// on non-SYN segments, the flood guard at work, ...), the non-zero ones,
    /// read from the pinned map.
    pub fn event_stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let path = self.pin_dir.join(MAP_EVENT_STATS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        let mut out = BTreeMap::new();
        for e in 0..event::COUNT {
            let n: u64 = map.get(&e, 0)?.iter().sum();
            if n > 0 {
                out.insert(event::NAMES[e as usize], n);
            }
        }
        Ok(out)
    }

    /// The pinned connection tables (CONNS and UNANSWERED): forward and
    /// reverse entries.
    pub fn conns(&self) -> Result<HashMap<FlowKey, Conn>> {
        let mut all = HashMap::new();
        // Flows not established yet first: an entry moving to CONNS during
        // the walk is then kept as the established one.
        for name in [MAP_UNANSWERED, MAP_CONNS] {
            let path = self.pin_dir.join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let map: BpfHashMap<_, FlowKey, Conn> = BpfHashMap::try_from(Map::LruHashMap(data))?;
            // Entries can vanish between reading a key and its value (LRU, a
            // concurrent delete); skip those.
            all.extend(map.iter().filter_map(|kv| kv.ok()));
        }
        Ok(all)
    }

    /// Entries in the pinned connection table (two per flow).
    pub fn conn_entries(&self) -> Result<usize> {
        Ok(self.conns()?.len())
    }

    /// What to print when a scenario fails: data-plane counters, the
    /// connection table size, the veths' XDP counters, the neighbours.
    pub fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- testbed {} ({} mode) ---\n",
            self.id,
            self.mode.as_str()
        );
        match self.reason_stats() {
            Ok(r) => {
                let _ = writeln!(s, "REASON_STATS: {r:?}");
            }
            Err(e) => {
                let _ = writeln!(s, "REASON_STATS: {e:#}");
            }
        }
        match self.conn_entries() {
            Ok(n) => {
                let _ = writeln!(s, "CONNS entries: {n}");
            }
            Err(e) => {
                let _ = writeln!(s, "CONNS: {e:#}");
            }
        }
        for (ns, dev) in [(&self.client_ns, "eth0"), (&self.ovl, "l1")] {
            if let Ok(out) = ns.exec(&["ethtool", "-S", dev]) {
                let xdp: Vec<&str> = out
                    .lines()
                    .map(str::trim)
                    .filter(|l| l.contains("xdp") && !l.ends_with(": 0"))
                    .collect();
                let _ = writeln!(s, "{} {dev} non-zero xdp counters: {xdp:?}", ns.name());
            }
        }
        let mut csum = Vec::new();
        let hosts = [("client", &self.client_ns), ("lb", &self.lb)]
            .into_iter()
            .chain(self.backends.iter().map(|b| (b.name(), b.ns())))
            .chain(self.pmtu_backend.iter().map(|b| (b.name(), b.ns())))
            .chain(self.router.iter().map(|r| ("rtr", r)))
            .chain(self.many.iter().map(|m| ("many", m.ns())));
        for (name, ns) in hosts {
            if let Some((tcp, udp)) = ns
                .exec(&["cat", "/proc/net/snmp"])
                .ok()
                .and_then(|t| in_csum_errors(&t))
            {
                csum.push(format!("{name} tcp {tcp} udp {udp}"));
            }
        }
        let _ = writeln!(s, "InCsumErrors: {}", csum.join(", "));
        if let Ok(out) = self.lb.ip(&["neigh"]) {
            let _ = writeln!(s, "lb neighbours:\n{}", out.trim_end());
        }
        s
    }
}

/// Sends `sig` to process `pid` (one of ours: a daemon, a flood, a load).
pub fn signal(pid: u32, sig: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut *self.live.lock().expect("live lock")) {
            // A daemon handle that outlived us (it should not): kill it.
            // A pid we spawned and have not reaped.
            let _ = signal(pid, Signal::SIGKILL);
        }
        // Removing the pins detaches the programs (what `xdplb down` does).
        if self.pin_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
                eprintln!("warning: could not remove {}: {e}", self.pin_dir.display());
            }
        }
        // The daemon's files in /run/xdplb (lock, status) that a killed
        // daemon leaves: `<tag>.lock`, `<tag>.status.json`, ...
        let lock = lb_user::dataplane::attach::InstanceLock::lock_path(&self.pin_dir);
        if let (Some(dir), Some(stem)) = (lock.parent(), lock.file_stem()) {
            let prefix = format!("{}.", stem.to_string_lossy());
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "testbed {}: keeping logs and configs in {}",
                self.id,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A veth pair: `dev` in `ns`, its peer `peer` moved into `peer_ns`.
fn veth(ns: &NetNs, dev: &str, peer_ns: &NetNs, peer: &str) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        dev,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        peer_ns.name(),
    ])?;
    Ok(())
}

/// `dev` in `ns`, plugged into the overlay bridge `br0` as port `port`.
fn bridge_port(ovl: &NetNs, ns: &NetNs, dev: &str, port: &str) -> Result<()> {
    veth(ns, dev, ovl, port)?;
    ovl.ip(&["link", "set", port, "master", "br0", "up"])?;
    Ok(())
}

/// The many-tasks namespace: `eth0` on `br0` (bridge port `m0`) with `n`
/// addresses, added in one `ip -batch` (200 separate `ip` runs take
/// seconds), and the balancer's route to them.
fn setup_many(lb: &NetNs, ovl: &NetNs, id: &str, dir: &Path, n: usize) -> Result<NetNs> {
    let ns = NetNs::new("tb-many")?;
    bridge_port(ovl, &ns, "eth0", "m0")?;
    let mut batch = String::new();
    for i in 0..n {
        // /16: the balancer's 10.20.0.1 is on-link for the answers.
        let _ = writeln!(batch, "addr add {}/16 dev eth0", many_task_addr(i));
    }
    let _ = writeln!(batch, "link set eth0 up");
    let path = dir.join(format!("{id}-many.ip"));
    std::fs::write(&path, batch).with_context(|| format!("writing {}", path.display()))?;
    ns.ip(&["-batch", &path.display().to_string()])
        .context("adding the many-tasks addresses")?;
    // Every task is on the overlay segment: ARP finds it through eth1.
    lb.ip(&["route", "add", "10.20.1.0/24", "dev", "eth1"])?;
    Ok(ns)
}

/// The PMTU router and the backend behind it (module documentation):
/// returns (router, backend) namespaces.
fn setup_router(lb: &NetNs, ovl: &NetNs) -> Result<(NetNs, NetNs)> {
    let rtr = NetNs::new("tb-rtr")?;
    let pm = NetNs::new("tb-pm")?;
    bridge_port(ovl, &rtr, "eth0", "r0")?;
    rtr.ip(&["addr", "add", &format!("{ROUTER_ADDR}/24"), "dev", "eth0"])?;
    rtr.ip(&["link", "set", "eth0", "up"])?;
    veth(&rtr, "eth1", &pm, "eth0")?;
    rtr.ip(&["addr", "add", "10.30.0.1/24", "dev", "eth1"])?;
    let mtu = PMTU_HOP_MTU.to_string();
    rtr.ip(&["link", "set", "eth1", "mtu", &mtu, "up"])?;
    rtr.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ])?;
    pm.ip(&[
        "addr",
        "add",
        &format!("{PMTU_BACKEND_ADDR}/24"),
        "dev",
        "eth0",
    ])?;
    pm.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
    // Its own MTU would advertise MSS 1240 and the client would never send
    // a packet too big for the hop; advmss advertises 1460 instead.
    pm.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.30.0.1",
        "advmss",
        "1460",
    ])?;
    lb.ip(&[
        "route",
        "add",
        "10.30.0.0/24",
        "via",
        &ROUTER_ADDR.to_string(),
    ])?;
    Ok((rtr, pm))
}

/// `InCsumErrors` of TCP and UDP from the text of `/proc/net/snmp`.
fn in_csum_errors(snmp: &str) -> Option<(u64, u64)> {
    let field = |proto: &str| -> Option<u64> {
        let mut lines = snmp.lines().filter(|l| l.starts_with(proto));
        let names = lines.next()?.split_whitespace();
        let values = lines.next()?.split_whitespace();
        names
            .zip(values)
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
    };
    Some((field("Tcp:")?, field("Udp:")?))
}

/// Removes what crashed earlier runs left behind: namespaces, pin
/// directories, log directories and the daemons' files in /run/xdplb (lock,
/// status) whose pid is gone.
fn sweep() {
    netns::sweep_leftovers(PREFIX);
    netns::sweep_stale_dirs(Path::new("/sys/fs/bpf"), PREFIX);
    netns::sweep_stale_dirs(&std::env::temp_dir(), PREFIX);
    // InstanceLock::lock_path turns /sys/fs/bpf/xdplb-tb-PID-N into
    // /run/xdplb/_sys_fs_bpf_xdplb_tb_PID_N.lock; the status file is next to it.
    let lock_dir = lb_user::dataplane::attach::InstanceLock::lock_path(Path::new("/x"));
    let Some(lock_dir) = lock_dir.parent() else {
        return;
    };
    let tag = format!("_sys_fs_bpf_{}", PREFIX.replace('-', "_"));
    let Ok(entries) = std::fs::read_dir(lock_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(&tag)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !netns::pid_alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes ANSI colour sequences (in case the daemon colours its log).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running `xdplb run`. Dropping it kills the daemon (SIGKILL) and, when
/// the test is failing, prints its log.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
    label: String,
    live: Arc<Mutex<BTreeSet<u32>>>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped(status);
            }
        }
        self.status
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.status = Some(status);
        self.live
            .lock()
            .expect("live lock")
            .remove(&self.child.id());
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits until the log contains `needle`; fails early if the daemon exits.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_line(&format!("{needle:?}"), timeout, |l| l.contains(needle))?;
        Ok(())
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` log lines contain `needle` (for events that
    /// happen more than once, like a backend entering `active` again).
    pub fn wait_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.count_log(needle) >= n {
                return Ok(());
            }
            if let Some(status) = self.try_status() {
                bail!(
                    "{} exited ({status}) before logging {needle:?} {n} times",
                    self.label
                );
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} logged {needle:?} {} times, not {n}, within {timeout:?}; log:\n{}",
                    self.label,
                    self.count_log(needle),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the main loop ("running; ...": attached, maps written).
    pub fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        self.wait_log("running;", READY_TIMEOUT)?;
        progress!("{}: ready after {:.2?}", self.label, start.elapsed());
        Ok(())
    }

    /// Waits until each of `addrs` (`10.20.0.10:80`) has been logged as
    /// entering `active` (a passed health check, no checks, or adopted).
    pub fn wait_active(&mut self, addrs: &[SocketAddr], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        for addr in addrs {
            let left = timeout.saturating_sub(start.elapsed());
            self.wait_log(&format!("{addr} active"), left)?;
        }
        progress!(
            "{}: {} backends active after {:.2?}",
            self.label,
            addrs.len(),
            start.elapsed()
        );
        Ok(())
    }

    /// Waits until the log has a line for which `matches` holds.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| matches(l)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.try_status() {
                bail!(
                    "{} exited ({status}) before logging {what}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} did not log {what} within {timeout:?}; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until service `service`'s Maglev table has been flipped to one
    /// with `active` backends (the map write that follows the "active" lines).
    pub fn wait_table(&mut self, service: &str, active: usize, timeout: Duration) -> Result<()> {
        let service = format!("service={service} ");
        let active = format!("active={active} ");
        self.wait_line(
            &format!("a Maglev table flip with {active}for {service}"),
            timeout,
            |l| l.contains("Maglev table flipped") && l.contains(&service) && l.contains(&active),
        )?;
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} still running {timeout:?} later; log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit.
    pub fn sigterm(&mut self) -> Result<ExitStatus> {
        if self.status.is_none() {
            // Our own child, which has not been reaped.
            let _ = signal(self.child.id(), Signal::SIGTERM);
        }
        let status = self.wait_exit(Duration::from_secs(10))?;
        progress!("{}: SIGTERM -> {status}", self.label);
        Ok(status)
    }

    /// SIGKILL (no cleanup at all), and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        if self.status.is_none() {
            self.child.kill().context("SIGKILL")?;
            let status = self.child.wait().context("reaping the daemon")?;
            self.reaped(status);
            progress!("{}: killed with SIGKILL", self.label);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let _ = writeln!(
                std::io::stderr(),
                "--- {} log ({}) ---\n{}--- end of log ---",
                self.label,
                self.log.display(),
                log
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_parses() {
        let mut cfg = DaemonConfig::new(Mode::Xdp);
        let text = cfg.toml();
        let parsed = lb_user::config::Config::from_toml_str(&text, "testbed.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed.services.len(), 2, "{text}");
        cfg.udp = false;
        let parsed = lb_user::config::Config::from_toml_str(&cfg.toml(), "testbed.toml").unwrap();
        assert_eq!(parsed.services.len(), 1);
        assert_eq!(parsed.services[0].drain_timeout, Duration::from_secs(3));
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m running;"),
            "2025  INFO running;"
        );
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(backend_addr(0), Ipv4Addr::new(10, 20, 0, 10));
        assert_eq!(backend_addr(3), Ipv4Addr::new(10, 20, 0, 13));
    }
}
