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
//!
//! A vCPU thread can also stop answering altogether: stopped by a debugger or a tracer (that is
//! how a "frozen CPU" fault is injected), or stuck in the host kernel. Events and replies carry a
//! sequence number, so a late reply is never taken for the answer to a newer event, and the
//! handle knows which vCPU is behind ([`VcpuHandle::unanswered_for`]). The engine then refuses
//! to pause (it cannot promise that no guest code runs) but keeps the VM: its memory stays
//! served, and the events queued for the stuck thread (the failed pause, then the resume that
//! undoes it) leave it running once it wakes.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    #[error(
        "vCPU {id} did not acknowledge within {ms} ms (its thread is stopped, e.g. by a \
         debugger, or stuck in the host kernel)"
    )]
    Timeout {
        /// The vCPU.
        id: u8,
        /// The wait.
        ms: u128,
    },
    /// It has not answered an earlier event yet, so a new one cannot be promised.
    #[error(
        "vCPU {id} has not answered the VMM for {ms} ms (its thread is stopped, e.g. by a \
         debugger, or stuck in the host kernel)"
    )]
    Behind {
        /// The vCPU.
        id: u8,
        /// Since its oldest unanswered event.
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
    events: Sender<(u64, VcpuEvent)>,
    replies: Receiver<(u64, VcpuReply)>,
    thread: Option<JoinHandle<()>>,
    /// Sequence number of the last event sent.
    sent: u64,
    /// Sequence number of the last event acknowledged.
    acked: u64,
    /// When the oldest event not yet acknowledged was sent (None when caught up).
    behind_since: Option<Instant>,
}

/// What a vCPU thread owns.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    events: Receiver<(u64, VcpuEvent)>,
    replies: Sender<(u64, VcpuReply)>,
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
            sent: 0,
            acked: 0,
            behind_since: None,
        })
    }

    /// Sends an event and kicks the thread out of `KVM_RUN`; returns its sequence number.
    pub fn send(&mut self, event: VcpuEvent) -> Result<u64, VcpuError> {
        let seq = self.sent + 1;
        self.events
            .send((seq, event))
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.sent = seq;
        if self.behind_since.is_none() && event != VcpuEvent::Finish {
            self.behind_since = Some(Instant::now());
        }
        if let Some(t) = &self.thread {
            // A failed kick only matters if the vCPU is inside KVM_RUN; the ack timeout reports it.
            let _ = t.kill(kick_signal());
        }
        Ok(seq)
    }

    fn note_ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        if self.acked >= self.sent {
            self.behind_since = None;
        }
    }

    /// Waits until `deadline` for the acknowledgement of event `seq`; older, late ones are
    /// dropped on the way.
    pub fn reply(&mut self, seq: u64, deadline: Instant) -> Result<VcpuReply, VcpuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok((s, reply)) => {
                    self.note_ack(s);
                    if s == seq {
                        return Ok(reply);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        id: self.id,
                        ms: self.behind_since.map_or(0, |t| t.elapsed().as_millis()),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
            }
        }
    }

    /// How long the thread has left an event unanswered (None: it has answered every event).
    /// Takes in the late replies that have arrived meanwhile.
    pub fn unanswered_for(&mut self) -> Option<Duration> {
        while let Ok((s, _)) = self.replies.try_recv() {
            self.note_ack(s);
        }
        self.behind_since.map(|t| t.elapsed())
    }

    /// Fails if the thread is behind: a new event's answer could not be promised.
    pub fn check_answering(&mut self) -> Result<(), VcpuError> {
        match self.unanswered_for() {
            Some(d) => Err(VcpuError::Behind {
                id: self.id,
                ms: d.as_millis(),
            }),
            None => Ok(()),
        }
    }

    /// Ends the thread and waits for it, at most [`ACK_TIMEOUT`]: a thread that does not end in
    /// that time (stopped by a tracer, stuck in the host kernel) is left behind, and since
    /// `Finish` is queued it ends, without running guest code again, whenever it wakes.
    pub fn finish(&mut self) {
        if self.send(VcpuEvent::Finish).is_err() {
            return;
        }
        let Some(t) = self.thread.take() else { return };
        // The reply channel disconnects when the thread ends (its sender is dropped).
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = t.join();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        vcpu = self.id,
                        "vCPU thread did not end within {} ms; left behind (it ends when it \
                         wakes, without running guest code)",
                        ACK_TIMEOUT.as_millis()
                    );
                    return;
                }
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
                    Ok((seq, ev)) => self.handle_event(seq, ev),
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
    fn handle_event(&mut self, seq: u64, event: VcpuEvent) -> bool {
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
        self.replies.send((seq, reply)).is_ok()
    }

    /// Drains pending events, then runs guest code until the next exit.
    fn running_step(&mut self) -> bool {
        while let Ok((seq, ev)) = self.events.try_recv() {
            if !self.handle_event(seq, ev) {
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
