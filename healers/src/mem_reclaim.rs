//! Mem_Reclaim_Healer: memory hogs.
//!
//! Sensors: `OOM_KILLER_RUNNING` (the guest entered its OOM handler again) and `FREE_PAGES` (below
//! its floor); on a stock kernel, whose virtual sensors cannot see OOM-handler entries, `OOM_KILLS`
//! and `FREE_PAGES`. Policies: `MAX_RSS` (the largest process and the same-user ancestors that would
//! respawn it), `MAX_RSSUID` (every process of the user holding most memory), `MAX_RSSUID_SAVEUID`
//! (the same, never touching the configured `save_users`). A controller that respawns its children
//! dies with them: a user kill takes all of the user's processes, and MAX_RSS takes the ancestors.

use std::time::{Duration, Instant};

use introspect::sensorbox::{ids, SensorBox};
use introspect::tasks::Process;

use crate::config::{MemConfig, MemPolicy};
use crate::contract::{Checker, Violation};
use crate::heal::{self, Diagnosis, Victims};
use crate::hm::{HealContext, HealOutcome, HealingModule};
use crate::policy::{self, Culprit};

/// The healer.
pub struct MemReclaimHealer {
    cfg: MemConfig,
    oom_seen: Option<u64>,
    calm_since: Option<Instant>,
}

/// How long memory must stay calm after a kill to count as healed.
pub const CALM: Duration = Duration::from_millis(300);

impl MemReclaimHealer {
    /// With this policy.
    pub fn new(cfg: MemConfig) -> Self {
        MemReclaimHealer {
            cfg,
            oom_seen: None,
            calm_since: None,
        }
    }

    /// The sensors it watches.
    pub const SENSORS: [u32; 3] = [ids::OOM_KILLER_RUNNING, ids::FREE_PAGES, ids::OOM_KILLS];
}

impl Diagnosis for MemReclaimHealer {
    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, String> {
        self.oom_seen = sb
            .value(ids::OOM_KILLER_RUNNING)
            .or(sb.value(ids::OOM_KILLS));
        self.calm_since = None;
        let mut spared = ctx.spared();
        Ok(match self.cfg.policy {
            MemPolicy::MAX_RSS => {
                policy::max_rss(table, &spared).map(|(c, p)| (c, Victims::Pids(p)))
            }
            MemPolicy::MAX_RSSUID => {
                policy::max_rss_uid(table, &spared).map(|c| (c.clone(), Victims::Uid(c.uid)))
            }
            MemPolicy::MAX_RSSUID_SAVEUID => {
                spared.extend(&self.cfg.save_users);
                policy::max_rss_uid(table, &spared).map(|mut c| {
                    c.policy = "MAX_RSSUID_SAVEUID";
                    (c.clone(), Victims::Uid(c.uid))
                })
            }
        })
    }

    fn recovered(&mut self, checker: &Checker, _v: &Violation, sb: &SensorBox) -> bool {
        // Healed: free memory above its floor and no new entry to the OOM handler, for
        // [`CALM`] in a row (the kill lands at the guest's next tick, memory is freed after).
        let free_ok = sb
            .sensor(ids::FREE_PAGES)
            .is_none_or(|s| checker.level_ok(s));
        let oom_now = sb
            .value(ids::OOM_KILLER_RUNNING)
            .or(sb.value(ids::OOM_KILLS));
        if !free_ok || oom_now != self.oom_seen {
            self.oom_seen = oom_now;
            self.calm_since = None;
            return false;
        }
        let since = *self.calm_since.get_or_insert_with(Instant::now);
        since.elapsed() >= CALM
    }
}

impl HealingModule for MemReclaimHealer {
    fn name(&self) -> &str {
        "Mem_Reclaim_Healer"
    }

    fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome {
        let rounds = self.cfg.max_rounds;
        heal::heal(
            "Mem_Reclaim_Healer",
            ctx,
            v,
            self,
            rounds,
            Duration::from_millis(1000),
        )
    }
}
