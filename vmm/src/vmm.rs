//! The VMM's event loop: one `event-manager` subscriber that owns the engine, the console, the
//! control API and the pause lease, and decides when the VM has ended.
//!
//! Everything the VMM reacts to is a file descriptor: API listener and connections, the lease
//! timer, the console's "something was seen" eventfd, the engine's own fds (vCPU exit eventfd and
//! i8042 reset for kvm; QEMU's pidfd and pipes for tcg), a panic grace timer and, when stdin is a
//! terminal, stdin (forwarded to the guest's serial port).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde::Serialize;
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::protocol::{
    MemoryReply, PauseReply, RegsReply, Request, ResumeReply, StatusReply, LEASE_MS_RANGE,
};
use crate::api::server::{Access, ApiServer, Incoming, PeerCred};
use crate::console::Console;
use crate::engine::{Engine, OnPanic, Ready, VmExit};
use crate::memory::GuestRam;
use introspect::conv::{millis, nanos};

const TAG_LISTENER: u32 = 1;
const TAG_LEASE_TIMER: u32 = 2;
const TAG_CONSOLE: u32 = 3;
const TAG_STDIN: u32 = 4;
const TAG_PANIC_TIMER: u32 = 5;
const TAG_ENGINE: u32 = 0x100; // + index into the engine's watch list
const TAG_CONN: u32 = 0x1_0000; // + connection id

/// After the first line of a kernel panic, how long the rest of the report may take to print.
const PANIC_GRACE: Duration = Duration::from_secs(2);

/// The signal that asked bdvmm to stop (0 = none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Who holds the pause and until when.
struct Lease {
    holder: u32,
    expires: Instant,
}

/// The VMM.
pub struct Vmm {
    // Drop order: the engine (vCPUs, QEMU) goes before the RAM it runs on.
    engine: Box<dyn Engine>,
    ram: GuestRam,
    /// The memfd reopened read-only, for read-only API clients.
    ram_readonly: std::fs::File,
    console: Console,
    api: Option<ApiServer>,
    lease: Option<Lease>,
    default_lease: Duration,
    lease_timer: TimerFd,
    panic_timer: TimerFd,
    /// What a guest panic does.
    on_panic: OnPanic,
    /// A panic was seen and the VM kept (`OnPanic::Keep`): said once.
    panic_kept: bool,
    stdin: Option<RawFd>,
    cmdline: String,
    started: Instant,
    pauses: u64,
    lease_expiries: u64,
    /// Time paused under leases, the current pause excluded (see [`Vmm::paused_ns_total`]).
    paused_total: Duration,
    /// When the current leased pause began.
    paused_since: Option<Instant>,
    exit: Option<VmExit>,
}

fn ok<T: Serialize>(reply: T) -> Value {
    let mut v = serde_json::to_value(reply).unwrap_or_else(|_| json!({}));
    v["ok"] = json!(true);
    v
}

