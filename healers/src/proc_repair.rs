//! Proc_Repair_Healer: fork bombs and runaway process counts.
//!
//! Sensors: `NPROCS` and `MAXPROC_RATE_PERUID`. Policies, tried in the configured order until one
//! names a clear culprit: `RATE_TOO_HIGH` (the user forking faster than the threshold — on a patched
//! guest from the kernel's per-user fork counters, so short-lived processes cannot dodge the count;
//! on a stock kernel from live processes started in the last second), `TOO_MANY_PROCS` (the user
//! with most processes), `TREE_TOO_DEEP` (the user with the deepest process tree). The repair kills
//! every process of the culprit, under the lock, and repeats until both sensors are back within
//! their contract.

use std::time::Duration;

use introspect::repair::Victims;
use introspect::sensorbox::{ids, SensorBox};
use introspect::tasks::Process;

use crate::config::{ProcConfig, ProcPolicy};
use crate::contract::{Checker, Violation};
use crate::guest::GuestError;
use crate::heal::{Diagnosis, Healer};
use crate::hm::HealContext;
use crate::policy::{self, Culprit};

/// Default forks/s for RATE_TOO_HIGH when neither the config nor the guest gives one.
pub const DEFAULT_RATE: u64 = 200;

/// The healer: [`ProcRepair`]'s diagnosis in the shared loop.
pub type ProcRepairHealer = Healer<ProcRepair>;

/// Proc_Repair_Healer's diagnosis.
pub struct ProcRepair {
    cfg: ProcConfig,
}

impl Healer<ProcRepair> {
    /// With these policies.
    pub fn new(cfg: ProcConfig) -> Self {
        Healer(ProcRepair { cfg })
    }

    /// The sensors it watches.
    pub const SENSORS: [u32; 2] = [ids::NPROCS, ids::MAXPROC_RATE_PERUID];
}

impl ProcRepair {
    fn rate_threshold(&self, ctx: &HealContext<'_>, sb: &SensorBox) -> u64 {
        self.cfg
            .rate_threshold
            .or_else(|| {
                sb.sensor(ids::MAXPROC_RATE_PERUID)
                    .map(|s| ctx.checker.threshold(s))
            })
            .unwrap_or(DEFAULT_RATE)
    }
}

impl Diagnosis for ProcRepair {
    const NAME: &'static str = "Proc_Repair_Healer";

    fn max_rounds(&self) -> u32 {
        self.cfg.max_rounds
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(2500)
    }

    fn quick(
        &mut self,
        ctx: &mut HealContext<'_>,
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, u32)>, GuestError> {
        if self.cfg.policies.first() != Some(&ProcPolicy::RATE_TOO_HIGH) {
            return Ok(None);
        }
        let Some(rates) = ctx.guest.fork_rates(sb)? else {
            return Ok(None);
        };
        let threshold = self.rate_threshold(ctx, sb);
        Ok(
            policy::rate_too_high(&rates, threshold, &ctx.spared()).map(|c| {
                let uid = c.uid;
                (c, uid)
            }),
        )
    }

    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, GuestError> {
        let spared = ctx.spared();
        for p in &self.cfg.policies {
            let c = match p {
                ProcPolicy::TOO_MANY_PROCS => policy::too_many_procs(table, &spared),
                ProcPolicy::TREE_TOO_DEEP => policy::tree_too_deep(table, &spared),
                ProcPolicy::RATE_TOO_HIGH => {
                    let threshold = self.rate_threshold(ctx, sb);
                    let rates = match ctx.guest.fork_rates(sb)? {
                        Some(r) => r,
                        None => policy::recent_starts(table, 1_000_000_000),
                    };
                    policy::rate_too_high(&rates, threshold, &spared)
                }
            };
            if let Some(c) = c {
                return Ok(Some((c.clone(), Victims::Uid(c.uid))));
            }
        }
        Ok(None)
    }

    fn recovered(&mut self, checker: &Checker, _v: &Violation, sb: &SensorBox) -> bool {
        ProcRepairHealer::SENSORS
            .iter()
            .filter_map(|id| sb.sensor(*id))
            .all(|s| checker.level_ok(s))
    }
}
