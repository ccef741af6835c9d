//! The healing-module API (the paper's `new_hm(handler)` and `register_sensor(hm, sensor)`).
//!
//! A healing module (HM) is a Rust value implementing [`HealingModule`]. Register it with
//! [`Registry::new_hm`], then tie it to sensors with [`Registry::register_sensor`]: one HM may watch
//! many sensors, and one sensor may have many HMs (called in registration order). The dispatcher
//! calls [`HealingModule::handle`] with the violation and a [`HealContext`] for the guest, on that
//! guest's own thread: a slow repair of one guest never delays another.
//!
//! ```
//! use bdmon::hm::{HealContext, HealOutcome, HealingModule, Registry};
//! use bdmon::contract::Violation;
//! use introspect::sensorbox::ids;
//!
//! /// Logs every file-table overflow and does nothing else.
//! struct FileTableWatch;
//!
//! impl HealingModule for FileTableWatch {
//!     fn name(&self) -> &str {
//!         "FileTableWatch"
//!     }
//!     fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome {
//!         ctx.emit("no_culprit", serde_json::json!({
//!             "hm": self.name(), "sensor": v.name, "reason": "reporting only",
//!         }));
//!         HealOutcome::Reported
//!     }
//! }
//!
//! let mut reg = Registry::new();
//! let hm = reg.new_hm(Box::new(FileTableWatch));
//! reg.register_sensor(hm, ids::FILE_TABLE_FULL);
//! assert_eq!(reg.handlers(ids::FILE_TABLE_FULL).len(), 1);
//! ```

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use introspect::repair::{Killed, Order, Spared, Victims};
use introspect::sensorbox::SensorBox;
use introspect::tasks::Process;
use serde_json::Value;

use crate::config::Config;
use crate::contract::{Checker, Violation};
use crate::events::Events;
use crate::guest::{Guest, GuestError, LockInfo};
use crate::metrics::Metrics;

/// What a handler did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealOutcome {
    /// The sensors are back within their contract.
    Healed {
        /// Lock–diagnose–repair rounds.
        rounds: u32,
        /// Processes killed.
        killed: usize,
    },
    /// Nobody is clearly to blame; nothing was done.
    NoCulprit(String),
    /// Dry run: the diagnosis was logged, nothing was killed.
    DryRun,
    /// Reported only (e.g. a hang with `action = "report"`).
    Reported,
    /// Tried and failed, or gave up after its rounds.
    NotHealed(String),
}

/// What a handler may use: the guest (through its bridge), the thresholds in force, the config,
/// the sample that showed the violation, and the event log.
pub struct HealContext<'a> {
    /// The guest.
    pub guest: &'a mut Guest,
    /// Thresholds and contract checks.
    pub checker: &'a Checker,
    /// The monitor's config (dry run, spared users, policies).
    pub cfg: &'a Config,
    /// The sample that showed the violation.
    pub sb: &'a SensorBox,
    /// The event log.
    pub events: &'a Events,
    /// Metrics.
    pub metrics: &'a Metrics,
}

impl<'a> HealContext<'a> {
    /// Logs an event for this guest.
    pub fn emit(&self, event: &str, fields: Value) {
        self.events.emit(&self.guest.cfg.name, event, fields);
    }

    /// Users no healer may kill (root always among them).
    pub fn spared(&self) -> Spared {
        Spared::new(self.cfg.spare_users.iter().copied())
    }

    /// Takes the guest's pause lock (at a moment when its task list is quiet, see
    /// [`Guest`]) and returns a guard that releases it when dropped, whatever path the healer takes
    /// out; [`Held::release`] releases it now and reports how that went.
    pub fn lock<'c>(&'c mut self, sb: &SensorBox) -> Result<Held<'c, 'a>, GuestError> {
        // Before the LOCK is asked for: the lease cannot have started earlier, so the end of
        // the lease reckoned from here is never later than the bridge's.
        let taken = Instant::now();
        let info = self.guest.lock(Some(sb))?;
        let lease = Duration::from_millis(self.guest.cfg.lease_ms);
        Ok(Held {
            ctx: self,
            info,
            held: true,
            taken,
            lease,
        })
    }
}

/// Kills are posted only while more than `1 / LEASE_MARGIN` of the lock's lease is left (500 ms
/// of the default 2 s): what is posted lands while the guest is surely still paused.
pub const LEASE_MARGIN: u32 = 4;

/// The last instant a lock whose lease `lease` was asked for at `taken` may post kills.
pub fn post_until(taken: Instant, lease: Duration) -> Instant {
    let usable = lease.saturating_sub(lease / LEASE_MARGIN);
    taken.checked_add(usable).unwrap_or(taken)
}

/// The guest's pause lock, held; the [`HealContext`] stays usable through it. Dropping it releases
/// the lock.
pub struct Held<'c, 'a> {
    ctx: &'c mut HealContext<'a>,
    /// What taking the lock cost.
    pub info: LockInfo,
    held: bool,
    taken: Instant,
    lease: Duration,
}

impl Held<'_, '_> {
    /// The last instant this lock may post kills ([`post_until`]).
    pub fn post_until(&self) -> Instant {
        post_until(self.taken, self.lease)
    }

