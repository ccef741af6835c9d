//! The kvm engine: rust-vmm on `/dev/kvm`.
//!
//! Set-up follows Firecracker's boot path: a VM with the in-kernel irqchip and PIT, guest RAM from
//! the shared memfd as KVM memory slots, COM1, the i8042 and the ACPI sleep registers on port I/O,
//! the kernel loaded by linux-loader (bzImage, or vmlinux via PVH or its 64-bit entry), an MP
//! table and ACPI tables (MADT) for SMP, and one thread per vCPU ([`vcpu`]).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod mptable;
pub mod vcpu;

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::EventFd;

use self::boot::BootSpec;
use self::devices::{EventFdTrigger, PioBus, COM1_IRQ};
use self::vcpu::{VcpuError, VcpuEvent, VcpuExitReport, VcpuHandle, VcpuReply, ACK_TIMEOUT};
use super::{Engine, EngineError, OnReset, Pausable, Ready, VcpuRegs, VmExit};
use crate::console::{Console, ConsoleWriter};
use crate::devices::bus::Slot;
use crate::devices::setup::{IoEvent, MmioDevices};
use crate::layout::MemoryLayout;
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
    #[error(transparent)]
    Ack(#[from] VcpuError),
    /// Too many vCPUs for this host's KVM.
    #[error("--vcpus {0} is more than this host's KVM supports ({1})")]
    TooManyVcpus(u8, usize),
}

/// The kvm engine.
///
/// A restart (the API's `reset`, or a guest reboot under `--on-reset restart`) is a hardware
/// reset done the simple, sure way: the vCPU threads end, the KVM VM is destroyed, and a new one
/// is built on the same memfd — fresh irqchip, PIT, LAPICs and vCPUs, the kernel, initrd and boot
/// information loaded again — so nothing of the old guest's CPU state (kvmclock pages, pending
/// interrupts, APs already started) survives into the new boot. Memory clients (the bridge)
/// keep their mapping: only the VM around the memory is new.
pub struct KvmEngine {
    // Field order matters for drop: vCPU threads end before the VM and KVM fds close.
    vcpus: Vec<VcpuHandle>,
    vm: Option<VmFd>,
    bus: Arc<PioBus>,
    exits: Receiver<VcpuExitReport>,
    exit_tx: Sender<VcpuExitReport>,
    exit_evt: Arc<EventFd>,
    reset_fd: RawFd,
    poweroff_fd: RawFd,
    serial_irq: EventFd,
    /// The virtio-mmio devices' interrupt eventfds, registered as irqfds on every (re)build.
    device_irqs: Vec<(Slot, EventFd)>,
    /// Queue notifications the kernel serves (vhost-net kicks), registered as ioeventfds.
    device_ioevents: Vec<IoEvent>,
    mem: GuestMemoryMmap,
    layout: MemoryLayout,
    spec: BootSpec,
    on_reset: OnReset,
    restarts: u32,
    kvm: Kvm,
    stopped: bool,
}

