//! bdmon benchmarks (the and the paper's figures), release build:
//!
//! 1. **Detection latency** — from the moment a sensor breaks its contract in the guest to the
//!    moment its HM is called — at 1 ms and 10 ms sampling, tcg engine. The onset is seen by an
//!    observer thread of this process that fetches the Sensor Box through a connection of its own
//!    to the same bridge every 200 µs (so onsets are late by at most that plus one FETCH_SB);
//!    bdmon itself samples through the bridge (TLS) like any remote monitor.
//! 2. **Repair time** of fork bombs of 100, 500, 1,000 and 1,500 processes (the paper's Table 1:
//!    140, 263, 350, 426 ms), on both engines side by side — tcg on this machine, kvm inside a kvm
//!    host with bdmon outside it (nested virtualization under QEMU TCG: not hardware times) — from
//!    the HM call (NPROCS crossed a threshold set just below the bomb's
//!    size, so all of its processes exist) until NPROCS is back down, i.e. every process of the
//!    culprit is gone; plus how long the guest was held paused.
//! 3. **Monitor CPU use** sampling a 100-sensor Sensor Box in a busy loop, at 10 ms and at 100 ms
//!    (paper: 46 %, ~5 %, <1 %), with the bridge in another process serving a memory image.
//!
//! `cargo bench -p backdoors-tests --bench bdmon [-- --rounds N --sizes 100,500 --engines tcg,kvm
//!  --periods 0,10,100 --csv DIR --cpu-only]` (`--csv`: also monitor-cpu.csv and table1-<engine>.csv in DIR)

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, sensor_box_image, stats};
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::site::Engine;
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;
use bdmon::config::{Config, GuestConfig};
use bdmon::contract::Violation;
use bdmon::dispatcher::GuestLoop;
use bdmon::events::Events;
use bdmon::hm::{HealContext, HealOutcome, HealingModule, Registry};
use bdmon::metrics::Metrics;
use bdmon::proc_repair::ProcRepairHealer;
use introspect::sensorbox::ids;
use rdma_bridge::client::Bridge;

const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["sb", "ram"],
    write: &["hooks"],
    restart: false,
    lock: true,
    regs: true,
};

