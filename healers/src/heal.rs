//! The repair loop shared by the process and memory healers — the paper's path, kept in one place:
//! LOCK → read the process table → policy picks the culprit → post SIGKILL through the repair hooks →
//! UNLOCK → re-check the sensors; again until they are back within their contract.
//!
//! A healer is a [`Diagnosis`] (who is to blame, and when the guest is healed) wrapped in a
//! [`Healer`], which is the [`HealingModule`] the dispatcher calls. The lock is a guard
//! ([`crate::hm::Held`]) released on every path out; the kill is [`introspect::repair::kill`].

use std::time::{Duration, Instant};

use introspect::repair::{Order, Victims};
use introspect::sensorbox::SensorBox;
use introspect::tasks::Process;
use serde_json::json;

use crate::contract::{Checker, Violation};
use crate::events::{micros, millis};
use crate::guest::{Guest, GuestError};
use crate::hm::{HealContext, HealOutcome, HealingModule};
use crate::policy::Culprit;

/// How a healer diagnoses and when it is done.
pub trait Diagnosis: Send {
    /// The healer's name, in events and metrics.
    const NAME: &'static str;

    /// Lock–diagnose–repair rounds before giving up.
    fn max_rounds(&self) -> u32;

    /// How long each round re-samples for [`Diagnosis::recovered`].
    fn settle(&self) -> Duration;

    /// Why this healer cannot work on `guest` at all (e.g. its kernel's RSS cannot be read), so
    /// that no lock is taken for it; the dispatcher has said so once already (`degraded`).
    fn unavailable(&self, _guest: &Guest) -> Option<String> {
        None
    }

    /// What the repair does to the culprit's processes.
    fn order(&self) -> Order {
        Order::Kill
    }

    /// Before the first round, without the lock held: `Ok(Some(reason))` skips the healing
    /// (nobody to blame yet, e.g. another healer's violation explains this one). A diagnosis that
    /// compares two tables takes its first one here.
    fn before(
        &mut self,
        _ctx: &mut HealContext<'_>,
        _sb: &SensorBox,
    ) -> Result<Option<String>, GuestError> {
        Ok(None)
    }

    /// A diagnosis that needs no process table (patched guests only), tried first under the lock:
    /// e.g. the kernel's own per-user fork counters name the culprit and KILL_UID kills all of
    /// the user's processes, so the walk — most of the time the guest is held paused — is
    /// skipped. `Ok(None)`: walk and call [`Diagnosis::diagnose`].
    fn quick(
        &mut self,
        _ctx: &mut HealContext<'_>,
        _sb: &SensorBox,
    ) -> Result<Option<(Culprit, u32)>, GuestError> {
        Ok(None)
    }

    /// Picks the culprit from a table read under the lock (and the fresh sample). `Ok(None)`:
    /// nobody is clearly to blame.
    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, GuestError>;

    /// True once a fresh sample shows the guest healed.
    fn recovered(&mut self, checker: &Checker, v: &Violation, sb: &SensorBox) -> bool;

    /// [`HealingModule::on_sample`]: after every sample of the guest while [`Diagnosis::busy`].
    fn on_sample(&mut self, _ctx: &mut HealContext<'_>) {}

    /// [`HealingModule::busy`].
    fn busy(&self) -> bool {
        false
    }
}

/// A [`Diagnosis`] as a healing module: the loop of [`heal`] around it.
pub struct Healer<D>(pub D);

impl<D: Diagnosis> HealingModule for Healer<D> {
    fn name(&self) -> &str {
        D::NAME
    }

    fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome {
        heal(ctx, v, &mut self.0)
    }

    fn on_sample(&mut self, ctx: &mut HealContext<'_>) {
        self.0.on_sample(ctx)
    }

