//! `post_sigkill`: making a guest process die with SIGKILL by writing guest memory while the guest
//! is paused.
//!
//! * **Patched guest** (it has a Sensor Box mailbox): a `KILL_PID` request with the task's
//!   `start_time`, carried out by the guest kernel at its next tick through the normal signal path.
//!   That wakes a task sleeping interruptibly and stops a fork storm.
//! * **Stock guest** (best effort, no guest cooperation): bdvmm sets the `SIGKILL` bit in the
//!   process's shared pending set (`signal->shared_pending.signal`), and in every thread's private
//!   pending set (`task->pending.signal`) plus `TIF_SIGPENDING` in its flags — what the kernel's
//!   own delivery of a fatal signal does. The private bit makes `fatal_signal_pending()` true, so a
//!   process caught in the middle of `fork()` abandons the fork instead of leaving a child behind
//!   (without it, a fork bomb's in-flight children escape every kill). A thread notices when it
//!   next returns to user mode: a CPU-bound process at its next timer interrupt, a sleeping one
//!   when it next wakes up, whatever the reason.
//!   A thread that never wakes never dies, because a host cannot safely put a task on a guest
//!   runqueue.
//!
//! The guest must be paused (bdvmm's pause lock) for the duration of the call: the direct path is
//! a read-modify-write of words the guest kernel also writes.
//!
//! The table a kill works from is a snapshot, and a task_struct is reused as soon as its task is
//! gone. So the kill is tied to the pause it was read under:
//!
//! * **Direct path: every victim re-checked.** Right before its writes, each of the victim's
//!   task_structs is read again at its address, past any page cache
//!   ([`crate::mem::PhysMem::read_fresh`]): the leader's pid, tgid and start time, each other
//!   thread's pid and tgid must still be the table's. If one is not, the victim is left alone
//!   and reported in [`Killed::stale`] — a reused task_struct (a root daemon's, say) is never
//!   signalled.
//! * **Mailbox path:** a KILL_PID request carries the start time, and the guest kernel checks pid
//!   and start time itself when it carries the request out (guest-kernel-patches/0004,
//!   `bd_kill_pid`: `-ESTALE` on a mismatch), so nothing is re-read here.
//! * **Within the lease.** [`KillSite::until`] is the last instant the caller's lock is surely
//!   still held (its lease less a margin): no request or victim is started after it, and what is
//!   left is counted in [`Killed::late`]; the caller locks again and re-diagnoses.
//!
//! [`kill`] is the one kill path of the project: the healers and the tests name the victims (a user
//! or some pids) and the users to spare, and it applies the never-kill rule ([`killable`], the only
//! copy of it), chooses mailbox or direct writes, and reports what it did.

use std::time::Instant;

use crate::btf::Btf;
pub use crate::hooks::Order;
use crate::hooks::{HookError, KillTarget, Mailbox};
use crate::mem::PhysMem;
use crate::sensorbox::SensorBox;
use crate::tasks::{KernelMem, Process, TaskError};

/// `SIGKILL`'s bit in a sigset (signal 9 → bit 8).
const SIGKILL_BIT: u64 = 1 << 8;
/// `TIF_SIGPENDING` (arch/x86/include/asm/thread_info.h).
const TIF_SIGPENDING: u64 = 1 << 2;

/// How a kill was posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// As a mailbox request in this slot (patched guest).
    Mailbox {
        /// Slot index.
        slot: u32,
    },
    /// By direct writes to the task structures (stock guest), for this many threads.
    Direct {
        /// Threads flagged.
        threads: usize,
    },
}

/// Why a kill could not be posted.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// Through the mailbox.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// Reading or writing task structures.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Layouts.
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    /// A field the direct kill path writes or compares is missing or not the size it expects.
    #[error(
        "the direct kill path cannot use {field}: {reason}; this kernel's task_struct is not one \
         introspect knows, report it with the kernel's release"
    )]
    Layout {
        /// The field, e.g. `task_struct.thread_info.flags`.
        field: String,
        /// What is wrong with it.
        reason: Box<crate::layout::FieldError>,
    },
    /// Stop, continue and renice are requests the guest kernel carries out; a stock kernel has
    /// no mailbox to take them (and a host cannot safely wake a stopped guest task).
    #[error(
        "{0} needs the repair-hook mailbox of a patched guest kernel (guest-kernel-patches/0006); \
         on a stock kernel only kill is available"
    )]
    NeedsMailbox(&'static str),
    /// Refused by the never-kill rule.
    #[error("refusing to kill {0}")]
    Refused(String),
    /// The request cannot be carried out without the process table.
    #[error("{0} needs the process table (no repair-hook mailbox to ask the guest kernel)")]
    NeedsTable(&'static str),
    /// The victim's task_struct now holds another task: the table is out of date.
    #[error(
        "pid {} ({:#x}) now holds pid {} tgid {} started at {} ns: the process table is out of \
         date (did the lock's lease run out?); nothing written, lock and walk again",
        .0.pid, .0.addr, .0.found.pid, .0.found.tgid, .0.found.start_time
    )]
    Stale(Box<Stale>),
}