impl KvmEngine {
    /// Opens KVM, checks what it can do, builds the VM and loads the guest; its vCPU threads start
    /// paused (call `resume`).
    pub fn new(
        ram: &GuestRam,
        mut spec: BootSpec,
        console: Console,
        device: &Path,
        on_reset: OnReset,
        devices: MmioDevices,
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
        let serial_irq = EventFdTrigger::new().map_err(KvmError::Thread)?;
        let serial_irq_fd = serial_irq.0.try_clone().map_err(KvmError::Thread)?;
        let reset = EventFdTrigger::new().map_err(KvmError::Thread)?;
        let reset_fd = reset.0.as_raw_fd();
        let poweroff = EventFdTrigger::new().map_err(KvmError::Thread)?;
        let poweroff_fd = poweroff.0.as_raw_fd();
        spec.acpi_devices = devices
            .bus
            .acpi_aml()
            .ok_or_else(|| KvmError::Boot("the devices' ACPI description is too long".into()))?;
        let bus = Arc::new(PioBus {
            mmio: devices.bus,
            serial: Mutex::new(Serial::new(serial_irq, ConsoleWriter(console))),
            i8042: Mutex::new(I8042Device::new(reset)),
            poweroff,
        });
        vcpu::register_kick_handler().map_err(KvmError::Thread)?;
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
        let exit_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(KvmError::Thread)?);
        let mut engine = Self {
            vcpus: Vec::new(),
            vm: None,
            bus,
            exits: exit_rx,
            exit_tx,
            exit_evt,
            reset_fd,
            poweroff_fd,
            serial_irq: serial_irq_fd,
            device_irqs: devices.irqs,
            device_ioevents: devices.ioevents,
            mem: ram.mem.clone(),
            layout: ram.layout.clone(),
            spec,
            on_reset,
            restarts: 0,
            kvm,
            stopped: false,
        };
        engine.build()?;
        Ok(engine)
    }

    /// Creates the KVM VM around guest RAM, loads the guest and starts its vCPU threads (paused).
    fn build(&mut self) -> Result<(), KvmError> {
        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| KvmError::Vm("create VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| KvmError::Vm("TSS address", e))?;
        vm.create_irq_chip()
            .map_err(|e| KvmError::Vm("irqchip", e))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(|e| KvmError::Vm("PIT", e))?;

        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| KvmError::Boot(format!("guest RAM not mapped: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a shared mapping of the memfd held by `self.mem` (a clone of
            // bdvmm's own), which lives as long as this engine and so longer than this VM.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| KvmError::Vm("memory slot", e))?;
        }
        vm.register_irqfd(&self.serial_irq, COM1_IRQ)
            .map_err(|e| KvmError::Vm("serial irqfd", e))?;
        for (slot, fd) in &self.device_irqs {
            vm.register_irqfd(fd, slot.irq)
                .map_err(|e| KvmError::Vm("virtio irqfd", e))?;
        }
        for io in &self.device_ioevents {
            // Without it the guest's notifications still arrive, as MMIO exits.
            if let Err(e) = vm.register_ioevent(&io.fd, &IoEventAddress::Mmio(io.addr), io.queue) {
                tracing::warn!(
                    addr = io.addr,
                    queue = io.queue,
                    "no ioeventfd for a virtio queue, notifications take MMIO exits: {e}"
                );
            }
        }

        let entry = boot::load(&self.mem, &self.layout, &self.spec)?;
        tracing::info!(?entry, "kernel loaded");

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Vm("supported CPUID", e))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(self.spec.vcpus as usize);
        for id in 0..self.spec.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| KvmError::Vm("create vCPU", e))?;
            cpu::setup_cpuid(&fd, &supported, id, self.spec.vcpus, tsc_deadline)?;
            cpu::setup_msrs(&fd)?;
            cpu::setup_regs(&fd, entry)?;
            cpu::setup_sregs(&self.mem, &fd, entry)?;
            cpu::setup_fpu(&fd)?;
            cpu::setup_lapic(&fd)?;
            vcpus.push(
                VcpuHandle::spawn(
                    id,
                    fd,
                    self.bus.clone(),
                    self.exit_tx.clone(),
                    self.exit_evt.clone(),
                )
                .map_err(KvmError::Thread)?,
            );
        }
        self.vcpus = vcpus;
        self.vm = Some(vm);
        Ok(())
    }

    /// Ends every vCPU thread and destroys the VM (guest RAM stays).
    fn teardown(&mut self) {
        for v in &mut self.vcpus {
            v.finish();
        }
        self.vcpus.clear();
        self.vm = None;
    }

    /// Reboots the guest in place: a new VM on the same memory, booted from the same files, left
    /// running.
    fn restart(&mut self, why: &str) -> Result<(), KvmError> {
        self.teardown();
        // Reports from the old vCPU threads are about a guest that no longer exists.
        while self.exits.try_recv().is_ok() {}
        let _ = self.exit_evt.read();
        let _ = self.bus.i8042.lock().map(|d| d.reset_evt().0.read());
        // The devices keep their images; what the old guest's drivers set up is forgotten.
        self.bus.mmio.hard_reset();
        for (_, fd) in &self.device_irqs {
            let _ = fd.read();
        }
        // vhost let go of the kicks in hard_reset: drop the old guest's pending ones.
        for io in &self.device_ioevents {
            let _ = io.fd.read();
        }
        self.restarts += 1;
        tracing::warn!(
            restarts = self.restarts,
            "restarting the guest in place: {why}"
        );
        self.build()?;
        self.broadcast(VcpuEvent::Resume)
    }

    /// How the VM ends, or goes on, after a reset the guest asked for.
    fn guest_reset(&mut self, what: &str) -> Ready {
        match self.on_reset {
            OnReset::Exit => Ready::Ended(VmExit::Shutdown(format!(
                "{what} (bdvmm treats a guest reboot as shutdown; --on-reset restart reboots it)"
            ))),
            OnReset::Restart => match self.restart(what) {
                Ok(()) => {
                    eprintln!("bdvmm: {what}; restarted the guest in place (--on-reset restart)");
                    Ready::Handled
                }
                Err(e) => Ready::Ended(VmExit::Failed(format!(
                    "{what}, and restarting it failed: {e}"
                ))),
            },
        }
    }

    /// Sends `event` to every vCPU, then collects their acknowledgements, all within one
    /// [`ACK_TIMEOUT`].
    ///
    /// A pause first checks that every vCPU has answered everything sent before: one that is
    /// behind (its thread stopped by a tracer, or stuck in the host kernel) could not promise to
    /// stop, so nothing is paused and the caller learns which and for how long. A resume goes to
    /// every vCPU but waits only for those that were answering: a thread that is behind finds the
    /// resume queued after what it missed and runs again when it wakes. So a stuck vCPU costs a
    /// pause request one timeout at most, once, and never the VM.
    fn broadcast(&mut self, event: VcpuEvent) -> Result<(), KvmError> {
        let mut behind = Vec::with_capacity(self.vcpus.len());
        for v in &mut self.vcpus {
            if event == VcpuEvent::Pause {
                v.check_answering()?;
            }
            behind.push(v.unanswered_for().is_some());
        }
        let mut sent = Vec::with_capacity(self.vcpus.len());
        for v in &mut self.vcpus {
            sent.push(v.send(event)?);
        }
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        let mut first_err = None;
        for ((v, seq), was_behind) in self.vcpus.iter_mut().zip(sent).zip(behind) {
            if was_behind {
                tracing::warn!(
                    vcpu = v.id,
                    "vCPU is not answering; it gets {event:?} when it wakes"
                );
                continue;
            }
            let err = match v.reply(seq, deadline) {
                Ok(VcpuReply::Paused | VcpuReply::Resumed) => continue,
                Ok(other) => VcpuError::Unexpected {
                    id: v.id,
                    reply: format!("{other:?}"),
                    event: format!("{event:?}"),
                },
                Err(e) => e,
            };
            first_err.get_or_insert(err);
        }
        match first_err {
            Some(e) => Err(KvmError::Ack(e)),
            None => Ok(()),
        }
    }
}

