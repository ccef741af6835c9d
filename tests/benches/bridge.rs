//! rdma-bridge over TCP on loopback (mutual TLS, release build), against a local read of the same
//! bytes in the same run:
//!
//! 1. FETCH_SB of a 100-sensor Sensor Box, 4 KiB READ latency and 1 MiB READ throughput, served from
//!    a memory image (our guest kernel has 11 sensors, so the 100-sensor box is laid out by
//!    `introspect::sensorbox::encode` in a dump the bridge serves);
//! 2. on a live tcg guest behind `rdma-bridge serve`: FETCH_SB of its real Sensor Box, and the
//!    LOCK → UNLOCK round trip next to bdvmm's own pause/resume over its local API.
//!
//! `cargo bench -p backdoors-tests --bench bridge [-- --rounds N]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, sensor_box_image, stats};
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;
use introspect::mem::{MappedMem, PhysMem};
use introspect::sensorbox;

use rdma_bridge::backend::DumpBackend;
use rdma_bridge::client::Bridge;
use rdma_bridge::config::BridgeConfig;
use rdma_bridge::server::{Server, SB_ATTEMPTS};

const BACKDOOR: u64 = 0x100_0000;
const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["backdoor", "ram"],
    write: &["hooks"],
    restart: false,
    lock: true,
    regs: true,
};

fn row(what: &str, v: Vec<Duration>) -> Duration {
    let n = v.len();
    let (med, p99) = stats(v);
    println!("{what:<46} median {med:>10.2?}  p99 {p99:>10.2?}  ({n} rounds)");
    med
}

fn time(rounds: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..rounds.min(50) {
        f(); // warm-up
    }
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn image_part(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("mem");
    sensor_box_image(&dump, 64, BACKDOOR, 100, 1, |ram| {
        for (i, b) in ram.iter_mut().enumerate().skip(32 << 20) {
            *b = i.to_le_bytes()[0];
        }
    });
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let cfg = BridgeConfig::load(&setup.config).unwrap();
    let server = Server::bind(
        &cfg,
        Arc::new(DumpBackend::open(&dump, (BACKDOOR, 1 << 20)).unwrap()),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    let mut b = Bridge::connect(addr, &setup.id("mon1")).unwrap();
    let local = MappedMem::open_dump(&dump).unwrap();
    let n = b.sensor_box().unwrap().sensors.len();
    let bytes = b.fetch_sb().unwrap().len();
    println!(
        "--- memory image, bridge on 127.0.0.1 (TLS 1.3), {n}-sensor Sensor Box = {bytes} bytes"
    );
    let remote = row(
        "FETCH_SB, 100 sensors, over the bridge",
        time(rounds, || {
            b.fetch_sb().unwrap();
        }),
    );
    let loc = row(
        "same copy, local memory (seq-checked)",
        time(rounds, || {
            sensorbox::copy(&local, BACKDOOR, 1 << 20, SB_ATTEMPTS, |_| true).unwrap();
        }),
    );
    println!("  ratio {:.0}x", remote.as_secs_f64() / loc.as_secs_f64());
    let gpa = 40 << 20;
    let remote = row(
        "READ 4 KiB, over the bridge",
        time(rounds, || {
            b.read(gpa, 4096).unwrap();
        }),
    );
    let mut page = [0u8; 4096];
    let loc = row(
        "READ 4 KiB, local memory",
        time(rounds, || local.read(gpa, &mut page).unwrap()),
    );
    println!("  ratio {:.0}x", remote.as_secs_f64() / loc.as_secs_f64());
    let batch: Vec<(u64, u32)> = (0..64).map(|i| (gpa + i * 8192, 64)).collect();
    row(
        "READ_BATCH 64 x 64 B, over the bridge",
        time(rounds, || {
            b.read_batch(&batch).unwrap();
        }),
    );
    // Throughput: 1 MiB reads over 16 MiB.
    let mb = |f: &mut dyn FnMut(u64)| {
        let t = Instant::now();
        let mut total = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            for i in 0..16u64 {
                f((32 << 20) + i * (1 << 20));
                total += 1 << 20;
            }
        }
        total as f64 / t.elapsed().as_secs_f64() / 1e6
    };
    let r = mb(&mut |g| {
        b.read(g, 1 << 20).unwrap();
    });
    let mut big = vec![0u8; 1 << 20];
    let l = mb(&mut |g| local.read(g, &mut big).unwrap());
    println!("READ 1 MiB throughput: over the bridge {r:.0} MB/s, local {l:.0} MB/s");
}

fn guest_part(rounds: usize) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=counter bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect(
        "BACKDOORS: scenario counter started",
        Duration::from_secs(120),
    );
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let bridge = BridgeProc::start(&vm, &setup);
    let mut b = bridge.connect(&setup.id("mon1"));
    let sb = b.sensor_box().unwrap();
    println!(
        "--- live tcg guest behind `rdma-bridge serve`, {} sensors",
        sb.sensors.len()
    );
    row(
        "FETCH_SB, live guest, over the bridge",
        time(rounds, || {
            b.fetch_sb().unwrap();
        }),
    );
    let (mem, map) = vm.memory();
    row(
        "same copy, local memfd (seq-checked)",
        time(rounds, || {
            sensorbox::copy(
                &mem,
                map.backdoor.gpa,
                map.backdoor.size,
                SB_ATTEMPTS,
                |_| true,
            )
            .unwrap();
        }),
    );
    row(
        "LOCK + UNLOCK, over the bridge",
        time(rounds, || {
            b.lock(Duration::from_secs(2)).unwrap();
            b.unlock().unwrap();
        }),
    );
    let mem = rdma_bridge::client::BridgeMem::new(bridge.connect(&setup.id("mon1")));
    let target = mem.locate(None).unwrap();
    let mut tasks = 0;
    let trips = mem.round_trips();
    let walks = time(rounds / 4, || {
        let t = target
            .process_table::<_, rdma_bridge::client::InspectError>(
                &mem,
                &mut mem.pauser(Duration::from_secs(2)),
                Duration::from_millis(500),
            )
            .unwrap();
        tasks = t.value.len();
    });
    let per_walk = (mem.round_trips() - trips) / (rounds / 4 + (rounds / 4).min(50)) as u64;
    row(
        &format!("process table ({tasks} tasks) incl. LOCK, over the bridge"),
        walks,
    );
    println!("  {per_walk} READ round trips per walk (pages cached while paused)");
    let mut c = vm.client();
    row(
        "pause + resume, bdvmm API, same host",
        time(rounds, || {
            c.pause(Some(Duration::from_secs(2))).unwrap();
            c.resume().unwrap();
        }),
    );
}

fn main() {
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(1000);
    image_part(rounds);
    guest_part(rounds / 5);
}
