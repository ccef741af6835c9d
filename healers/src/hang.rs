//! Hang detection: progress sensors (TIMER_TICKS, CONTEXT_SWITCHES, CPU_PROGRESS) that stop
//! advancing while bdvmm says the vCPUs run. The dispatcher confirms "running" with the bridge's
//! STATUS before a stall reaches this HM, so a guest paused by a monitor is never reported as hung.
//!
//! **A CPU freed in place.** When the timer ticks still advance, the kernel is alive and the
//! stall is a CPU that one task keeps from the others (an RT spinner with RT throttling off): under
//! the lock, each CPU's runqueue names its current task and how long it has held the CPU
//! ([`introspect::cpus`]); the process of the task that has held a contended CPU longest (at least
//! `min_hold_ms`) is stopped or killed (`free_cpu`) — never init, a kernel thread, a spared user's
//! or (unless `free_root`) root's — and the sensor re-checked. Only if it does not recover is the
//! configured `action` (report, command, restart) taken.

use std::process::Command;
use std::time::{Duration, Instant};

use introspect::sensorbox::ids;
use serde_json::json;

use introspect::repair::{Order, Victims};
use introspect::sensorbox::SensorBox;

use crate::config::{FreeCpu, HangAction, HangConfig};
use crate::contract::{Breach, Violation};
use crate::guest::GuestError;
use crate::hm::{HealContext, HealOutcome, HealingModule};

/// Reports (and acts on) a hung guest at most once per this period.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Why a held CPU was not freed (the `no_culprit` event's reason).
#[derive(Debug, thiserror::Error)]
pub enum NotFreed {
    /// `free_cpu = "off"`.
    #[error("free_cpu = \"off\"")]
    Off,
    /// No CPU is held long enough.
    #[error("no CPU has run one task for {min_hold_ms} ms while others wait")]
    NoneHeld {
        /// The hold that counts.
        min_hold_ms: u64,
    },
    /// The holder is not in the process table.
    #[error("CPU {cpu}'s task ({task:#x}) is not a process of the table (a kernel thread?)")]
    NotAProcess {
        /// The CPU.
        cpu: u32,
        /// Its task_struct.
        task: u64,
    },
    /// The holder may not be touched.
    #[error("{what}: {why}")]
    Refused {
        /// The CPU, task and hold, as the events show them.
        what: serde_json::Value,
        /// Why not.
        why: &'static str,
    },
    /// Dry run: logged, not done.
    #[error("dry run")]
    DryRun,
    /// The request was not posted (the holder's task_struct changed, or the lease ran short).
    #[error("nothing posted (stale or late)")]
    NothingPosted,
}

/// How long to wait for a timer tick before deciding the kernel's ticks stopped.
pub const TICK_CHECK: Duration = Duration::from_millis(100);
/// How long a stalled sensor has to advance after its CPU was freed.
pub const RECOVER_WITHIN: Duration = Duration::from_secs(3);
/// Longest the hang command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The hang detector.
pub struct HangDetector {
    cfg: HangConfig,
    last: Option<Instant>,
    /// This boot's sessions were moved to the standby (`[guest.failover]`): done once.
    failed_over: bool,
}

impl HangDetector {
    /// With this action.
    pub fn new(cfg: HangConfig) -> Self {
        HangDetector {
            cfg,
            last: None,
            failed_over: false,
        }
    }

    /// The sensors it watches: the kernel's progress, and the Progress Box (a service's
    /// interrupts, packets and connections: no contract unless the operator gives one).
    pub const SENSORS: [u32; 6] = [
        ids::TIMER_TICKS,
        ids::CONTEXT_SWITCHES,
        ids::CPU_PROGRESS,
        ids::IRQS,
        ids::NET_RX_PACKETS,
        ids::TCP_ACCEPTS,
    ];

    /// The per-device Progress Box sensors it also watches (`NET_RX:<dev>`, `NET_IRQS:<dev>`).
    pub fn device_sensors() -> std::ops::Range<u32> {
        ids::NET_DEV..ids::NET_DEV + 2 * ids::NET_DEVS
    }

