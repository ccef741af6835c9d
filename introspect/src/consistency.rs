//! Reading the guest while it is paused, at a moment when its task list is not being changed:
//! the paper's remote OS lock, with its brute-force fallback.
//!
//! Pause the guest; if `tasklist_lock` is write-held at that instant (a fork or exit was
//! mid-update), let the guest run a moment and pause again; after a timeout, read anyway and say
//! so in the result.

use std::time::{Duration, Instant};

/// Something that can stop and restart the guest: the one pause of the project, implemented by
/// every layer (bdvmm's engines and API client, the bridge's backend and client, the monitor's
/// guest). Above the bridge the same thing is called the *lock*; below it, *pause*. The mapping is
/// written down once, in `docs/architecture.md`.
///
/// Take it with [`Pausable::paused`], which returns a guard that resumes the guest when dropped,
/// so no error path can leave a guest stopped (the bridge's lease is the second line of defence).
pub trait Pausable {
    /// Why pausing or resuming failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Stops every vCPU; returns once they have all stopped.
    fn pause(&mut self) -> Result<(), Self::Error>;
    /// Lets them run.
    fn resume(&mut self) -> Result<(), Self::Error>;
    /// Pauses, and returns a guard that resumes on drop.
    fn paused(&mut self) -> Result<Paused<'_, Self>, Self::Error>
    where
        Self: Sized,
    {
        self.pause()?;
        Ok(Paused {
            inner: self,
            held: true,
        })
    }
}

/// A paused guest; dropping it resumes the guest (errors are then logged, not returned: call
/// [`Paused::resume`] to see them).
pub struct Paused<'a, P: Pausable> {
    inner: &'a mut P,
    held: bool,
}

impl<P: Pausable> Paused<'_, P> {
    /// Resumes now, and says whether that worked.
    pub fn resume(mut self) -> Result<(), P::Error> {
        self.held = false;
        self.inner.resume()
    }

    /// Leaves the guest paused when the guard goes (the caller resumes it later).
    pub fn keep(mut self) {
        self.held = false;
    }
}

impl<P: Pausable> std::ops::Deref for Paused<'_, P> {
    type Target = P;
    fn deref(&self) -> &P {
        self.inner
    }
}

impl<P: Pausable> std::ops::DerefMut for Paused<'_, P> {
    fn deref_mut(&mut self) -> &mut P {
        self.inner
    }
}

impl<P: Pausable> Drop for Paused<'_, P> {
    fn drop(&mut self) {
        if self.held {
            if let Err(e) = self.inner.resume() {
                tracing::warn!("resuming the guest failed: {e}");
            }
        }
    }
}

/// A value read under the pause lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locked<T> {
    /// What was read.
    pub value: T,
    /// Pauses taken (1 if the lock was free at once).
    pub attempts: u32,
    /// True if the lock was still write-held at the timeout and the read went ahead anyway.
    pub forced: bool,
}

/// How long the guest runs between two attempts.
const BACKOFF: Duration = Duration::from_millis(2);

/// Pauses at a moment when `busy()` says false (retrying with the guest running [`BACKOFF`] in
/// between), or after `timeout` anyway (`forced`), and returns with the guest still paused: the
/// caller resumes it. On error the guest is resumed.
pub fn pause_quiescent<P: Pausable, E: From<P::Error>>(
    pauser: &mut P,
    timeout: Duration,
    mut busy: impl FnMut() -> Result<bool, E>,
) -> Result<Locked<()>, E> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        let paused = pauser.paused()?;
        attempts += 1;
        let held = busy()?;
        let forced = held && start.elapsed() >= timeout;
        if !held || forced {
            paused.keep();
            return Ok(Locked {
                value: (),
                attempts,
                forced,
            });
        }
        paused.resume()?;
        std::thread::sleep(BACKOFF);
    }
}

/// Pauses, waits (as above) for `busy()` to say false, runs `read` while paused, and resumes
/// whatever happens.
pub fn read_quiescent<P: Pausable, T, E: From<P::Error>>(
    pauser: &mut P,
    timeout: Duration,
    busy: impl FnMut() -> Result<bool, E>,
    read: impl FnOnce() -> Result<T, E>,
) -> Result<Locked<T>, E> {
    let Locked {
        attempts, forced, ..
    } = pause_quiescent(pauser, timeout, busy)?;
    let value = read();
    let resumed = pauser.resume().map_err(E::from);
    let value = value?;
    resumed?;
    Ok(Locked {
        value,
        attempts,
        forced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        paused: bool,
        pauses: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("fake")]
    struct FakeError;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Pause(#[from] FakeError),
        #[error("{0}")]
        Read(&'static str),
    }

    impl Pausable for Fake {
        type Error = FakeError;
        fn pause(&mut self) -> Result<(), FakeError> {
            assert!(!self.paused);
            self.paused = true;
            self.pauses += 1;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), FakeError> {
            assert!(self.paused);
            self.paused = false;
            Ok(())
        }
    }

    #[test]
    fn retries_while_the_lock_is_held_then_reads() {
        let mut p = Fake::default();
        let mut held = 3;
        let r: Locked<u32> = read_quiescent(
            &mut p,
            Duration::from_secs(5),
            || -> Result<bool, TestError> {
                held -= 1;
                Ok(held >= 0)
            },
            || Ok(42),
        )
        .unwrap();
        assert_eq!((r.value, r.attempts, r.forced), (42, 4, false));
        assert!(!p.paused, "the guest must be resumed");
    }

    #[test]
    fn a_lock_held_forever_is_taken_by_force_after_the_timeout() {
        let mut p = Fake::default();
        let r: Locked<&str> = read_quiescent(
            &mut p,
            Duration::from_millis(20),
            || -> Result<bool, TestError> { Ok(true) },
            || Ok("read anyway"),
        )
        .unwrap();
        assert!(r.forced && r.attempts > 1);
        assert!(!p.paused);
    }

    #[test]
    fn the_guest_is_resumed_when_the_read_fails() {
        let mut p = Fake::default();
        let r: Result<Locked<()>, TestError> = read_quiescent(
            &mut p,
            Duration::from_secs(1),
            || Ok(false),
            || Err(TestError::Read("boom")),
        );
        assert!(r.is_err());
        assert!(!p.paused);
    }
}
