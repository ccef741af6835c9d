//! Reading the guest while it is paused, at a moment when its task list is not being changed:
//! the paper's remote OS lock, with its brute-force fallback.
//!
//! Pause the guest; if `tasklist_lock` is write-held at that instant (a fork or exit was
//! mid-update), let the guest run a moment and pause again; after a timeout, read anyway and say
//! so in the result.

use std::time::{Duration, Instant};

/// Something that can stop and restart the guest (bdvmm's API, the bridge).
pub trait Pauser {
    /// Stops every vCPU.
    fn pause(&mut self) -> Result<(), String>;
    /// Lets them run.
    fn resume(&mut self) -> Result<(), String>;
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
pub fn pause_quiescent<E: From<String>>(
    pauser: &mut dyn Pauser,
    timeout: Duration,
    mut busy: impl FnMut() -> Result<bool, E>,
) -> Result<Locked<()>, E> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        pauser.pause().map_err(E::from)?;
        attempts += 1;
        let held = match busy() {
            Ok(h) => h,
            Err(e) => {
                let _ = pauser.resume();
                return Err(e);
            }
        };
        let forced = held && start.elapsed() >= timeout;
        if !held || forced {
            return Ok(Locked {
                value: (),
                attempts,
                forced,
            });
        }
        pauser.resume().map_err(E::from)?;
        std::thread::sleep(BACKOFF);
    }
}

/// Pauses, waits (as above) for `busy()` to say false, runs `read` while paused, and resumes
/// whatever happens.
pub fn read_quiescent<T, E: From<String>>(
    pauser: &mut dyn Pauser,
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

    impl Pauser for Fake {
        fn pause(&mut self) -> Result<(), String> {
            assert!(!self.paused);
            self.paused = true;
            self.pauses += 1;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), String> {
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
            || -> Result<bool, String> {
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
            || -> Result<bool, String> { Ok(true) },
            || Ok("read anyway"),
        )
        .unwrap();
        assert!(r.forced && r.attempts > 1);
        assert!(!p.paused);
    }

    #[test]
    fn the_guest_is_resumed_when_the_read_fails() {
        let mut p = Fake::default();
        let r: Result<Locked<()>, String> = read_quiescent(
            &mut p,
            Duration::from_secs(1),
            || Ok(false),
            || Err("boom".into()),
        );
        assert!(r.is_err());
        assert!(!p.paused);
    }
}
