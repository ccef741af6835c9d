//! The event dispatcher (ED): samples each guest's Sensor Box, checks each sensor against its
//! contract and calls the HMs registered for violated sensors.
//!
//! Each guest has a thread of its own, so a slow or dead guest (or a long repair) never delays the
//! sampling of the others. Sampling is periodic (`sample_ms`, 1 ms and up; a late sample is not
//! made up for with a burst) and on demand ([`Handle::sample_now`]). A handler that found no
//! culprit or failed is not called again for the same sensor for [`RETRY_AFTER`], doubling at each
//! further failure up to `retry_max_ms`, so a violation nobody can heal is logged once per period,
//! not once per sample.
//!
//! First, do no harm: a sample that fails (the bridge unreachable, the kernel not locatable, a
//! lock the pause budget refused) is not retried at the next period but after a backoff, 1 s
//! doubling to 60 s by default and reset by the next good sample (on-demand samples wait too).
//! Each failure is reported once: a warning on stderr that says what to fix, a `backoff` event
//! with the reason and the next retry time (`pause_skipped` when the budget refused the lock), and
//! the `bdmon_backoffs_total` metric.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::budget::Backoff;
use crate::config::{Config, GuestConfig};
use crate::contract::{Breach, Checker};
use crate::events::{millis, Events};
use crate::guest::{Guest, GuestError};
use crate::hm::{HealContext, HealOutcome, HmId, Registry};
use crate::metrics::Metrics;

/// Pause before calling a handler again for a sensor it could not heal.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Builds the HMs for one guest.
pub type MakeRegistry = dyn Fn(&Config, &GuestConfig) -> Registry + Send + Sync;

/// The running dispatcher.
pub struct Handle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    wake: HashMap<String, Sender<()>>,
}

impl Handle {
    /// Samples `guest` now (between periods).
    pub fn sample_now(&self, guest: &str) -> bool {
        self.wake.get(guest).is_some_and(|s| s.send(()).is_ok())
    }

    /// Stops every guest thread (each releases any lock it holds) and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.wake.values() {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts one sampling thread per guest.
pub fn start(
    cfg: Arc<Config>,
    make: Arc<MakeRegistry>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
) -> std::io::Result<Handle> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut wake = HashMap::new();
    for g in &cfg.guests {
        let (tx, rx) = mpsc::channel();
        wake.insert(g.name.clone(), tx);
        let (cfg, make, events, metrics, stop, g) = (
            cfg.clone(),
            make.clone(),
            events.clone(),
            metrics.clone(),
            stop.clone(),
            g.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("ed-{}", g.name))
                .spawn(move || {
                    let reg = make(&cfg, &g);
                    GuestLoop::new(&cfg, g, reg, &events, &metrics).run(&stop, &rx)
                })?,
        );
    }
    Ok(Handle {
        stop,
        threads,
        wake,
    })
}

/// One guest's sampling loop.
pub struct GuestLoop<'a> {
    cfg: &'a Config,
    guest: Guest,
    reg: Registry,
    checker: Checker,
    events: &'a Events,
    metrics: &'a Metrics,
    period: Duration,
    up: Option<bool>,
    /// Per handler and sensor: no call before, and the delay after the next failure.
    backoff: HashMap<(HmId, u32), (Instant, Duration)>,
    /// Failing samples.
    retry: Backoff,
    /// No sample before this (a failing sample backs off).
    not_before: Option<Instant>,
    /// Longest handler backoff.
    retry_max: Duration,
}

impl<'a> GuestLoop<'a> {
    /// A loop for guest `g`.
    pub fn new(
        cfg: &'a Config,
        g: GuestConfig,
        reg: Registry,
        events: &'a Events,
        metrics: &'a Metrics,
    ) -> Self {
        let overrides = g.threshold_overrides();
        let names = g.threshold_names();
        let retry = g.backoff();
        GuestLoop {
            period: Duration::from_millis(g.sample_ms.unwrap_or(cfg.sample_ms).max(1)),
            cfg,
            guest: Guest::new(g),
            reg,
            checker: Checker::new(overrides).with_names(names),
            events,
            metrics,
            up: None,
            backoff: HashMap::new(),
            retry,
            not_before: None,
            retry_max: Duration::from_millis(cfg.retry_max_ms).max(RETRY_AFTER),
        }
    }

