//! bdmon: the remote healer. It attaches to one or many guests through their bridges, samples
//! their Sensor Boxes, and calls healing modules when a sensor breaks its contract.
//!
//! Data flow of one healing (see `DESIGN.md`): FETCH_SB ([`guest::Guest::sample`]) → violated
//! sensor ([`contract::Checker`]) → the ED dispatches to its HMs ([`dispatcher`]) → the HM takes the
//! LOCK, reads the process table over bridge READs, its policy picks the culprit ([`policy`]) and
//! posts SIGKILL through the repair hooks (bridge WRITEs, Guard-checked) → UNLOCK → re-check
//! ([`heal`]) → events with timings ([`events`]).
//!
//! * [`hm`] — the HM API: `new_hm`, `register_sensor`, and how to write one.
//! * [`proc_repair`], [`mem_reclaim`], [`hang`] — the paper's healers and hang detection;
//!   [`cpu_share`] — CPU hogs (renice, stop or kill), and [`hang`] frees a CPU one task holds;
//!   [`failover`] — a hung guest's sessions (State Boxes) moved to a standby front end.
//! * [`budget`] — first, do no harm: the pause budget bdmon holds itself to, and the backoff of
//!   failing steps.
//! * [`config`] — the TOML file; [`metrics`] — Prometheus text.

pub mod budget;
pub mod config;
pub mod contract;
pub mod cpu_share;
pub mod dispatcher;
pub mod events;
pub mod failover;
pub mod files;
pub mod guest;
pub mod hang;
pub mod heal;
pub mod hm;
pub mod mem_reclaim;
pub mod membership;
pub mod metrics;
pub mod policy;
pub mod proc_repair;
pub mod top;

use config::{Config, GuestConfig};
use hm::Registry;

/// The HMs bdmon registers for every guest, as the config enables them: Proc_Repair_Healer on
/// NPROCS and MAXPROC_RATE_PERUID, Mem_Reclaim_Healer on OOM_KILLER_RUNNING, FREE_PAGES and
/// OOM_KILLS, CPU_Share_Healer on NR_RUNNING, and the hang detector on the progress sensors.
pub fn default_registry(cfg: &Config, _guest: &GuestConfig) -> Registry {
    let mut reg = Registry::new();
    if cfg.proc.enabled {
        let hm = reg.new_hm(Box::new(proc_repair::ProcRepairHealer::new(
            cfg.proc.clone(),
        )));
        for s in proc_repair::ProcRepairHealer::SENSORS {
            reg.register_sensor(hm, s);
        }
    }
    if cfg.mem.enabled {
        let hm = reg.new_hm(Box::new(mem_reclaim::MemReclaimHealer::new(
            cfg.mem.clone(),
        )));
        for s in mem_reclaim::MemReclaimHealer::SENSORS {
            reg.register_sensor(hm, s);
        }
    }
    if cfg.cpu.enabled {
        let hm = reg.new_hm(Box::new(cpu_share::CpuShareHealer::new(cfg.cpu.clone())));
        for s in cpu_share::CpuShareHealer::SENSORS {
            reg.register_sensor(hm, s);
        }
    }
    let hm = reg.new_hm(Box::new(hang::HangDetector::new(cfg.hang.clone())));
    for s in hang::HangDetector::SENSORS
        .into_iter()
        .chain(hang::HangDetector::device_sensors())
    {
        reg.register_sensor(hm, s);
    }
    reg
}
