//! The kvm engine: rust-vmm on `/dev/kvm`.
//!
//! Set-up follows Firecracker's boot path: a VM with the in-kernel irqchip and PIT, guest RAM from
//! the shared memfd as KVM memory slots, COM1 and the i8042 on port I/O, the kernel loaded by
//! linux-loader (bzImage, or vmlinux via PVH or its 64-bit entry), an MP table for SMP, and one
//! thread per vCPU ([`vcpu`]).

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod mptable;
pub mod vcpu;

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::EventFd;

use self::boot::BootSpec;
use self::devices::{EventFdTrigger, PioBus, COM1_IRQ};
use self::vcpu::{VcpuEvent, VcpuHandle, VcpuReply, ACK_TIMEOUT};
use super::{Engine, EngineError, Ready, VcpuRegs, VmExit};
use crate::console::{Console, ConsoleWriter};
use crate::memory::GuestRam;

/// Where KVM may put its TSS (3 pages) on Intel; just below the 4 GiB BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of the kvm engine.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The KVM device cannot be opened.
    #[error("cannot open {0}: {1}; this host has no usable KVM, run with --engine tcg")]
    Open(String, kvm_ioctls::Error),
    /// A VM-level ioctl failed.
    #[error("KVM VM set-up failed ({0}): {1}")]
    Vm(&'static str, kvm_ioctls::Error),
    /// A vCPU ioctl failed.
    #[error("KVM vCPU ioctl failed: {0}")]
    Vcpu(kvm_ioctls::Error),
    /// Loading or describing the guest failed.
    #[error("{0}")]
    Boot(String),
    /// Thread or signal set-up failed.
    #[error("cannot start vCPU threads: {0}")]
    Thread(std::io::Error),
    /// A vCPU did not acknowledge.
    #[error("{0}")]
    Ack(String),
    /// Too many vCPUs for this host's KVM.
    #[error("--vcpus {0} is more than this host's KVM supports ({1})")]
    TooManyVcpus(u8, usize),
}

/// The kvm engine.
pub struct KvmEngine {
    // Field order matters for drop: vCPU threads end before the VM and KVM fds close.
    vcpus: Vec<VcpuHandle>,
    bus: Arc<PioBus>,
    exits: Receiver<(u8, VmExit)>,
    exit_evt: Arc<EventFd>,
    reset_fd: RawFd,
    _vm: VmFd,
    _kvm: Kvm,
    stopped: bool,
}

impl KvmEngine {
    /// Creates the VM, loads the guest and starts its vCPU threads (paused; call `resume`).
    pub fn new(
        ram: &GuestRam,
        spec: &BootSpec,
        console: Console,
        device: &Path,
    ) -> Result<Self, KvmError> {
        let shown = device.display().to_string();
        let cpath = CString::new(device.as_os_str().as_bytes())
            .map_err(|_| KvmError::Open(shown.clone(), kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| KvmError::Open(shown, e))?;
        let max = kvm.get_max_vcpus();
        if usize::from(spec.vcpus) > max {
            return Err(KvmError::TooManyVcpus(spec.vcpus, max));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Irqfd,
            Cap::ImmediateExit,
            Cap::UserMemory,
            Cap::Pit2,
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::Boot(format!(
                    "this host's KVM lacks {cap:?}; run with --engine tcg"
                )));
            }
        }
        let vm = kvm.create_vm().map_err(|e| KvmError::Vm("create VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| KvmError::Vm("TSS address", e))?;
        vm.create_irq_chip()
            .map_err(|e| KvmError::Vm("irqchip", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| KvmError::Vm("PIT", e))?;

        for (slot, region) in ram.mem.iter().enumerate() {
            let host = ram
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| KvmError::Boot(format!("guest RAM not mapped: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is bdvmm's own shared mapping of the memfd, which lives (in
            // `ram`, owned by the caller for the VM's whole life) longer than this VM.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| KvmError::Vm("memory slot", e))?;
        }

        let serial_irq = EventFdTrigger::new().map_err(KvmError::Thread)?;
        vm.register_irqfd(&serial_irq.0, COM1_IRQ)
            .map_err(|e| KvmError::Vm("serial irqfd", e))?;
        let reset = EventFdTrigger::new().map_err(KvmError::Thread)?;
        let reset_fd = reset.0.as_raw_fd();
        let bus = Arc::new(PioBus {
            serial: Mutex::new(Serial::new(serial_irq, ConsoleWriter(console))),
            i8042: Mutex::new(I8042Device::new(reset)),
        });

        let entry = boot::load(&ram.mem, &ram.layout, spec)?;
        tracing::info!(?entry, "kernel loaded");

        vcpu::register_kick_handler().map_err(KvmError::Thread)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Vm("supported CPUID", e))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        let exit_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(KvmError::Thread)?);
        let mut vcpus = Vec::with_capacity(spec.vcpus as usize);
        for id in 0..spec.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| KvmError::Vm("create vCPU", e))?;
            cpu::setup_cpuid(&fd, &supported, id, spec.vcpus, tsc_deadline)?;
            cpu::setup_msrs(&fd)?;
            cpu::setup_regs(&fd, entry)?;
            cpu::setup_sregs(&ram.mem, &fd, entry)?;
            cpu::setup_fpu(&fd)?;
            cpu::setup_lapic(&fd)?;
            vcpus.push(
                VcpuHandle::spawn(id, fd, bus.clone(), exit_tx.clone(), exit_evt.clone())
                    .map_err(KvmError::Thread)?,
            );
        }
        Ok(Self {
            vcpus,
            bus,
            exits: exit_rx,
            exit_evt,
            reset_fd,
            _vm: vm,
            _kvm: kvm,
            stopped: false,
        })
    }