/// Who a task_struct holds, read at its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// `start_time`, ns since boot.
    pub start_time: u64,
}

/// A victim left alone because one of its task_structs no longer holds the task the table showed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stale {
    /// The task's pid in the table.
    pub pid: u32,
    /// The victim's (process) pid in the table.
    pub victim: u32,
    /// The task_struct's address.
    pub addr: u64,
    /// What is there now.
    pub found: Identity,
}

/// Offsets the direct path writes, from BTF.
#[derive(Clone, Copy, Debug)]
pub struct DirectLayout {
    signal: u64,
    shared_pending: u64,
    pending: u64,
    ti_flags: u64,
    pid: u64,
    tgid: u64,
    start_time: u64,
}

impl DirectLayout {
    /// Resolves the offsets, and checks that each word written or compared has the size this
    /// path reads and writes (the same in every kernel from 5.10 to 6.12 on x86-64: a `sigset_t`
    /// is `unsigned long sig[1]`, `thread_info.flags` an `unsigned long`).
    pub fn from_btf(btf: &Btf) -> Result<Self, RepairError> {
        let word = |structure: &'static str, path: &'static str, size: u64| {
            let s = btf.struct_layout(structure)?;
            let (off, m) =
                crate::layout::member_at(btf, &s, path).map_err(|reason| RepairError::Layout {
                    field: format!("{structure}.{path}"),
                    reason: Box::new(reason),
                })?;
            // An array (a sigset's words) is checked by its first element.
            let unit = match m.kind {
                crate::btf::MemberKind::Array { elem_size, .. } => elem_size,
                _ => m.size,
            };
            if unit != size {
                return Err(RepairError::Layout {
                    field: format!("{structure}.{path}"),
                    reason: Box::new(crate::layout::FieldError::Size {
                        found: unit,
                        expected: size,
                    }),
                });
            }
            Ok(off)
        };
        Ok(Self {
            signal: word("task_struct", "signal", 8)?,
            shared_pending: word("signal_struct", "shared_pending.signal.sig", 8)?,
            pending: word("task_struct", "pending.signal.sig", 8)?,
            ti_flags: word("task_struct", "thread_info.flags", 8)?,
            pid: word("task_struct", "pid", 4)?,
            tgid: word("task_struct", "tgid", 4)?,
            start_time: word("task_struct", "start_time", 8)?,
        })
    }
}

/// Users whose processes are never killed. Root (uid 0, which also owns every kernel thread) is
/// always among them, whatever the configuration says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spared(Vec<u32>);

impl Spared {
    /// Root and `users`.
    pub fn new(users: impl IntoIterator<Item = u32>) -> Spared {
        let mut v: Vec<u32> = std::iter::once(0).chain(users).collect();
        v.sort_unstable();
        v.dedup();
        Spared(v)
    }

    /// Root only.
    pub fn root() -> Spared {
        Spared::new([])
    }

    /// These and `more`.
    pub fn with(&self, more: impl IntoIterator<Item = u32>) -> Spared {
        Spared::new(self.0.iter().copied().chain(more))
    }

    /// The same users without root: only for an operator's explicit choice to let a healer act
    /// on root's processes (bdmon's `[hang] free_root`). Init and kernel threads stay refused
    /// ([`killable`]).
    pub fn allowing_root(&self) -> Spared {
        Spared(self.0.iter().copied().filter(|&u| u != 0).collect())
    }

    /// Is `uid` spared?
    pub fn contains(&self, uid: u32) -> bool {
        self.0.binary_search(&uid).is_ok()
    }

    /// The spared users, root first.
    pub fn users(&self) -> &[u32] {
        &self.0
    }
}

