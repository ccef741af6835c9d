//! The two ways bdvmm runs a guest's vCPUs, behind one trait.
//!
//! * [`kvm`] — the product: rust-vmm on `/dev/kvm`, one thread per vCPU.
//! * [`tcg`] — a `qemu-system-x86_64 -accel tcg` child on the same memfd, driven over QMP, for
//!   hosts whose KVM cannot run a stock kernel.
//!
//! Both see the same memfd, memory layout and command line; the VMM's event loop and control API
//! do not know which one runs.

pub mod kvm;
pub mod tcg;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

pub use bdvmm_api::VcpuRegs;
pub use introspect::consistency::Pausable;

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// kvm where the host CPU has hardware virtualization (vmx/svm), tcg otherwise.
    Auto,
    /// rust-vmm on /dev/kvm.
    Kvm,
    /// QEMU TCG child process.
    Tcg,
}

impl EngineKind {
    /// Resolves `Auto` from `/proc/cpuinfo`; returns the choice and why.
    pub fn resolve(self) -> (EngineKind, String) {
        match self {
            EngineKind::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                if host_has_hw_virt(&cpuinfo) {
                    (EngineKind::Kvm, "host CPU has vmx/svm".into())
                } else {
                    (
                        EngineKind::Tcg,
                        "host CPU has no vmx/svm flag (nested or emulated KVM cannot run a stock kernel)"
                            .into(),
                    )
                }
            }
            other => (other, "chosen with --engine".into()),
        }
    }

    /// The engine's name.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::Kvm => "kvm",
            EngineKind::Tcg => "tcg",
        }
    }
}

/// Whether a `/proc/cpuinfo` text shows hardware virtualization in its `flags` lines.
pub fn host_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// What a guest reboot (the guest resetting its machine) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReset {
    /// bdvmm exits with status 0, as when the guest powers off (Firecracker's behaviour).
    #[default]
    Exit,
    /// The guest boots again in place: the same kernel, initrd and command line on the same
    /// memory, every vCPU back in its boot state.
    Restart,
}

/// What a guest kernel panic does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPanic {
    /// bdvmm ends the VM and exits with status 1, naming the panic.
    #[default]
    Exit,
    /// bdvmm logs the panic and keeps the VM: its memory stays reachable through the API and
    /// the bridge for a monitor to recover the guest's state (its State Boxes); the vCPUs stay in
    /// the kernel's panic loop (boot it with `panic=0` so the kernel does not reboot itself).
    Keep,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest shut itself down (poweroff, or reboot, which bdvmm treats as shutdown).
    Shutdown(String),
    /// Something went wrong: guest panic, QEMU crash, KVM error. bdvmm exits non-zero.
    Failed(String),
}

/// What became of an engine event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Handled; keep watching.
    Handled,
    /// That fd is finished (end of file): stop watching it.
    Unwatch,
    /// The VM has ended.
    Ended(VmExit),
}

/// Errors of the engines.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// From the kvm engine.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// From the tcg engine.
    #[error(transparent)]
    Tcg(#[from] tcg::TcgError),
    /// A vCPU index beyond the configured count.
    #[error("no vCPU {0}: the guest has {1}")]
    NoSuchVcpu(u8, u8),
    /// The VM has already stopped.
    #[error("the guest has stopped")]
    Stopped,
    /// The engine cannot do this.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A running guest's vCPUs, as the event loop and control API see them.
///
/// Its pause is the project's one [`Pausable`]: `pause` stops every vCPU and returns only once all
/// have acknowledged; `resume` lets them run again; both are idempotent.
pub trait Engine: Pausable<Error = EngineError> {
    /// "kvm" or "tcg".
    fn name(&self) -> &'static str;
    /// Number of vCPUs.
    fn vcpus(&self) -> u8;
    /// Registers of one vCPU (any state).
    fn regs(&mut self, vcpu: u8) -> Result<VcpuRegs, EngineError>;
    /// Restarts the guest in place (a hardware reset: it boots again from the same kernel, on
    /// the same memory), leaving it running.
    fn reset(&mut self) -> Result<(), EngineError>;
    /// Bytes typed on the host console, for the guest's serial port.
    fn serial_input(&mut self, bytes: &[u8]);
    /// File descriptors the event loop must watch for this engine.
    fn watch_fds(&self) -> Vec<RawFd>;
    /// One of `watch_fds` is readable: handle it.
    fn on_ready(&mut self, fd: RawFd) -> Ready;
    /// Stops the guest for good (bdvmm is exiting). Idempotent; never blocks for long.
    fn terminate(&mut self);
    /// vCPUs whose threads have stopped answering the VMM (stopped by a tracer, stuck in the
    /// host kernel), and for how long. Such a guest cannot be paused; it stays served.
    fn unanswering(&mut self) -> Vec<(u8, std::time::Duration)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hw_virt_is_read_from_flags_lines_only() {
        assert!(host_has_hw_virt("flags\t\t: fpu vme vmx sse\n"));
        assert!(host_has_hw_virt("model\t: x\nflags\t: svm lm\n"));
        assert!(!host_has_hw_virt("flags\t: fpu hypervisor svm_lock\n"));
        assert!(!host_has_hw_virt("model name\t: vmx svm\n"));
    }
}