    /// Frees a CPU held by one task (see the module's documentation). `Ok(None)`: no CPU is
    /// held, or its holder may not be touched (the reason); `Ok(Some(pid))`: its process was
    /// stopped or killed.
    fn free_cpu(
        &self,
        ctx: &mut HealContext<'_>,
        sb: &SensorBox,
    ) -> Result<Result<u32, NotFreed>, GuestError> {
        let order = match self.cfg.free_cpu {
            FreeCpu::Stop => Order::Stop,
            FreeCpu::Kill => Order::Kill,
            FreeCpu::Off => return Ok(Err(NotFreed::Off)),
        };
        let spared = if self.cfg.free_root {
            ctx.spared().allowing_root()
        } else {
            ctx.spared()
        };
        let min_hold = self.cfg.min_hold_ms.saturating_mul(1_000_000);
        let mut held = ctx.lock(sb)?;
        let lock_ns = held.info.lock_ns;
        let cpus = held.guest.cpus()?;
        let Some(cpu) = cpus
            .iter()
            .filter(|c| c.contended() && c.held_ns.is_some_and(|h| h >= min_hold))
            .max_by_key(|c| c.held_ns)
            .copied()
        else {
            return Ok(Err(NotFreed::NoneHeld {
                min_hold_ms: self.cfg.min_hold_ms,
            }));
        };
        let table = held.processes()?;
        let Some(p) = table.iter().find(|p| p.thread_addrs.contains(&cpu.curr)) else {
            return Ok(Err(NotFreed::NotAProcess {
                cpu: cpu.cpu,
                task: cpu.curr,
            }));
        };
        let what = json!({"cpu": cpu.cpu, "pid": p.task.pid, "comm": p.task.comm,
                          "uid": p.task.uid, "held_ms": cpu.held_ns.unwrap_or(0) / 1_000_000,
                          "waiting": cpu.nr_running.saturating_sub(1)});
        if !introspect::repair::killable(p, &spared) {
            let why = if p.task.uid == 0 && !self.cfg.free_root {
                "a root process (set free_root = true to allow)"
            } else {
                "init, a kernel thread or a spared user's process"
            };
            return Ok(Err(NotFreed::Refused { what, why }));
        }
        if held.cfg.dry_run {
            drop(held);
            ctx.emit(
                "repair",
                json!({"hm": self.name(), "dry_run": true, "order": order, "held": what}),
            );
            return Ok(Err(NotFreed::DryRun));
        }
        let pid = p.task.pid;
        let done = held.apply(
            order,
            &Victims::Pids(vec![pid]),
            Some(&table),
            &spared,
            Some(sb),
        );
        let released = held.release();
        let done = done?;
        let held_for = released?;
        ctx.emit(
            "repair",
            json!({"hm": self.name(), "order": order, "held": what, "how": done.how,
                   "requests": done.requests, "stale": done.stale, "late": done.late,
                   "lock_ns": lock_ns, "lock_held_us": crate::events::micros(held_for),
                   "dry_run": false}),
        );
        if done.requests == 0 {
            return Ok(Err(NotFreed::NothingPosted));
        }
        Ok(Ok(pid))
    }

    /// Whether the timer ticks advance: a fresh sample's TIMER_TICKS differs from `sb`'s.
    fn ticking(ctx: &mut HealContext<'_>, sb: &SensorBox) -> bool {
        let Some(before) = sb.value(ids::TIMER_TICKS) else {
            return false;
        };
        std::thread::sleep(TICK_CHECK);
        matches!(ctx.guest.sample(), Ok(s) if s.value(ids::TIMER_TICKS).is_some_and(|t| t != before))
    }

    /// Samples until sensor `id` moves from `value`, for at most [`RECOVER_WITHIN`].
    fn recovers(ctx: &mut HealContext<'_>, id: u32, value: u64) -> bool {
        let until = Instant::now() + RECOVER_WITHIN;
        while Instant::now() < until {
            if matches!(ctx.guest.sample(), Ok(s) if s.value(id).is_some_and(|x| x != value)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Moves the hung guest's sessions to its standby ([`crate::failover`]).
    fn fail_over(
        &mut self,
        ctx: &mut HealContext<'_>,
        v: &Violation,
        for_ms: u64,
        fo: &crate::config::FailoverConfig,
        ticks: Option<bool>,
    ) -> HealOutcome {
        if ctx.cfg.dry_run {
            self.failed_over = true;
            ctx.emit(
                "failover",
                json!({"hm": self.name(), "stalled": v.name, "for_ms": for_ms,
                       "standby": fo.backup, "dry_run": true}),
            );
            return HealOutcome::DryRun;
        }
        let sb = ctx.sb.clone();
        let detected_us = crate::events::micros(v.sampled_at.elapsed());
        // Whatever sensor stalled first, a guest whose timer stopped too has stopped running:
        // its vCPUs may not answer a pause (frozen), so it is read without the lock first.
        let kernel_stopped =
            v.id == ids::TIMER_TICKS || !ticks.unwrap_or_else(|| Self::ticking(ctx, &sb));
        match crate::failover::fail_over(ctx, fo, &sb, kernel_stopped) {
            Ok(done) => {
                self.failed_over = true;
                let mut fields = json!({"hm": self.name(), "stalled": v.name, "for_ms": for_ms,
                                        "hm_called_us": detected_us, "dry_run": false});
                if let (Some(f), Some(d)) = (fields.as_object_mut(), done.fields.as_object()) {
                    f.extend(d.clone());
                }
                ctx.emit("failover", fields);
                ctx.metrics.add(
                    "bdmon_failovers_total",
                    &[("guest", &ctx.guest.cfg.name)],
                    1.0,
                );
                HealOutcome::Healed {
                    rounds: 1,
                    killed: 0,
                }
            }
            Err(e) => {
                ctx.emit(
                    "failover_failed",
                    json!({"hm": self.name(), "stalled": v.name, "standby": fo.backup,
                           "error": e.to_string()}),
                );
                HealOutcome::NotHealed(e.to_string())
            }
        }
    }

    fn run_command(&self, guest: &str) -> String {
        let argv: Vec<String> = self
            .cfg
            .command
            .iter()
            .map(|a| a.replace("{guest}", guest))
            .collect();
        let Some((prog, args)) = argv.split_first() else {
            return "no command".into();
        };
        let mut child = match Command::new(prog).args(args).spawn() {
            Ok(c) => c,
            Err(e) => return format!("cannot run {prog}: {e}"),
        };
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return format!("killed after {COMMAND_TIMEOUT:?}");
                }
            }
        }
    }
}

