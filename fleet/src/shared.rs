//! What a handle shares with its background thread: the state under a mutex (a panic elsewhere
//! never locks it for good) and a condition variable that announces each change; and the retry
//! delays of every background loop.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// First retry delay after a failure (etcd unreachable, a request timed out).
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// State of type `T` and its change notification.
pub(crate) struct Shared<T> {
    state: Mutex<T>,
    changed: Condvar,
}

impl<T> Shared<T> {
    pub(crate) fn new(state: T) -> Shared<T> {
        Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Wakes every [`Shared::wait_until`]: call after changing the state.
    pub(crate) fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits until `done` holds or `timeout` passes; returns the state, locked.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&T) -> bool,
    ) -> MutexGuard<'_, T> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !done(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = match self.changed.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        g
    }
}
