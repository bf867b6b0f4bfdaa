//! Atomic table flips under load. One thread hammers the data plane with new
//! flows through `BPF_PROG_TEST_RUN` while another rewrites and flips the
//! service's Maglev table thousands of times, the way
//! `lb_user::dataplane::table::Writer` does it: fill the inactive half of the service's
//! `MAGLEV` region, then replace the whole `SERVICES` value with
//! `active_half` pointing at it. Only tables change: every backend stays
//! `active` in `BACKENDS` throughout, so with the first slot of each flow
//! deciding (no probing), what a packet may see is exact.
//!
//! Generations: the flipper numbers its tables. Generation `g` is the table
//! `plan.sets[g % len]`, written into one half and then made live by one
//! `SERVICES` update. Around every run the packet thread reads `published`
//! (before) and `writing` (after), so the run may have used generations
//! `published_before ..= writing_after` and nothing else.
//!
//! Stamps: each generation's `SERVICES` value also carries its own SNAT port
//! range (one of [`STAMPS`] disjoint ranges, `g % STAMPS`). The data plane
//! takes the SNAT port from the same `Service` it takes `active_half` from,
//! so the rewritten source port names the version the packet read. Two
//! checks per packet follow:
//!
//! - **old or new set**: the backend is the flow's slot in some generation of
//!   the run's window (the requirement: no backend outside the old or the
//!   new table);
//! - **no torn read**: the backend is the flow's slot in *the* generation
//!   the stamp names, i.e. the table matches the `SERVICES` version the
//!   packet used. Writing into the live half breaks this while it can still
//!   pass the first check, which is why the stamp exists
//!   ([`torn_read_detector_catches_in_place_writes`] keeps the detector
//!   honest).
//!
//! Plus: every packet is forwarded (no drop, `drop_*` counters stay 0).
//!
//! What "no torn read" assumes: the program copies the `SERVICES` value
//! right after its lookup (`core::service`: the kernel's BPF allocator may
//! reuse a replaced element before an RCU grace period ends, and a run that
//! read the value field by field was once seen with the Maglev half of one
//! generation and the SNAT range of another), and reads its one `MAGLEV`
//! slot from the half that copy names; and the writer does not rewrite the
//! half a flip retired while a run that read the old value may still be
//! going. The `Writer` waits for an RCU grace period then
//! (`table::wait_for_running_programs`); this flipper waits until the
//! packet thread's run in progress at the flip has returned (its only
//! reader; a grace period per flip would cut it to about 100 flips a
//! second). Without that wait, a `BPF_PROG_TEST_RUN` preempted between the
//! copy and the slot read on a busy machine saw the half rewritten under it
//! (seen in CI: 1 torn read in 117,760 packets).
//!
//! Run as root, one test at a time (the lab moves its thread into its own
//! network namespace):
//! `cargo test -p tests --test flip -- --test-threads=1 --nocapture`

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{
    reason, Config, Service, ServiceKey, BACKEND_ACTIVE, MAP_MAGLEV, MAP_SERVICES, PROTO_TCP,
};
use lb_user::dataplane::maglev::{build_table, MaglevBackend};
use tests::packet::*;

const BACKEND_PORT: u16 = 8080;
/// How many disjoint SNAT ranges stamp the generations: within a window of
/// fewer generations the stamp names exactly one. (A wider window, when the
/// packet thread was descheduled between its reads, leaves several
/// candidates; the packet must match one of them.)
const STAMPS: u64 = 5;
const STAMP_WIDTH: u16 = 2000;
/// TCP idle timeout for the test, unanswered flows' too (every flow here is
/// one: a SYN never answered). Every packet opens a flow that never sends
/// again, so after this long its SNAT reservation is stale and its port free:
/// only the last few hundred flows hold ports, spread over 2000-port stamp
/// ranges. (With the default hour, CONNS fills and LRU eviction must free
/// the ports; measured: clusters of 32+ consecutive reserved ports then
/// survive eviction, each probe refreshing them, and some new flows drop as
/// `drop_snat_exhausted`, which is not what this test is about.)
const TCP_TIMEOUT: Duration = Duration::from_millis(10);
/// A phase that has not met its counts by then fails.
const PHASE_TIME_LIMIT: Duration = Duration::from_secs(40);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// `Writer`'s: fill the inactive half, then flip to it.
    FillInactiveThenFlip,
    /// Broken on purpose: overwrite the live half in place, then publish.
    OverwriteActive,
}

