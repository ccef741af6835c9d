//! State Boxes: what exporting costs an application, and what extracting them through the bridge
//! costs a monitor (the talk: export < 30 µs, extracting 10 KiB 358 µs).
//!
//! 1. `export` / `import` of a 256 B and a 10 KiB box with `statebox::Region`, in this process.
//! 2. Extracting 10 KiB of State Boxes over the bridge: a memory image holds two processes'
//!    regions at `STATEBOX_VA` behind their own 4-level page tables, pages scattered
//!    (`backdoor_tests::statebox_image`): one box of 10 KiB ("1x10KiB") and 40 boxes of 256 B
//!    ("40x256B"). `rdma-bridge serve --dump` serves it on 127.0.0.1 (mutual TLS, its own
//!    process). Timed: a fresh page walk and `introspect::statebox::read_through` over one
//!    `BridgeMem` session, two ways: without the lock (nothing cached: one READ per page-table
//!    level, one for the region's run of page-table entries, one READ_BATCH of its pages), and
//!    under LOCK ... UNLOCK as bdmon reads them (the same reads, each fetching whole pages into
//!    the cache, no read-ahead; the cache is dropped at UNLOCK, so each round starts cold). A
//!    dump has no vCPUs: its LOCK pauses nothing, so the LOCK rows hold the two round trips and
//!    the bridge's audit record, not a real pause (see `--bench bridge` for LOCK on a live guest).
//! 3. Extract + reinstate: (2) under the lock, then `create_box` + `export` of every box into
//!    this process's `Region` (the boxes are deleted again after each round, untimed).
//!
//! `cargo bench -p backdoors-tests --bench statebox [-- --rounds N]` (needs the release
//! `rdma-bridge`: `cargo build --release -p rdma-bridge`; `make bench` builds it). On a VM whose
//! other vCPU sleeps, every loopback round trip may wait for that vCPU to wake: the bench binary
//! run under `taskset -c 0` (the bridge inherits it) measures the protocol without that.

use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, stats};
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::statebox_image::{ImageBox, ImageProcess, StateBoxImage};
use introspect::mem::MappedMem;
use introspect::paging::PageWalker;
use introspect::statebox::{read_through, Region as Extracted};
use rdma_bridge::client::BridgeMem;
use statebox::abi::STATEBOX_VA;
use statebox::{BoxHandle, Region};

const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["ram"],
    write: &[],
    restart: false,
    lock: true,
    regs: false,
};
/// The bridge's backdoor range (unused here: nothing in the image is a Sensor Box).
const BACKDOOR: (u64, u64) = (0x1000, 0x1000);
const LEASE: Duration = Duration::from_secs(1);
const KIB10: usize = 10 * 1024;

/// Prints one row: median and p99 in µs.
fn row(what: &str, v: Vec<Duration>) {
    let n = v.len();
    let (med, p99) = stats(v);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<50} median {:>8.2} µs  p99 {:>8.2} µs  ({n} rounds)",
        us(med),
        us(p99)
    );
}

/// Times `run` over `rounds` rounds after a few warm-up rounds; `after` sees each result
/// untimed (checks, clean-up).
fn measure<T>(
    rounds: usize,
    mut run: impl FnMut() -> T,
    mut after: impl FnMut(T),
) -> Vec<Duration> {
    let warm = rounds.min(20);
    let mut v = Vec::with_capacity(rounds);
    for i in 0..warm + rounds {
        let t = Instant::now();
        let out = run();
        let took = t.elapsed();
        after(out);
        if i >= warm {
            v.push(took);
        }
    }
    v
}

fn pattern(len: usize, salt: u64) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0] ^ salt.to_le_bytes()[0])
        .collect()
}

