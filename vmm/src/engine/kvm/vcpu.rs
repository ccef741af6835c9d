//! One thread per vCPU, each an explicit state machine.
//!
//! ```text
//!            Pause (ack Paused)                 guest shutdown / reset / KVM error
//!  Running ─────────────────────► Paused      Running ──────────────────────► Stopped
//!     ▲  ◄─────────────────────     │            (reported on the exit channel + eventfd:
//!     │      Resume (ack Resumed)   │             Ended(VmExit) or Reset(why))
//!     └── GetRegs: ack Regs, state unchanged (any state)
//!  Finish (any state) ──► thread ends
//! ```
//!
//! A reset (triple fault, reset system event) only stops the vCPU and reports it: the engine
//! decides, by `--on-reset`, whether the VM ends or is rebuilt (every thread finished, a new VM
//! with new vCPU threads on the same memory).
//!
//! Events arrive on a channel. A Running vCPU sits inside `KVM_RUN`, so the sender also *kicks*
//! the thread with a real-time signal; the handler sets `kvm_run.immediate_exit`, which makes
//! `KVM_RUN` return `EINTR` at once, even if the signal lands just before the ioctl is entered.
//! Every event is acknowledged on the vCPU's reply channel, so the VMM knows when *all* vCPUs have
//! stopped. A Stopped vCPU still acknowledges Pause/Resume/GetRegs so that nobody waits forever.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::cpu::read_kernel_gs_base;
use super::devices::PioBus;
use crate::engine::{VcpuRegs, VmExit};

/// Events the VMM sends to a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running guest code and acknowledge.
    Pause,
    /// Run again and acknowledge.
    Resume,
    /// Report registers.
    GetRegs,
    /// End the thread.
    Finish,
}

/// Why a vCPU thread did not do what the engine asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Its thread has ended.
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    /// It did not acknowledge in time.
    #[error("vCPU {id} did not acknowledge within {ms} ms")]
    Timeout {
        /// The vCPU.
        id: u8,
        /// The wait.
        ms: u128,
    },
    /// It acknowledged something else.
    #[error("vCPU {id} answered {reply} to {event}")]
    Unexpected {
        /// The vCPU.
        id: u8,
        /// What it answered.
        reply: String,
        /// What it was asked.
        event: String,
    },
    /// Reading its registers failed.
    #[error("{what}: {source}")]
    Regs {
        /// The ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

/// Acknowledgements from a vCPU.
#[derive(Debug)]
pub enum VcpuReply {
    /// Now paused.
    Paused,
    /// Now running (or stopped for good, if the guest had ended).
    Resumed,
    /// Registers.
    Regs(Box<VcpuRegs>),
    /// Registers could not be read.
    RegsFailed(VcpuError),
}

/// Why a vCPU stopped running guest code for good, as it reports it to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReport {
    /// The guest reset the machine (a triple fault, or a reset system event): what happens next
    /// is the engine's `--on-reset` choice.
    Reset(String),
    /// The VM has ended.
    Ended(VmExit),
}

/// The vCPU's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Executing guest code.
    Running,
    /// Parked by the VMM.
    Paused,
    /// The guest ended (or KVM failed); guest code never runs again.
    Stopped,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own VcpuFd's kvm_run mapping and
            // cleared before the VcpuFd is dropped; writing one byte is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The VMM's side of one vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub id: u8,
    events: Sender<VcpuEvent>,
    replies: Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
}

/// What a vCPU thread owns.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    events: Receiver<VcpuEvent>,
    replies: Sender<VcpuReply>,
    exits: Sender<VcpuExitReport>,
    exit_evt: Arc<EventFd>,
    state: VcpuState,
}

