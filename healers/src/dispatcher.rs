//! The event dispatcher (ED): samples each guest's Sensor Box, checks each sensor against its
//! contract and calls the HMs registered for violated sensors.
//!
//! Sampling is event-driven: one tokio runtime thread (the sampler) drives every guest's
//! `FETCH_SB` session ([`bridge_client::nonblocking`]) and checks each sample where it arrives —
//! a thousand guests need one thread, not a thousand. Whatever may block — a repair under the
//! lock, a stock kernel's virtual sensors read through introspection, locating a kernel, an HM
//! with work pending — runs on the runtime's blocking pool with the guest's [`GuestLoop`] moved
//! there, so a slow or dead guest (or a long repair) never delays the sampling of the others.
//! Sampling is periodic (`sample_ms`, 1 ms and up; a late sample is not made up for with a
//! burst) and on demand ([`Handle::sample_now`]). A handler that found no culprit or failed is
//! not called again for the same sensor for [`RETRY_AFTER`], doubling at each further failure up
//! to `retry_max_ms`, so a violation nobody can heal is logged once per period, not once per
//! sample.
//!
//! First, do no harm: a sample that fails (the bridge unreachable, the kernel not locatable, a
//! lock the pause budget refused) is not retried at the next period but after a backoff, 1 s
//! doubling to 60 s by default and reset by the next good sample (on-demand samples wait too).
//! Each failure is reported once: a warning on stderr that says what to fix, a `backoff` event
//! with the reason and the next retry time (`pause_skipped` when the budget refused the lock), and
//! the `bdmon_backoffs_total` metric.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bridge_client::nonblocking::AsyncBridge;
use introspect::sensorbox::SensorBox;
use serde_json::json;
use tokio::sync::Notify;

use crate::budget::Backoff;
use crate::config::{Config, GuestConfig};
use crate::contract::{Breach, Checker, Violation};
use crate::events::{millis, Events};
use crate::guest::{Guest, GuestError};
use crate::hm::{HealContext, HealOutcome, HmId, Registry};
use crate::metrics::{Metrics, SampleGauges};

/// Pause before calling a handler again for a sensor it could not heal.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// A blocking session unused this long is closed by the sampler (bridges close idle sessions
/// after `idle_timeout_ms`, 30 s by default; a repair should never start on a dead one). Kept open
/// while it is in use, e.g. by a hang check at every sample of a stalled guest.
pub const BLOCKING_IDLE: Duration = Duration::from_secs(5);

/// Longest wait for one sample's reply (and for a session to open) on the sampler.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the HMs for one guest.
pub type MakeRegistry = dyn Fn(&Config, &GuestConfig) -> Registry + Send + Sync;

