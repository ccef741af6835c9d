//! `make experiments`: the paper's Figures 2 and 3 on real guests, with the healers users run
//! today as baselines, written as CSV for `scripts/plot_experiments.py`.
//!
//! One guest (Debian's root filesystem image on the patched kernel, redis running) runs `useful`
//! as user2; after `BASELINE` iterations a fault starts as user1, capped at `x` processes:
//! - `fig2-cpu`: a CPU-bound fork bomb of x processes; `fig2-io`: the same I/O-bound;
//! - `fig3-mem`: a memory hog of x self-respawning children of `MEM_MB` MiB each.
//!
//! The y value is `useful`'s mean iteration time over the iterations that *start* within the
//! fault's first `WINDOW` seconds (guest time, from useful's own clock; an iteration still
//! running when the window ends counts whole, so a crippled guest shows its real stall). Each
//! point is a fresh guest, and every healer meets the same fault:
//! - `none`: nothing but the kernel (for the memory hog, the kernel's OOM killer alone);
//! - `nproc`: RLIMIT_NPROC of `NPROC` processes for user1 (fork bombs);
//! - `earlyoom`: Debian's earlyoom in the guest, defaults (memory hog);
//! - `bdmon`: bdmon on this machine through the guest's bridge, sampling every 10 ms (NPROCS
//!   threshold `NPROCS_ABOVE` above the guest's own count), attached before the fault starts.
//!
//! `cargo bench -p backdoors-tests --bench experiments -- [--engines tcg,kvm]
//!  [--figures fig2-cpu,fig2-io,fig3-mem] [--x 25,50,100,200,400]
//!  [--healers none,nproc,earlyoom,bdmon] [--out docs/figures]`
//! writes `<out>/<figure>-<engine>.csv` (one row per point) and prints each row as it comes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backdoors_tests::bench::arg;
use backdoors_tests::bridge::{BridgeProc, BridgeSetup};
use backdoors_tests::rootfs::{RootfsGuest, RootfsSpec};
use backdoors_tests::site::Engine;
use introspect::sensorbox::ids;

/// useful's iterations before the fault: about 7 s on tcg, long enough for bdmon to attach.
const BASELINE: u64 = 100;
/// The measured window after the fault starts, guest seconds.
const WINDOW: f64 = 10.0;
/// The fault's own bound (it ends by itself after this, healed or not).
const FAULT_SECONDS: u64 = 15;
/// RLIMIT_NPROC of the `nproc` baseline: a per-user limit an operator might set.
const NPROC: u64 = 64;
/// bdmon's NPROCS threshold above the guest's quiet count.
const NPROCS_ABOVE: u64 = 25;
/// MiB per memory-hog child.
const MEM_MB: u64 = 16;
/// Guest RAM, MiB.
const GUEST_MIB: u64 = 512;
const BOOT: Duration = Duration::from_secs(300);
const USER2: u32 = 1001;

#[derive(Clone, Copy, PartialEq)]
enum Healer {
    None,
    Nproc,
    Earlyoom,
    Bdmon,
}

impl Healer {
    fn name(self) -> &'static str {
        match self {
            Healer::None => "none",
            Healer::Nproc => "nproc",
            Healer::Earlyoom => "earlyoom",
            Healer::Bdmon => "bdmon",
        }
    }
}

#[derive(Clone, Copy)]
struct Figure {
    name: &'static str,
    healers: &'static [Healer],
    /// Kernel parameters of the fault with x processes.
    fault: fn(u64) -> String,
    default_x: &'static [u64],
}

const FIGURES: &[Figure] = &[
    Figure {
        name: "fig2-cpu",
        healers: &[Healer::None, Healer::Nproc, Healer::Bdmon],
        fault: |x| format!("bd.scenario=forkbomb bd.mode=cpu bd.max={x}"),
        default_x: &[25, 50, 100, 200, 400],
    },
    Figure {
        name: "fig2-io",
        healers: &[Healer::None, Healer::Nproc, Healer::Bdmon],
        fault: |x| format!("bd.scenario=forkbomb bd.mode=io bd.max={x}"),
        default_x: &[25, 50, 100, 200, 400],
    },
    Figure {
        name: "fig3-mem",
        healers: &[Healer::None, Healer::Earlyoom, Healer::Bdmon],
        fault: |x| format!("bd.scenario=memhog bd.children={x} bd.mb={MEM_MB}"),
        default_x: &[8, 16, 24, 32, 40],
    },
];