/// Wraps an HM and notes when it is called.
struct Timed {
    inner: Box<dyn HealingModule>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl HealingModule for Timed {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome {
        self.calls.lock().unwrap().push(Instant::now());
        self.inner.handle(ctx, v)
    }
}

/// Event lines collected in memory.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// bdmon's config for one guest, with `engine`'s limits (`Engine::bdmon_guest_limits`, as the
/// end-to-end tests use: a kvm guest nested under TCG walks its process table far slower than
/// the defaults' walk and lease allow, and a walk cut short repairs nothing).
fn config(
    bridge: &str,
    pki: &std::path::Path,
    sample_ms: u64,
    nprocs: u64,
    engine: Engine,
) -> Config {
    let text = format!(
        "sample_ms = {sample_ms}\n[mem]\nenabled = false\n[[guest]]\nname = \"vm\"\nbridge = \"{bridge}\"\n\
         pki = \"{}\"\nmonitor = \"mon1\"\n{}[guest.thresholds]\nNPROCS = {nprocs}\n",
        pki.display(),
        engine.bdmon_guest_limits()
    );
    Config::parse(&text, std::path::Path::new("bench.toml")).unwrap()
}

/// NPROCS crossings seen by the observer: (rising edges, falling edges).
type Edges = Arc<Mutex<(Vec<Instant>, Vec<Instant>)>>;

/// Watches NPROCS cross `threshold` through its own bridge connection (FETCH_SB every
/// `poll`), the same way on both engines.
fn observe(mut b: Bridge, threshold: u64, poll: Duration, stop: Arc<AtomicBool>) -> Edges {
    let edges: Edges = Arc::default();
    let e = edges.clone();
    std::thread::spawn(move || {
        let mut above = false;
        while !stop.load(Ordering::SeqCst) {
            if let Ok(sb) = b.sensor_box() {
                let now = Instant::now();
                let v = sb.value(ids::NPROCS).unwrap_or(0);
                if v > threshold && !above {
                    e.lock().unwrap().0.push(now);
                } else if v <= threshold && above {
                    e.lock().unwrap().1.push(now);
                }
                above = v > threshold;
            }
            std::thread::sleep(poll);
        }
    });
    edges
}

struct Round {
    detect: Duration,
    repair: Duration,
    held_us: u64,
    killed: u64,
    /// The HM walked the process table (rather than naming the user from the kernel's per-user
    /// fork counters).
    walked: bool,
}

/// Boots a guest on `engine` (tcg: on this machine; kvm: inside a kvm host) running `rounds` bombs
/// of `max` processes and heals them with bdmon, here, sampling every `sample_ms` through the
/// guest's bridge; returns per-round figures.
fn bomb_rounds(engine: Engine, max: u64, rounds: usize, sample_ms: u64) -> Vec<Round> {
    let img = Images::load();
    let mut spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        &format!("quiet bd.halt=wait bd.scenario=bombs bd.idle=3 bd.max={max} bd.rounds={rounds}"),
    );
    spec.mem = 1024;
    let mut vm = Vm::start(&spec);
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &[MON], 1, 1000);
    let bridge = BridgeProc::start(&vm, &setup);
    vm.expect("SCENARIO bombs: idle", Duration::from_secs(180));
    let stop = Arc::new(AtomicBool::new(false));
    // The baseline is read in the guest's quiet seconds, before any bomb: a threshold just below
    // the bomb's full size.
    let base = bridge
        .connect(&setup.id("mon1"))
        .sensor_box()
        .unwrap()
        .value(ids::NPROCS)
        .unwrap();
    let threshold = base + max.saturating_sub(max / 20 + 2);
    let edges = observe(
        bridge.connect(&setup.id("mon1")),
        threshold,
        Duration::from_micros(200),
        stop.clone(),
    );
    let cfg = config(&bridge.addr, &setup.pki(), sample_ms, threshold, engine);
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut reg = Registry::new();
    let hm = reg.new_hm(Box::new(Timed {
        inner: Box::new(ProcRepairHealer::new(cfg.proc.clone())),
        calls: calls.clone(),
    }));
    reg.register_sensor(hm, ids::NPROCS);
    let sink = Sink::default();
    let events = Arc::new(Events::to_writer(Box::new(sink.clone())));
    let metrics = Arc::new(Metrics::default());
    let g: GuestConfig = cfg.guests[0].clone();
    let done = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let d = done.clone();
        let (cfg, events, metrics) = (Arc::new(cfg.clone()), events.clone(), metrics.clone());
        s.spawn(move || {
            let mut ed = GuestLoop::new(cfg, g, reg, events, metrics);
            let period = Duration::from_millis(sample_ms);
            let mut next = Instant::now();
            while !d.load(Ordering::SeqCst) {
                ed.once();
                next = (next + period).max(Instant::now());
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        // Whatever happens to the guest (a panic here too), the monitor thread stops, or the
        // scope would wait for it forever.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(done.clone());
        vm.expect(
            &format!("SCENARIO bombs: round {rounds} over"),
            Duration::from_secs(1200),
        );
    });
    stop.store(true, Ordering::SeqCst);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let all: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let repairs: Vec<&serde_json::Value> = all.iter().filter(|e| e["event"] == "repair").collect();
    let healed: Vec<&serde_json::Value> = all.iter().filter(|e| e["event"] == "healed").collect();
    let (rise, fall) = edges.lock().unwrap().clone();
    let calls = calls.lock().unwrap().clone();
    let mut out = Vec::new();
    // Each HM call is one detection: its onset is the last crossing the observer saw before it
    // (a brief crossing that bdmon's samples missed is not a detection), and the repair ends at
    // the first fall after it.
    for (i, call) in calls.iter().enumerate() {
        let Some(onset) = rise.iter().rev().find(|r| *r <= call) else {
            continue;
        };
        let Some(gone) = fall.iter().find(|f| *f >= call) else {
            continue;
        };
        let r = repairs.get(i);
        out.push(Round {
            detect: call.duration_since(*onset),
            repair: gone.duration_since(*call),
            held_us: r.and_then(|r| r["lock_held_us"].as_u64()).unwrap_or(0),
            walked: r.is_some_and(|r| !r["killed"].is_null()),
            // From `healed`: counted from the table, or (no walk) from NPROCS before and after.
            killed: healed
                .get(i)
                .and_then(|h| h["killed"].as_u64())
                .unwrap_or(0),
        });
    }
    out
}

