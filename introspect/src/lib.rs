//! Reads a Linux guest's state from its physical memory alone.
//!
//! * [`mem`] — guest-physical memory sources (bdvmm's memfd, dump files, byte vectors).
//! * [`sensorbox`] — the Sensor Box of a patched guest, read consistently.
//! * [`hooks`] — the repair-hook mailbox: asking the guest kernel to kill.

pub mod hooks;
pub mod mem;
pub mod sensorbox;