fn in_process(region: &mut Region, rounds: usize) {
    println!("--- in this process, statebox::Region (talk: < 30 µs; goal <= 5 µs)");
    let mut out = Vec::with_capacity(KIB10);
    for (id, size, name) in [(1u64, 256usize, "256 B"), (2, KIB10, "10 KiB")] {
        let data = pattern(size, id);
        let b = region.create_box(id).expect("create a box");
        row(
            &format!("export {name}"),
            measure(
                rounds,
                || region.export(&b, std::hint::black_box(&data)),
                |r| r.expect("export"),
            ),
        );
        row(
            &format!("import {name}"),
            measure(
                rounds,
                || region.import(&b, &mut out),
                |r| r.expect("import"),
            ),
        );
        assert_eq!(out, data, "import gave back other bytes than exported");
        region.delete(b).expect("delete the box");
    }
}

/// Walks `p`'s tables afresh and reads its region over the bridge.
fn extract(mem: &BridgeMem, p: &ImageProcess) -> Extracted {
    let pw = PageWalker::new(mem, p.cr3, 4).expect("4-level walker");
    read_through(&pw, 1000, 1000, "front")
        .expect("read the region over the bridge")
        .expect("a region is mapped")
}

/// Checks an extraction against what the image holds.
fn check(r: &Extracted, p: &ImageProcess) {
    assert!(r.refused.is_empty(), "slots refused: {:?}", r.refused);
    assert_eq!(r.boxes.len(), p.boxes.len());
    for (got, want) in r.boxes.iter().zip(&p.boxes) {
        assert_eq!((got.id, &got.data), (want.id, &want.data));
    }
}

fn locked(mem: &BridgeMem, p: &ImageProcess) -> Extracted {
    mem.lock(LEASE).expect("LOCK");
    let r = extract(mem, p);
    mem.unlock().expect("UNLOCK");
    r
}

/// Re-creates every extracted box in this process's region.
fn reinstate(region: &mut Region, r: &Extracted) -> Vec<BoxHandle> {
    r.boxes
        .iter()
        .map(|b| {
            let h = region.create_box(b.id).expect("create the box again");
            region.export(&h, &b.data).expect("export its state");
            h
        })
        .collect()
}

