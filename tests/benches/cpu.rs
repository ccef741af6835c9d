//! CPU healing timings, release build, both engines side by side (kvm inside the kvm host with
//! bdmon outside it: nested, not hardware times — compare the engines' ratios):
//!
//! * **CPU hogs** — the `cpuhog` scenario (30 CPU-bound processes of user1 next to `useful` of
//!   user2) healed by CPU_Share_Healer with each action (`renice`, `stop`, `kill`);
//! * **hung CPU** — the `hang` scenario (root's SCHED_FIFO spinner, RT throttling off) freed in
//!   place by the hang detector (`free_cpu = "stop"`, `free_root = true`).
//!
//! Per round: **detect** = from the fault's start (its console line, seen by this process) to
//! bdmon's `violation` event; **repair** = from that event to `healed` (for CPU_SHARE this holds
//! the `window_ms` = 500 ms between the two walks); **held** = the longest the guest was held
//! paused by one lock of the repair. Medians and p99 over the rounds.
//!
//! `cargo bench -p backdoors-tests --bench cpu [-- --rounds N --engines tcg,kvm --cases renice,stop,kill,hang]`

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backdoors_tests::bench::{arg, stats};
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::site::{Engine, Site};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;
use serde_json::Value;

const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["sb", "ram"],
    write: &["hooks"],
    restart: false,
    lock: true,
    regs: true,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One round's timings, in ms.
struct Round {
    detect: u64,
    repair: u64,
    held_us: u64,
}

fn round(engine: Engine, case: &str) -> Result<Round, String> {
    let img = Images::load();
    let (scenario, started, extra, hm) = match case {
        "hang" => (
            "bd.scenario=hang bd.after=3",
            "SCENARIO hang: spinning",
            "[hang]\naction = \"report\"\nfree_cpu = \"stop\"\nfree_root = true\n".to_string(),
            "Hang_Detector",
        ),
        action => (
            "bd.scenario=cpuhog bd.iterations=12",
            "SCENARIO cpuhog: fault starts",
            format!("[cpu]\naction = \"{action}\"\nresume_after_s = 0\n"),
            "CPU_Share_Healer",
        ),
    };
    let mut spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        &format!("quiet bd.halt=wait {scenario}"),
    );
    spec.site = Some(Site::remote_host(engine));
    let mut vm = Vm::start(&spec);
    vm.wait_for("BACKDOORS: scenario", Duration::from_secs(180))?;
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &[MON], 1, 1000);
    let bridge = BridgeProc::start(&vm, &setup);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = format!(
        "sample_ms = 10\nevents = \"events.jsonl\"\nspare_users = [1001]\n{extra}\n\
         [[guest]]\nname = \"vm1\"\nbridge = \"{}\"\npki = \"{}\"\nmonitor = \"mon1\"\n",
        bridge.addr,
        setup.pki().display()
    );
    let mut mon = backdoors_tests::start_bdmon(dir.path(), &cfg);
    vm.wait_for(started, Duration::from_secs(120))?;
    let fault = now_ms();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let events = loop {
        let ev = backdoors_tests::bdmon_events(dir.path());
        if ev.iter().any(|e| e["event"] == "healed" && e["hm"] == hm) {
            break ev;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("not healed: {ev:#?}\n{}", mon.output()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    mon.terminate(Duration::from_secs(10));
    let ts = |e: &Value| e["ts_ms"].as_u64().unwrap_or(0);
    let healed = events
        .iter()
        .find(|e| e["event"] == "healed" && e["hm"] == hm)
        .map(ts)
        .unwrap_or(0);
    let violation = events
        .iter()
        .filter(|e| e["event"] == "violation" && ts(e) <= healed)
        .filter(|e| {
            e["hms"]
                .as_array()
                .is_some_and(|h| h.iter().any(|n| n == hm))
        })
        .map(ts)
        .find(|&t| t + 50 >= fault)
        .ok_or("no violation")?;
    let held_us = events
        .iter()
        .filter(|e| e["event"] == "repair" && e["hm"] == hm)
        .filter_map(|e| e["lock_held_us"].as_u64())
        .max()
        .unwrap_or(0);
    Ok(Round {
        detect: violation.saturating_sub(fault),
        repair: healed.saturating_sub(violation),
        held_us,
    })
}

fn main() {
    let rounds: usize = arg("--rounds").and_then(|r| r.parse().ok()).unwrap_or(3);
    let engines = arg("--engines").unwrap_or_else(|| "tcg,kvm".into());
    let cases = arg("--cases").unwrap_or_else(|| "renice,stop,kill,hang".into());
    println!("CPU healing, {rounds} round(s) per case (ms; held: longest lock of the repair)");
    println!(
        "{:<6} {:<7} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "engine", "case", "detect p50", "detect p99", "repair p50", "repair p99", "held p50 (ms)"
    );
    for engine in engines.split(',').filter_map(Engine::parse) {
        for case in cases.split(',') {
            let mut all = Vec::new();
            for i in 0..rounds {
                match round(engine, case) {
                    Ok(r) => all.push(r),
                    Err(e) => eprintln!("{} {case} round {i}: {e}", engine.name()),
                }
            }
            if all.is_empty() {
                continue;
            }
            let ms = |f: fn(&Round) -> u64| {
                stats(all.iter().map(|r| Duration::from_millis(f(r))).collect())
            };
            let (d50, d99) = ms(|r| r.detect);
            let (r50, r99) = ms(|r| r.repair);
            let (h50, _) = stats(
                all.iter()
                    .map(|r| Duration::from_micros(r.held_us))
                    .collect(),
            );
            println!(
                "{:<6} {:<7} {:>12} {:>12} {:>12} {:>12} {:>14.1}",
                engine.name(),
                case,
                d50.as_millis(),
                d99.as_millis(),
                r50.as_millis(),
                r99.as_millis(),
                h50.as_secs_f64() * 1000.0
            );
        }
    }
}
