//! Integer conversions that cannot lose anything on the one target this project supports.
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
pub(crate) const fn usize_from(x: u64) -> usize {
    x as usize
}