/// The never-kill rule, and its only copy: kernel threads, init (pid or tgid 1, and the idle task)
/// and the processes of spared users (root always) are never killed, nor named as culprits.
pub fn killable(p: &Process, spared: &Spared) -> bool {
    let t = &p.task;
    !t.kthread && t.pid > 1 && t.tgid > 1 && !spared.contains(t.uid)
}

/// Whom to kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Victims {
    /// Every process of this user.
    Uid(u32),
    /// These processes.
    Pids(Vec<u32>),
}

impl Victims {
    /// The processes of `table` this names that may be killed.
    pub fn select<'t>(&self, table: &'t [Process], spared: &Spared) -> Vec<&'t Process> {
        table
            .iter()
            .filter(|p| match self {
                Victims::Uid(u) => p.task.uid == *u,
                Victims::Pids(v) => v.contains(&p.task.pid),
            })
            .filter(|p| killable(p, spared))
            .collect()
    }
}

/// How the kills were carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// Requests in the repair-hook mailbox, carried out by the guest kernel.
    Mailbox,
    /// SIGKILL written into the task structures.
    Direct,
}

impl How {
    /// "mailbox" or "direct".
    pub fn as_str(self) -> &'static str {
        match self {
            How::Mailbox => "mailbox",
            How::Direct => "direct",
        }
    }
}

/// What [`kill`] (or [`apply`]) did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Killed {
    /// What was asked: kill, stop, cont or renice.
    pub order: Order,
    /// The killable processes the table showed (`None`: no table was read; a KILL_UID request
    /// then kills whatever the user has, and the guest's own process count tells how many).
    pub processes: Option<usize>,
    /// Their pids (empty without a table).
    pub pids: Vec<u32>,
    /// Requests written: mailbox slots, or processes signalled directly.
    pub requests: usize,
    /// How.
    pub how: How,
    /// Victims left alone because a task_struct of theirs holds another task now (direct path).
    pub stale: Vec<Stale>,
    /// Requests or victims not started because the lock's lease was about to end
    /// ([`KillSite::until`]).
    pub late: usize,
}

/// The guest as the kill path needs it: its memory, its kernel's address space, the Sensor Box
/// sample (its mailbox, on a patched guest) and the offsets the direct path writes.
#[derive(Clone, Copy)]
pub struct KillSite<'a> {
    /// Physical memory, paused.
    pub mem: &'a dyn PhysMem,
    /// Kernel virtual addresses.
    pub km: &'a KernelMem<'a>,
    /// A Sensor Box sample; its mailbox, if any, is used.
    pub sb: Option<&'a SensorBox>,
    /// Offsets for direct writes.
    pub direct: &'a DirectLayout,
    /// Nothing is started at or after this instant: the end of the lock's lease, less a margin
    /// (`None`: no lease, e.g. a local pause that the caller ends itself).
    pub until: Option<Instant>,
}

impl KillSite<'_> {
    /// True once [`KillSite::until`] has passed.
    fn late(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() >= u)
    }

    fn mailbox(&self) -> Result<Option<Mailbox>, RepairError> {
        match self.sb.filter(|s| s.hooks_gpa().is_some()) {
            Some(sb) => Ok(Some(Mailbox::open(self.mem, sb)?)),
            None => Ok(None),
        }
    }
}

/// Kills `victims` in a paused guest, sparing `spared`: the one kill path.
///
/// With a mailbox (patched guest) a user is killed by one KILL_UID request (the guest kernel skips
/// init and kernel threads itself; no `table` needed), processes by KILL_PID requests guarded by
/// their start times. Without one (stock guest), SIGKILL is written into each process of `table`.
/// The never-kill rule is applied before anything is written: a spared user, root, init or a
/// kernel thread is refused or left out.
pub fn kill(
    site: &KillSite<'_>,
    victims: &Victims,
    table: Option<&[Process]>,
    spared: &Spared,
) -> Result<Killed, RepairError> {
    apply(site, Order::Kill, victims, table, spared)
}

