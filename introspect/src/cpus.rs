//! Each CPU's runqueue: the task it runs, how many tasks are runnable on it, and how long its
//! current task has held it — what a monitor needs to find a CPU that one task keeps from
//! everyone else (an RT spinner) and to count runnable tasks on a stock kernel.
//!
//! Read from the per-CPU variable `runqueues` (`struct rq`, whose layout comes from BTF) at
//! `__per_cpu_offset[cpu]` for every CPU below `nr_cpu_ids`. How long the current task has run
//! is the runqueue's clock less the task's `sched_info.last_arrival` (the clock when it last got
//! the CPU; `CONFIG_SCHED_INFO`, which Debian's kernels and our patched one have). The reads are
//! single words, taken with the guest running or paused: a diagnosis that acts on them takes the
//! lock and reads again.

use crate::btf::Btf;
use crate::layout::{int, pointer, FieldError};
use crate::tasks::{KernelMem, TaskError};

/// Why the runqueues could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CpusError {
    /// Reading guest memory.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A CPU count no kernel has.
    #[error("nr_cpu_ids {0} is implausible (expected 1..={MAX_CPUS})")]
    Implausible(u32),
    /// This kernel's runqueues cannot be read at all.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// Why a kernel's runqueues cannot be found (decided once, when the kernel is located).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// A patched kernel whose descriptor predates the field.
    #[error(
        "the Sensor Box's descriptor does not name the runqueues (a kernel without \
         guest-kernel-patches/0007)"
    )]
    NotNamed,
    /// A symbol the kernel's table lacks.
    #[error("no symbol {0} in the kernel's symbols")]
    NoSymbol(&'static str),
    /// `struct rq` is not one introspect reads.
    #[error("struct rq: {0}")]
    Layout(FieldError),
}

/// Most CPUs read.
pub const MAX_CPUS: u32 = 8192;

/// Offsets in `struct rq` and `struct task_struct`, resolved once from BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RqLayout {
    nr_running: u64,
    nr_switches: u64,
    curr: u64,
    idle: u64,
    clock: u64,
    /// `task_struct.sched_info.last_arrival` (`None` without `CONFIG_SCHED_INFO`).
    last_arrival: Option<u64>,
}

impl RqLayout {
    /// Resolves the offsets from the kernel's BTF.
    pub fn from_btf(btf: &Btf) -> Result<RqLayout, FieldError> {
        let rq = btf.struct_layout("rq")?;
        let task = btf.struct_layout("task_struct")?;
        Ok(RqLayout {
            nr_running: int(btf, &rq, "nr_running", &[4])?,
            nr_switches: int(btf, &rq, "nr_switches", &[8])?,
            curr: pointer(btf, &rq, "curr")?,
            idle: pointer(btf, &rq, "idle")?,
            clock: int(btf, &rq, "clock", &[8])?,
            last_arrival: int(btf, &task, "sched_info.last_arrival", &[8]).ok(),
        })
    }

    /// Whether how long a task has held its CPU can be told (`CONFIG_SCHED_INFO`).
    pub fn has_hold_time(&self) -> bool {
        self.last_arrival.is_some()
    }
}

/// How many CPUs to read: a value the patched kernel's descriptor gives, or the address of
/// `nr_cpu_ids` to read it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuCount {
    /// `nr_cpu_ids` itself.
    Value(u32),
    /// Kernel virtual address of `nr_cpu_ids`.
    At(u64),
}

/// Where the runqueues are, and their layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runqueues {
    /// The per-CPU address of `runqueues` (an offset into each CPU's area).
    pub runqueues: u64,
    /// Kernel virtual address of the `__per_cpu_offset` array.
    pub per_cpu_offset: u64,
    /// How many CPUs.
    pub cpus: CpuCount,
    /// Offsets.
    pub layout: RqLayout,
}

/// One CPU, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cpu {
    /// CPU number.
    pub cpu: u32,
    /// The task_struct it runs.
    pub curr: u64,
    /// It runs its idle task.
    pub idle: bool,
    /// Runnable tasks on it, the running one included.
    pub nr_running: u32,
    /// Context switches so far.
    pub nr_switches: u64,
    /// Its clock, ns.
    pub clock: u64,
    /// How long its current (non-idle) task has held it, ns (`None`: idle, or unknown).
    pub held_ns: Option<u64>,
}

