//! Hang detection: progress sensors (TIMER_TICKS, CONTEXT_SWITCHES) that stop advancing while
//! bdvmm says the vCPUs run. The dispatcher confirms "running" with the bridge's STATUS before a
//! stall reaches this HM, so a guest paused by a monitor is never reported as hung.

use std::process::Command;
use std::time::{Duration, Instant};

use introspect::sensorbox::ids;
use serde_json::json;

use crate::config::{HangAction, HangConfig};
use crate::contract::{Breach, Violation};
use crate::hm::{HealContext, HealOutcome, HealingModule};

/// Reports (and acts on) a hung guest at most once per this period.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Longest the hang command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The hang detector.
pub struct HangDetector {
    cfg: HangConfig,
    last: Option<Instant>,
}

impl HangDetector {
    /// With this action.
    pub fn new(cfg: HangConfig) -> Self {
        HangDetector { cfg, last: None }
    }

    /// The sensors it watches.
    pub const SENSORS: [u32; 2] = [ids::TIMER_TICKS, ids::CONTEXT_SWITCHES];

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