/// [`kill`] for any [`Order`]: the same victims, never-kill rule, re-checks and lease. Only a kill
/// can be carried out without the guest kernel's help (direct writes on a stock kernel); stop,
/// continue and renice need the mailbox ([`RepairError::NeedsMailbox`]), and renice names a user.
pub fn apply(
    site: &KillSite<'_>,
    order: Order,
    victims: &Victims,
    table: Option<&[Process]>,
    spared: &Spared,
) -> Result<Killed, RepairError> {
    if let Victims::Uid(uid) = victims {
        if spared.contains(*uid) {
            return Err(RepairError::Refused(format!("uid {uid} (spared)")));
        }
    }
    let selected = table.map(|t| victims.select(t, spared));
    let pids: Vec<u32> = selected.iter().flatten().map(|p| p.task.pid).collect();
    let processes = selected.as_ref().map(Vec::len);
    let mailbox = site.mailbox()?;
    if mailbox.is_none() && order != Order::Kill {
        return Err(RepairError::NeedsMailbox(order.as_str()));
    }
    let (mut requests, mut late) = (0, 0);
    let mut stale = Vec::new();
    let how = match (&mailbox, victims) {
        (Some(mb), Victims::Uid(uid)) => {
            if site.late() {
                late = 1;
            } else {
                mb.request(site.mem, order, KillTarget::Uid(*uid), u64::from(*uid))?;
                requests = 1;
            }
            How::Mailbox
        }
        (Some(mb), Victims::Pids(_)) => {
            let procs = selected.ok_or(RepairError::NeedsTable("a kill by pid"))?;
            for (i, p) in procs.iter().enumerate() {
                if site.late() {
                    late = procs.len() - i;
                    break;
                }
                // The guest kernel checks pid and start time when it carries this out.
                mb.request(site.mem, order, pid_target(p), u64::from(p.task.pid))?;
                requests += 1;
            }
            How::Mailbox
        }
        (None, _) => {
            let procs = selected.ok_or(RepairError::NeedsTable("a direct kill"))?;
            for (i, p) in procs.iter().enumerate() {
                if site.late() {
                    late = procs.len() - i;
                    break;
                }
                if let Some(s) = check(site, p)? {
                    tracing::warn!(
                        pid = s.pid,
                        victim = s.victim,
                        now = s.found.pid,
                        "task_struct {:#x} holds another task now: victim left alone",
                        s.addr
                    );
                    stale.push(s);
                    continue;
                }
                if !write_sigkill(site, p)? {
                    late = procs.len() - i;
                    break;
                }
                requests += 1;
            }
            How::Direct
        }
    };
    if late > 0 {
        tracing::warn!(late, "the lock's lease is about to end: kills not posted");
    }
    Ok(Killed {
        order,
        processes,
        pids,
        requests,
        how,
        stale,
        late,
    })
}

/// Posts SIGKILL for one process of the walked table (its whole thread group): a KILL_PID
/// request if `sb` has a mailbox, direct writes otherwise, after the same re-check as [`kill`]
/// ([`RepairError::Stale`] if a task_struct holds another task now). Refused unless [`killable`]
/// with only root spared. The guest must be paused.
pub fn post_sigkill(
    mem: &dyn PhysMem,
    km: &KernelMem,
    sb: Option<&SensorBox>,
    direct: &DirectLayout,
    proc: &Process,
) -> Result<Posted, RepairError> {
    let t = &proc.task;
    if !killable(proc, &Spared::root()) {
        return Err(RepairError::Refused(format!(
            "pid {} ({}, uid {})",
            t.pid, t.comm, t.uid
        )));
    }
    let site = KillSite {
        mem,
        km,
        sb,
        direct,
        until: None,
    };
    if let Some(mb) = site.mailbox()? {
        let slot = mb.post(mem, pid_target(proc), u64::from(t.pid))?;
        return Ok(Posted::Mailbox { slot });
    }
    if let Some(s) = check(&site, proc)? {
        return Err(RepairError::Stale(Box::new(s)));
    }
    write_sigkill(&site, proc)?;
    Ok(Posted::Direct {
        threads: proc.thread_addrs.len(),
    })
}

fn pid_target(p: &Process) -> KillTarget {
    KillTarget::Pid {
        pid: p.task.pid,
        start_time: p.task.start_time,
    }
}