impl Cpu {
    /// Its current task holds it while others wait.
    pub fn contended(&self) -> bool {
        !self.idle && self.nr_running > 1
    }
}

impl Runqueues {
    /// The number of CPUs to read, checked.
    fn count(&self, km: &KernelMem) -> Result<u32, CpusError> {
        let n = match self.cpus {
            CpuCount::Value(n) => n,
            CpuCount::At(a) => (km.read_u64(a, "nr_cpu_ids")? & 0xffff_ffff) as u32,
        };
        if n == 0 || n > MAX_CPUS {
            return Err(CpusError::Implausible(n));
        }
        Ok(n)
    }

    /// Reads every CPU's runqueue (`nr_cpu_ids` of them, at most [`MAX_CPUS`]).
    pub fn read(&self, km: &KernelMem) -> Result<Vec<Cpu>, CpusError> {
        let n = self.count(km)?;
        let l = &self.layout;
        let mut out = Vec::with_capacity(n as usize);
        for cpu in 0..n {
            let off = km.read_u64(
                self.per_cpu_offset.wrapping_add(u64::from(cpu) * 8),
                "__per_cpu_offset",
            )?;
            let rq = off.wrapping_add(self.runqueues);
            let curr = km.read_u64(rq.wrapping_add(l.curr), "rq.curr")?;
            let idle = km.read_u64(rq.wrapping_add(l.idle), "rq.idle")?;
            let clock = km.read_u64(rq.wrapping_add(l.clock), "rq.clock")?;
            let is_idle = curr == idle || curr == 0;
            let held_ns = match l.last_arrival {
                Some(o) if !is_idle => {
                    let arrived = km.read_u64(curr.wrapping_add(o), "sched_info.last_arrival")?;
                    Some(clock.saturating_sub(arrived))
                }
                _ => None,
            };
            out.push(Cpu {
                cpu,
                curr,
                idle: is_idle,
                nr_running: km.read_u32(rq.wrapping_add(l.nr_running), "rq.nr_running")?,
                nr_switches: km.read_u64(rq.wrapping_add(l.nr_switches), "rq.nr_switches")?,
                clock,
                held_ns,
            });
        }
        Ok(out)
    }
}

/// Runnable tasks summed over CPUs (what the kernel's `nr_running()` returns).
pub fn nr_running(cpus: &[Cpu]) -> u64 {
    cpus.iter().map(|c| u64::from(c.nr_running)).sum()
}

/// The virtual `CPU_PROGRESS` value, in ms of the runqueue clock: the latest instant at which
/// every CPU had made progress — now (the freshest runqueue clock) unless a CPU's current task
/// holds it while others wait, then the moment that task got it. It stays put while one task
/// holds a CPU, and advances otherwise. `None` when hold times are unknown.
pub fn progress_ms(cpus: &[Cpu]) -> Option<u64> {
    let now = cpus.iter().map(|c| c.clock).max()?;
    let mut mark = now;
    for c in cpus.iter().filter(|c| c.contended()) {
        mark = mark.min(c.clock.saturating_sub(c.held_ns?));
    }
    Some(mark / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(clock: u64, idle: bool, nr: u32, held: Option<u64>) -> Cpu {
        Cpu {
            cpu: 0,
            curr: 1,
            idle,
            nr_running: nr,
            nr_switches: 0,
            clock,
            held_ns: held,
        }
    }

    #[test]
    fn progress_stays_put_while_a_cpu_is_held() {
        let ms = 1_000_000;
        // Idle and alone CPUs progress with the clock.
        let a = [
            cpu(100 * ms, true, 0, None),
            cpu(90 * ms, false, 1, Some(50 * ms)),
        ];
        assert_eq!(progress_ms(&a), Some(100));
        // CPU 1 held since 40 ms while others wait: 40, whatever the clocks do.
        let b = [
            cpu(200 * ms, true, 0, None),
            cpu(190 * ms, false, 3, Some(150 * ms)),
        ];
        let c = [
            cpu(300 * ms, true, 0, None),
            cpu(295 * ms, false, 3, Some(255 * ms)),
        ];
        assert_eq!(progress_ms(&b), Some(40));
        assert_eq!(progress_ms(&c), Some(40));
        assert_eq!(nr_running(&c), 3);
        assert_eq!(progress_ms(&[]), None);
    }
}