struct Plan {
    /// Backend numbers (10.1.0.n) of each table; generation `g` uses
    /// `sets[g % sets.len()]`.
    sets: Vec<Vec<u8>>,
    protocol: Protocol,
    /// (hook, at least this many packets, during at least this many flips).
    phases: Vec<(Hook, u64, u64)>,
}

/// Two tables, one per half: every generation rewrites the inactive half
/// with the table it already holds (all slots), then flips.
#[test]
fn pure_flip_between_overlapping_sets() {
    let outcome = run_plan(
        "flip-ov",
        Plan {
            sets: vec![(11..=15).collect(), (14..=20).collect()],
            protocol: Protocol::FillInactiveThenFlip,
            phases: vec![(Hook::Xdp, 100_000, 3_000), (Hook::Tc, 20_000, 1_000)],
        },
    );
    outcome.assert_clean();
}

/// As above with no backend in common: every slot changes at every flip.
#[test]
fn pure_flip_between_disjoint_sets() {
    let outcome = run_plan(
        "flip-dj",
        Plan {
            sets: vec![(11..=14).collect(), (15..=20).collect()],
            protocol: Protocol::FillInactiveThenFlip,
            phases: vec![(Hook::Xdp, 100_000, 3_000), (Hook::Tc, 20_000, 1_000)],
        },
    );
    outcome.assert_clean();
}

/// Three tables in turn over two halves: each half receives a different
/// table at every write (S0, S2, S1, S0, ... in half 0).
#[test]
fn rewrite_inactive_half_with_cycling_sets() {
    let outcome = run_plan(
        "flip-rw",
        Plan {
            sets: vec![
                (11..=15).collect(),
                (14..=20).collect(),
                vec![11, 12, 17, 18, 19],
            ],
            protocol: Protocol::FillInactiveThenFlip,
            phases: vec![(Hook::Xdp, 100_000, 3_000), (Hook::Tc, 20_000, 1_000)],
        },
    );
    outcome.assert_clean();
}

/// The harness itself: a writer that overwrites the live half is caught by
/// the torn-read check (and can slip past the old-or-new check, since every
/// value it exposes belongs to the old or the new table).
#[test]
fn torn_read_detector_catches_in_place_writes() {
    let outcome = run_plan(
        "flip-bad",
        Plan {
            sets: vec![(11..=14).collect(), (15..=20).collect()],
            protocol: Protocol::OverwriteActive,
            phases: vec![(Hook::Xdp, 20_000, 500)],
        },
    );
    let torn: u64 = outcome.phases.iter().map(|p| p.torn).sum();
    let packets: u64 = outcome.phases.iter().map(|p| p.packets).sum();
    assert!(
        torn > 0,
        "a writer that overwrites the live half must produce torn reads; saw none in {packets} \
         packets over {} publications",
        outcome.flipper.flips
    );
}

// ---- generations and stamps ---------------------------------------------------------

/// What the flipper tells the packet thread.
#[derive(Default)]
struct Gens {
    /// The generation being written (set before its first slot write).
    writing: AtomicU64,
    /// The generation whose `SERVICES` update has returned.
    published: AtomicU64,
    /// Packet runs that have returned. The flipper waits for one more
    /// before it rewrites the half a flip retired: the run that may have
    /// read the old `SERVICES` value is then over (the `Writer` waits for
    /// an RCU grace period, `table::wait_for_running_programs`, which
    /// covers every reader; the packet thread is this test's only one).
    runs_done: AtomicU64,
    stop: AtomicBool,
}

/// Stops the flipper when dropped, also while a failing test unwinds
/// (otherwise the thread scope would wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// The SNAT range that stamps generation `g`, inside `SNAT_PORTS`.
fn stamp_range(g: u64) -> (u16, u16) {
    let lo = *SNAT_PORTS.start() + (g % STAMPS) as u16 * STAMP_WIDTH;
    (lo, lo + STAMP_WIDTH - 1)
}

/// `g % STAMPS` for a SNAT port, if the port lies in a stamp range.
fn stamp_of(port: u16) -> Option<u64> {
    let off = port.checked_sub(*SNAT_PORTS.start())?;
    let s = u64::from(off / STAMP_WIDTH);
    (s < STAMPS).then_some(s)
}

fn table_of(tables: &[Vec<u32>], g: u64) -> &[u32] {
    &tables[(g % tables.len() as u64) as usize]
}

// ---- the flipper ----------------------------------------------------------------------

