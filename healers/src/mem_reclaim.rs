//! Mem_Reclaim_Healer: memory hogs.
//!
//! Sensors: `OOM_KILLER_RUNNING` (the guest entered its OOM handler again) and `FREE_PAGES` (below
//! its floor); on a stock kernel, whose virtual sensors cannot see OOM-handler entries, `OOM_KILLS`
//! and `FREE_PAGES`. Policies: `MAX_RSS` (the largest process and the same-user ancestors that would
//! respawn it), `MAX_RSSUID` (every process of the user holding most memory), `MAX_RSSUID_SAVEUID`
//! (the same, never touching the configured `save_users`). A controller that respawns its children
//! dies with them: a user kill takes all of the user's processes, and MAX_RSS takes the ancestors.
//!
//! The policies need resident set sizes: on a kernel whose `mm_struct.rss_stat` introspect cannot
//! read in any shape it knows, this healer does nothing (and takes no lock) for that guest; the
//! dispatcher says so once with a `degraded` event, and every other healer keeps working.

use std::time::{Duration, Instant};

use introspect::repair::Victims;
use introspect::sensorbox::{ids, SensorBox};
use introspect::tasks::Process;

use crate::config::{MemConfig, MemPolicy};
use crate::contract::{Checker, Violation};
use crate::guest::{Guest, GuestError};
use crate::heal::{Diagnosis, Healer};
use crate::hm::HealContext;
use crate::policy::{self, Culprit};

/// The healer: [`MemReclaim`]'s diagnosis in the shared loop.
pub type MemReclaimHealer = Healer<MemReclaim>;

/// Mem_Reclaim_Healer's diagnosis.
pub struct MemReclaim {
    cfg: MemConfig,
    oom_seen: Option<u64>,
    calm_since: Option<Instant>,
}

/// How long memory must stay calm after a kill to count as healed.
pub const CALM: Duration = Duration::from_millis(300);

impl Healer<MemReclaim> {
    /// With this policy.
    pub fn new(cfg: MemConfig) -> Self {
        Healer(MemReclaim {
            cfg,
            oom_seen: None,
            calm_since: None,
        })
    }

    /// The sensors it watches.
    pub const SENSORS: [u32; 3] = [ids::OOM_KILLER_RUNNING, ids::FREE_PAGES, ids::OOM_KILLS];
}

impl Diagnosis for MemReclaim {
    const NAME: &'static str = "Mem_Reclaim_Healer";

    fn max_rounds(&self) -> u32 {
        self.cfg.max_rounds
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(1000)
    }

    fn unavailable(&self, guest: &Guest) -> Option<String> {
        guest
            .rss_unresolved()
            .map(|u| format!("memory policies disabled for this guest: {u}"))
    }

    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, GuestError> {
        self.oom_seen = sb
            .value(ids::OOM_KILLER_RUNNING)
            .or(sb.value(ids::OOM_KILLS));
        self.calm_since = None;
        let spared = ctx.spared();
        Ok(match self.cfg.policy {
            MemPolicy::MAX_RSS => policy::max_rss(table, &spared, self.cfg.min_culprit_pages())
                .map(|(c, p)| (c, Victims::Pids(p))),
            MemPolicy::MAX_RSSUID => {
                policy::max_rss_uid(table, &spared, self.cfg.min_culprit_pages())
                    .map(|c| (c.clone(), Victims::Uid(c.uid)))
            }
            MemPolicy::MAX_RSSUID_SAVEUID => {
                let spared = spared.with(self.cfg.save_users.iter().copied());
                policy::max_rss_uid(table, &spared, self.cfg.min_culprit_pages()).map(|mut c| {
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