    /// What is left of the lease before [`Held::post_until`] (zero once past it).
    pub fn lease_left(&self) -> Duration {
        self.post_until().saturating_duration_since(Instant::now())
    }

    /// The process table, walked under this lock within the guest's walk budget
    /// (`walk_entries`, `walk_ms`), and never past [`Held::post_until`]: a table read after
    /// that could not be acted on.
    pub fn processes(&mut self) -> Result<Vec<Process>, GuestError> {
        let mut limits = self.ctx.guest.cfg.walk_limits();
        limits.max_time = limits.max_time.min(self.lease_left());
        self.ctx.guest.processes_within(limits)
    }

    /// Kills `victims` under this lock ([`Guest::kill`], the one kill path): nothing is posted
    /// after [`Held::post_until`], and a direct victim whose task_struct holds another task
    /// now is left alone; both are reported in the result.
    pub fn kill(
        &mut self,
        victims: &Victims,
        table: Option<&[Process]>,
        spared: &Spared,
        sb: Option<&SensorBox>,
    ) -> Result<Killed, GuestError> {
        self.apply(Order::Kill, victims, table, spared, sb)
    }

    /// [`Held::kill`] for any [`Order`] (stop, continue, renice: patched guests only).
    pub fn apply(
        &mut self,
        order: Order,
        victims: &Victims,
        table: Option<&[Process]>,
        spared: &Spared,
        sb: Option<&SensorBox>,
    ) -> Result<Killed, GuestError> {
        let until = self.post_until();
        self.ctx
            .guest
            .apply(order, victims, table, spared, sb, Some(until))
    }

    /// Releases the lock now; returns how long it was held.
    pub fn release(mut self) -> Result<Duration, GuestError> {
        self.held = false;
        let unlocked = self.ctx.guest.unlock();
        unlocked.map(|()| self.since().elapsed())
    }

    /// When the lock was taken.
    pub fn since(&self) -> Instant {
        self.info.at.unwrap_or_else(Instant::now)
    }
}

impl<'a> Deref for Held<'_, 'a> {
    type Target = HealContext<'a>;
    fn deref(&self) -> &HealContext<'a> {
        self.ctx
    }
}

impl<'a> DerefMut for Held<'_, 'a> {
    fn deref_mut(&mut self) -> &mut HealContext<'a> {
        self.ctx
    }
}

impl Drop for Held<'_, '_> {
    fn drop(&mut self) {
        if self.held {
            if let Err(e) = self.ctx.guest.unlock() {
                tracing::warn!(guest = %self.ctx.guest.cfg.name, "unlock: {e}");
            }
        }
    }
}

/// A healing module.
pub trait HealingModule: Send {
    /// Its name, in events and metrics.
    fn name(&self) -> &str;
    /// Heals (or reports) one violation.
    fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome;
    /// Called after every sample of the guest, violated or not (e.g. to undo a reversible
    /// repair whose time is up). Called only while [`HealingModule::busy`] says there is
    /// something to do, or the sample showed a violation.
    fn on_sample(&mut self, _ctx: &mut HealContext<'_>) {}
    /// True while [`HealingModule::on_sample`] has work pending (e.g. a stopped user to resume
    /// later). A quiet sample of a guest whose HMs are all idle is checked on the sampling thread
    /// without calling any HM.
    fn busy(&self) -> bool {
        false
    }
}

/// Identifies a registered HM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HmId(pub usize);

/// The HMs of one guest and the sensors they watch.
#[derive(Default)]
pub struct Registry {
    hms: Vec<Box<dyn HealingModule>>,
    by_sensor: HashMap<u32, Vec<HmId>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// `new_hm(handler)`.
    pub fn new_hm(&mut self, hm: Box<dyn HealingModule>) -> HmId {
        self.hms.push(hm);
        HmId(self.hms.len() - 1)
    }

    /// `register_sensor(hm, sensor)`; registering twice has no further effect.
    pub fn register_sensor(&mut self, hm: HmId, sensor: u32) {
        let v = self.by_sensor.entry(sensor).or_default();
        if !v.contains(&hm) && hm.0 < self.hms.len() {
            v.push(hm);
        }
    }

    /// The HMs registered for `sensor`, in registration order.
    pub fn handlers(&self, sensor: u32) -> &[HmId] {
        self.by_sensor
            .get(&sensor)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The HM itself.
    pub fn get_mut(&mut self, id: HmId) -> Option<&mut (dyn HealingModule + 'static)> {
        self.hms.get_mut(id.0).map(|b| b.as_mut())
    }

    /// Whether any HM has work pending at the next sample ([`HealingModule::busy`]).
    pub fn busy(&self) -> bool {
        self.hms.iter().any(|h| h.busy())
    }

    /// Number of HMs registered.
    pub fn len(&self) -> usize {
        self.hms.len()
    }

    /// No HM registered.
    pub fn is_empty(&self) -> bool {
        self.hms.is_empty()
    }

    /// Sensors with at least one HM.
    pub fn sensors(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.by_sensor.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_stop_a_quarter_of_the_lease_before_it_ends() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(post_until(t, ms(2000)), t + ms(1500));
        assert_eq!(post_until(t, ms(10)), t + ms(10) - ms(10) / 4);
        assert_eq!(post_until(t, Duration::ZERO), t);
    }
}