/// One watched guest's task on the sampler.
struct Watched {
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// The running dispatcher.
pub struct Handle {
    rt: Option<tokio::runtime::Runtime>,
    cfg: Arc<Config>,
    make: Arc<MakeRegistry>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    guests: Mutex<HashMap<String, Watched>>,
    /// Removed guests whose task has not ended yet (e.g. in the middle of a repair).
    ending: Mutex<Vec<(String, Watched)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Watched {
    /// Tells the task to end, at its next step.
    fn signal(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl Handle {
    /// Samples `guest` now (between periods).
    pub fn sample_now(&self, guest: &str) -> bool {
        self.lock_guests().get(guest).is_some_and(|w| {
            w.wake.notify_one();
            true
        })
    }

    fn lock_guests(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        lock(&self.guests)
    }

    /// The guests watched now.
    pub fn watched(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock_guests().keys().cloned().collect();
        v.sort();
        v
    }

    /// Starts watching `g`. False, and nothing done, if a guest of that name is watched, or was
    /// removed and its task has not ended yet ([`Handle::ending`]): a guest never has two loops.
    pub fn add(&self, g: GuestConfig) -> bool {
        let Some(rt) = &self.rt else {
            return false;
        };
        // Checked under the guests' lock, which `remove` takes first: no remove of this name
        // can slip between the two checks.
        let mut guests = self.lock_guests();
        if guests.contains_key(&g.name) || self.ending(&g.name) {
            return false;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let name = g.name.clone();
        let l = GuestLoop::new(
            self.cfg.clone(),
            g.clone(),
            (self.make)(&self.cfg, &g),
            self.events.clone(),
            self.metrics.clone(),
        );
        let task = rt.spawn(watch(l, stop.clone(), wake.clone()));
        guests.insert(name, Watched { stop, wake, task });
        true
    }

    /// Stops watching `guest`, without waiting: its task ends at its next step, after the work
    /// it is in the middle of (a repair, which its lock's lease bounds); then any lock it held is
    /// released and its sessions closed. Until then [`Handle::ending`] is true and the name
    /// cannot be added again. False if it was not watched.
    pub fn remove(&self, guest: &str) -> bool {
        let mut guests = self.lock_guests();
        let Some(w) = guests.remove(guest) else {
            return false;
        };
        w.signal();
        lock(&self.ending).push((guest.to_string(), w));
        drop(guests);
        self.metrics.forget_guest(guest);
        true
    }

    /// True while the task of `guest`, removed, has not ended yet.
    pub fn ending(&self, guest: &str) -> bool {
        let mut ending = lock(&self.ending);
        ending.retain(|(_, w)| !w.task.is_finished());
        ending.iter().any(|(n, _)| n == guest)
    }

    /// Waits until every removed guest's task has ended (each released any lock it held).
    pub fn wait_removed(&self) {
        let ws: Vec<Watched> = lock(&self.ending).drain(..).map(|(_, w)| w).collect();
        self.end(ws);
    }

    fn end(&self, ws: Vec<Watched>) {
        for w in &ws {
            w.signal();
        }
        if let Some(rt) = &self.rt {
            rt.block_on(async {
                for w in ws {
                    let _ = w.task.await;
                }
            });
        }
    }

    /// Stops every guest (each releases any lock it holds) and waits for them, and for the
    /// removed ones still ending.
    pub fn stop(mut self) {
        let mut ws: Vec<Watched> = self.lock_guests().drain().map(|(_, w)| w).collect();
        ws.extend(lock(&self.ending).drain(..).map(|(_, w)| w));
        self.end(ws);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Starts the sampler and watches every guest of `cfg`.
pub fn start(
    cfg: Arc<Config>,
    make: Arc<MakeRegistry>,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
) -> std::io::Result<Handle> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bdmon-sampler")
        .enable_all()
        .build()?;
    let h = Handle {
        rt: Some(rt),
        cfg: cfg.clone(),
        make,
        events,
        metrics,
        guests: Mutex::new(HashMap::new()),
        ending: Mutex::new(Vec::new()),
    };
    for g in &cfg.guests {
        h.add(g.clone());
    }
    Ok(h)
}

/// One guest's life on the sampler: quiet samples are taken and checked here; anything that may
/// block runs on the blocking pool with the loop moved there.
async fn watch(mut l: GuestLoop, stop: Arc<AtomicBool>, wake: Arc<Notify>) {
    let mut fast: Option<AsyncBridge> = None;
    // The sample, parsed in place again and again (no allocation while the box keeps its shape).
    let mut sb = SensorBox::default();
    let mut next = tokio::time::Instant::now();
    let name = l.guest.cfg.name.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {}
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // The timer fires up to a millisecond late: a sample late by less than a period keeps
        // the schedule (the next one comes sooner); one a whole period late is not made up for.
        next += l.period;
        let now = tokio::time::Instant::now();
        if next + l.period < now {
            next = now;
        }
        if l.backing_off() {
            continue;
        }
        if l.wants_blocking() {
            fast = None;
            l = match blocking(l, GuestLoop::once).await {
                Some(l) => l,
                None => return,
            };
            l.blocking_at = Some(Instant::now());
            continue;
        }
        if l.blocking_at.is_some_and(|at| at.elapsed() > BLOCKING_IDLE) && !l.guest.holds_lock() {
            // The sampler samples; the blocking session, unused for a while, is closed before
            // the bridge closes it for idleness (the next repair opens a fresh one).
            l.guest.disconnect();
            l.blocking_at = None;
        }
        let t = Instant::now();
        let b = match fast.as_mut() {
            Some(b) => b,
            None => match AsyncBridge::connect(
                &l.guest.cfg.bridge,
                &l.guest.cfg.identity(),
                SAMPLE_TIMEOUT,
            )
            .await
            {
                Ok(b) => fast.insert(b),
                Err(source) => {
                    l.sample_failed(GuestError::Connect {
                        bridge: l.guest.cfg.bridge.clone(),
                        source,
                    });
                    continue;
                }
            },
        };
        if let Err(e) = b.sensor_box_into(&mut sb).await {
            fast = None;
            l.sample_failed(e.into());
            continue;
        }
        let took = t.elapsed();
        let violations = l.observe(&sb, t, took);
        if violations.is_empty() && !l.reg.busy() {
            continue;
        }
        let sb = std::mem::take(&mut sb);
        l = match blocking(l, move |l| {
            l.dispatch(&sb, violations, took);
            l.blocking_at = Some(Instant::now());
        })
        .await
        {
            Some(l) => l,
            None => return,
        };
    }
    // Dropping the loop closes its sessions (a held lock ends with them).
    let _ = tokio::task::spawn_blocking(move || drop(l)).await;
    tracing::debug!("guest {name}: no longer watched");
}

/// Runs `f` on the loop on the blocking pool; None if it panicked (the guest is no longer
/// watched; said on stderr).
async fn blocking(
    mut l: GuestLoop,
    f: impl FnOnce(&mut GuestLoop) + Send + 'static,
) -> Option<GuestLoop> {
    let name = l.guest.cfg.name.clone();
    match tokio::task::spawn_blocking(move || {
        f(&mut l);
        l
    })
    .await
    {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(
                "guest {name}: its healing loop failed ({e}); the guest is no longer watched"
            );
            None
        }
    }
}

/// One guest's sampling loop.
pub struct GuestLoop {
    cfg: Arc<Config>,
    guest: Guest,
    reg: Registry,
    checker: Checker,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    gauges: Arc<SampleGauges>,
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
    /// When the blocking session (repairs, stock sampling, hang checks) was last used.
    blocking_at: Option<Instant>,
}

impl GuestLoop {
    /// A loop for guest `g`.
    pub fn new(
        cfg: Arc<Config>,
        g: GuestConfig,
        reg: Registry,
        events: Arc<Events>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let overrides = g.threshold_overrides();
        let names = g.threshold_names();
        let retry = g.backoff();
        let retry_max = Duration::from_millis(cfg.retry_max_ms).max(RETRY_AFTER);
        GuestLoop {
            period: Duration::from_millis(g.sample_ms.unwrap_or(cfg.sample_ms).max(1)),
            gauges: metrics.guest(&g.name),
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
            retry_max,
            blocking_at: None,
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
        let b = self.guest.budget();
        let used = b.used(Instant::now());
        let ratio = used.as_secs_f64() / b.allowed().as_secs_f64().max(f64::MIN_POSITIVE);
        let total = b.total().as_secs_f64();
        self.gauges.budget(ratio, total);
    }

    /// True while a failed sample backs off (nothing to do until then).
    pub fn backing_off(&self) -> bool {
        self.not_before.is_some_and(|t| Instant::now() < t)
    }

    /// True while sampling needs the blocking session: until the guest is known to run a patched
    /// kernel (a stock kernel's virtual sensors are read through introspection), and while a
    /// guest with failover has not been located yet.
    pub fn wants_blocking(&self) -> bool {
        !self.guest.patched() || (self.guest.cfg.failover.is_some() && !self.guest.located())
    }

    fn set_up(&mut self, up: bool, reason: &str) {
        self.gauges.set_up(up);
        if self.up != Some(up) {
            let name = &self.guest.cfg.name;
            let was = self.up.replace(up);
            if up {
                self.events.emit(
                    name,
                    "attached",
                    json!({"bridge": self.guest.cfg.bridge, "stock_kernel": self.guest.stock()}),
                );
            } else if was.is_none() {
                // Never attached yet: most often a guest still booting, not a failure.
                self.events.emit(
                    name,
                    "waiting",
                    json!({"bridge": self.guest.cfg.bridge, "for": "the guest (booting, or its \
                        bridge not up yet); retrying", "reason": reason}),
                );
            } else {
                self.events.emit(
                    name,
                    "detached",
                    json!({"bridge": self.guest.cfg.bridge, "reason": reason}),
                );
            }
        }
    }

    /// One sample through the blocking session, its checks and the dispatch of its violations
    /// (nothing while a failed sample backs off).
    pub fn once(&mut self) {
        if self.backing_off() {
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

    /// A sample that failed (`e`): reported once, then backed off.
    pub fn sample_failed(&mut self, e: GuestError) {
        let name = self.guest.cfg.name.clone();
        self.metrics
            .add("bdmon_sample_errors_total", &[("guest", &name)], 1.0);
        self.set_up(false, &e.to_string());
        self.failed("sample", &e);
    }

    fn step(&mut self) {
        let t = Instant::now();
        let sb = match self.guest.sample() {
            Ok(sb) => sb,
            Err(e) => return self.sample_failed(e),
        };
        let took = t.elapsed();
        if self.guest.cfg.failover.is_some() && !self.guest.located() {
            // Sessions can be moved only from a guest whose kernel is known: find it while the
            // guest is healthy (a failed one may not answer a pause).
            let t = Instant::now();
            if let Err(e) = self.guest.locate(&sb) {
                self.failed("locate", &e);
                return;
            }
            self.events.emit(
                &self.guest.cfg.name,
                "located",
                json!({"for": "failover", "took_us": crate::events::micros(t.elapsed())}),
            );
            self.report_layout();
        }
        let violations = self.observe(&sb, t, took);
        self.dispatch(&sb, violations, took);
    }

    /// What a good sample `sb` (asked for at `t`, answered after `took`) says: the gauges, and
    /// the sensors out of contract. Cheap and never blocks: it runs on the sampler thread.
    pub fn observe(&mut self, sb: &SensorBox, t: Instant, took: Duration) -> Vec<Violation> {
        if self.not_before.take().is_some() {
            let failures = self.retry.reset();
            if failures > 0 {
                tracing::warn!(
                    "guest {}: sampling works again after {failures} failure(s)",
                    self.guest.cfg.name
                );
            }
        }
        self.set_up(true, "");
        if self.guest.take_sensor_box_appeared() {
            self.events.emit(
                &self.guest.cfg.name,
                "sensor_box",
                json!({"stock_kernel": false, "note": "a Sensor Box appeared in the backdoor range: \
                    the guest's patched kernel was still booting when bdmon attached; its Sensor \
                    Box and repair hooks are used from now on"}),
            );
        }
        let checker = &self.checker;
        self.gauges
            .sampled(took, &sb.sensors, |s| checker.threshold(s));
        self.budget_metrics();
        self.checker.check(sb, t)
    }

    /// Calls the HMs of `violations` (found in `sb`, a sample that took `took`) and every HM's
    /// per-sample work. May block: a repair takes the lock.
    pub fn dispatch(&mut self, sb: &SensorBox, mut violations: Vec<Violation>, took: Duration) {
        let name = self.guest.cfg.name.clone();
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
                    cfg: &self.cfg,
                    sb,
                    events: &self.events,
                    metrics: &self.metrics,
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
                    cfg: &self.cfg,
                    sb,
                    events: &self.events,
                    metrics: &self.metrics,
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
        let events = Arc::new(Events::to_writer(Box::new(buf.clone())));
        let metrics = Arc::new(Metrics::default());
        let g = cfg.guests[0].clone();
        let mut l = GuestLoop::new(Arc::new(cfg), g, Registry::new(), events, metrics.clone());
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