/// How long the VMM waits for one acknowledgement before declaring the vCPU stuck.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// Starts the thread for `fd`, initially Paused (the VMM resumes all vCPUs together).
    pub fn spawn(
        id: u8,
        fd: VcpuFd,
        bus: Arc<PioBus>,
        exits: Sender<VcpuExitReport>,
        exit_evt: Arc<EventFd>,
    ) -> std::io::Result<Self> {
        let (event_tx, event_rx) = std::sync::mpsc::channel();
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let vcpu = Vcpu {
            id,
            fd,
            bus,
            events: event_rx,
            replies: reply_tx,
            exits,
            exit_evt,
            state: VcpuState::Paused,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run_thread())?;
        Ok(Self {
            id,
            events: event_tx,
            replies: reply_rx,
            thread: Some(thread),
        })
    }

    /// Sends an event and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(t) = &self.thread {
            // A failed kick only matters if the vCPU is inside KVM_RUN; the ack timeout reports it.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    /// Waits for the next acknowledgement.
    pub fn reply(&self, timeout: Duration) -> Result<VcpuReply, VcpuError> {
        self.replies.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout {
                id: self.id,
                ms: timeout.as_millis(),
            },
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// Ends the thread and waits for it (bounded by the ack timeout of a stuck vCPU).
    pub fn finish(&mut self) {
        if self.send(VcpuEvent::Finish).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Vcpu {
    fn run_thread(mut self) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        loop {
            let keep_going = match self.state {
                VcpuState::Running => self.running_step(),
                VcpuState::Paused | VcpuState::Stopped => match self.events.recv() {
                    Ok(ev) => self.handle_event(ev),
                    Err(_) => false,
                },
            };
            if !keep_going {
                break;
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Applies one event; returns false when the thread must end.
    fn handle_event(&mut self, event: VcpuEvent) -> bool {
        let reply = match (event, self.state) {
            (VcpuEvent::Finish, _) => return false,
            (VcpuEvent::GetRegs, _) => match self.regs() {
                Ok(r) => VcpuReply::Regs(Box::new(r)),
                Err(e) => VcpuReply::RegsFailed(e),
            },
            (VcpuEvent::Pause, VcpuState::Running) => {
                self.state = VcpuState::Paused;
                VcpuReply::Paused
            }
            (VcpuEvent::Pause, _) => VcpuReply::Paused,
            (VcpuEvent::Resume, VcpuState::Paused) => {
                self.state = VcpuState::Running;
                VcpuReply::Resumed
            }
            (VcpuEvent::Resume, _) => VcpuReply::Resumed,
        };
        self.replies.send(reply).is_ok()
    }

    /// Drains pending events, then runs guest code until the next exit.
    fn running_step(&mut self) -> bool {
        while let Ok(ev) = self.events.try_recv() {
            if !self.handle_event(ev) {
                return false;
            }
            if self.state != VcpuState::Running {
                return true;
            }
        }
        match self.fd.run() {
            Ok(exit) => match handle_exit(&self.bus, exit) {
                Some(VcpuExitReport::Ended(end)) => self.stop(end),
                Some(VcpuExitReport::Reset(why)) => {
                    self.state = VcpuState::Stopped;
                    // Where the guest was is what tells a crash from a reboot it asked for.
                    let at = match self.regs() {
                        Ok(r) => format!(
                            " (RIP {:#x}, RSP {:#x}, CR2 {:#x}, CR3 {:#x}, CPL {})",
                            r.rip, r.rsp, r.cr2, r.cr3, r.cpl
                        ),
                        Err(_) => String::new(),
                    };
                    let _ = self.exits.send(VcpuExitReport::Reset(format!(
                        "{why} on vCPU {}{at}",
                        self.id
                    )));
                    let _ = self.exit_evt.write(1);
                }
                None => {}
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => self.stop(VmExit::Failed(format!(
                "KVM_RUN failed on vCPU {}: {e}",
                self.id
            ))),
        }
        true
    }

    fn stop(&mut self, end: VmExit) {
        let end = match end {
            VmExit::Failed(reason) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                VmExit::Failed(format!("{reason} (vCPU {}, RIP {rip:#x})", self.id))
            }
            other => other,
        };
        self.state = VcpuState::Stopped;
        let _ = self.exits.send(VcpuExitReport::Ended(end));
        let _ = self.exit_evt.write(1);
    }

    fn regs(&self) -> Result<VcpuRegs, VcpuError> {
        let r = self.fd.get_regs().map_err(|source| VcpuError::Regs {
            what: "KVM_GET_REGS",
            source,
        })?;
        let s = self.fd.get_sregs().map_err(|source| VcpuError::Regs {
            what: "KVM_GET_SREGS",
            source,
        })?;
        Ok(VcpuRegs {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cpl: s.cs.dpl,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            kernel_gs_base: read_kernel_gs_base(&self.fd),
        })
    }
}

/// Services one VM exit; returns how the VM ended, if this exit ends it.
fn handle_exit(bus: &PioBus, exit: VcpuExit) -> Option<VcpuExitReport> {
    const KVM_SYSTEM_EVENT_RESET: u32 = 2;
    let ended = |e: VmExit| Some(VcpuExitReport::Ended(e));
    match exit {
        VcpuExit::IoIn(port, data) => bus.read(port, data),
        VcpuExit::IoOut(port, data) => bus.write(port, data),
        VcpuExit::MmioRead(addr, data) => {
            if !bus.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            bus.mmio.write(addr, data);
        }
        VcpuExit::Hlt => {
            // Only without an in-kernel LAPIC; ours has one, so this is a halted guest.
            return ended(VmExit::Shutdown("guest halted".into()));
        }
        VcpuExit::Shutdown => {
            return Some(VcpuExitReport::Reset(
                "guest triple-faulted (KVM_EXIT_SHUTDOWN)".into(),
            ))
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            return Some(VcpuExitReport::Reset("guest reset system event".into()))
        }
        VcpuExit::SystemEvent(kind, _) => {
            return ended(VmExit::Shutdown(format!("guest system event {kind}")))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return ended(VmExit::Failed(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return ended(VmExit::Failed(
                "KVM internal error (often an instruction KVM could not emulate)".into(),
            ))
        }
        other => {
            tracing::debug!("unhandled vCPU exit {other:?}");
        }
    }
    None
}