fn err(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

impl Vmm {
    /// Wraps a started (paused) engine.
    pub fn new(
        engine: Box<dyn Engine>,
        ram: GuestRam,
        console: Console,
        api: Option<ApiServer>,
        default_lease: Duration,
        cmdline: String,
        forward_stdin: bool,
    ) -> std::io::Result<Self> {
        // The same memfd (same inode, same seals) through a read-only open file description: a
        // shared writable mapping of it fails with EACCES, and so does mprotect to add PROT_WRITE.
        let ram_readonly = std::fs::File::open(format!("/proc/self/fd/{}", ram.file.as_raw_fd()))?;
        Ok(Self {
            engine,
            ram,
            ram_readonly,
            console,
            api,
            lease: None,
            default_lease,
            lease_timer: TimerFd::new()?,
            panic_timer: TimerFd::new()?,
            on_panic: OnPanic::default(),
            panic_kept: false,
            stdin: forward_stdin.then_some(libc::STDIN_FILENO),
            cmdline,
            started: Instant::now(),
            pauses: 0,
            lease_expiries: 0,
            paused_total: Duration::ZERO,
            paused_since: None,
            exit: None,
        })
    }

    /// Starts the guest and runs the event loop until the VM ends (or a stop signal arrives).
    pub fn run(mut self) -> VmExit {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal) {
                tracing::warn!("cannot handle signal {sig}: {e}");
            }
        }
        if let Err(e) = self.engine.resume() {
            self.engine.terminate();
            return VmExit::Failed(format!("cannot start the guest's vCPUs: {e}"));
        }
        self.started = Instant::now();
        let vmm = Rc::new(RefCell::new(self));
        let mut manager = match EventManager::<Rc<RefCell<Vmm>>>::new() {
            Ok(m) => m,
            Err(e) => return VmExit::Failed(format!("cannot create the event loop: {e:?}")),
        };
        manager.add_subscriber(vmm.clone());
        loop {
            if let Err(e) = manager.run_with_timeout(100) {
                tracing::debug!("event loop: {e:?}");
            }
            let mut v = vmm.borrow_mut();
            let sig = STOP_SIGNAL.load(Ordering::SeqCst);
            if v.exit.is_none() && sig != 0 {
                v.exit = Some(VmExit::Failed(format!(
                    "bdvmm stopped by signal {sig}; guest terminated"
                )));
            }
            if let Some(end) = v.exit.take() {
                v.engine.terminate();
                return v.final_exit(end);
            }
        }
    }

    /// A guest panic seen on the console outranks whatever the engine reported — except that a
    /// VM kept after its panic (`--on-panic keep`) ends later, for a reason of its own, which is
    /// said too.
    fn final_exit(&self, end: VmExit) -> VmExit {
        match self.console.findings().panic {
            Some(p) if self.panic_kept => {
                let (VmExit::Shutdown(why) | VmExit::Failed(why)) = end;
                VmExit::Failed(format!(
                    "guest kernel panic: {p}; the VM, kept after it (--on-panic keep), ended: {why}"
                ))
            }
            Some(p) => VmExit::Failed(format!("guest kernel panic: {p}")),
            None => end,
        }
    }

    fn remaining_lease(&self) -> Option<Duration> {
        self.lease
            .as_ref()
            .map(|l| l.expires.saturating_duration_since(Instant::now()))
    }

    fn arm_lease_timer(&mut self, d: Duration) {
        if let Err(e) = self
            .lease_timer
            .reset(d.max(Duration::from_micros(1)), None)
        {
            tracing::error!("cannot arm the lease timer: {e}; resuming the guest now");
            self.release(false);
        }
    }

    /// Time the guest has spent paused under leases, the pause going on now included. Counted
    /// here, where every leased pause of either engine starts and ends (from the pause request
    /// until the resume returned), so a monitor's cost to the guest can be measured from outside.
    fn paused_ns_total(&self) -> u64 {
        let now = self.paused_since.map(|t| t.elapsed()).unwrap_or_default();
        nanos(self.paused_total.saturating_add(now))
    }

    /// Resumes the guest and forgets the lease. `expired`: count it as a lease expiry.
    fn release(&mut self, expired: bool) {
        if self.lease.take().is_none() {
            return;
        }
        let _ = self.lease_timer.clear();
        if expired {
            self.lease_expiries += 1;
        }
        let resumed = self.engine.resume();
        if let Some(t) = self.paused_since.take() {
            self.paused_total = self.paused_total.saturating_add(t.elapsed());
        }
        if let Err(e) = resumed {
            // The resume is queued for every vCPU thread, so one that is stuck runs again when
            // it wakes; the VM stays served either way.
            tracing::error!("resuming the guest: {e}");
        }
    }

    fn handle(
        &mut self,
        conn: u32,
        who: (Access, PeerCred),
        req: Request,
    ) -> (Value, Option<RawFd>) {
        let (access, peer) = who;
        if access == Access::ReadOnly
            && matches!(
                req,
                Request::Pause { .. } | Request::Resume | Request::Reset
            )
        {
            tracing::warn!(
                "read-only API client uid {} (pid {}) asked to pause, resume or reset; refused",
                peer.uid,
                peer.pid
            );
            return (
                err(format!(
                    "uid {} has read-only access to this bdvmm: pause, resume and reset are refused; \
                     its operator can grant full access with --api-allow-uid/--api-allow-gid",
                    peer.uid
                )),
                None,
            );
        }
        match req {
            Request::Pause { lease_ms } => {
                let ms = lease_ms.unwrap_or(millis(self.default_lease));
                if !LEASE_MS_RANGE.contains(&ms) {
                    return (
                        err(format!(
                            "lease_ms {ms} out of range {}..={}",
                            LEASE_MS_RANGE.start(),
                            LEASE_MS_RANGE.end()
                        )),
                        None,
                    );
                }
                let lease = Duration::from_millis(ms);
                match &self.lease {
                    Some(l) if l.holder != conn => (
                        err(format!(
                            "the guest is paused by another client (lease ends in {} ms); retry later",
                            self.remaining_lease().unwrap_or_default().as_millis()
                        )),
                        None,
                    ),
                    Some(_) => {
                        self.lease = Some(Lease {
                            holder: conn,
                            expires: Instant::now() + lease,
                        });
                        self.arm_lease_timer(lease);
                        (
                            ok(PauseReply {
                                pause_ns: 0,
                                lease_ms: ms,
                                renewed: true,
                            }),
                            None,
                        )
                    }
                    None => {
                        let t0 = Instant::now();
                        if let Err(e) = self.engine.pause() {
                            // Some vCPUs may have stopped before one failed to answer: never leave
                            // a guest half-paused with no lease to undo it. Whatever happens, the
                            // VM stays: a guest that cannot be paused can still be read, and
                            // ending it here would lose the memory a backup recovers state from.
                            let undo = match self.engine.resume() {
                                Ok(()) => "the vCPUs that had stopped run again".to_string(),
                                Err(r) => format!("resuming the others failed too: {r}"),
                            };
                            tracing::warn!("pause refused: {e}; {undo}");
                            return (err(format!("pause failed: {e}; {undo}")), None);
                        }
                        let pause_ns = nanos(t0.elapsed());
                        self.pauses += 1;
                        self.paused_since = Some(t0);
                        self.lease = Some(Lease {
                            holder: conn,
                            expires: Instant::now() + lease,
                        });
                        self.arm_lease_timer(lease);
                        (
                            ok(PauseReply {
                                pause_ns,
                                lease_ms: ms,
                                renewed: false,
                            }),
                            None,
                        )
                    }
                }
            }
            Request::Resume => match &self.lease {
                Some(l) if l.holder != conn => (
                    err("the guest is paused by another client; only the lease holder may resume it"),
                    None,
                ),
                Some(_) => {
                    let t0 = Instant::now();
                    self.release(false);
                    (
                        ok(ResumeReply {
                            resume_ns: nanos(t0.elapsed()),
                            was_paused: true,
                        }),
                        None,
                    )
                }
                None => (
                    ok(ResumeReply {
                        resume_ns: 0,
                        was_paused: false,
                    }),
                    None,
                ),
            },
            Request::Reset => {
                if self.lease.as_ref().is_some_and(|l| l.holder != conn) {
                    return (
                        err("the guest is paused by another client; retry once its lease ends"),
                        None,
                    );
                }
                if self.lease.is_some() {
                    self.release(false);
                }
                let t0 = Instant::now();
                match self.engine.reset() {
                    Ok(()) => {
                        tracing::warn!("guest reset on request of API client {conn}");
                        (
                            serde_json::json!({"ok": true, "reset_ns": nanos(t0.elapsed())}),
                            None,
                        )
                    }
                    Err(e) => (err(format!("reset failed: {e}")), None),
                }
            }
            Request::Regs { vcpu } => match self.engine.regs(vcpu) {
                Ok(regs) => (ok(RegsReply { regs }), None),
                Err(e) => (err(e), None),
            },
            Request::Memory => (
                ok(MemoryReply {
                    size: self.ram.layout.total,
                    ranges: self.ram.layout.ranges.clone(),
                    backdoor: self.ram.layout.backdoor,
                }),
                Some(match access {
                    Access::Full => self.ram.file.as_raw_fd(),
                    Access::ReadOnly => self.ram_readonly.as_raw_fd(),
                }),
            ),
            Request::Status => {
                let holder = self.lease.as_ref().map(|l| {
                    if l.holder == conn {
                        "you".to_string()
                    } else {
                        "other".to_string()
                    }
                });
                (
                    ok(StatusReply {
                        engine: self.engine.name().into(),
                        vcpus: self.engine.vcpus(),
                        mem_bytes: self.ram.layout.total,
                        state: if self.lease.is_some() { "paused" } else { "running" }.into(),
                        uptime_ms: millis(self.started.elapsed()),
                        pid: std::process::id(),
                        cmdline: self.cmdline.clone(),
                        lease_holder: holder,
                        lease_remaining_ms: self.remaining_lease().map(millis),
                        pauses: self.pauses,
                        lease_expiries: self.lease_expiries,
                        paused_ns_total: self.paused_ns_total(),
                        unanswering_vcpus: self
                            .engine
                            .unanswering()
                            .into_iter()
                            .map(|(id, _)| id)
                            .collect(),
                    }),
                    None,
                )
            }
        }
    }

    fn on_conn(&mut self, id: u32, ops: &mut EventOps) {
        let Some(api) = self.api.as_mut() else { return };
        let fd = api.conn_fd(id);
        let Some(who) = api.access(id) else { return };
        match api.read(id) {
            Incoming::Requests(reqs) => {
                for req in reqs {
                    let (reply, fd_out) = match req {
                        Ok(r) => self.handle(id, who, r),
                        Err(e) => (err(e), None),
                    };
                    let api = self.api.as_mut().expect("api exists");
                    if !api.reply(id, &reply, fd_out) {
                        self.conn_gone(id, fd, ops);
                        return;
                    }
                }
            }
            Incoming::Closed => self.conn_gone(id, fd, ops),
        }
    }

    fn conn_gone(&mut self, id: u32, fd: Option<RawFd>, ops: &mut EventOps) {
        if let Some(fd) = fd {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        if let Some(api) = self.api.as_mut() {
            api.close(id);
        }
        if self.lease.as_ref().is_some_and(|l| l.holder == id) {
            tracing::warn!("the client holding the pause disconnected; resuming the guest");
            self.release(true);
        }
    }

    /// What a guest kernel panic does ([`OnPanic::Exit`] unless set here).
    pub fn with_on_panic(mut self, on_panic: OnPanic) -> Self {
        self.on_panic = on_panic;
        self
    }

    /// The guest's kernel panicked (its report is complete, or its grace ran out).
    fn on_guest_panic(&mut self) {
        match self.on_panic {
            OnPanic::Exit => self.exit = Some(VmExit::Failed("guest kernel panic".into())),
            OnPanic::Keep if !self.panic_kept => {
                self.panic_kept = true;
                let what = self.console.findings().panic.unwrap_or_default();
                tracing::warn!(
                    "guest kernel panic: {what}; the VM is kept (--on-panic keep): its memory \
                     stays reachable through the API and the bridge"
                );
            }
            OnPanic::Keep => {}
        }
    }

    fn on_console(&mut self) {
        let _ = self.console.event.read();
        let f = self.console.findings();
        if f.panic_complete {
            self.on_guest_panic();
        } else if f.panic.is_some() && !self.panic_timer.is_armed().unwrap_or(false) {
            let _ = self.panic_timer.reset(PANIC_GRACE, None);
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        // SAFETY: read into a valid buffer from stdin.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        // End of file (0) or an error (negative): stop watching stdin.
        let Some(n) = usize::try_from(n).ok().filter(|n| *n > 0) else {
            let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
            self.stdin = None;
            return;
        };
        self.engine.serial_input(&buf[..n]);
    }
}

impl MutEventSubscriber for Vmm {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = vec![
            (self.lease_timer.as_raw_fd(), TAG_LEASE_TIMER),
            (self.panic_timer.as_raw_fd(), TAG_PANIC_TIMER),
            (self.console.event.as_raw_fd(), TAG_CONSOLE),
        ];
        if let Some(api) = &self.api {
            watch.push((api.listener_fd(), TAG_LISTENER));
        }
        if let Some(fd) = self.stdin {
            watch.push((fd, TAG_STDIN));
        }
        for (tag, fd) in (TAG_ENGINE..).zip(self.engine.watch_fds()) {
            watch.push((fd, tag));
        }
        for (fd, tag) in watch {
            if let Err(e) = ops.add(Events::with_data_raw(fd, tag, EventSet::IN)) {
                self.exit = Some(VmExit::Failed(format!("cannot watch fd {fd}: {e:?}")));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let tag = events.data();
        match tag {
            TAG_LISTENER => {
                let new = self.api.as_mut().map(|a| a.accept()).unwrap_or_default();
                for (id, fd) in new {
                    let set = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP;
                    if ops
                        .add(Events::with_data_raw(fd, TAG_CONN + id, set))
                        .is_err()
                    {
                        if let Some(api) = self.api.as_mut() {
                            api.close(id);
                        }
                    }
                }
            }
            TAG_LEASE_TIMER => {
                let _ = self.lease_timer.wait();
                if self.remaining_lease().is_some_and(|d| d.is_zero()) {
                    tracing::warn!("pause lease ran out; resuming the guest");
                    self.release(true);
                }
            }
            TAG_PANIC_TIMER => {
                let _ = self.panic_timer.wait();
                self.on_guest_panic();
            }
            TAG_CONSOLE => self.on_console(),
            TAG_STDIN => self.on_stdin(ops),
            t if t >= TAG_CONN => self.on_conn(t - TAG_CONN, ops),
            t if t >= TAG_ENGINE => {
                let fd = events.fd();
                match self.engine.on_ready(fd) {
                    Ready::Handled => {}
                    Ready::Unwatch => {
                        let _ = ops.remove(Events::empty_raw(fd));
                    }
                    Ready::Ended(end) => {
                        let _ = ops.remove(Events::empty_raw(fd));
                        if self.exit.is_none() {
                            self.exit = Some(end);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}
