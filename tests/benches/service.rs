//! redis-server under attack in a guest, healed by bdmon and then not, on both engines: the
//! latency its clients see, from `redis-benchmark` windows (`backdoors_tests::service`).
//!
//! `cargo bench -p backdoors-tests --bench service [-- --engines tcg,kvm --attacks cpu,mem
//!  --csv-dir DIR]`
//!
//! Per run it prints the window table (start and end relative to the load's start, throughput,
//! p50, p99 of each window) and one summary line: the baseline p99 (median of the baseline
//! windows), the worst p99 while the healed attack ran, how long from the attack to bdmon's last
//! repair, how long from that repair until a window's p99 was back within 1.2x the baseline, the
//! p99 the test judges (the median p99 of the first windows from 2 s after the repair), and what
//! the same attack did without bdmon. With `--csv-dir`, each run's windows also go to
//! `service-<engine>-<attack>.csv`, and the moments to mark (attacks, last repair, baseline p99)
//! to `service-<engine>-<attack>-marks.csv` (make experiments plots them).

use backdoors_tests::bench::arg;
use backdoors_tests::load::Outcome;
use backdoors_tests::service::{self, Attack};
use backdoors_tests::site::Engine;

fn main() {
    let engines = arg("--engines").unwrap_or_else(|| "tcg,kvm".into());
    let attacks = arg("--attacks").unwrap_or_else(|| "cpu,mem".into());
    let csv_dir = arg("--csv-dir").map(std::path::PathBuf::from);
    for e in engines.split(',') {
        let engine = match e {
            "tcg" => Engine::Tcg,
            "kvm" => Engine::Kvm,
            other => panic!("unknown engine {other}: give tcg or kvm"),
        };
        for a in attacks.split(',') {
            let attack = match a {
                "cpu" => Attack::ForkBomb,
                "mem" => Attack::MemoryHog,
                other => panic!("unknown attack {other}: give cpu or mem"),
            };
            let r = service::run(engine, attack);
            println!("{}", r.text());
            let rel = |t: u64| t.saturating_sub(r.t0_ms);
            let worst_healed = r
                .windows
                .iter()
                .filter(|w| {
                    w.end_ms >= r.healed_attack_ms
                        && r.last_repair_ms.is_some_and(|l| w.start_ms <= l)
                })
                .filter_map(|w| w.p99())
                .fold(0.0, f64::max);
            let back_ms = r.last_repair_ms.and_then(|l| {
                r.windows
                    .iter()
                    .find(|w| w.start_ms >= l && w.p99().is_some_and(|p| p <= r.baseline_p99 * 1.2))
                    .map(|w| w.end_ms.saturating_sub(l))
            });
            println!(
                "summary {:<3} {:<3} baseline_p99_ms={:.3} healed_worst_p99_ms={:.3} attack_to_last_repair_ms={} repair_to_p99_back_ms={} p99_from_2s_after_repair_ms={:.3} unhealed_failed_windows={}/{} unhealed_worst_p99_ms={:.3} redis_pid_kept={}",
                engine.name(),
                attack.kind(),
                r.baseline_p99,
                worst_healed,
                r.last_repair_ms.map(|l| l.saturating_sub(r.healed_attack_ms)).map_or("none".into(), |v| v.to_string()),
                back_ms.map_or("never".into(), |v| v.to_string()),
                r.p99_2s_after_repair().unwrap_or(f64::NAN),
                r.crippled_failures(),
                r.crippled_windows().len(),
                r.crippled_worst_p99(),
                r.pid_after_heal.as_deref() == Some(r.pid_before.as_str()),
            );
            if let Some(dir) = &csv_dir {
                std::fs::create_dir_all(dir).expect("csv dir");
                let mut csv = String::from("start_ms,end_ms,outcome,rps,p50_ms,p99_ms\n");
                for w in &r.windows {
                    let (o, rps, p50, p99) = match &w.outcome {
                        Outcome::Done {
                            rps,
                            p50_ms,
                            p99_ms,
                        } => (
                            "done",
                            rps.to_string(),
                            p50_ms.to_string(),
                            p99_ms.to_string(),
                        ),
                        Outcome::TimedOut => {
                            ("timeout", String::new(), String::new(), String::new())
                        }
                        Outcome::Failed(_) => {
                            ("failed", String::new(), String::new(), String::new())
                        }
                    };
                    csv.push_str(&format!(
                        "{},{},{o},{rps},{p50},{p99}\n",
                        rel(w.start_ms),
                        rel(w.end_ms)
                    ));
                }
                let base = format!("service-{}-{}", engine.name(), attack.kind());
                std::fs::write(dir.join(format!("{base}.csv")), csv).expect("write csv");
                // The moments the figure marks, ms on the same axis.
                let mut marks = format!(
                    "mark,t_ms\nbaseline_p99_ms,{}\nhealed_attack,{}\n",
                    r.baseline_p99,
                    rel(r.healed_attack_ms)
                );
                if let Some(l) = r.last_repair_ms {
                    marks.push_str(&format!("last_repair,{}\n", rel(l)));
                }
                marks.push_str(&format!(
                    "unhealed_attack,{}\nunhealed_over,{}\n",
                    rel(r.crippled_ms.0),
                    rel(r.crippled_ms.1)
                ));
                std::fs::write(dir.join(format!("{base}-marks.csv")), marks).expect("write marks");
            }
        }
    }
}
