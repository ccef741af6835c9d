//! State Boxes: a process exports each session's essential state into one memory region at a
//! fixed virtual address, in a format ([`abi`], `ABI.md`) that a monitor can read through the
//! process's page tables without the help of the guest's CPU or OS.
//!
//! - [`abi`]: the format, its check, and the parsers a monitor uses on hostile bytes (pure code).
//! - [`Region`] (Linux): the writer side for Rust applications. C applications use `c/statebox.h`.
//!
//! ```no_run
//! # #[cfg(target_os = "linux")]
//! # fn main() -> Result<(), statebox::RegionError> {
//! use statebox::Region;
//! // 64 sessions of at most 4 KiB of state each (needs RLIMIT_MEMLOCK for ~0.5 MiB).
//! let mut region = Region::create(64, 4096)?;
//! let session = region.create_box(42)?;
//! region.export(&session, b"cart: 3 items; last ack 17")?;
//! let mut back = Vec::new();
//! region.import(&session, &mut back)?;
//! assert_eq!(back, b"cart: 3 items; last ack 17");
//! region.delete(session)?;
//! # Ok(())
//! # }
//! # #[cfg(not(target_os = "linux"))]
//! # fn main() {}
//! ```

pub mod abi;
#[cfg(target_os = "linux")]
mod mapping;
#[cfg(target_os = "linux")]
mod random;
#[cfg(target_os = "linux")]
mod region;

pub use abi::{AbiError, BoxCopy, Header};
#[cfg(target_os = "linux")]
pub use mapping::MapError;
#[cfg(target_os = "linux")]
pub use region::{BoxHandle, Region, RegionError};

/// The README's Rust example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
