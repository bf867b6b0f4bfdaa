//! The map writer (`lb_user::dataplane::table::Writer`) against the real kernel maps:
//! what `apply` writes, that it flips only on change, and that a second
//! writer on the same pins (a restarted daemon) adopts everything.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use lb_common::{BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_EMPTY};
use lb_user::dataplane::{
    maglev::{self, MaglevBackend},
    maps::{DataPlane, LoadOptions},
    table::{ServiceSpec, Writer},
};
use tests::packet::require_root;

const SIZE: u32 = 251;

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = DataPlane::unpin_all(&self.0);
    }
}

fn spec() -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        listen: "10.0.0.100:80".parse().unwrap(),
        udp: false,
        maglev_size: SIZE,
        snat_ports: (20000, 29999),
        // Fixed, so the test needs no route towards the backends.
        snat_addr: Some("10.1.0.1".parse().unwrap()),
    }
}

fn load(pins: &Pins) -> DataPlane {
    let mut opts = LoadOptions::new(&pins.0);
    opts.maglev_capacity = 4 * SIZE;
    opts.conns_capacity = 1024;
    DataPlane::load(&opts).expect("loading the data plane")
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new([10, 1, 0, n].into(), 8080)
}

fn states(list: &[(u8, u8)]) -> BTreeMap<SocketAddr, u8> {
    list.iter().map(|&(n, s)| (addr(n), s)).collect()
}

/// The Maglev table the data plane should hold for these active backends.
fn expected_table(w: &Writer, active: &[u8]) -> Vec<u32> {
    let members: Vec<MaglevBackend> = active
        .iter()
        .map(|&n| MaglevBackend {
            key: addr(n).to_string(),
            index: w
                .backend_index("web", addr(n))
                .expect("backend has an index"),
            weight: 1,
        })
        .collect();
    maglev::build_table(&members, SIZE).unwrap()
}

fn active_half(dp: &DataPlane, svc: &lb_common::Service) -> Vec<u32> {
    let base = svc.maglev_base + svc.active_half * svc.maglev_size;
    (0..svc.maglev_size)
        .map(|i| dp.maglev_slot(base + i).unwrap())
        .collect()
}