fn over_bridge(region: &mut Region, rounds: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dump = dir.path().join("mem");
    let mut img = StateBoxImage::new(64, 0x5b_0c5);
    let one = img
        .add_process(
            1,
            u32::try_from(KIB10).expect("10 KiB fits u32"),
            vec![ImageBox {
                id: 0x1001,
                data: pattern(KIB10, 1),
            }],
        )
        .expect("the 1x10KiB region");
    let many = img
        .add_process(
            40,
            256,
            (1..=40)
                .map(|i| ImageBox {
                    id: 0x2000 + i,
                    data: pattern(256, i),
                })
                .collect(),
        )
        .expect("the 40x256B region");
    img.write(&dump).expect("write the image");
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let bridge = BridgeProc::start_dump(&setup.config, &dump, BACKDOOR);
    let mem = BridgeMem::new(bridge.connect(&setup.id("mon1")));

    println!(
        "--- over rdma-bridge --dump on 127.0.0.1 (TLS 1.3, its own process), 64 MiB image, \
         pages scattered (talk: 358 µs; goal <= 100 µs)"
    );
    let page = measure(
        rounds,
        || mem.bridge().read(0x10_0000, 4096),
        |r| {
            r.expect("READ");
        },
    );
    row("READ 4 KiB (one round trip, for scale)", page);
    let block = measure(
        rounds,
        || mem.bridge().read(0x10_0000, 32 * 1024),
        |r| {
            r.expect("READ");
        },
    );
    row("READ 32 KiB (one read-ahead block, for scale)", block);
    let lock = measure(
        rounds,
        || {
            mem.lock(LEASE).expect("LOCK");
            mem.unlock()
        },
        |r| r.expect("UNLOCK"),
    );
    row("LOCK + UNLOCK (a dump: nothing is paused)", lock);
    // Where the 1x10KiB region's pages are, from the image itself (untimed): what one READ_BATCH
    // of a region costs once its page tables are walked.
    let local = MappedMem::open_dump(&dump).expect("map the image");
    let pw = PageWalker::new(&local, one.cr3, 4).expect("4-level walker");
    let pages: Vec<(u64, u32)> = (0..one.header.region_bytes() / 4096)
        .map(|k| {
            let t = pw.walk(STATEBOX_VA + k * 4096).expect("a region page");
            (t.phys, 4096)
        })
        .collect();
    let batch = measure(
        rounds,
        || mem.bridge().read_batch(&pages),
        |r| {
            r.expect("READ_BATCH");
        },
    );
    row(
        &format!(
            "READ_BATCH {} x 4 KiB, 1x10KiB's pages (for scale)",
            pages.len()
        ),
        batch,
    );
    // What reading only the header and the box's active copy would fetch (after one more round
    // trip for the slot's seq): its first 4 pages.
    let active = measure(
        rounds,
        || mem.bridge().read_batch(&pages[..4]),
        |r| {
            r.expect("READ_BATCH");
        },
    );
    row("READ_BATCH 4 x 4 KiB, header + active copy", active);
    for (name, p) in [("1x10KiB", &one), ("40x256B", &many)] {
        println!(
            "  {name}: {} slots of {} B, region {} B",
            p.header.slot_count,
            p.header.slot_size,
            p.header.region_bytes()
        );
        let trips = mem.round_trips();
        let t = measure(rounds, || extract(&mem, p), |r| check(&r, p));
        let per = (mem.round_trips() - trips) / total_rounds(rounds);
        row(&format!("extract {name}, no LOCK, uncached"), t);
        println!("    {per} round trips (READ or READ_BATCH) per extraction");

        let trips = mem.round_trips();
        let t = measure(rounds, || locked(&mem, p), |r| check(&r, p));
        let per = (mem.round_trips() - trips) / total_rounds(rounds);
        row(
            &format!("extract {name}, LOCK-cached (incl. LOCK+UNLOCK)"),
            t,
        );
        println!("    {per} round trips (READ or READ_BATCH) + LOCK + UNLOCK per extraction");

        let t = reinstate_rounds(&mem, p, region, rounds);
        row(&format!("extract {name} + reinstate (LOCK-cached)"), t);
    }
    drop(bridge);
}

/// Extract + reinstate, timed, `rounds` times after a warm-up; the reinstated boxes are deleted
/// after each round, untimed (`measure`'s two closures cannot both borrow `region`).
fn reinstate_rounds(
    mem: &BridgeMem,
    p: &ImageProcess,
    region: &mut Region,
    rounds: usize,
) -> Vec<Duration> {
    let warm = rounds.min(20);
    let mut v = Vec::with_capacity(rounds);
    for i in 0..warm + rounds {
        let t = Instant::now();
        let r = locked(mem, p);
        let handles = reinstate(region, &r);
        let took = t.elapsed();
        assert_eq!(handles.len(), p.boxes.len());
        let mut back = Vec::new();
        for (h, want) in handles.into_iter().zip(&p.boxes) {
            region
                .import(&h, &mut back)
                .expect("import a reinstated box");
            assert_eq!(back, want.data, "a reinstated box holds other bytes");
            region.delete(h).expect("delete a reinstated box");
        }
        if i >= warm {
            v.push(took);
        }
    }
    v
}

/// Rounds `measure` runs, warm-up included.
fn total_rounds(rounds: usize) -> u64 {
    u64::try_from(rounds + rounds.min(20))
        .unwrap_or(u64::MAX)
        .max(1)
}

fn main() {
    let rounds: usize = arg("--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .max(1);
    // One region per process: 64 slots of 10 KiB (1.3 MiB locked) hold both layouts.
    let mut region = Region::create(64, u32::try_from(KIB10).expect("10 KiB fits u32"))
        .unwrap_or_else(|e| panic!("State Box region: {e}"));
    in_process(&mut region, rounds);
    over_bridge(&mut region, rounds);
}