#[derive(Debug, Default)]
struct FlipStats {
    /// `SERVICES` updates (each one a new generation).
    flips: u64,
    slot_writes: u64,
    elapsed: Duration,
}

/// Writes generation after generation until told to stop, through its own
/// descriptors of the pinned maps.
fn flip_tables(
    pin_dir: &Path,
    key: ServiceKey,
    mut svc: Service,
    tables: &[Vec<u32>],
    protocol: Protocol,
    gens: &Gens,
) -> anyhow::Result<FlipStats> {
    let open = |name: &str| -> anyhow::Result<Map> {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("map {name}"))
    };
    let mut services: BpfHashMap<MapData, ServiceKey, Service> =
        BpfHashMap::try_from(open(MAP_SERVICES)?)?;
    let mut maglev: Array<MapData, u32> = Array::try_from(open(MAP_MAGLEV)?)?;
    let mut stats = FlipStats::default();
    let start = Instant::now();
    let mut g = gens.published.load(SeqCst);
    // Runs returned when the last flip's `SERVICES` update had returned.
    let mut runs_at_flip = None;
    while !gens.stop.load(SeqCst) {
        g += 1;
        gens.writing.store(g, SeqCst);
        let half = match protocol {
            Protocol::FillInactiveThenFlip => {
                // The half about to be rewritten was live until the last
                // flip: wait until the run in progress then (if any) is over.
                if let Some(at) = runs_at_flip {
                    while gens.runs_done.load(SeqCst) <= at && !gens.stop.load(SeqCst) {
                        std::thread::yield_now();
                    }
                }
                svc.active_half ^ 1
            }
            Protocol::OverwriteActive => svc.active_half,
        };
        let base = svc.maglev_base + half * svc.maglev_size;
        for (i, b) in table_of(tables, g).iter().enumerate() {
            maglev
                .set(base + i as u32, b, 0)
                .with_context(|| format!("writing MAGLEV[{}]", base + i as u32))?;
        }
        stats.slot_writes += u64::from(svc.maglev_size);
        svc.active_half = half;
        (svc.snat_port_lo, svc.snat_port_hi) = stamp_range(g);
        services.insert(key, svc, 0).context("writing SERVICES")?;
        gens.published.store(g, SeqCst);
        runs_at_flip = Some(gens.runs_done.load(SeqCst));
        stats.flips += 1;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

// ---- the packet side ---------------------------------------------------------------------

/// What one phase saw.
#[derive(Debug)]
struct PhaseTally {
    hook: Hook,
    packets: u64,
    flips: u64,
    elapsed: Duration,
    /// `published` changed while the packet ran.
    straddled: u64,
    /// The packet used a generation published after its run began.
    newer_generation: u64,
    widest_window: u64,
    /// Backend number -> new flows.
    per_backend: BTreeMap<u8, u64>,
    /// Table (`g % tables`, by the packet's stamp) -> packets that used it.
    per_table: BTreeMap<usize, u64>,
    dropped: u64,
    /// Backend in no generation of the window (neither old nor new).
    out_of_window: u64,
    /// Backend not the slot of the generation the stamp names.
    torn: u64,
    /// Output not a well-formed forward (address, port, stamp, checksums).
    malformed: u64,
    reason_problem: Option<String>,
    examples: Vec<String>,
}

impl PhaseTally {
    fn new(hook: Hook) -> Self {
        Self {
            hook,
            packets: 0,
            flips: 0,
            elapsed: Duration::ZERO,
            straddled: 0,
            newer_generation: 0,
            widest_window: 0,
            per_backend: BTreeMap::new(),
            per_table: BTreeMap::new(),
            dropped: 0,
            out_of_window: 0,
            torn: 0,
            malformed: 0,
            reason_problem: None,
            examples: Vec::new(),
        }
    }

    fn example(&mut self, s: String) {
        if self.examples.len() < 8 {
            self.examples.push(s);
        }
    }
}

struct Outcome {
    phases: Vec<PhaseTally>,
    flipper: FlipStats,
    min_flips: Vec<u64>,
    /// Problems found once the flipper stopped (chosen backends outside every
    /// table, changed `BACKENDS`, live state not the last generation).
    after: Vec<String>,
}

impl Outcome {
    #[track_caller]
    fn assert_clean(&self) {
        for (p, &min_flips) in self.phases.iter().zip(&self.min_flips) {
            let bad = p.dropped + p.out_of_window + p.torn + p.malformed;
            assert!(
                bad == 0 && p.reason_problem.is_none(),
                "{:?}: expected every packet forwarded to the flow's slot in the table the \
                 packet's SERVICES version names; saw {} dropped, {} outside both old and new \
                 tables, {} torn (table does not match the SERVICES version), {} malformed; \
                 counters: {}\nfirst cases:\n  {}",
                p.hook,
                p.dropped,
                p.out_of_window,
                p.torn,
                p.malformed,
                p.reason_problem.as_deref().unwrap_or("consistent"),
                p.examples.join("\n  ")
            );
            assert!(
                p.flips >= min_flips,
                "{:?}: expected at least {min_flips} flips while packets ran, saw {} \
                 ({} packets in {:?})",
                p.hook,
                p.flips,
                p.packets,
                p.elapsed
            );
        }
        assert!(
            self.after.is_empty(),
            "after the run:\n  {}",
            self.after.join("\n  ")
        );
    }
}

/// Test client `i`: 50 000 ports per address from 198.18.0.1 on, so every
/// packet opens a new flow.
fn client_of(i: u64) -> SocketAddr {
    let host = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i / 50_000) as u32 + 1;
    sock(Ipv4Addr::from(host), 10_000 + (i % 50_000) as u16)
}