    /// Reports a failed `step` once (stderr, a `backoff` or `pause_skipped` event, a metric) and
    /// sets when it may be tried again.
    fn failed(&mut self, step: &str, e: &GuestError) {
        let name = self.guest.cfg.name.clone();
        let now = Instant::now();
        let (event, next) = match e.retry_at() {
            // The budget refused a lock: not a failure to double, a wait until one fits.
            Some(at) => ("pause_skipped", at.max(now)),
            None => ("backoff", now + self.retry.fail()),
        };
        self.not_before = Some(next);
        let wait = next.saturating_duration_since(now);
        let fix = e.fix(&name);
        let reason = e.to_string();
        self.metrics.add(
            if event == "backoff" {
                "bdmon_backoffs_total"
            } else {
                "bdmon_pause_skipped_total"
            },
            &[("guest", &name), ("step", step)],
            1.0,
        );
        self.metrics.set(
            "bdmon_backoff_seconds",
            &[("guest", &name)],
            wait.as_secs_f64(),
        );
        self.events.emit(
            &name,
            event,
            json!({"step": step, "reason": reason, "fix": fix,
                   "failures": self.retry.failures(),
                   "retry_in_ms": millis(wait),
                   "retry_at_ms": crate::events::now_ms().saturating_add(millis(wait))}),
        );
        tracing::warn!(
            "guest {name}: {step} failed: {reason}{}; next try in {:.1} s",
            fix.map(|f| format!("; {f}")).unwrap_or_default(),
            wait.as_secs_f64()
        );
    }

    /// Publishes what bdmon has cost the guest outside repairs.
    fn budget_metrics(&mut self) {
        let name = self.guest.cfg.name.clone();
        let b = self.guest.budget();
        let used = b.used(Instant::now());
        let ratio = used.as_secs_f64() / b.allowed().as_secs_f64().max(f64::MIN_POSITIVE);
        let total = b.total().as_secs_f64();
        self.metrics
            .set("bdmon_pause_budget_used_ratio", &[("guest", &name)], ratio);
        self.metrics.set(
            "bdmon_budget_pause_seconds_total",
            &[("guest", &name)],
            total,
        );
    }