struct Point {
    baseline_ms: f64,
    mean_ms: f64,
    median_ms: f64,
    iterations: usize,
    repairs: usize,
    /// The healing modules that repaired, `+`-separated.
    hms: String,
    oom_kills: usize,
    /// bdmon's first sample came before the fault (always true for the other healers).
    attached_before: bool,
}

/// useful's iteration times (ms) before and after the console's "fault starts" line.
fn iterations(console: &str) -> (Vec<f64>, Vec<f64>) {
    let (mut before, mut after, mut started) = (Vec::new(), Vec::new(), false);
    for line in console.lines() {
        if line.starts_with("SCENARIO") && line.contains("fault starts") {
            started = true;
        }
        if let Some(us) = line
            .strip_prefix("USEFUL iter=")
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|f| f.strip_prefix("wall_us="))
            .and_then(|v| v.parse::<f64>().ok())
        {
            if started { &mut after } else { &mut before }.push(us / 1000.0);
        }
    }
    (before, after)
}

/// The iterations that started within the window, and whether the window is over.
fn in_window(after: &[f64]) -> (Vec<f64>, bool) {
    let (mut t, mut v) = (0.0, Vec::new());
    for &ms in after {
        if t >= WINDOW * 1000.0 {
            return (v, true);
        }
        v.push(ms);
        t += ms;
    }
    let over = t >= WINDOW * 1000.0;
    (v, over)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

fn run_point(engine: Engine, fig: &Figure, healer: Healer, x: u64) -> Result<Point, String> {
    let mut params = format!(
        "quiet {} bd.seconds={FAULT_SECONDS} bd.iterations=1000000 bd.baseline={BASELINE}",
        (fig.fault)(x)
    );
    match healer {
        Healer::Nproc => params.push_str(&format!(" bd.nproc={NPROC}")),
        Healer::Earlyoom => params.push_str(" bd.earlyoom=yes"),
        Healer::None | Healer::Bdmon => {}
    }
    let mut spec = RootfsSpec::new(engine, &params);
    spec.mem = GUEST_MIB;
    let mut g = RootfsGuest::start(&spec);
    g.vm.wait_for("BACKDOORS: scenario", BOOT)?;
    if healer == Healer::Earlyoom && !g.vm.stdout().contains("BACKDOORS: service earlyoom up") {
        return Err(format!(
            "earlyoom is not running in the guest\n{}",
            g.vm.diagnostics()
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut mon = None;
    let mut _bridge = None;
    let mut attached_before = true;
    if healer == Healer::Bdmon {
        let setup = BridgeSetup::one_monitor(&g.vm.site().listen_addr(), false);
        let bridge = BridgeProc::start(&g.vm, &setup);
        let mut b = bridge.connect(&setup.id("mon1"));
        let quiet = b
            .sensor_box()
            .map_err(|e| format!("Sensor Box: {e}"))?
            .value(ids::NPROCS)
            .ok_or("no NPROCS")?;
        let table = rdma_bridge::client::BridgeMem::new(b)
            .process_table(None)
            .map_err(|e| format!("process table: {e}"))?
            .value;
        let redis = table
            .iter()
            .find(|p| p.task.comm == "redis-server")
            .map(|p| p.task.uid)
            .ok_or("no redis-server in the process table")?;
        let cfg = format!(
            "sample_ms = 10\nevents = \"events.jsonl\"\nspare_users = [{USER2}, {redis}]\n\
             [[guest]]\nname = \"vm1\"\nbridge = \"{}\"\npki = \"{}\"\nmonitor = \"mon1\"\n{}\
             [guest.thresholds]\nNPROCS = {}\n",
            bridge.addr,
            setup.pki().display(),
            engine.bdmon_guest_limits(),
            quiet + NPROCS_ABOVE
        );
        mon = Some(backdoors_tests::start_bdmon(dir.path(), &cfg));
        // bdmon says "watching" as it starts sampling: the fault must not have started yet.
        attached_before = !g.vm.stdout().contains("fault starts");
        _bridge = Some((bridge, setup));
    }
    // Until the window is over (the fault's own bound ends any stall), bounded.
    let deadline = Instant::now() + Duration::from_secs(FAULT_SECONDS + 240);
    let console = loop {
        let console = g.vm.stdout();
        let (_, after) = iterations(&console);
        if in_window(&after).1 {
            break console;
        }
        if let Some(st) = g.vm.try_exit() {
            return Err(format!(
                "the guest ended ({st}) before the window did\n{}",
                g.vm.diagnostics()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the window did not end in time\n{}",
                g.vm.diagnostics()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let events = backdoors_tests::bdmon_events(dir.path());
    if let Some(m) = &mut mon {
        let _ = m.terminate(Duration::from_secs(10));
    }
    let (before, after) = iterations(&console);
    let (win, _) = in_window(&after);
    Ok(Point {
        baseline_ms: median(&before),
        mean_ms: win.iter().sum::<f64>() / win.len().max(1) as f64,
        median_ms: median(&win),
        iterations: win.len(),
        repairs: events.iter().filter(|e| e["event"] == "repair").count(),
        hms: {
            let mut h: Vec<&str> = events
                .iter()
                .filter(|e| e["event"] == "repair")
                .filter_map(|e| e["hm"].as_str())
                .collect();
            h.sort_unstable();
            h.dedup();
            h.join("+")
        },
        oom_kills: console.matches("Out of memory: Killed process").count(),
        attached_before,
    })
}

fn main() {
    let engines: Vec<Engine> = arg("--engines")
        .unwrap_or_else(|| "tcg".into())
        .split(',')
        .map(|e| Engine::parse(e).unwrap_or_else(|| panic!("--engines: tcg or kvm, not {e}")))
        .collect();
    let figures: Vec<&Figure> = match arg("--figures") {
        None => FIGURES.iter().collect(),
        Some(list) => list
            .split(',')
            .map(|n| {
                FIGURES
                    .iter()
                    .find(|f| f.name == n)
                    .unwrap_or_else(|| panic!("--figures: no figure {n}"))
            })
            .collect(),
    };
    let xs: Option<Vec<u64>> = arg("--x").map(|l| {
        l.split(',')
            .map(|v| v.parse().expect("--x: numbers"))
            .collect()
    });
    let only: Option<Vec<String>> =
        arg("--healers").map(|l| l.split(',').map(str::to_owned).collect());
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/figures")
            .display()
            .to_string()
    }));
    std::fs::create_dir_all(&out).expect("--out directory");
    let t0 = Instant::now();
    for &engine in &engines {
        for fig in &figures {
            let path = out.join(format!("{}-{}.csv", fig.name, engine.name()));
            let mut csv = std::fs::File::create(&path).expect("create CSV");
            writeln!(
                csv,
                "healer,x,baseline_ms,mean_ms,median_ms,iterations,repairs,hms,oom_kills,bdmon_attached"
            )
            .unwrap();
            for &x in xs.as_deref().unwrap_or(fig.default_x) {
                for &h in fig.healers {
                    if only
                        .as_ref()
                        .is_some_and(|o| !o.iter().any(|n| n == h.name()))
                    {
                        continue;
                    }
                    // A point whose guest or kvm host fails to start (the harness panics)
                    // is an empty row, not the end of an hour's run.
                    let point = std::panic::catch_unwind(|| run_point(engine, fig, h, x))
                        .unwrap_or_else(|_| Err("the harness panicked (above)".into()));
                    let row = match point {
                        Ok(p) => format!(
                            "{},{x},{:.1},{:.1},{:.1},{},{},{},{},{}",
                            h.name(),
                            p.baseline_ms,
                            p.mean_ms,
                            p.median_ms,
                            p.iterations,
                            p.repairs,
                            p.hms,
                            p.oom_kills,
                            p.attached_before
                        ),
                        Err(why) => {
                            eprintln!("{} {} {} x={x}: {why}", fig.name, engine.name(), h.name());
                            format!("{},{x},,,,,,,,", h.name())
                        }
                    };
                    println!(
                        "{:>6.0}s {} {} {row}",
                        t0.elapsed().as_secs_f64(),
                        fig.name,
                        engine.name()
                    );
                    writeln!(csv, "{row}").unwrap();
                    csv.flush().unwrap();
                }
            }
            println!("wrote {}", path.display());
        }
    }
    println!("experiments took {:.0} s", t0.elapsed().as_secs_f64());
}