/// Backend indexes per backend number, and numbers per address.
struct Backends {
    index: BTreeMap<u8, u32>,
    by_addr: BTreeMap<IpAddr, (u8, u32)>,
}

fn run_plan(tag: &str, plan: Plan) -> Outcome {
    let mut lab = PacketLab::new(tag);
    let cfg = Config {
        tcp_timeout_ns: TCP_TIMEOUT.as_nanos() as u64,
        unanswered_timeout_ns: TCP_TIMEOUT.as_nanos() as u64,
        ..lab.dp().config().expect("reading CONFIG")
    };
    lab.dp_mut().set_config(&cfg).expect("writing CONFIG");
    let all: Vec<u8> = BACKEND_NUMBERS.collect();
    let addrs: Vec<SocketAddr> = all
        .iter()
        .map(|&n| sock(backend_v4(n), BACKEND_PORT))
        .collect();
    let vip = sock(VIP_V4, 80);
    let mut svc = lab.add_service(vip, PROTO_TCP, stamp_range(0).0..=stamp_range(0).1, &addrs);
    let backends = Backends {
        index: all
            .iter()
            .zip(&svc.backends)
            .map(|(&n, b)| (n, b.0))
            .collect(),
        by_addr: all
            .iter()
            .zip(&svc.backends)
            .map(|(&n, b)| (b.1.ip(), (n, b.0)))
            .collect(),
    };
    let tables: Vec<Vec<u32>> = plan
        .sets
        .iter()
        .map(|set| maglev_table(set, &backends))
        .collect();
    let members: BTreeSet<u32> = tables.iter().flatten().copied().collect();
    let backends_before: Vec<_> = svc
        .backends
        .iter()
        .map(|b| lab.dp().backend(b.0).expect("reading BACKENDS"))
        .collect();

    // Generation 0 is live in half 0; half 1 holds generation 1's table.
    lab.write_table(&mut svc, 0, table_of(&tables, 0).to_vec());
    lab.write_table(&mut svc, 1, table_of(&tables, 1).to_vec());
    svc.val.active_half = 0;
    (svc.val.snat_port_lo, svc.val.snat_port_hi) = stamp_range(0);
    lab.dp_mut()
        .set_service(&svc.key, &svc.val)
        .expect("writing SERVICES");

    println!(
        "{tag}: {:?}, tables {:?} ({} slots each; slots where consecutive tables differ: {:?})",
        plan.protocol,
        plan.sets,
        MAGLEV_SIZE,
        (0..tables.len())
            .map(|i| differing(&tables[i], &tables[(i + 1) % tables.len()]))
            .collect::<Vec<_>>()
    );

    let gens = Gens::default();
    let pin_dir = lab.dp().pin_dir().to_path_buf();
    let mut next_flow = 0u64;
    let (phases, flipper) = thread::scope(|scope| {
        let stop = StopOnDrop(&gens.stop);
        let flipper =
            scope.spawn(|| flip_tables(&pin_dir, svc.key, svc.val, &tables, plan.protocol, &gens));
        while gens.published.load(SeqCst) == 0 && !flipper.is_finished() {
            thread::yield_now();
        }
        let mut phases = Vec::new();
        for &(hook, min_packets, min_flips) in &plan.phases {
            let t = hammer(
                &mut lab,
                hook,
                (min_packets, min_flips),
                &svc,
                &tables,
                &backends,
                &gens,
                &mut next_flow,
                || flipper.is_finished(),
            );
            phases.push(t);
        }
        drop(stop);
        let stats = flipper
            .join()
            .expect("the flipper thread panicked")
            .unwrap_or_else(|e| panic!("the flipper failed: {e:#}"));
        (phases, stats)
    });

    println!(
        "{tag}: flipper: {} flips, {} slot writes in {:.2?} ({:.0} flips/s)",
        flipper.flips,
        flipper.slot_writes,
        flipper.elapsed,
        flipper.flips as f64 / flipper.elapsed.as_secs_f64()
    );
    for p in &phases {
        println!(
            "{tag}: {:?}: {} packets in {:.2?} during {} flips; straddling a flip: {}; served by \
             a generation newer than at their start: {}; widest window: {} generations",
            p.hook, p.packets, p.elapsed, p.flips, p.straddled, p.newer_generation, p.widest_window
        );
        println!(
            "{tag}: {:?}: per backend {:?}; per table {:?}",
            p.hook, p.per_backend, p.per_table
        );
        println!(
            "{tag}: {:?}: dropped {}, outside old and new {}, torn {}, malformed {}",
            p.hook, p.dropped, p.out_of_window, p.torn, p.malformed
        );
        for e in &p.examples {
            println!("{tag}:   {e}");
        }
    }

    // Checked after the packets (so a torn read is reported as such first).
    let mut after = Vec::new();
    for p in &phases {
        let seen: BTreeSet<u32> = p.per_backend.keys().map(|n| backends.index[n]).collect();
        if !seen.is_subset(&members) {
            after.push(format!(
                "{:?}: backends {seen:?} chosen, but the tables only hold {members:?}",
                p.hook
            ));
        }
    }
    // Only tables flipped: every backend entry is as it was, and active.
    for (b, before) in svc.backends.iter().zip(&backends_before) {
        let now = lab.dp().backend(b.0).expect("reading BACKENDS");
        if now != *before || now.state != BACKEND_ACTIVE {
            after.push(format!(
                "BACKENDS[{}] ({}) changed during the test: {before:?} -> {now:?}",
                b.0, b.1
            ));
        }
    }
    // The live SERVICES value and half are the flipper's last generation.
    let last = gens.published.load(SeqCst);
    let live = lab
        .dp()
        .service(&svc.key)
        .expect("reading SERVICES")
        .expect("the service is still there");
    if (live.snat_port_lo, live.snat_port_hi) != stamp_range(last) {
        after.push(format!(
            "SERVICES should hold generation {last}'s stamp {:?}, holds {live:?}",
            stamp_range(last)
        ));
    }
    let base = live.maglev_base + live.active_half * live.maglev_size;
    let half: Vec<u32> = (0..live.maglev_size)
        .map(|i| lab.dp().maglev_slot(base + i).expect("reading MAGLEV"))
        .collect();
    let want = table_of(&tables, last);
    if half != want {
        after.push(format!(
            "the live half {} should hold generation {last}'s table; {} of {} slots differ",
            live.active_half,
            differing(&half, want),
            want.len()
        ));
    }

    Outcome {
        min_flips: plan.phases.iter().map(|p| p.2).collect(),
        phases,
        flipper,
        after,
    }
}