/// What the task_struct at `addr` holds now, read past any cache: in one read when the three
/// fields lie within [`SPAN`] bytes (they do, in every kernel we know), else one read each.
fn identity(site: &KillSite<'_>, addr: u64) -> Result<Identity, RepairError> {
    let d = site.direct;
    let lo = d.pid.min(d.tgid).min(d.start_time);
    let hi = d.pid.max(d.tgid).max(d.start_time).saturating_add(8);
    let span = usize::try_from(hi - lo).ok().filter(|&n| n <= SPAN);
    let mut buf = vec![0u8; span.unwrap_or(0)];
    if span.is_some() {
        site.km
            .read_fresh(addr.wrapping_add(lo), "task identity", &mut buf)?;
    }
    let field = |off: u64, n: usize| -> Result<Vec<u8>, RepairError> {
        let at = usize::try_from(off - lo).unwrap_or(usize::MAX);
        if let Some(b) = buf.get(at..at.saturating_add(n)) {
            return Ok(b.to_vec());
        }
        let mut b = vec![0u8; n];
        site.km
            .read_fresh(addr.wrapping_add(off), "task identity", &mut b)?;
        Ok(b)
    };
    let (pid, tgid, start) = (field(d.pid, 4)?, field(d.tgid, 4)?, field(d.start_time, 8)?);
    Ok(Identity {
        pid: crate::le::u32_at(&pid, 0).unwrap_or(0),
        tgid: crate::le::u32_at(&tgid, 0).unwrap_or(0),
        start_time: crate::le::u64_at(&start, 0).unwrap_or(0),
    })
}

/// The most bytes [`identity`] reads in one go.
const SPAN: usize = 1024;

/// Re-reads every task_struct of `proc` right before it is signalled: the leader must still hold
/// the table's pid, tgid and start time, each other thread its pid and the tgid. The first that
/// does not is returned (and nothing must be written).
fn check(site: &KillSite<'_>, proc: &Process) -> Result<Option<Stale>, RepairError> {
    let t = &proc.task;
    let expected = std::iter::once(t.pid).chain(proc.threads.iter().copied());
    for (i, (&addr, pid)) in proc.thread_addrs.iter().zip(expected).enumerate() {
        let found = identity(site, addr)?;
        let same =
            found.pid == pid && found.tgid == t.tgid && (i > 0 || found.start_time == t.start_time);
        if !same {
            return Ok(Some(Stale {
                pid,
                victim: t.pid,
                addr,
                found,
            }));
        }
    }
    Ok(None)
}

/// The direct path: SIGKILL in the shared and every thread's private pending set, and
/// TIF_SIGPENDING in every thread's flags. Returns false if [`KillSite::until`] passed before
/// every thread was flagged.
fn write_sigkill(site: &KillSite<'_>, proc: &Process) -> Result<bool, RepairError> {
    let (mem, km, d) = (site.mem, site.km, site.direct);
    let t = &proc.task;
    let signal = km.read_u64(t.addr.wrapping_add(d.signal), "task signal")?;
    let pending = km.phys(signal.wrapping_add(d.shared_pending), "shared_pending")?;
    set_bits(mem, pending, SIGKILL_BIT)?;
    for &task in &proc.thread_addrs {
        if site.late() {
            return Ok(false);
        }
        set_bits(
            mem,
            km.phys(task.wrapping_add(d.pending), "pending")?,
            SIGKILL_BIT,
        )?;
        let flags = km.phys(task.wrapping_add(d.ti_flags), "thread_info flags")?;
        set_bits(mem, flags, TIF_SIGPENDING)?;
    }
    Ok(true)
}

