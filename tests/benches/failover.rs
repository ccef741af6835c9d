//! Session failover timings and the talk's "Failover throughput" and "Failover latency"
//! figures: for each engine and fault, one run of `backdoors_tests::failover` (two guests, the
//! auction service, 60 client sessions, the primary failed mid-run), then
//! - detection (fault → bdmon's violation), the failover's own steps (bdmon's `failover` event:
//!   extract, import, takeover), and fault → the first reply the standby served;
//! - the clients' replies per second and median/p99 latency per 100 ms, as CSV and as a figure
//!   (`scripts/plot_failover.py`, matplotlib) in `docs/figures/failover-<engine>-<fault>.{csv,svg,png}`.
//!
//! `cargo bench -p backdoors-tests --bench failover -- [--engines tcg,kvm] [--faults freeze,panic,softhang,netdown]`
//! (default: both engines, the frozen-vCPU fault). Needs the guest images (`make images`).

use std::path::PathBuf;
use std::time::Duration;

use backdoors_tests::bench::arg;
use backdoors_tests::failover::{self, Fault, Report};
use backdoors_tests::site::Engine;

fn figures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/figures")
}

/// Unix ms of the first request's start: time 0 of the series.
fn t0_ms(r: &Report) -> u64 {
    r.load
        .requests
        .iter()
        .map(|q| q.start_ns / 1_000_000)
        .min()
        .unwrap_or(r.fault_ms)
}

/// When the standby began to take over (Unix ms): the `failover` event's time less its
/// takeover step.
fn takeover_ms(r: &Report) -> Option<u64> {
    let f = r.failover()?;
    let at = f["ts_ms"].as_u64()?;
    let took = f["takeover_us"].as_u64()? / 1000;
    Some(at.saturating_sub(took))
}

fn main() {
    let engines: Vec<Engine> = arg("--engines")
        .unwrap_or_else(|| "tcg,kvm".into())
        .split(',')
        .map(|e| Engine::parse(e).unwrap_or_else(|| panic!("unknown engine {e}")))
        .collect();
    let faults: Vec<Fault> = arg("--faults")
        .unwrap_or_else(|| "freeze".into())
        .split(',')
        .map(|f| {
            *Fault::ALL
                .iter()
                .find(|x| x.name() == f)
                .unwrap_or_else(|| panic!("unknown fault {f}"))
        })
        .collect();
    std::fs::create_dir_all(figures_dir()).expect("docs/figures");
    println!(
        "engine fault      sessions wrong detect_ms extract_ms import_ms takeover_ms failover_total_ms fault_to_first_backup_reply_ms db"
    );
    for &engine in &engines {
        for &fault in &faults {
            let r = failover::run(engine, fault);
            let t0 = t0_ms(&r);
            let violation = r
                .events
                .iter()
                .filter(|e| e["event"] == "violation")
                .filter_map(|e| e["ts_ms"].as_u64())
                .find(|&t| t >= r.fault_ms);
            let f = r.failover().cloned().unwrap_or_default();
            let ms = |k: &str| f[k].as_u64().map(|us| format!("{:.1}", us as f64 / 1000.0));
            let takeover = takeover_ms(&r);
            let first_backup = takeover.and_then(|tk| {
                r.load
                    .requests
                    .iter()
                    .filter(|q| q.ok && q.end_ns / 1_000_000 >= tk)
                    .map(|q| q.end_ns / 1_000_000)
                    .min()
            });
            println!(
                "{:<6} {:<10} {:>8} {:>5} {:>9} {:>10} {:>9} {:>11} {:>17} {:>30} {}",
                engine.name(),
                fault.name(),
                r.load.completed,
                r.load.wrong.len(),
                violation.map_or("-".into(), |v| (v - r.fault_ms).to_string()),
                ms("extract_us").unwrap_or("-".into()),
                ms("import_us").unwrap_or("-".into()),
                ms("takeover_us").unwrap_or("-".into()),
                ms("total_us").unwrap_or("-".into()),
                first_backup.map_or("-".into(), |t| (t - r.fault_ms).to_string()),
                if r.check.is_clean() {
                    "exactly-once"
                } else {
                    "NOT CLEAN"
                },
            );
            let base = figures_dir().join(format!("failover-{}-{}", engine.name(), fault.name()));
            let series = auction::series::series(&r.load, Duration::from_millis(100));
            let csv = base.with_extension("csv");
            std::fs::write(&csv, auction::series::to_csv(&series)).expect("write the CSV");
            let title = format!(
                "Failover ({} engine, {}): 60 sessions, bdmon moves them to the standby",
                engine.name(),
                fault.name()
            );
            // Debian's python3 has python3-matplotlib; another python3 first on PATH may not.
            let python = if std::path::Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3"
            } else {
                "python3"
            };
            let st = std::process::Command::new(python)
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/plot_failover.py"))
                .arg(&csv)
                .arg(&base)
                .arg(&title)
                .arg((r.fault_ms.saturating_sub(t0)).to_string())
                .arg(takeover.map_or(0, |t| t.saturating_sub(t0)).to_string())
                .status();
            match st {
                Ok(s) if s.success() => println!("  figure: {}.{{svg,png}}", base.display()),
                other => println!(
                    "  no figure ({other:?}): apt-get install python3-matplotlib; the CSV is {}",
                    csv.display()
                ),
            }
            if !r.check.is_clean() || !r.load.wrong.is_empty() {
                println!(
                    "  {}",
                    r.diagnostics
                        .lines()
                        .take(40)
                        .collect::<Vec<_>>()
                        .join("\n  ")
                );
            }
        }
    }
}