/// Samples bdmon's dispatcher took of its guests (from its metrics).
fn samples(metrics: &Metrics) -> f64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("bdmon_samples_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Back-to-back samples for 5 s through bdmon's sampling path (its tokio session, the parse in
/// place, `GuestLoop::observe`) on one thread: (samples, wall seconds, CPU seconds).
fn busy_loop(cfg: &Config) -> (f64, f64, f64) {
    let g = cfg.guests[0].clone();
    let id = g.identity();
    let addr = g.bridge.clone();
    let mut l = GuestLoop::new(
        Arc::new(cfg.clone()),
        g,
        Registry::new(),
        Arc::new(Events::to_writer(Box::new(Sink::default()))),
        Arc::new(Metrics::default()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut b =
            bridge_client::nonblocking::AsyncBridge::connect(&addr, &id, Duration::from_secs(10))
                .await
                .expect("connect");
        let mut sb = introspect::sensorbox::SensorBox::default();
        let (wall0, cpu0) = (Instant::now(), cpu_seconds());
        let mut n = 0u64;
        while wall0.elapsed() < Duration::from_secs(5) {
            let t = Instant::now();
            b.sensor_box_into(&mut sb).await.expect("FETCH_SB");
            let _ = l.observe(&sb, t, t.elapsed());
            n += 1;
        }
        (
            n as f64,
            wall0.elapsed().as_secs_f64(),
            cpu_seconds() - cpu0,
        )
    })
}

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (zeroed before in any case).
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The paper's monitor CPU use: busy loop 46 %, 10 ms ~5 %, 100 ms < 1 % (one 100-sensor box).
fn paper_cpu(period_ms: u64) -> &'static str {
    match period_ms {
        0 => "46",
        10 => "5",
        100 => "1",
        _ => "",
    }
}

/// Monitor CPU use at each sampling period of `periods_ms` (0: a busy loop); with `csv`, also
/// written there (`period_ms,samples_per_s,cpu_percent,paper_percent`).
fn cpu_use(periods_ms: &[u64], csv: Option<&std::path::Path>) {
    let dir = tempfile::tempdir().unwrap();
    let backdoor = 0x100_0000u64;
    let dump = dir.path().join("mem");
    sensor_box_image(&dump, 32, backdoor, 100, 200, |_| {});
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let bridge = BridgeProc::start_dump(&setup.config, &dump, (backdoor, 1 << 20));
    println!(
        "--- monitor CPU use, one guest with a 100-sensor Sensor Box, bridge in another process"
    );
    let mut rows = String::from("period_ms,samples_per_s,cpu_percent,paper_percent\n");
    for &ms in periods_ms {
        let label = if ms == 0 {
            "busy loop".to_string()
        } else {
            format!("every {ms} ms")
        };
        let cfg = config(&bridge.addr, &setup.pki(), ms.max(1), 100_000, Engine::Tcg);
        let (n, wall, cpu) = if ms == 0 {
            busy_loop(&cfg)
        } else {
            // bdmon's own dispatcher: its sampler thread, its session, its checks and gauges.
            let metrics = Arc::new(Metrics::default());
            let h = bdmon::dispatcher::start(
                Arc::new(cfg),
                Arc::new(|_: &Config, _: &GuestConfig| Registry::new()),
                Arc::new(Events::to_writer(Box::new(Sink::default()))),
                metrics.clone(),
            )
            .expect("start the dispatcher");
            std::thread::sleep(Duration::from_secs(1)); // connect, detect the patched box
            let (s0, wall0, cpu0) = (samples(&metrics), Instant::now(), cpu_seconds());
            std::thread::sleep(Duration::from_secs(5));
            let (s1, wall, cpu) = (
                samples(&metrics),
                wall0.elapsed().as_secs_f64(),
                cpu_seconds() - cpu0,
            );
            h.stop();
            (s1 - s0, wall, cpu)
        };
        println!(
            "sampling {label:<13} {:>8.0} samples/s   monitor CPU {:>5.1} % of one core",
            n / wall,
            100.0 * cpu / wall
        );
        rows.push_str(&format!(
            "{ms},{:.0},{:.2},{}\n",
            n / wall,
            100.0 * cpu / wall,
            paper_cpu(ms)
        ));
    }
    if let Some(path) = csv {
        std::fs::write(path, rows).expect("write the CPU CSV");
    }
}