fn maglev_table(set: &[u8], backends: &Backends) -> Vec<u32> {
    let members: Vec<MaglevBackend> = set
        .iter()
        .map(|&n| MaglevBackend {
            key: sock(backend_v4(n), BACKEND_PORT).to_string(),
            index: backends.index[&n],
            weight: 1,
        })
        .collect();
    build_table(&members, MAGLEV_SIZE).expect("building a Maglev table")
}

fn differing(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// Sends new-flow SYNs through `hook` until `min_packets` went out and the
/// flipper flipped `min_flips` times meanwhile, judging each one.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are the lab's, the plan's and the flipper's"
)]
fn hammer(
    lab: &mut PacketLab,
    hook: Hook,
    (min_packets, min_flips): (u64, u64),
    svc: &Svc,
    tables: &[Vec<u32>],
    backends: &Backends,
    gens: &Gens,
    next_flow: &mut u64,
    flipper_gone: impl Fn() -> bool,
) -> PhaseTally {
    let mut t = PhaseTally::new(hook);
    let reasons_before = lab.reasons();
    let flows_before = lab.service_counters(svc.id()).new_flows;
    let first_gen = gens.published.load(SeqCst);
    let start = Instant::now();
    loop {
        if t.packets.is_multiple_of(1024) {
            let flips = gens.published.load(SeqCst) - first_gen;
            let done = t.packets >= min_packets && flips >= min_flips;
            if done || start.elapsed() > PHASE_TIME_LIMIT || flipper_gone() {
                break;
            }
        }
        let syn = Pkt::tcp(client_of(*next_flow), svc.vip, TCP_SYN);
        *next_flow += 1;
        let frame = syn.build();
        let key = syn.flow_key();
        let slot = (lab_hash(&key) % svc.val.maglev_size) as usize;

        let published_before = gens.published.load(SeqCst);
        let (action, out) = lab.run(hook, &frame);
        gens.runs_done.fetch_add(1, SeqCst);
        let writing_after = gens.writing.load(SeqCst);
        let published_after = gens.published.load(SeqCst);
        t.packets += 1;

        let window = published_before..=writing_after;
        t.widest_window = t.widest_window.max(writing_after - published_before + 1);
        if published_after != published_before {
            t.straddled += 1;
        }
        let what = format!("flow {} ({hook:?}), slot {slot}", show_key(&key));
        if action != hook.redirect() {
            t.dropped += 1;
            t.example(format!(
                "{what}: expected {}, saw {} during generations {window:?}",
                hook.action_name(hook.redirect()),
                hook.action_name(action)
            ));
            continue;
        }
        let Some(v) = view(&out) else {
            t.malformed += 1;
            t.example(format!("{what}: output is not IP:\n{}", hex(&out)));
            continue;
        };
        let sport = v.ports.map_or(0, |p| p.0);
        let backend = backends.by_addr.get(&v.ip.dst).copied();
        let stamp = stamp_of(sport);
        let (Some((number, index)), Some(stamp), Some((_, BACKEND_PORT)), true) =
            (backend, stamp, v.ports, checksums(&out).all_valid())
        else {
            t.malformed += 1;
            t.example(format!(
                "{what}: expected a forward to a backend:{BACKEND_PORT} from a stamped SNAT \
                 port with valid checksums, saw {}",
                describe(&out)
            ));
            continue;
        };
        *t.per_backend.entry(number).or_default() += 1;

        // Old or new: the flow's slot in some generation of the window.
        let slot_in = |g: u64| table_of(tables, g)[slot];
        if !window.clone().any(|g| slot_in(g) == index) {
            t.out_of_window += 1;
            t.example(format!(
                "{what}: went to backend {index} (10.1.0.{number}), which is the slot's backend \
                 in no generation of {window:?} ({:?})",
                window.clone().map(slot_in).collect::<Vec<_>>()
            ));
            continue;
        }
        // No torn read: the slot in the generation the stamp names.
        let stamped: Vec<u64> = window.clone().filter(|g| g % STAMPS == stamp).collect();
        match stamped.iter().find(|&&g| slot_in(g) == index) {
            Some(&g) => {
                *t.per_table
                    .entry((g % tables.len() as u64) as usize)
                    .or_default() += 1;
                if g > published_before {
                    t.newer_generation += 1;
                }
            }
            None => {
                t.torn += 1;
                t.example(format!(
                    "{what}: SNAT port {sport} says SERVICES generation {:?} (of window \
                     {window:?}), whose table has backend {:?} in this slot, but the packet went \
                     to backend {index} (10.1.0.{number})",
                    stamped,
                    stamped.iter().map(|&g| slot_in(g)).collect::<Vec<_>>()
                ));
            }
        }
    }
    t.elapsed = start.elapsed();
    t.flips = gens.published.load(SeqCst) - first_gen;

    // Every packet counted once, as a redirect; nothing dropped.
    let reasons_after = lab.reasons();
    let mut want = reasons_before.clone();
    want[reason::FWD_REDIRECT as usize] += t.packets;
    let new_flows = lab.service_counters(svc.id()).new_flows - flows_before;
    if reasons_after != want || new_flows != t.packets {
        t.reason_problem = Some(format!(
            "{} packets, {new_flows} new flows counted, reasons {} (drop_no_backend {})",
            t.packets,
            reason_delta(&reasons_before, &reasons_after),
            reasons_after[reason::DROP_NO_BACKEND as usize]
                - reasons_before[reason::DROP_NO_BACKEND as usize]
        ));
    }
    t
}
