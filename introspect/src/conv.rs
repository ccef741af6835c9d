//! Integer conversions that cannot lose anything on the one target this project supports, and
//! durations as the whole numbers that events, replies and metrics carry. The one copy for every
//! crate of the workspace.
//!
//! Backdoors runs on x86_64 Linux only (KVM, bdvmm's memfd, RDMA verbs), where `usize` is 64 bits
//! wide, so every `u64` fits in a `usize`. Where such a value is not already bounded by a check,
//! use `usize::try_from` and an error instead: values from the guest are untrusted.

#[cfg(target_pointer_width = "64")]
const _: () = assert!(usize::BITS == 64);

/// `x` as a `usize`, lossless because `usize` is 64 bits wide on every target we build for (a
/// 32-bit target does not compile). For lengths and offsets that a check has already bounded.
#[cfg(target_pointer_width = "64")]
#[inline]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // Lossless: usize is 64 bits wide (asserted above).
pub const fn usize_from(x: u64) -> usize {
    x as usize
}

// Durations as whole numbers. Each saturates at `u64::MAX` (more than 584 years in nanoseconds)
// rather than wrap to a small, plausible-looking number.

/// `d` in whole milliseconds.
#[must_use]
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` in whole microseconds.
#[must_use]
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `d` in whole nanoseconds.
#[must_use]
pub fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