fn main() {
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(5);
    let sizes: Vec<u64> = arg("--sizes")
        .unwrap_or_else(|| "100,500,1000,1500".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let repair_only = std::env::args().any(|a| a == "--repair-only");
    // --csv DIR: also write monitor-cpu.csv and table1.csv there (make experiments).
    let csv = arg("--csv").map(std::path::PathBuf::from);
    let periods: Vec<u64> = arg("--periods")
        .unwrap_or_else(|| "0,10,100".into())
        .split(',')
        .map(|v| v.parse().expect("--periods: milliseconds"))
        .collect();
    if !repair_only {
        cpu_use(
            &periods,
            csv.as_ref().map(|d| d.join("monitor-cpu.csv")).as_deref(),
        );
    }
    if std::env::args().any(|a| a == "--cpu-only") {
        return;
    }
    let engines: Vec<Engine> = arg("--engines")
        .unwrap_or_else(|| "tcg,kvm".into())
        .split(',')
        .map(|e| match e {
            "tcg" => Engine::Tcg,
            "kvm" => Engine::Kvm,
            other => panic!("--engines: unknown engine {other:?} (tcg, kvm)"),
        })
        .collect();
    println!("--- detection latency (sensor out of contract in the guest -> HM called), fork bomb of 100, tcg engine");
    for ms in [1u64, 10] {
        if repair_only {
            break;
        }
        let r = bomb_rounds(Engine::Tcg, 100, rounds, ms);
        let (med, p99) = stats(r.iter().map(|r| r.detect).collect());
        println!(
            "sampling every {ms:>2} ms: median {med:>9.2?}  max {p99:>9.2?}  ({} rounds)",
            r.len()
        );
    }
    println!(
        "--- repair time (HM called -> every process of the culprit gone), sampling every 10 ms"
    );
    println!("    (kvm: nested inside a kvm host, QEMU TCG emulating AMD-V: not hardware times)");
    let paper: HashMap<u64, u64> = [(100, 140), (500, 263), (1000, 350), (1500, 426)].into();
    // Per engine, for table1-<engine>.csv.
    let mut table1: HashMap<&str, String> = HashMap::new();
    for n in sizes {
        for &engine in &engines {
            let r = bomb_rounds(engine, n, rounds, 10);
            let n_label = format!("{} bomb of {n:>4}", engine.name());
            if r.is_empty() {
                println!("{n_label}: no complete round");
                continue;
            }
            let (med, p99) = stats(r.iter().map(|r| r.repair).collect());
            let held = r.iter().map(|r| r.held_us).max().unwrap_or(0);
            let killed = r.iter().map(|r| r.killed).max().unwrap_or(0);
            let walked = r.iter().filter(|r| r.walked).count();
            table1.entry(engine.name()).or_default().push_str(&format!(
                "{},{n},{:.1},{:.1},{},{killed},{:.2},{},{walked}\n",
                engine.name(),
                med.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                paper.get(&n).copied().unwrap_or(0),
                held as f64 / 1000.0,
                r.len()
            ));
            println!(
            "{n_label}: median {med:>9.2?}  max {p99:>9.2?}  (paper {} ms)  killed {killed}  guest held paused <= {:.1} ms  ({} rounds, {walked} walked the table)",
            paper.get(&n).copied().unwrap_or(0),
            held as f64 / 1000.0,
            r.len()
        );
        }
    }
    if let Some(dir) = csv {
        for (engine, rows) in table1 {
            let head = "engine,processes,median_ms,max_ms,paper_ms,killed,held_ms,rounds,walked\n";
            std::fs::write(
                dir.join(format!("table1-{engine}.csv")),
                format!("{head}{rows}"),
            )
            .expect("write table1-<engine>.csv");
        }
    }
}
