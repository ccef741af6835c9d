//! CPU_Share_Healer: one user's processes take the CPU from everyone else.
//!
//! Sensor: `NR_RUNNING` (runnable tasks summed over CPUs) above its threshold. Policy
//! `CPU_SHARE`: from two walks of the process table `window_ms` apart, each process's CPU time
//! delta (`se.sum_exec_runtime`); the user whose processes used the largest share of all CPU time
//! in the window is the culprit if that share is above `max_share` and another user's task is
//! runnable (waiting). Root, kernel threads and spared users are never named.
//!
//! Actions (`[cpu] action`): `renice` (`RENICE_UID`: every process of the user at `nice`),
//! `stop` (`STOP_UID`, undone by `CONT_UID` after `resume_after_s` or by `bdmon resume-user`) —
//! both carried out by a patched guest kernel — or `kill`. A fork bomb or a memory hog is not
//! this healer's to judge: while `NPROCS`, `MAXPROC_RATE_PERUID` or `FREE_PAGES` is out of
//! contract it does nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use introspect::repair::{killable, Order, Spared, Victims};
use introspect::sensorbox::{ids, SensorBox};
use introspect::tasks::Process;
use serde_json::json;

use crate::config::{CpuAction, CpuConfig};
use crate::contract::{Checker, Violation};
use crate::guest::GuestError;
use crate::heal::{Diagnosis, Healer};
use crate::hm::HealContext;
use crate::policy::Culprit;

/// The healer: [`CpuShare`]'s diagnosis in the shared loop.
pub type CpuShareHealer = Healer<CpuShare>;

/// A process, by pid and start time (a reused pid is another process).
type Key = (u32, u64);

/// CPU_Share_Healer's diagnosis.
pub struct CpuShare {
    cfg: CpuConfig,
    /// The previous table's CPU times, and when it was read.
    last: Option<(Instant, HashMap<Key, u64>)>,
    /// `REPAIRS_APPLIED` when a renice was posted (a renice leaves NR_RUNNING as it was: it is
    /// done once the guest kernel has carried it out).
    reniced_at: Option<u64>,
    /// Users stopped, and when.
    stopped: Vec<(u32, Instant)>,
    /// A renice leaves NR_RUNNING where it was: after one, no diagnosis (no lock) before this.
    quiet_until: Option<Instant>,
}

/// How long after a renice CPU_Share_Healer leaves NR_RUNNING's violation alone: the reniced user
/// keeps its runnable tasks, and diagnosing again at every sample would pause the guest for
/// nothing.
pub const RENICE_QUIET: Duration = Duration::from_secs(60);

impl Healer<CpuShare> {
    /// With this config.
    pub fn new(cfg: CpuConfig) -> Self {
        Healer(CpuShare {
            cfg,
            last: None,
            reniced_at: None,
            stopped: Vec::new(),
            quiet_until: None,
        })
    }

    /// The sensors it watches.
    pub const SENSORS: [u32; 1] = [ids::NR_RUNNING];
}

/// Sensors whose violation means another healer's case (a fork bomb, a memory hog).
const OTHERS: [u32; 3] = [ids::NPROCS, ids::MAXPROC_RATE_PERUID, ids::FREE_PAGES];

fn cpu_times(table: &[Process]) -> HashMap<Key, u64> {
    table
        .iter()
        .map(|p| ((p.task.pid, p.task.start_time), p.cpu_ns))
        .collect()
}

/// The policy `CPU_SHARE`: the user with the largest share of the CPU time used between `before`
/// and `table`, if above `max_share` while another user's task waits.
pub fn cpu_share(
    before: &HashMap<Key, u64>,
    table: &[Process],
    max_share: f64,
    spared: &Spared,
) -> Option<Culprit> {
    let mut by_uid: HashMap<u32, u64> = HashMap::new();
    let mut total = 0u64;
    for p in table {
        // A process new since the first walk used all its CPU time within the window.
        let was = before
            .get(&(p.task.pid, p.task.start_time))
            .copied()
            .unwrap_or(0);
        let d = p.cpu_ns.saturating_sub(was);
        total = total.saturating_add(d);
        if killable(p, spared) {
            *by_uid.entry(p.task.uid).or_default() += d;
        }
    }
    if total == 0 {
        return None;
    }
    let mut users: Vec<(u32, u64)> = by_uid.into_iter().collect();
    users.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let &(uid, used) = users.first()?;
    let share = used as f64 / total as f64;
    let waiting = table
        .iter()
        .any(|p| p.task.uid != uid && !p.task.kthread && p.task.state == 'R');
    (share > max_share && waiting).then(|| Culprit {
        uid,
        policy: "CPU_SHARE",
        score: per_mille(used, total),
        // Shares in per mille.
        runner_up: users.get(1).map_or(0, |&(_, n)| per_mille(n, total)),
    })
}

/// `part / total` in per mille, rounded.
fn per_mille(part: u64, total: u64) -> u64 {
    let pm = (u128::from(part) * 1000 + u128::from(total) / 2) / u128::from(total.max(1));
    u64::try_from(pm).unwrap_or(u64::MAX)
}

impl CpuShare {
    fn window(&self) -> Duration {
        Duration::from_millis(self.cfg.window_ms)
    }
}

impl Diagnosis for CpuShare {
    const NAME: &'static str = "CPU_Share_Healer";

    fn max_rounds(&self) -> u32 {
        self.cfg.max_rounds
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(2500)
    }

    fn order(&self) -> Order {
        match self.cfg.action {
            CpuAction::Renice => Order::Renice(self.cfg.nice),
            CpuAction::Stop => Order::Stop,
            CpuAction::Kill => Order::Kill,
        }
    }