impl HealingModule for HangDetector {
    fn name(&self) -> &str {
        "Hang_Detector"
    }

    fn handle(&mut self, ctx: &mut HealContext<'_>, v: &Violation) -> HealOutcome {
        let Breach::Stalled { for_ms } = v.breach else {
            return HealOutcome::Reported;
        };
        if for_ms < self.cfg.min_stall_ms {
            return HealOutcome::NoCulprit(format!("stalled only {for_ms} ms so far"));
        }
        // Over already (another violation of the same sample was healed first)?
        if matches!(ctx.guest.sample(), Ok(s) if s.value(v.id).is_some_and(|x| x != v.value)) {
            return HealOutcome::Reported;
        }
        // The kernel still ticks: free the CPU one task holds, and act no further if that heals.
        let ticks = (matches!(v.id, ids::CONTEXT_SWITCHES | ids::CPU_PROGRESS)
            && self.cfg.free_cpu != FreeCpu::Off)
            .then(|| Self::ticking(ctx, ctx.sb));
        if ticks == Some(true) {
            let sb = ctx.sb.clone();
            let called = Instant::now();
            match self.free_cpu(ctx, &sb) {
                Ok(Ok(pid)) if Self::recovers(ctx, v.id, v.value) => {
                    let recovered = v.sampled_at.elapsed();
                    ctx.emit(
                        "healed",
                        json!({"hm": self.name(), "sensor": v.name, "rounds": 1, "pid": pid,
                               "freed_cpu": true,
                               "hm_called_us": crate::events::micros(called.duration_since(v.sampled_at)),
                               "recovered_us": crate::events::micros(recovered)}),
                    );
                    ctx.metrics.add(
                        "bdmon_repairs_total",
                        &[("guest", &ctx.guest.cfg.name), ("hm", self.name())],
                        1.0,
                    );
                    return HealOutcome::Healed {
                        rounds: 1,
                        killed: 0,
                    };
                }
                Ok(Ok(pid)) => ctx.emit(
                    "no_culprit",
                    json!({"hm": self.name(), "sensor": v.name,
                           "reason": format!("pid {pid} stopped, but {} did not recover", v.name)}),
                ),
                Ok(Err(reason)) => ctx.emit(
                    "no_culprit",
                    json!({"hm": self.name(), "sensor": v.name, "reason": reason.to_string()}),
                ),
                Err(e) => ctx.emit(
                    "no_culprit",
                    json!({"hm": self.name(), "sensor": v.name,
                           "reason": format!("cannot free the CPU: {e}")}),
                ),
            }
        }
        if let Some(fo) = ctx.guest.cfg.failover.clone() {
            if !self.failed_over {
                return self.fail_over(ctx, v, for_ms, &fo, ticks);
            }
        }
        if self.last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return HealOutcome::Reported;
        }
        self.last = Some(Instant::now());
        let status = match self.cfg.action {
            HangAction::Report => None,
            HangAction::Command if ctx.cfg.dry_run => Some("dry run: not run".to_string()),
            HangAction::Command => Some(self.run_command(&ctx.guest.cfg.name)),
            HangAction::Restart if ctx.cfg.dry_run => Some("dry run: not restarted".to_string()),
            HangAction::Restart => Some(match ctx.guest.restart() {
                Ok(()) => "restarted".to_string(),
                Err(e) => format!("restart failed: {e}"),
            }),
        };
        ctx.metrics
            .add("bdmon_hangs_total", &[("guest", &ctx.guest.cfg.name)], 1.0);
        ctx.emit(
            "hang",
            json!({"hm": self.name(), "stalled": v.name, "for_ms": for_ms,
                   "action": format!("{:?}", self.cfg.action).to_lowercase(),
                   "command_status": status}),
        );
        HealOutcome::Reported
    }
}
