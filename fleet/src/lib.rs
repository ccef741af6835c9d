//! fleet: guests and monitors meeting in etcd (see "Many hosts, many monitors" in `DESIGN.md`).
//!
//! Layout under a configurable prefix (default `/backdoors`):
//!
//! | key                       | value (JSON)     | written by                      | under        |
//! |---------------------------|------------------|---------------------------------|--------------|
//! | `<prefix>/guests/<name>`  | [`GuestRecord`]  | the guest's `rdma-bridge`       | its lease    |
//! | `<prefix>/monitors/<name>`| [`MemberRecord`] | each monitor (`bdmon`)          | its lease    |
//!
//! * [`Registration`] — a guest's key, kept alive under its lease, re-made after etcd loses it.
//! * [`Member`] — a monitor's membership, with *fencing*: [`Member::owns_until`] is the instant
//!   until which the monitor can prove it is still a member; past it the monitor must stop acting.
//! * [`Watcher`] — the current [`View`] (members and guests), listed then watched.
//! * [`assigned`] — which `k` monitors serve a guest: rendezvous hashing, so that a member leaving
//!   moves only the guests it had.
//!
//! Each handle owns a one-thread tokio runtime on a thread of its own and offers plain synchronous
//! methods, so synchronous code (the bridge, bdmon) uses it without an executor. Everything read
//! from etcd is untrusted: keys and values are bounded and validated before they enter a view.

mod assign;
pub mod config;
mod lease;
mod records;
mod shared;
#[doc(hidden)]
pub mod testing;
mod watch;

pub use assign::{assigned, score};
pub use config::{FleetConfig, FleetError};
pub use lease::{Member, Registration};
pub use records::{check_name, GuestRecord, MemberRecord, MAX_NAME, MAX_VALUE};
pub use watch::{View, Watcher};