fn set_bits(mem: &dyn PhysMem, gpa: u64, bits: u64) -> Result<(), RepairError> {
    let v = mem.read_u64(gpa).map_err(TaskError::from)?;
    mem.write(gpa, &(v | bits).to_le_bytes())
        .map_err(TaskError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Task;

    fn proc(pid: u32, uid: u32, kthread: bool) -> Process {
        Process {
            task: Task {
                pid,
                tgid: pid,
                uid,
                kthread,
                ..Task::default()
            },
            threads: vec![],
            thread_addrs: vec![],
            depth: 2,
            children: 0,
            cpu_ns: 0,
        }
    }

    #[test]
    fn root_is_always_spared() {
        let s = Spared::new([1000, 1000]);
        assert_eq!(s.users(), &[0, 1000]);
        assert!(s.contains(0) && s.contains(1000) && !s.contains(1001));
        assert!(s.with([7]).contains(7));
        assert!(Spared::root().contains(0));
    }

    #[test]
    fn never_kill_init_kernel_threads_root_or_spared_users() {
        let spared = Spared::new([1001]);
        assert!(killable(&proc(50, 1000, false), &spared));
        assert!(!killable(&proc(1, 1000, false), &spared));
        assert!(!killable(&proc(0, 1000, false), &spared));
        assert!(!killable(&proc(50, 1000, true), &spared));
        assert!(!killable(&proc(50, 0, false), &spared));
        assert!(!killable(&proc(50, 1001, false), &spared));
        let mut child_of_init = proc(60, 1000, false);
        child_of_init.task.tgid = 1;
        assert!(!killable(&child_of_init, &spared));
    }

    #[test]
    fn victims_select_only_killable_processes() {
        let table = vec![
            proc(1, 0, false),
            proc(2, 0, true),
            proc(10, 1000, false),
            proc(11, 1000, false),
            proc(12, 1001, false),
        ];
        let spared = Spared::new([1001]);
        let pids = |v: &Victims| -> Vec<u32> {
            v.select(&table, &spared)
                .iter()
                .map(|p| p.task.pid)
                .collect()
        };
        assert_eq!(pids(&Victims::Uid(1000)), [10, 11]);
        assert_eq!(pids(&Victims::Uid(0)), Vec::<u32>::new());
        assert_eq!(pids(&Victims::Pids(vec![1, 2, 11, 12])), [11]);
    }

    use std::cell::Cell;

    use crate::kernel::KernelLocation;
    use crate::mem::{MemError, VecMem};

    const BASE: u64 = 0xffff_8880_0000_0000;

    /// Guest memory that counts the writes reaching it.
    struct Recording {
        mem: VecMem,
        writes: Cell<usize>,
    }

    impl PhysMem for Recording {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.mem.read(gpa, buf)
        }
        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemError> {
            self.writes.set(self.writes.get() + 1);
            self.mem.write(gpa, bytes)
        }
    }

    const DIRECT: DirectLayout = DirectLayout {
        signal: 0x60,
        shared_pending: 0x10,
        pending: 0x80,
        ti_flags: 0x08,
        pid: 0x20,
        tgid: 0x24,
        start_time: 0x50,
    };

    /// task_struct `i` at 0x1000 * (i + 1), its signal_struct 0x800 further.
    fn at(i: u64) -> u64 {
        0x1000 * (i + 1)
    }

    fn write_task(mem: &dyn PhysMem, i: u64, pid: u32, tgid: u32, start: u64) {
        let a = at(i);
        mem.write(a + DIRECT.pid, &pid.to_le_bytes()).unwrap();
        mem.write(a + DIRECT.tgid, &tgid.to_le_bytes()).unwrap();
        mem.write(a + DIRECT.start_time, &start.to_le_bytes())
            .unwrap();
        mem.write(a + DIRECT.signal, &(BASE + a + 0x800).to_le_bytes())
            .unwrap();
    }

    /// A table entry for task `i` (a process of uid 1000) with threads `threads`.
    fn victim(i: u64, pid: u32, start: u64, threads: &[(u64, u32)]) -> Process {
        let mut p = proc(pid, 1000, false);
        p.task.addr = BASE + at(i);
        p.task.start_time = start;
        p.thread_addrs = std::iter::once(p.task.addr)
            .chain(threads.iter().map(|&(t, _)| BASE + at(t)))
            .collect();
        p.threads = threads.iter().map(|&(_, pid)| pid).collect();
        p
    }

    fn loc() -> KernelLocation {
        KernelLocation {
            slide: 0,
            phys_base: 0,
            page_offset_base: BASE,
            cr3: 0,
            levels: 4,
        }
    }

    fn pending(mem: &dyn PhysMem, i: u64) -> u64 {
        mem.read_u64(at(i) + DIRECT.pending).unwrap()
    }

    #[test]
    fn a_stale_task_struct_on_the_stock_path_is_never_written() {
        let mem = Recording {
            mem: VecMem::new(0, vec![0u8; 0x10000]),
            writes: Cell::new(0),
        };
        // The table: pid 500 at task 0, pid 501 at task 1 with thread 502 at task 2.
        let table = vec![
            victim(0, 500, 7_000, &[]),
            victim(1, 501, 8_000, &[(2, 502)]),
        ];
        // Since the walk, pid 500 exited and its task_struct now holds a root daemon; 501 and its
        // thread are still there.
        write_task(&mem, 0, 900, 900, 9_999);
        write_task(&mem, 1, 501, 501, 8_000);
        write_task(&mem, 2, 502, 501, 8_100);
        mem.writes.set(0);
        let km = KernelMem::new(&mem, loc());
        let site = KillSite {
            mem: &mem,
            km: &km,
            sb: None,
            direct: &DIRECT,
            until: None,
        };
        let k = kill(&site, &Victims::Uid(1000), Some(&table), &Spared::root()).unwrap();
        assert_eq!(k.requests, 1);
        assert_eq!(k.stale.len(), 1, "{k:?}");
        assert_eq!((k.stale[0].pid, k.stale[0].found.pid), (500, 900));
        assert_eq!(pending(&mem, 0), 0, "the daemon was not signalled");
        assert_eq!(pending(&mem, 1), SIGKILL_BIT);
        assert_eq!(pending(&mem, 2), SIGKILL_BIT);
        // shared pending + 2 x (pending, flags) for 501's two threads; nothing for the daemon.
        assert_eq!(mem.writes.get(), 5);

        // One call, one process: refused with the reason, nothing written.
        let refused = |p: &Process, pid: u32| {
            mem.writes.set(0);
            let r = post_sigkill(&mem, &km, None, &DIRECT, p);
            assert!(
                matches!(r, Err(RepairError::Stale(ref s)) if s.pid == pid),
                "{r:?}"
            );
            assert_eq!(mem.writes.get(), 0);
        };
        refused(&table[0], 500);
        // The same pid and tgid but another start time: the pid was reused.
        write_task(&mem, 0, 500, 500, 9_999);
        refused(&table[0], 500);
        // A thread whose task_struct was reused: the whole victim is left alone.
        write_task(&mem, 2, 77, 77, 1);
        refused(&table[1], 502);
    }

    #[test]
    fn the_re_check_reads_past_the_page_cache() {
        // Over a bridge the walk's pages stay cached while the lock is held; if the lease ran out
        // the guest changed memory under that cache.
        let mem = crate::cache::CachedMem::new(VecMem::new(0, vec![0u8; 0x10000]), 1, 64);
        write_task(&mem, 0, 500, 500, 7_000);
        mem.set_caching(true);
        assert_eq!(mem.read_u32(at(0) + DIRECT.pid).unwrap(), 500);
        write_task(mem.inner(), 0, 900, 900, 9_999);
        assert_eq!(mem.read_u32(at(0) + DIRECT.pid).unwrap(), 500, "cached");
        let km = KernelMem::new(&mem, loc());
        let r = post_sigkill(&mem, &km, None, &DIRECT, &victim(0, 500, 7_000, &[]));
        assert!(matches!(r, Err(RepairError::Stale(_))), "{r:?}");
        assert_eq!(mem.inner().read_u64(at(0) + DIRECT.pending).unwrap(), 0);
    }

    #[test]
    fn nothing_is_posted_once_the_lease_is_nearly_over() {
        let mem = Recording {
            mem: VecMem::new(0, vec![0u8; 0x10000]),
            writes: Cell::new(0),
        };
        write_task(&mem, 0, 500, 500, 7_000);
        let table = vec![victim(0, 500, 7_000, &[])];
        mem.writes.set(0);
        let km = KernelMem::new(&mem, loc());
        let mut site = KillSite {
            mem: &mem,
            km: &km,
            sb: None,
            direct: &DIRECT,
            until: Some(Instant::now()),
        };
        let k = kill(&site, &Victims::Uid(1000), Some(&table), &Spared::root()).unwrap();
        assert_eq!((k.requests, k.late, mem.writes.get()), (0, 1, 0), "{k:?}");

        // The mailbox path (patched guest) too.
        let img = crate::sensorbox::tests::image();
        let sb = crate::sensorbox::parse(&img, 0x10_0000).unwrap();
        let mb = Recording {
            mem: VecMem::new(0x10_0000, img),
            writes: Cell::new(0),
        };
        let km = KernelMem::new(&mb, loc());
        site.mem = &mb;
        site.km = &km;
        site.sb = Some(&sb);
        for victims in [Victims::Uid(1000), Victims::Pids(vec![500])] {
            let k = kill(&site, &victims, Some(&table), &Spared::root()).unwrap();
            assert_eq!((k.requests, k.late, mb.writes.get()), (0, 1, 0), "{k:?}");
        }
        // With lease left, the same request is posted.
        site.until = Instant::now().checked_add(std::time::Duration::from_secs(60));
        let k = kill(&site, &Victims::Uid(1000), None, &Spared::root()).unwrap();
        assert_eq!((k.requests, k.late), (1, 0));
        assert!(mb.writes.get() > 0);
    }
}