    fn busy(&self) -> bool {
        self.0.busy()
    }
}

/// Why a round failed, and at which step.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {error}")]
struct RoundError {
    step: &'static str,
    error: GuestError,
}

fn at(step: &'static str) -> impl FnOnce(GuestError) -> RoundError {
    move |error| RoundError { step, error }
}

/// What one locked round found and did.
enum Round {
    /// Nobody clearly to blame (the reason).
    NoCulprit(String),
    /// Dry run: logged what would die.
    DryRun,
    /// Kills posted: how many processes the table showed (`None`: no table was walked), and the
    /// guest's process count before.
    Repaired {
        processes: Option<usize>,
        nprocs_before: Option<u64>,
    },
    /// Too little of the lock's lease was left to kill: nothing posted; lock and diagnose again.
    LeaseShort,
}

/// Runs the loop for `d` on violation `v`: at most `d.max_rounds()` rounds, each followed by up to
/// `d.settle()` of re-sampling until `d.recovered` says so.
pub fn heal<D: Diagnosis>(ctx: &mut HealContext<'_>, v: &Violation, d: &mut D) -> HealOutcome {
    let hm = D::NAME;
    if let Some(reason) = d.unavailable(ctx.guest) {
        ctx.emit(
            "no_culprit",
            json!({"hm": hm, "sensor": v.name, "reason": reason}),
        );
        return HealOutcome::NoCulprit(reason);
    }
    match d.before(ctx, ctx.sb) {
        Ok(None) => {}
        Ok(Some(reason)) => {
            ctx.emit(
                "no_culprit",
                json!({"hm": hm, "sensor": v.name, "reason": reason}),
            );
            return HealOutcome::NoCulprit(reason);
        }
        Err(e) => return not_healed(ctx, hm, v, 0, format!("before diagnosis: {e}"), false),
    }
    let (max_rounds, settle) = (d.max_rounds().max(1), d.settle());
    let called = Instant::now();
    let mut killed_total = 0usize;
    let mut sb = ctx.sb.clone();
    let mut lease_short = false;
    for round in 1..=max_rounds {
        lease_short = false;
        let (walked, nprocs_before) = match locked_round(ctx, d, &sb, round) {
            Err(e) => {
                // A hostile or corrupt task list (or one over the walk's budget), not a failed read.
                let guest_fault = matches!(&e.error, GuestError::Task(t) if t.is_guest_fault());
                if guest_fault {
                    tracing::warn!(guest = %ctx.guest.cfg.name, "{e}");
                }
                return not_healed(ctx, hm, v, round, e.to_string(), guest_fault);
            }
            Ok(Round::DryRun) => return HealOutcome::DryRun,
            Ok(Round::LeaseShort) => {
                // Lock again at once and diagnose afresh: the table may be out of date.
                lease_short = true;
                continue;
            }
            Ok(Round::NoCulprit(reason)) => {
                ctx.emit(
                    "no_culprit",
                    json!({"hm": hm, "sensor": v.name, "reason": reason}),
                );
                ctx.metrics.add(
                    "bdmon_not_healed_total",
                    &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
                    1.0,
                );
                return HealOutcome::NoCulprit(reason);
            }
            Ok(Round::Repaired {
                processes,
                nprocs_before,
            }) => {
                killed_total += processes.unwrap_or(0);
                (processes.is_some(), nprocs_before)
            }
        };
        // Re-check: sample until healed or `settle` runs out.
        let until = Instant::now() + settle;
        loop {
            match ctx.guest.sample() {
                Ok(s) => {
                    if d.recovered(ctx.checker, v, &s) {
                        if !walked {
                            // No walk: count the kill from the guest's own process count.
                            let after = s.value(introspect::sensorbox::ids::NPROCS);
                            if let (Some(b), Some(a)) = (nprocs_before, after) {
                                // Both counts come from the guest: saturate, never wrap.
                                let gone =
                                    usize::try_from(b.saturating_sub(a)).unwrap_or(usize::MAX);
                                killed_total = killed_total.saturating_add(gone);
                            }
                        }
                        let recovered = v.sampled_at.elapsed();
                        ctx.emit(
                            "healed",
                            json!({"hm": hm, "sensor": v.name, "rounds": round, "killed": killed_total,
                                   "detected_at_ms": crate::events::now_ms()
                                       .saturating_sub(millis(recovered)),
                                   "hm_called_us": micros(called.duration_since(v.sampled_at)),
                                   "recovered_us": micros(recovered)}),
                        );
                        ctx.metrics.add(
                            "bdmon_repairs_total",
                            &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
                            1.0,
                        );
                        return HealOutcome::Healed {
                            rounds: round,
                            killed: killed_total,
                        };
                    }
                    sb = s;
                }
                Err(e) => tracing::debug!("re-check sample: {e}"),
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let reason = if lease_short {
        "the lock's lease was nearly over before every kill; raise lease_ms (the walk or the \
         bridge is slow)"
    } else {
        "sensors still out of contract"
    };
    not_healed(ctx, hm, v, max_rounds, reason.into(), false)
}

/// One round under the lock: diagnose (quick, or from a walked table), log the diagnosis, kill.
/// The lock is a guard: every way out of this function releases it.
fn locked_round<D: Diagnosis>(
    ctx: &mut HealContext<'_>,
    d: &mut D,
    sb: &SensorBox,
    round: u32,
) -> Result<Round, RoundError> {
    let hm = D::NAME;
    let spared = ctx.spared();
    let mut held = ctx.lock(sb).map_err(at("lock"))?;
    let info = held.info;
    // A dry run walks, to show exactly which processes would die.
    let quick = if held.guest.stock() || held.cfg.dry_run {
        None
    } else {
        d.quick(&mut held, sb).map_err(at("diagnosis"))?
    };
    let (table, culprit) = match quick {
        Some((c, uid)) => (None, Some((c, Victims::Uid(uid)))),
        None => {
            let t = held.processes().map_err(at("diagnosis"))?;
            let c = d.diagnose(&mut held, &t, sb).map_err(at("diagnosis"))?;
            (Some(t), c)
        }
    };
    let Some((c, victims)) = culprit else {
        return Ok(Round::NoCulprit(format!(
            "no clear culprit among {} processes (round {round})",
            table.map(|t| t.len()).unwrap_or(0)
        )));
    };
    let pids: Vec<u32> = table
        .as_deref()
        .map(|t| victims.select(t, &spared))
        .unwrap_or_default()
        .iter()
        .map(|p| p.task.pid)
        .collect();
    held.emit(
        "diagnosis",
        json!({"hm": hm, "round": round, "policy": c.policy, "uid": c.uid, "score": c.score,
               "runner_up": c.runner_up, "processes": table.as_ref().map(|t| t.len()),
               "victims": table.as_ref().map(|_| pids.len()),
               "lock_attempts": info.attempts, "lock_forced": info.forced}),
    );
    if held.cfg.dry_run {
        drop(held);
        ctx.emit(
            "repair",
            json!({"hm": hm, "round": round, "dry_run": true, "uid": c.uid,
                   "order": d.order(), "would_kill": pids}),
        );
        return Ok(Round::DryRun);
    }
    // The kill must land while the guest is surely still paused: with too little of the lease
    // left (a slow walk or bridge), post nothing and go round again.
    if held.lease_left().is_zero() {
        let since = held.since();
        drop(held);
        ctx.emit(
            "lease_short",
            json!({"hm": hm, "round": round, "uid": c.uid, "victims": pids.len(),
                   "lease_ms": ctx.guest.cfg.lease_ms, "locked_us": micros(since.elapsed()),
                   "reason": "too little of the lock's lease left to kill; nothing posted"}),
        );
        return Ok(Round::LeaseShort);
    }
    let killed = held.apply(d.order(), &victims, table.as_deref(), &spared, Some(sb));
    let released = held.release();
    let (killed, held_for) = killed
        .and_then(|k| released.map(|h| (k, h)))
        .map_err(at("repair"))?;
    ctx.metrics.add(
        "bdmon_killed_total",
        &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
        killed.processes.unwrap_or(0) as f64,
    );
    ctx.emit(
        "repair",
        json!({"hm": hm, "round": round, "uid": c.uid, "order": killed.order,
               // Unknown until the re-check when no table was walked (see `healed`).
               "killed": killed.processes,
               "requests": killed.requests, "how": killed.how, "pids": killed.pids,
               // Left alone: their task_struct holds another task now; not posted: lease short.
               "stale": killed.stale, "late": killed.late,
               "lock_ns": info.lock_ns, "lock_held_us": micros(held_for),
               "dry_run": false}),
    );
    Ok(Round::Repaired {
        processes: killed.processes,
        nprocs_before: sb.value(introspect::sensorbox::ids::NPROCS),
    })
}

fn not_healed(
    ctx: &mut HealContext<'_>,
    hm: &str,
    v: &Violation,
    round: u32,
    reason: String,
    guest_fault: bool,
) -> HealOutcome {
    // `guest_fault`: the guest's task lists are hostile, corrupt or over the walk's budget
    // (introspect::tasks::TaskError::is_guest_fault), not a failed read.
    ctx.emit(
        "not_healed",
        json!({"hm": hm, "sensor": v.name, "rounds": round, "reason": reason,
               "guest_fault": guest_fault}),
    );
    ctx.metrics.add(
        "bdmon_not_healed_total",
        &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
        1.0,
    );
    HealOutcome::NotHealed(reason)
}
