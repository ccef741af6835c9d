//! The control API's wire format: one JSON object per line, in both directions, over a Unix
//! stream socket. Each request gets exactly one reply, in order.
//!
//! Requests (`cmd` selects the operation):
//!
//! | request | reply fields (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"pause","lease_ms":2000}` | `pause_ns` (time until every vCPU acknowledged), `lease_ms`, `renewed` |
//! | `{"cmd":"resume"}` | `resume_ns`, `was_paused` |
//! | `{"cmd":"regs","vcpu":0}` | `regs`: `rip rsp rflags cr0 cr2 cr3 cr4 efer cpl fs_base gs_base kernel_gs_base` |
//! | `{"cmd":"memory"}` | `size`, `ranges` (`gpa size offset`), `backdoor` (`gpa size`); the memfd arrives with the reply as an `SCM_RIGHTS` ancillary message |
//! | `{"cmd":"reset"}` | `reset_ns`: the guest reboots in place on the same memory (kvm engine: a new VM with every vCPU in its boot state, the kernel and initrd loaded again; tcg engine: QEMU's system reset). Refused while another client holds the pause lease; the caller's own lease ends first |
//! | `{"cmd":"status"}` | `engine vcpus mem_bytes state uptime_ms pid cmdline lease_holder lease_remaining_ms pauses lease_expiries paused_ns_total` |
//!
//! Errors are `{"ok": false, "error": "<what went wrong and what to do>"}`.
//!
//! **The pause lease.** A `pause` makes the calling connection the lease holder for `lease_ms`
//! (default set by `bdvmm run --lease-ms`, 2000). The holder may `pause` again to renew, and
//! `resume` to release. When the lease runs out, or the holder's connection closes for any reason
//! (including the process dying), bdvmm resumes the guest by itself: a dead monitor can never
//! leave a guest frozen. While one connection holds the lease, other connections' `pause` and
//! `resume` are refused.

use serde::{Deserialize, Serialize};

/// Longest request line the server accepts.
pub const MAX_REQUEST: usize = 4096;
/// Shortest and longest pause lease a client may ask for.
pub const LEASE_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=600_000;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Pause all vCPUs (or renew the lease).
    Pause {
        /// Lease length; the server default if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_ms: Option<u64>,
    },
    /// Resume all vCPUs.
    Resume,
    /// Registers of one vCPU.
    Regs {
        /// vCPU index.
        #[serde(default)]
        vcpu: u8,
    },
    /// The memfd and its map.
    Memory,
    /// VM status.
    Status,
    /// Restart the guest in place (tcg engine); any lease ends first.
    Reset,
}

/// Reply to `pause`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReply {
    /// Nanoseconds from the request until every vCPU acknowledged (0 for a renewal).
    pub pause_ns: u64,
    /// The lease granted.
    pub lease_ms: u64,
    /// True if the caller already held the lease and this only renewed it.
    pub renewed: bool,
}

/// Reply to `resume`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeReply {
    /// Nanoseconds until every vCPU acknowledged (0 if it was not paused).
    pub resume_ns: u64,
    /// Whether the guest was paused.
    pub was_paused: bool,
}

/// Reply to `regs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegsReply {
    /// The registers.
    pub regs: VcpuRegs,
}

/// Reply to `memory` (the memfd travels alongside).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReply {
    /// memfd size in bytes.
    pub size: u64,
    /// Guest-physical ranges and their memfd offsets.
    pub ranges: Vec<RamRange>,
    /// The reserved backdoor range.
    pub backdoor: GpaRange,
}

/// Reply to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// "kvm" or "tcg".
    pub engine: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// "running" or "paused".
    pub state: String,
    /// Since bdvmm started the guest.
    pub uptime_ms: u64,
    /// bdvmm's pid.
    pub pid: u32,
    /// The kernel command line the guest got.
    pub cmdline: String,
    /// "you", "other" or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// Time left on the current lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_remaining_ms: Option<u64>,
    /// Pauses granted so far.
    pub pauses: u64,
    /// Leases that ran out or whose holder vanished.
    pub lease_expiries: u64,
    /// Nanoseconds the guest has spent paused under leases since bdvmm started it, the pause
    /// going on now included: what the monitors' locks have cost the guest (e.g. sample it twice
    /// and divide the difference by the time between). Absent from older bdvmm builds.
    #[serde(default)]
    pub paused_ns_total: u64,
    /// vCPUs whose threads have stopped answering the VMM (stopped by a tracer or a debugger,
    /// or stuck in the host kernel): while any is listed the guest cannot be paused, and its
    /// memory is still served. Empty (and absent from the JSON) on a healthy VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unanswering_vcpus: Vec<u8>,
}

/// A vCPU's registers, as much as a monitor needs to walk the guest's page tables and per-CPU data.
///
/// The one register type of the project: bdvmm's engines fill it, its API and the bridge's `REGS`
/// reply carry it (the bridge's `wire::Regs` is this type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VcpuRegs {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR2 (last page-fault address).
    pub cr2: u64,
    /// CR3 (page-table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER MSR.
    pub efer: u64,
    /// Current privilege level (CS.DPL).
    pub cpl: u8,
    /// FS base.
    pub fs_base: u64,
    /// GS base (the kernel's per-CPU base while in kernel mode).
    pub gs_base: u64,
    /// KERNEL_GS_BASE MSR (the per-CPU base while in user mode), where the engine can read it.
    pub kernel_gs_base: Option<u64>,
}

/// A contiguous run of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of `gpa` in the memfd.
    pub offset: u64,
}

/// A guest-physical range without a file offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpaRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}