impl Pausable for KvmEngine {
    type Error = EngineError;

    fn pause(&mut self) -> Result<(), EngineError> {
        Ok(self.broadcast(VcpuEvent::Pause)?)
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        Ok(self.broadcast(VcpuEvent::Resume)?)
    }
}

impl Engine for KvmEngine {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn vcpus(&self) -> u8 {
        // Never more than spec.vcpus, a u8: the handles are made for 0..spec.vcpus.
        u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX)
    }

    fn regs(&mut self, id: u8) -> Result<VcpuRegs, EngineError> {
        let count = self.vcpus();
        let v = self
            .vcpus
            .get_mut(usize::from(id))
            .ok_or(EngineError::NoSuchVcpu(id, count))?;
        // A thread that is behind would only make the API wait out the timeout again.
        v.check_answering().map_err(KvmError::from)?;
        let seq = v.send(VcpuEvent::GetRegs).map_err(KvmError::from)?;
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        match v.reply(seq, deadline).map_err(KvmError::from)? {
            VcpuReply::Regs(r) => Ok(*r),
            VcpuReply::RegsFailed(e) => Err(KvmError::from(e).into()),
            other => Err(KvmError::from(VcpuError::Unexpected {
                id,
                reply: format!("{other:?}"),
                event: "GetRegs".into(),
            })
            .into()),
        }
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        if self.stopped {
            return Err(EngineError::Stopped);
        }
        Ok(self.restart("reset requested through the API")?)
    }

    fn serial_input(&mut self, bytes: &[u8]) {
        let mut serial = self.bus.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = serial.enqueue_raw_bytes(bytes) {
            tracing::debug!("serial input dropped: {e:?}");
        }
    }

    fn watch_fds(&self) -> Vec<RawFd> {
        vec![self.exit_evt.as_raw_fd(), self.reset_fd, self.poweroff_fd]
    }

    fn on_ready(&mut self, fd: RawFd) -> Ready {
        if fd == self.poweroff_fd {
            let _ = self.bus.poweroff.0.read();
            return Ready::Ended(VmExit::Shutdown("guest powered off".into()));
        }
        if fd == self.reset_fd {
            let _ = self.bus.i8042.lock().map(|d| d.reset_evt().0.read());
            return self.guest_reset("guest reset through the i8042");
        }
        let _ = self.exit_evt.read();
        match self.exits.try_recv() {
            Ok(VcpuExitReport::Reset(why)) => match self.on_reset {
                // A triple fault is far more often a crash than a wish to reboot: without
                // --on-reset restart it is a failure, as it always was.
                OnReset::Exit if why.contains("triple") => Ready::Ended(VmExit::Failed(why)),
                _ => self.guest_reset(&why),
            },
            Ok(VcpuExitReport::Ended(end)) => Ready::Ended(end),
            Err(_) => Ready::Handled,
        }
    }

    fn unanswering(&mut self) -> Vec<(u8, std::time::Duration)> {
        self.vcpus
            .iter_mut()
            .filter_map(|v| v.unanswered_for().map(|d| (v.id, d)))
            .collect()
    }

    fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.teardown();
    }
}

impl Drop for KvmEngine {
    fn drop(&mut self) {
        self.terminate();
    }
}
