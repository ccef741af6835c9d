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
    /// Refused by policy.
    #[error("refusing to kill {0}")]
    Refused(String),
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

/// Posts SIGKILL for `proc` (its whole thread group), as found by the process-table walk. The
/// guest must be paused.
pub fn post_sigkill(
    mem: &dyn PhysMem,
    km: &KernelMem,
    sb: Option<&SensorBox>,
    direct: &DirectLayout,
    proc: &Process,
) -> Result<Posted, RepairError> {
    let t = &proc.task;
    if t.pid <= 1 || t.kthread {
        return Err(RepairError::Refused(format!("pid {} ({})", t.pid, t.comm)));
    }
    if let Some(sb) = sb.filter(|s| s.hooks_gpa().is_some()) {
        let mb = Mailbox::open(mem, sb)?;
        let slot = mb.post(
            mem,
            KillTarget::Pid {
                pid: t.pid,
                start_time: t.start_time,
            },
            u64::from(t.pid),
        )?;
        return Ok(Posted::Mailbox { slot });
    }
    let signal = km.read_u64(t.addr.wrapping_add(direct.signal), "task signal")?;
    let pending = km.phys(signal.wrapping_add(direct.shared_pending), "shared_pending")?;
    let set = mem.read_u64(pending).map_err(TaskError::from)?;
    mem.write(pending, &(set | SIGKILL_BIT).to_le_bytes())
        .map_err(TaskError::from)?;
    for &task in &proc.thread_addrs {
        let own = km.phys(task.wrapping_add(direct.pending), "pending")?;
        let set = mem.read_u64(own).map_err(TaskError::from)?;
        mem.write(own, &(set | SIGKILL_BIT).to_le_bytes())
            .map_err(TaskError::from)?;
        let flags = km.phys(task.wrapping_add(direct.ti_flags), "thread_info flags")?;
        let f = mem.read_u64(flags).map_err(TaskError::from)?;
        mem.write(flags, &(f | TIF_SIGPENDING).to_le_bytes())
            .map_err(TaskError::from)?;
    }
    Ok(Posted::Direct {
        threads: proc.thread_addrs.len(),
    })
}