#[test]
fn apply_flips_on_change_and_a_new_writer_adopts_everything() {
    require_root();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-writer-{}",
        std::process::id()
    )));
    let _ = DataPlane::unpin_all(&pins.0);
    let key = spec().key();

    let mut w = Writer::new(load(&pins), 4 * SIZE, &[spec()]).unwrap();
    let svc0 = *w.service("web").unwrap();
    assert_eq!(svc0.active_half, 0, "a new service starts on half 0");

    // Three active backends: one flip, the active half holds their table.
    let r = w
        .apply(
            "web",
            &states(&[
                (11, BACKEND_ACTIVE),
                (12, BACKEND_ACTIVE),
                (13, BACKEND_ACTIVE),
            ]),
        )
        .unwrap();
    assert!(
        r.flipped && r.active == 3,
        "expected a flip with 3 active, got {r:?}"
    );
    let svc1 = w
        .data_plane()
        .service(&key)
        .unwrap()
        .expect("service in SERVICES");
    assert_eq!(svc1.active_half, 1, "the flip must make half 1 active");
    let table3 = active_half(w.data_plane(), &svc1);
    assert_eq!(table3, expected_table(&w, &[11, 12, 13]));

    // The same input again changes nothing in the kernel.
    let r = w
        .apply(
            "web",
            &states(&[
                (11, BACKEND_ACTIVE),
                (12, BACKEND_ACTIVE),
                (13, BACKEND_ACTIVE),
            ]),
        )
        .unwrap();
    assert!(
        !r.flipped && r.slots_written == 0,
        "no change must mean no write, got {r:?}"
    );

    // 13 drains: it keeps its BACKENDS entry (state draining) but leaves the table.
    let r = w
        .apply(
            "web",
            &states(&[
                (11, BACKEND_ACTIVE),
                (12, BACKEND_ACTIVE),
                (13, BACKEND_DRAINING),
            ]),
        )
        .unwrap();
    assert!(
        r.flipped && r.active == 2,
        "expected a flip with 2 active, got {r:?}"
    );
    let idx13 = w.backend_index("web", addr(13)).unwrap();
    assert_eq!(
        w.data_plane().backend(idx13).unwrap().state,
        BACKEND_DRAINING
    );
    let svc2 = w.data_plane().service(&key).unwrap().unwrap();
    assert_eq!(svc2.active_half, 0, "second flip goes back to half 0");
    let table = active_half(w.data_plane(), &svc2);
    assert_eq!(table, expected_table(&w, &[11, 12]));
    assert!(
        !table.contains(&idx13),
        "a draining backend must not be in the table"
    );
    // Removing 1 of 3 moves about a third of the slots, not all of them.
    let moved = table.iter().zip(&table3).filter(|(a, b)| a != b).count() as f64 / SIZE as f64;
    assert!(
        moved < 0.45,
        "Maglev should move ~1/3 of the slots, moved {moved:.2}"
    );

    // A restarted daemon: a new DataPlane on the same pins, a new writer.
    drop(w);
    let mut w2 = Writer::new(load(&pins), 4 * SIZE, &[spec()]).unwrap();
    let adopted = *w2.service("web").unwrap();
    assert_eq!(adopted.id, svc2.id, "service id must be adopted");
    assert_eq!(
        adopted.active_half, svc2.active_half,
        "active half must be adopted"
    );
    assert_eq!(
        w2.backend_index("web", addr(13)),
        Some(idx13),
        "backend index must be adopted"
    );
    let mut active = w2.adopted_active("web");
    active.sort();
    assert_eq!(
        active,
        vec![addr(11), addr(12)],
        "only active backends count as adopted-active"
    );
    let r = w2
        .apply(
            "web",
            &states(&[
                (11, BACKEND_ACTIVE),
                (12, BACKEND_ACTIVE),
                (13, BACKEND_DRAINING),
            ]),
        )
        .unwrap();
    assert!(
        !r.flipped && r.slots_written == 0,
        "the adopted state equals the wanted state: nothing to write, got {r:?}"
    );

    // 13 leaves for good: its slot is cleared after the flip.
    w2.apply(
        "web",
        &states(&[(11, BACKEND_ACTIVE), (12, BACKEND_ACTIVE)]),
    )
    .unwrap();
    assert_eq!(w2.data_plane().backend(idx13).unwrap().state, BACKEND_EMPTY);
    assert_eq!(w2.backend_index("web", addr(13)), None);
}

/// The writer's Maglev slots go through a memory mapping of `MAGLEV`
/// (`BPF_F_MMAPABLE`). What it stores there must be what the kernel holds:
/// read back through the `bpf()` syscall from a separate open of the pin,
/// at the first, a middle and the last slot (the kernel spaces array
/// elements 8 bytes apart, so a wrong stride shows up at once).
#[test]
fn maglev_slots_written_through_the_mapping_are_the_kernels() {
    require_root();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-mmap-{}",
        std::process::id()
    )));
    let mut dp = load(&pins);
    assert!(
        dp.maglev_mapped(),
        "MAGLEV should be BPF_F_MMAPABLE and mapped"
    );
    let last = 4 * SIZE - 1;
    let slots = [0, 1, 2, SIZE, last];
    for (n, &i) in slots.iter().enumerate() {
        dp.set_maglev_slot(i, 1000 + n as u32).unwrap();
    }
    let pinned = lb_user::dataplane::pinned::PinnedMaps::open(&pins.0).expect("opening the pins");
    for (n, &i) in slots.iter().enumerate() {
        assert_eq!(
            pinned.maglev_slot(i).unwrap(),
            Some(1000 + n as u32),
            "MAGLEV[{i}] through bpf()"
        );
        assert_eq!(dp.maglev_slot(i).unwrap(), 1000 + n as u32);
    }
    assert!(
        dp.set_maglev_slot(last + 1, 1).is_err(),
        "a slot past the map must be refused, not written"
    );
}
