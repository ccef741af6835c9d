//! Integer conversions that cannot lose anything on the one target bdvmm supports, and durations
//! reported as whole numbers.
//!
//! bdvmm runs on x86_64 Linux only (KVM, memfd), where `usize` is 64 bits wide, so every `u64`
//! fits in a `usize`.

use std::time::Duration;

#[cfg(target_pointer_width = "64")]
const _: () = assert!(usize::BITS == 64);

/// `x` as a `usize`, lossless because `usize` is 64 bits wide on every target we build for (a
/// 32-bit target does not compile). For sizes of guest RAM and of files we map or read whole.
#[cfg(target_pointer_width = "64")]
#[inline]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // Lossless: usize is 64 bits wide (asserted above).
pub(crate) const fn usize_from(x: u64) -> usize {
    x as usize
}

/// `d` in whole nanoseconds, `u64::MAX` past 584 years.
#[must_use]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `d` in whole milliseconds, `u64::MAX` if it does not fit.
#[must_use]
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
