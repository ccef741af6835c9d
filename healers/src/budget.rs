//! First, do no harm: what bdmon allows itself to cost a guest.
//!
//! A monitor's pause is the one cost healing imposes on a guest, and a monitor that retries a
//! failing step at every sample can become the outage it is there to prevent. Two limits keep it
//! from that:
//!
//! * [`PauseBudget`] — the guest time bdmon may spend paused *outside an actual repair* (locating
//!   the kernel, a diagnosis that finds nobody to blame), as a fraction of any sliding window
//!   (`pause_budget_percent` of `pause_budget_window_s`, 1 % of a minute by default). A lock that
//!   would break it is not taken: the step is skipped and reported (`pause_skipped`). A lock taken
//!   on its own behalf (a locate) gets at most the budget left as its lease, so bdvmm itself ends
//!   it there whatever happens in bdmon. A repair — a diagnosed culprit and its kill — is outside
//!   the budget but bounded by `lease_ms`.
//! * [`Backoff`] — a step that fails (connecting, locating the kernel, sampling, a healer that
//!   could not heal) is retried after a delay that doubles from `retry_min_ms` up to
//!   `retry_max_ms` (1 s to 60 s by default) and resets on success; every failure is reported
//!   once, on stderr and as a `backoff` event, with what to fix.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Shortest lock worth taking: below this much budget left, no lock is taken at all.
pub const MIN_PAUSE: Duration = Duration::from_millis(10);

/// Most pauses remembered (older ones are merged into the oldest kept): a bound on memory whatever
/// the window and the sampling period.
const MAX_INTERVALS: usize = 4096;

/// Paused time allowed per sliding window, and the pauses charged to it.
#[derive(Clone, Debug)]
pub struct PauseBudget {
    allowed: Duration,
    window: Duration,
    /// Charged pauses as (start, end), oldest first; none ends after the last `charge`'s `now`.
    spent: VecDeque<(Instant, Instant)>,
    /// Everything ever charged.
    total: Duration,
}

impl PauseBudget {
    /// `percent` of every `window` (clamped to 0..=100).
    pub fn new(percent: f64, window: Duration) -> PauseBudget {
        PauseBudget {
            allowed: window.mul_f64(percent.clamp(0.0, 100.0) / 100.0),
            window,
            spent: VecDeque::new(),
            total: Duration::ZERO,
        }
    }

    /// Paused time allowed per window.
    pub fn allowed(&self) -> Duration {
        self.allowed
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Everything charged since the start.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// Paused time charged within the window that ends at `at` (at or after the last charge).
    fn used_at(&self, at: Instant) -> Duration {
        let from = at.checked_sub(self.window);
        self.spent
            .iter()
            .map(|&(s, e)| {
                let s = from.map_or(s, |f| s.max(f));
                e.min(at).saturating_duration_since(s)
            })
            .sum()
    }

    /// Paused time charged within the window ending now.
    pub fn used(&mut self, now: Instant) -> Duration {
        if let Some(from) = now.checked_sub(self.window) {
            while self.spent.front().is_some_and(|&(_, e)| e <= from) {
                self.spent.pop_front();
            }
        }
        self.used_at(now)
    }

    /// What is left of the budget now.
    pub fn remaining(&mut self, now: Instant) -> Duration {
        self.allowed.saturating_sub(self.used(now))
    }

    /// Charges a pause from `start` to `end`.
    pub fn charge(&mut self, start: Instant, end: Instant) {
        let end = end.max(start);
        self.total = self.total.saturating_add(end - start);
        if self.spent.len() >= MAX_INTERVALS {
            // Merge the two oldest into one interval that covers both: never undercounts.
            if let (Some((s, _)), Some(second)) = (self.spent.pop_front(), self.spent.front_mut()) {
                second.0 = s;
            }
        }
        self.spent.push_back((start, end));
    }

    /// The earliest moment, from `now` on, at which `need` fits in the budget; `None` if it never
    /// can (more than the whole budget).
    pub fn fits_at(&mut self, need: Duration, now: Instant) -> Option<Instant> {
        if need > self.allowed {
            return None;
        }
        if self.remaining(now) >= need {
            return Some(now);
        }
        // The use only falls as pauses slide out of the window: try the moments each one has
        // left it completely (the last of them leaves nothing charged).
        self.spent
            .iter()
            .map(|&(_, e)| e + self.window)
            .filter(|&t| t > now)
            .find(|&t| self.used_at(t).saturating_add(need) <= self.allowed)
            .or(Some(now + self.window))
    }
}

/// Exponential backoff for a failing step.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// Starting at `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// Records a failure; returns how long to wait before the next try.
    pub fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Records a success; returns the failures it ends (0 if the step was not failing).
    pub fn reset(&mut self) -> u32 {
        self.next = self.min;
        std::mem::take(&mut self.failures)
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_budget_slides_with_its_window() {
        let t0 = Instant::now();
        let mut b = PauseBudget::new(1.0, Duration::from_secs(60));
        assert_eq!(b.allowed(), 600 * MS);
        assert_eq!(b.remaining(t0), 600 * MS);
        b.charge(t0, t0 + 400 * MS);
        b.charge(t0 + 10_000 * MS, t0 + 10_150 * MS);
        let now = t0 + 20_000 * MS;
        assert_eq!(b.used(now), 550 * MS);
        assert_eq!(b.remaining(now), 50 * MS);
        assert_eq!(b.fits_at(50 * MS, now), Some(now));
        // 200 ms fit once the first pause has slid out of the window.
        assert_eq!(
            b.fits_at(200 * MS, now),
            Some(t0 + 400 * MS + Duration::from_secs(60))
        );
        assert_eq!(b.fits_at(601 * MS, now), None);
        // Half of the first pause is still inside the window 60.2 s after it began.
        assert_eq!(b.used(t0 + 60_200 * MS), 350 * MS);
        assert_eq!(b.used(t0 + 80_200 * MS), Duration::ZERO);
        assert_eq!(b.total(), 550 * MS);
    }

    #[test]
    fn many_small_pauses_never_undercount() {
        let t0 = Instant::now();
        let mut b = PauseBudget::new(100.0, Duration::from_secs(3600));
        let n = 2 * u32::try_from(MAX_INTERVALS).unwrap();
        for i in 0..n {
            let s = t0 + i * 10 * MS;
            b.charge(s, s + MS);
        }
        assert!(b.used(t0 + n * 10 * MS) >= n * MS);
        assert!(b.spent.len() <= MAX_INTERVALS);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let d: Vec<u64> = (0..9).map(|_| b.fail().as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.reset(), 9);
        assert_eq!(b.fail(), Duration::from_secs(1));
    }
}