    /// Sends `event` to every vCPU, then collects one acknowledgement from each.
    fn broadcast(&mut self, event: VcpuEvent) -> Result<(), KvmError> {
        for v in &self.vcpus {
            v.send(event).map_err(KvmError::Ack)?;
        }
        for v in &self.vcpus {
            match v.reply(ACK_TIMEOUT).map_err(KvmError::Ack)? {
                VcpuReply::Paused | VcpuReply::Resumed => {}
                other => {
                    return Err(KvmError::Ack(format!(
                        "vCPU {} answered {other:?} to {event:?}",
                        v.id
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Engine for KvmEngine {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn vcpus(&self) -> u8 {
        self.vcpus.len() as u8
    }

    fn pause(&mut self) -> Result<(), EngineError> {
        Ok(self.broadcast(VcpuEvent::Pause)?)
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        Ok(self.broadcast(VcpuEvent::Resume)?)
    }

    fn regs(&mut self, id: u8) -> Result<VcpuRegs, EngineError> {
        let count = self.vcpus();
        let v = self
            .vcpus
            .get(usize::from(id))
            .ok_or(EngineError::NoSuchVcpu(id, count))?;
        v.send(VcpuEvent::GetRegs).map_err(KvmError::Ack)?;
        match v.reply(ACK_TIMEOUT).map_err(KvmError::Ack)? {
            VcpuReply::Regs(r) => Ok(*r),
            VcpuReply::RegsFailed(e) => Err(KvmError::Ack(e).into()),
            other => Err(KvmError::Ack(format!("vCPU {id} answered {other:?} to GetRegs")).into()),
        }
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        // A reset would need the boot set-up (kernel load, boot parameters, vCPU registers)
        // redone on live vCPU threads; like Firecracker, this engine ends the VM on a guest
        // reset instead. Restart bdvmm to restart the guest.
        Err(EngineError::Unsupported(
            "the kvm engine cannot reset a guest in place; restart bdvmm instead",
        ))
    }

    fn serial_input(&mut self, bytes: &[u8]) {
        let mut serial = self.bus.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.enqueue_raw_bytes(bytes) {
            tracing::debug!("serial input dropped: {e:?}");
        }
    }

    fn watch_fds(&self) -> Vec<RawFd> {
        vec![self.exit_evt.as_raw_fd(), self.reset_fd]
    }

    fn on_ready(&mut self, fd: RawFd) -> Ready {
        if fd == self.reset_fd {
            let _ = self.bus.i8042.lock().map(|d| d.reset_evt().0.read());
            return Ready::Ended(VmExit::Shutdown(
                "guest reset through the i8042 (bdvmm treats a guest reboot as shutdown)".into(),
            ));
        }
        let _ = self.exit_evt.read();
        match self.exits.try_recv() {
            Ok((_, end)) => Ready::Ended(end),
            Err(_) => Ready::Handled,
        }
    }

    fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for v in &mut self.vcpus {
            v.finish();
        }
    }
}

impl Drop for KvmEngine {
    fn drop(&mut self) {
        self.terminate();
    }
}
