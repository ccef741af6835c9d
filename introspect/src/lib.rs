//! Reads a Linux guest's state from its physical memory alone.
//!
//! * [`elf`] — a minimal, bounds-checked ELF64 reader (sections, `.symtab`).
//! * [`btf`] — struct layouts and enum values from the kernel's BTF.
//! * [`mem`] — guest-physical memory sources (bdvmm's memfd, dump files, byte vectors).
//! * [`sensorbox`] — the Sensor Box of a patched guest, read consistently.
//! * [`hooks`] — the repair-hook mailbox: asking the guest kernel to kill.
//! * [`repair`] — the one kill path: the never-kill rule, mailbox or direct SIGKILL.
//! * [`consistency`] — [`consistency::Pausable`], the project's one pause, and reads at a moment
//!   when the task list is not being changed.
//! * [`target`], [`tasks`], [`kernel`], [`paging`] — locating the kernel and walking its tasks;
//!   [`layout`] — the fields the walk reads, in whichever shape the kernel has them.
//! * [`image`], [`kallsyms`], [`discover`] — the kernel image's mappings, the symbol table in its
//!   read-only data and its BTF: a stock kernel with no System.map and no vmlinux.
//! * [`show`] — text tables for command-line tools.
//! * [`cache`] — a page cache over any memory source, for reads of a paused guest.
//! * [`le`] — the checked little-endian reader every parser of untrusted bytes uses.
//! * [`banner`] — the kernel's release, from its banner, for messages.

pub mod banner;
pub mod btf;
pub mod cache;
pub mod consistency;
pub mod conv;
pub mod cpus;
pub mod discover;
pub mod elf;
pub mod forkrate;
pub mod hooks;
pub mod image;
pub mod kallsyms;
pub mod kernel;
pub mod layout;
pub mod le;
pub mod mem;
pub mod paging;
pub mod repair;
pub mod sensorbox;
pub mod show;
pub mod statebox;
pub mod target;
pub mod tasks;
pub mod virtual_sensors;
