//! The repair loop shared by the process and memory healers — the paper's path, kept in one place:
//! LOCK → read the process table → policy picks the culprit → post SIGKILL through the repair hooks →
//! UNLOCK → re-check the sensors; again until they are back within their contract.

use std::time::{Duration, Instant};

use introspect::sensorbox::SensorBox;
use introspect::tasks::Process;
use serde_json::json;

use crate::contract::{Checker, Violation};
use crate::hm::{HealContext, HealOutcome};
use crate::policy::Culprit;

/// Whom to kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Victims {
    /// Every process of this user.
    Uid(u32),
    /// These processes.
    Pids(Vec<u32>),
}

/// How a healer diagnoses and when it is done.
pub trait Diagnosis {
    /// A diagnosis that needs no process table (patched guests only), tried first under the lock:
    /// e.g. the kernel's own per-user fork counters name the culprit and KILL_UID kills all of
    /// the user's processes, so the walk — most of the time the guest is held paused — is
    /// skipped. `Ok(None)`: walk and call [`Diagnosis::diagnose`].
    fn quick(
        &mut self,
        _ctx: &mut HealContext<'_>,
        _sb: &SensorBox,
    ) -> Result<Option<(Culprit, u32)>, String> {
        Ok(None)
    }

    /// Picks the culprit from a table read under the lock (and the fresh sample). `Ok(None)`:
    /// nobody is clearly to blame.
    fn diagnose(
        &mut self,
        ctx: &mut HealContext<'_>,
        table: &[Process],
        sb: &SensorBox,
    ) -> Result<Option<(Culprit, Victims)>, String>;

    /// True once a fresh sample shows the guest healed.
    fn recovered(&mut self, checker: &Checker, v: &Violation, sb: &SensorBox) -> bool;
}

/// Runs the loop for `hm` on violation `v`: at most `max_rounds` rounds, each followed by up to
/// `settle` of re-sampling until `d.recovered` says so.
pub fn heal(
    hm: &str,
    ctx: &mut HealContext<'_>,
    v: &Violation,
    d: &mut dyn Diagnosis,
    max_rounds: u32,
    settle: Duration,
) -> HealOutcome {
    let called = Instant::now();
    let spared = ctx.spared();
    let mut killed_total = 0usize;
    let mut sb = ctx.sb.clone();
    for round in 1..=max_rounds.max(1) {
        let info = match ctx.guest.lock(Some(&sb)) {
            Ok(i) => i,
            Err(e) => return not_healed(ctx, hm, v, round, format!("lock: {e}")),
        };
        let locked_at = info.at.unwrap_or_else(Instant::now);
        // A dry run walks, to show exactly which processes would die.
        let quick = if ctx.guest.stock() || ctx.cfg.dry_run {
            Ok(None)
        } else {
            d.quick(ctx, &sb)
        };
        let diag = match quick {
            Ok(Some((c, uid))) => Ok((None, Some((c, Victims::Uid(uid))))),
            Ok(None) => ctx
                .guest
                .processes()
                .and_then(|t| d.diagnose(ctx, &t, &sb).map(|c| (Some(t), c))),
            Err(e) => Err(e),
        };
        let (table, culprit) = match diag {
            Ok((t, Some(c))) => (t, c),
            Ok((t, None)) => {
                let _ = ctx.guest.unlock();
                let reason = format!(
                    "no clear culprit among {} processes (round {round})",
                    t.map(|t| t.len()).unwrap_or(0)
                );
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
            Err(e) => {
                let _ = ctx.guest.unlock();
                return not_healed(ctx, hm, v, round, format!("diagnosis: {e}"));
            }
        };
        let (c, victims) = culprit;
        let nprocs_before = sb.value(introspect::sensorbox::ids::NPROCS);
        let pids: Vec<u32> = table
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|p| match &victims {
                Victims::Uid(u) => p.task.uid == *u,
                Victims::Pids(v) => v.contains(&p.task.pid),
            })
            .filter(|p| crate::policy::killable(p, &spared))
            .map(|p| p.task.pid)
            .collect();
        ctx.emit(
            "diagnosis",
            json!({"hm": hm, "round": round, "policy": c.policy, "uid": c.uid, "score": c.score,
                   "runner_up": c.runner_up, "processes": table.as_ref().map(|t| t.len()),
                   "victims": table.as_ref().map(|_| pids.len()),
                   "lock_attempts": info.attempts, "lock_forced": info.forced}),
        );
        if ctx.cfg.dry_run {
            let _ = ctx.guest.unlock();
            ctx.emit(
                "repair",
                json!({"hm": hm, "round": round, "dry_run": true, "uid": c.uid, "would_kill": pids}),
            );
            return HealOutcome::DryRun;
        }
        let killed = match &victims {
            Victims::Uid(u) => ctx.guest.kill_uid(*u, table.as_deref(), &spared, Some(&sb)),
            Victims::Pids(p) => match &table {
                Some(t) => ctx.guest.kill_pids(p, t, &spared, Some(&sb)),
                None => Err("a kill by pid needs the process table".into()),
            },
        };
        let unlocked = ctx.guest.unlock();
        let held = locked_at.elapsed();
        let killed = match killed.and_then(|k| unlocked.map(|_| k)) {
            Ok(k) => k,
            Err(e) => return not_healed(ctx, hm, v, round, format!("repair: {e}")),
        };
        killed_total += killed.processes;
        ctx.metrics.add(
            "bdmon_killed_total",
            &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
            killed.processes as f64,
        );
        ctx.emit(
            "repair",
            json!({"hm": hm, "round": round, "uid": c.uid,
                   // Unknown until the re-check when no table was walked (see `healed`).
                   "killed": table.as_ref().map(|_| killed.processes),
                   "requests": killed.requests, "how": killed.how, "pids": pids,
                   "lock_ns": info.lock_ns, "lock_held_us": held.as_micros() as u64,
                   "dry_run": false}),
        );
        // Re-check: sample until healed or `settle` runs out.
        let until = Instant::now() + settle;
        loop {
            match ctx.guest.sample() {
                Ok(s) => {
                    if d.recovered(ctx.checker, v, &s) {
                        if table.is_none() {
                            // No walk: count the kill from the guest's own process count.
                            let after = s.value(introspect::sensorbox::ids::NPROCS);
                            if let (Some(b), Some(a)) = (nprocs_before, after) {
                                killed_total += b.saturating_sub(a) as usize;
                            }
                        }
                        let recovered = v.sampled_at.elapsed();
                        ctx.emit(
                            "healed",
                            json!({"hm": hm, "sensor": v.name, "rounds": round, "killed": killed_total,
                                   "detected_at_ms": crate::events::now_ms()
                                       .saturating_sub(recovered.as_millis() as u64),
                                   "hm_called_us": called.duration_since(v.sampled_at).as_micros() as u64,
                                   "recovered_us": recovered.as_micros() as u64}),
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
    not_healed(
        ctx,
        hm,
        v,
        max_rounds,
        "sensors still out of contract".into(),
    )
}

fn not_healed(
    ctx: &mut HealContext<'_>,
    hm: &str,
    v: &Violation,
    round: u32,
    reason: String,
) -> HealOutcome {
    ctx.emit(
        "not_healed",
        json!({"hm": hm, "sensor": v.name, "rounds": round, "reason": reason}),
    );
    ctx.metrics.add(
        "bdmon_not_healed_total",
        &[("guest", &ctx.guest.cfg.name), ("hm", hm)],
        1.0,
    );
    HealOutcome::NotHealed(reason)
}