    fn run(mut self, stop: &AtomicBool, wake: &mpsc::Receiver<()>) {
        let mut next = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let wait = next.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                match wake.recv_timeout(wait) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                if stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            let now = Instant::now();
            next = (next + self.period).max(now);
            self.once();
        }
    }

    fn set_up(&mut self, up: bool, reason: &str) {
        let name = self.guest.cfg.name.clone();
        self.metrics
            .set("bdmon_up", &[("guest", &name)], if up { 1.0 } else { 0.0 });
        if self.up != Some(up) {
            let was = self.up.replace(up);
            if up {
                self.events.emit(
                    &name,
                    "attached",
                    json!({"bridge": self.guest.cfg.bridge, "stock_kernel": self.guest.stock()}),
                );
            } else if was.is_none() {
                // Never attached yet: most often a guest still booting, not a failure.
                self.events.emit(
                    &name,
                    "waiting",
                    json!({"bridge": self.guest.cfg.bridge, "for": "the guest (booting, or its \
                        bridge not up yet); retrying", "reason": reason}),
                );
            } else {
                self.events.emit(
                    &name,
                    "detached",
                    json!({"bridge": self.guest.cfg.bridge, "reason": reason}),
                );
            }
        }
    }

    /// One sample, its checks and the dispatch of its violations (nothing while a failed sample
    /// backs off).
    pub fn once(&mut self) {
        if self.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.step();
        self.report_layout();
        self.budget_metrics();
    }

    /// Says once per located kernel what it lacks and what is off because of it (a warning on
    /// stderr and a `degraded` event each): e.g. no readable RSS turns the memory policies off
    /// for this guest while every other healer keeps working.
    fn report_layout(&mut self) {
        let name = self.guest.cfg.name.clone();
        for u in self.guest.take_layout_notes() {
            tracing::warn!("guest {name}: {u}");
            self.events.emit(
                &name,
                "degraded",
                json!({"release": u.release, "field": u.field, "looked_for": u.looked_for,
                       "disables": u.disables, "reason": u.reason}),
            );
        }
    }

    fn step(&mut self) {
        let name = self.guest.cfg.name.clone();
        let t = Instant::now();
        let sb = match self.guest.sample() {
            Ok(sb) => sb,
            Err(e) => {
                self.metrics
                    .add("bdmon_sample_errors_total", &[("guest", &name)], 1.0);
                self.set_up(false, &e.to_string());
                self.failed("sample", &e);
                return;
            }
        };
        let took = t.elapsed();
        if self.not_before.take().is_some() {
            let failures = self.retry.reset();
            self.metrics
                .set("bdmon_backoff_seconds", &[("guest", &name)], 0.0);
            if failures > 0 {
                tracing::warn!("guest {name}: sampling works again after {failures} failure(s)");
            }
        }
        self.set_up(true, "");
        if self.guest.take_sensor_box_appeared() {
            self.events.emit(
                &name,
                "sensor_box",
                json!({"stock_kernel": false, "note": "a Sensor Box appeared in the backdoor range: \
                    the guest's patched kernel was still booting when bdmon attached; its Sensor \
                    Box and repair hooks are used from now on"}),
            );
        }
        if self.guest.cfg.failover.is_some() && !self.guest.located() {
            // Sessions can be moved only from a guest whose kernel is known: find it while the
            // guest is healthy (a failed one may not answer a pause).
            let t = Instant::now();
            if let Err(e) = self.guest.locate(&sb) {
                self.failed("locate", &e);
                return;
            }
            self.events.emit(
                &name,
                "located",
                json!({"for": "failover", "took_us": crate::events::micros(t.elapsed())}),
            );
            self.report_layout();
        }
        self.metrics
            .add("bdmon_samples_total", &[("guest", &name)], 1.0);
        self.metrics.set(
            "bdmon_sample_seconds",
            &[("guest", &name)],
            took.as_secs_f64(),
        );
        for s in &sb.sensors {
            let l = [("guest", name.as_str()), ("sensor", s.name.as_str())];
            self.metrics.set("bdmon_sensor_value", &l, s.value as f64);
            self.metrics.set(
                "bdmon_sensor_threshold",
                &l,
                self.checker.threshold(s) as f64,
            );
        }
        let mut violations = self.checker.check(&sb, t);
        if violations
            .iter()
            .any(|v| matches!(v.breach, Breach::Stalled { .. }))
        {
            // A stall means a hang only if bdvmm says the vCPUs ran.
            let running = matches!(self.guest.status(), Ok(st) if st.state == bridge_client::wire::VM_RUNNING);
            if !running {
                self.checker.reset_progress(Instant::now());
                violations.retain(|v| !matches!(v.breach, Breach::Stalled { .. }));
            }
        }
        for v in violations {
            self.metrics.add(
                "bdmon_violations_total",
                &[("guest", &name), ("sensor", &v.name)],
                1.0,
            );
            let now = Instant::now();
            let hms: Vec<HmId> = self
                .reg
                .handlers(v.id)
                .iter()
                .copied()
                .filter(|h| {
                    self.backoff
                        .get(&(*h, v.id))
                        .is_none_or(|(until, _)| now >= *until)
                })
                .collect();
            if hms.is_empty() {
                continue;
            }
            let names: Vec<String> = hms
                .iter()
                .filter_map(|h| self.reg.get_mut(*h).map(|m| m.name().to_owned()))
                .collect();
            self.events.emit(
                &name,
                "violation",
                json!({"sensor": v.name, "value": v.value, "threshold": v.threshold,
                       "breach": v.breach, "hms": names,
                       "sample_us": crate::events::micros(took)}),
            );
            for h in hms {
                let Some(hm) = self.reg.get_mut(h) else {
                    continue;
                };
                let mut ctx = HealContext {
                    guest: &mut self.guest,
                    checker: &self.checker,
                    cfg: self.cfg,
                    sb: &sb,
                    events: self.events,
                    metrics: self.metrics,
                };
                let out = hm.handle(&mut ctx, &v);
                let hm_name = hm.name().to_owned();
                match out {
                    HealOutcome::Healed { .. } => {
                        self.backoff.remove(&(h, v.id));
                    }
                    out => {
                        // Doubling from RETRY_AFTER: a violation nobody can heal costs the guest
                        // (and the log) less and less.
                        let delay = self
                            .backoff
                            .get(&(h, v.id))
                            .map_or(RETRY_AFTER, |(_, d)| *d);
                        let next = delay.saturating_mul(2).min(self.retry_max);
                        self.backoff
                            .insert((h, v.id), (Instant::now() + delay, next));
                        if let HealOutcome::NotHealed(reason) = out {
                            self.metrics.add(
                                "bdmon_backoffs_total",
                                &[("guest", &name), ("step", &hm_name)],
                                1.0,
                            );
                            self.events.emit(
                                &name,
                                "backoff",
                                json!({"step": hm_name, "sensor": v.name, "reason": reason,
                                       "retry_in_ms": millis(delay),
                                       "retry_at_ms": crate::events::now_ms()
                                           .saturating_add(millis(delay))}),
                            );
                            tracing::warn!(
                                "guest {name}: {hm_name} could not heal {}: {reason}; next try in {:.1} s",
                                v.name,
                                delay.as_secs_f64()
                            );
                        }
                    }
                }
            }
            // A repair holds the lock and stops the guest's clocks: do not mistake that for a
            // hang. (Hang reports take no lock, so a stall keeps counting.)
            if !matches!(v.breach, Breach::Stalled { .. }) {
                self.checker.reset_progress(Instant::now());
            }
        }
        for h in 0..self.reg.len() {
            if let Some(hm) = self.reg.get_mut(HmId(h)) {
                let mut ctx = HealContext {
                    guest: &mut self.guest,
                    checker: &self.checker,
                    cfg: self.cfg,
                    sb: &sb,
                    events: self.events,
                    metrics: self.metrics,
                };
                hm.on_sample(&mut ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A guest whose bridge cannot be reached is not retried at every sample: one try, one
    /// `backoff` event saying what to fix and when the next try is, then nothing until then.
    #[test]
    fn a_failing_sample_backs_off_and_says_so_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(
            "sample_ms = 1\n[[guest]]\nname = \"vm\"\nbridge = \"127.0.0.1:1\"\npki = \"nopki\"\nmonitor = \"m\"\n",
            &dir.path().join("bdmon.toml"),
        )
        .unwrap();
        let buf = Buf::default();
        let events = Events::to_writer(Box::new(buf.clone()));
        let metrics = Metrics::default();
        let mut l = GuestLoop::new(
            &cfg,
            cfg.guests[0].clone(),
            Registry::new(),
            &events,
            &metrics,
        );
        for _ in 0..50 {
            l.once();
        }
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let backoffs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|e: &serde_json::Value| e["event"] == "backoff")
            .collect();
        assert_eq!(backoffs.len(), 1, "{text}");
        let e = &backoffs[0];
        assert_eq!(e["step"], "sample");
        assert_eq!(e["retry_in_ms"], 1000);
        assert!(e["retry_at_ms"].as_u64().is_some(), "{e}");
        assert!(
            e["fix"]
                .as_str()
                .is_some_and(|f| f.contains("[[guest]] vm")),
            "{e}"
        );
        assert!(metrics
            .render()
            .contains("bdmon_backoffs_total{guest=\"vm\",step=\"sample\"} 1"));
    }
}
