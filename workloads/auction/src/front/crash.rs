//! Crash injection for tests: the front end freezes at a chosen point of a BID, as if its machine
//! stopped there, and dies if it is ever continued.
//!
//! Freezing (SIGSTOP to itself) rather than dying at once keeps the process's memory, and so its
//! State Boxes, readable from outside, as a failed guest's memory stays readable by its monitor.

/// Where in a BID to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CrashPoint {
    /// After the pending record is exported and the transaction's rows are written, before COMMIT.
    Pending,
    /// After COMMIT, before the committed state is exported.
    Commit,
}

/// A crash armed for the n-th BID (counted from 1) this process executes.
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    /// Where.
    pub point: CrashPoint,
    /// Which BID.
    pub on_bid: u64,
}

impl Crash {
    /// Crashes now if this is the armed point of the armed BID.
    pub fn maybe(crash: Option<Crash>, point: CrashPoint, bid_number: u64) {
        if let Some(c) = crash {
            if c.point == point && c.on_bid == bid_number {
                freeze_then_abort(point);
            }
        }
    }
}

fn freeze_then_abort(point: CrashPoint) -> ! {
    tracing::error!(
        ?point,
        "crash injection: freezing (SIGSTOP), will abort if continued"
    );
    // SAFETY: raise() only sends a signal to this process; SIGSTOP stops every thread here.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
    std::process::abort()
}