    fn unavailable(&self, guest: &crate::guest::Guest) -> Option<String> {
        (self.cfg.action != CpuAction::Kill && guest.stock()).then(|| {
            format!(
                "[cpu] action = {:?} needs the repair-hook mailbox of a patched guest kernel; \
                 this guest's kernel is stock (use action = \"kill\")",
                self.cfg.action
            )
            .to_lowercase()
        })
    }

    fn before(
        &mut self,
        ctx: &mut HealContext<'_>,
        sb: &SensorBox,
    ) -> Result<Option<String>, GuestError> {
        if let Some(left) = self
            .quiet_until
            .and_then(|u| u.checked_duration_since(Instant::now()))
        {
            return Ok(Some(format!(
                "a user was reniced {} s ago; not looking again for {} s",
                (RENICE_QUIET - left).as_secs(),
                left.as_secs()
            )));
        }
        self.reniced_at = None;
        if let Some(s) = OTHERS
            .iter()
            .filter_map(|id| sb.sensor(*id))
            .find(|s| !ctx.checker.level_ok(s))
        {
            return Ok(Some(format!(
                "{} is out of contract too: the process or memory healer's case",
                s.name
            )));
        }
        // A table from the last window or so is the first of the two; else read one now.
        let fresh = self
            .last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() <= self.window() * 3);
        if !fresh {
            let table = {
                let mut held = ctx.lock(sb)?;
                let t = held.processes()?;
                held.release()?;
                t
            };
            self.last = Some((Instant::now(), cpu_times(&table)));
            std::thread::sleep(self.window());
        }
        Ok(None)
    }

    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, GuestError> {
        let before = self
            .last
            .replace((Instant::now(), cpu_times(table)))
            .map(|(_, t)| t)
            .unwrap_or_default();
        let c = cpu_share(&before, table, self.cfg.max_share, &ctx.spared());
        if let Some(c) = &c {
            if self.cfg.action == CpuAction::Renice && !ctx.cfg.dry_run {
                self.reniced_at = Some(sb.value(ids::REPAIRS_APPLIED).unwrap_or(0));
            }
            if self.cfg.action == CpuAction::Stop && !ctx.cfg.dry_run {
                self.stopped.retain(|(u, _)| *u != c.uid);
                self.stopped.push((c.uid, Instant::now()));
            }
        }
        Ok(c.map(|c| {
            let uid = c.uid;
            (c, Victims::Uid(uid))
        }))
    }

    fn on_sample(&mut self, ctx: &mut HealContext<'_>) {
        self.resume_due(ctx);
    }

    fn busy(&self) -> bool {
        self.cfg.resume_after_s != 0 && !self.stopped.is_empty()
    }

    fn recovered(&mut self, checker: &Checker, _v: &Violation, sb: &SensorBox) -> bool {
        if let Some(at) = self.reniced_at {
            let done = sb.value(ids::REPAIRS_APPLIED).is_some_and(|n| n > at);
            if done {
                self.quiet_until = Some(Instant::now() + RENICE_QUIET);
            }
            return done;
        }
        CpuShareHealer::SENSORS
            .iter()
            .filter_map(|id| sb.sensor(*id))
            .all(|s| checker.level_ok(s))
    }
}

impl CpuShare {
    /// Resumes the users whose stop has lasted `resume_after_s`: one `CONT_UID` each, under one
    /// lock. Called after every sample; does nothing (and takes no lock) when no stop is due.
    pub fn resume_due(&mut self, ctx: &mut HealContext<'_>) {
        if self.cfg.resume_after_s == 0 || self.stopped.is_empty() {
            return;
        }
        let after = Duration::from_secs(self.cfg.resume_after_s);
        let due: Vec<u32> = self
            .stopped
            .iter()
            .filter(|(_, at)| at.elapsed() >= after)
            .map(|(u, _)| *u)
            .collect();
        if due.is_empty() {
            return;
        }
        self.stopped.retain(|(u, _)| !due.contains(u));
        let spared = ctx.spared();
        for uid in due {
            let r = ctx.guest.resume_user(uid, &spared);
            ctx.emit(
                "resumed",
                json!({"hm": Self::NAME, "uid": uid, "after_s": self.cfg.resume_after_s,
                       "error": r.err().map(|e| e.to_string())}),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::proc;

    fn with_cpu(mut p: Process, ns: u64) -> Process {
        p.cpu_ns = ns;
        p
    }

    #[test]
    fn the_user_with_most_cpu_time_in_the_window_is_named() {
        let before: HashMap<Key, u64> = [((10, 10_000_000), 1_000), ((20, 20_000_000), 5_000)]
            .into_iter()
            .collect();
        // uid 1000: pid 10 (+9000 ns) and pid 11, new (3000 ns); uid 1001: pid 20 (+1000 ns).
        let table = vec![
            with_cpu(proc(10, 1, 1000, 2, 0), 10_000),
            with_cpu(proc(11, 1, 1000, 2, 0), 3_000),
            with_cpu(proc(20, 1, 1001, 2, 0), 6_000),
        ];
        let c = cpu_share(&before, &table, 0.75, &Spared::root()).unwrap();
        assert_eq!((c.uid, c.score, c.runner_up), (1000, 923, 77));
        // Spared: nobody else is above the share.
        assert!(cpu_share(&before, &table, 0.75, &Spared::new([1000])).is_none());
        // A fair split names nobody.
        assert!(cpu_share(&before, &table, 0.95, &Spared::root()).is_none());
    }

    #[test]
    fn nobody_is_named_when_no_one_else_waits() {
        let mut other = proc(20, 1, 1001, 2, 0);
        other.task.state = 'S';
        let table = vec![with_cpu(proc(10, 1, 1000, 2, 0), 10_000), other];
        assert!(cpu_share(&HashMap::new(), &table, 0.5, &Spared::root()).is_none());
    }
}
