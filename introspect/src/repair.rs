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
//! [`kill`] is the one kill path of the project: the healers and the tests name the victims (a user
//! or some pids) and the users to spare, and it applies the never-kill rule ([`killable`], the only
//! copy of it), chooses mailbox or direct writes, and reports what it did.

use crate::btf::Btf;
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
    /// Refused by the never-kill rule.
    #[error("refusing to kill {0}")]
    Refused(String),
    /// The request cannot be carried out without the process table.
    #[error("{0} needs the process table (no repair-hook mailbox to ask the guest kernel)")]
    NeedsTable(&'static str),
}

/// Offsets the direct path writes, from BTF.
#[derive(Clone, Copy, Debug)]
pub struct DirectLayout {
    signal: u64,
    shared_pending: u64,
    pending: u64,
    ti_flags: u64,
}

impl DirectLayout {
    /// Resolves the offsets.
    pub fn from_btf(btf: &Btf) -> Result<Self, RepairError> {
        Ok(Self {
            signal: btf.field_offset("task_struct", "signal")?,
            shared_pending: btf.field_offset("signal_struct", "shared_pending.signal.sig")?,
            pending: btf.field_offset("task_struct", "pending.signal.sig")?,
            ti_flags: btf.field_offset("task_struct", "thread_info.flags")?,
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

/// What [`kill`] did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Killed {
    /// The killable processes the table showed (`None`: no table was read; a KILL_UID request
    /// then kills whatever the user has, and the guest's own process count tells how many).
    pub processes: Option<usize>,
    /// Their pids (empty without a table).
    pub pids: Vec<u32>,
    /// Requests written: mailbox slots, or processes signalled directly.
    pub requests: usize,
    /// How.
    pub how: How,
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
}

impl KillSite<'_> {
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
    if let Victims::Uid(uid) = victims {
        if spared.contains(*uid) {
            return Err(RepairError::Refused(format!("uid {uid} (spared)")));
        }
    }
    let selected = table.map(|t| victims.select(t, spared));
    let pids: Vec<u32> = selected.iter().flatten().map(|p| p.task.pid).collect();
    let processes = selected.as_ref().map(Vec::len);
    let mailbox = site.mailbox()?;
    let mut requests = 0;
    let how = match (&mailbox, victims) {
        (Some(mb), Victims::Uid(uid)) => {
            mb.post(site.mem, KillTarget::Uid(*uid), u64::from(*uid))?;
            requests = 1;
            How::Mailbox
        }
        (Some(mb), Victims::Pids(_)) => {
            let procs = selected.ok_or(RepairError::NeedsTable("a kill by pid"))?;
            for p in procs {
                mb.post(site.mem, pid_target(p), u64::from(p.task.pid))?;
                requests += 1;
            }
            How::Mailbox
        }
        (None, _) => {
            let procs = selected.ok_or(RepairError::NeedsTable("a direct kill"))?;
            for p in procs {
                write_sigkill(site, p)?;
                requests += 1;
            }
            How::Direct
        }
    };
    Ok(Killed {
        processes,
        pids,
        requests,
        how,
    })
}

/// Posts SIGKILL for one process of the walked table (its whole thread group): a KILL_PID
/// request if `sb` has a mailbox, direct writes otherwise. Refused unless [`killable`] with only
/// root spared. The guest must be paused.
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
    };
    if let Some(mb) = site.mailbox()? {
        let slot = mb.post(mem, pid_target(proc), u64::from(t.pid))?;
        return Ok(Posted::Mailbox { slot });
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

/// The direct path: SIGKILL in the shared and every thread's private pending set, and
/// TIF_SIGPENDING in every thread's flags.
fn write_sigkill(site: &KillSite<'_>, proc: &Process) -> Result<(), RepairError> {
    let (mem, km, d) = (site.mem, site.km, site.direct);
    let t = &proc.task;
    let signal = km.read_u64(t.addr.wrapping_add(d.signal), "task signal")?;
    let pending = km.phys(signal.wrapping_add(d.shared_pending), "shared_pending")?;
    set_bits(mem, pending, SIGKILL_BIT)?;
    for &task in &proc.thread_addrs {
        set_bits(
            mem,
            km.phys(task.wrapping_add(d.pending), "pending")?,
            SIGKILL_BIT,
        )?;
        let flags = km.phys(task.wrapping_add(d.ti_flags), "thread_info flags")?;
        set_bits(mem, flags, TIF_SIGPENDING)?;
    }
    Ok(())
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
}
