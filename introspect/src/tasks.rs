//! The guest's process table, read from `init_task`'s task list with layouts from BTF.
//!
//! Every pointer comes from the guest and is checked: it must be 8-byte aligned and lie in the
//! direct map or the kernel image; list walks stop after a bounded number of steps and report a
//! cycle or a wild pointer as an error; strings are cut at their field.

use std::collections::HashMap;

use crate::btf::{Btf, BtfError};
use crate::conv::usize_from;
use crate::kernel::{KernelLocation, START_KERNEL_MAP};
use crate::mem::{MemError, PhysMem};

/// `PF_KTHREAD` (include/linux/sched.h): the task is a kernel thread.
const PF_KTHREAD: u32 = 0x0020_0000;
/// `EXIT_ZOMBIE` / `EXIT_DEAD` (include/linux/sched.h).
const EXIT_ZOMBIE: u32 = 0x10;
const EXIT_DEAD: u32 = 0x20;
/// Size of the direct map we accept pointers into (the architectural maximum is 64 TiB/32 PiB).
const DIRECT_MAP_SPAN: u64 = 1 << 46;

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A layout is missing from BTF.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// Memory could not be read.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A pointer outside what a task list may contain.
    #[error("wild pointer {ptr:#x} in {what}")]
    WildPointer {
        /// Where it was found.
        what: &'static str,
        /// The value.
        ptr: u64,
    },
    /// A list came back to an element other than its head.
    #[error("cycle in {0} (a task seen twice)")]
    Cycle(&'static str),
    /// What should be `init_task` is not the idle task.
    #[error("the task at init_task is pid {0} {1:?}, not the idle task (pid 0, swapper): wrong symbols or layout")]
    NotInitTask(u32, String),
    /// A list did not end within the step limit.
    #[error("{0} longer than {1} entries; giving up")]
    TooLong(&'static str, usize),
}

/// Field offsets the walk needs, resolved once from BTF.
#[derive(Clone, Debug)]
pub struct TaskLayout {
    tasks: u64,
    pid: u64,
    tgid: u64,
    comm: u64,
    comm_len: u64,
    real_parent: u64,
    real_cred: u64,
    state: u64,
    exit_state: u64,
    flags: u64,
    start_time: u64,
    mm: u64,
    signal: u64,
    thread_node: u64,
    signal_thread_head: u64,
    cred_uid: u64,
    cred_euid: u64,
    mm_rss: u64,
    rss_index: [u64; 3],
}

impl TaskLayout {
    /// Resolves every offset from the kernel's BTF.
    pub fn from_btf(btf: &Btf) -> Result<Self, TaskError> {
        let task = btf.struct_layout("task_struct")?;
        let comm = task.member("comm")?;
        let idx = |name: &str| -> Result<u64, TaskError> {
            Ok(u64::try_from(btf.enum_constant(name)?).unwrap_or(0))
        };
        Ok(Self {
            tasks: task.offset("tasks")?,
            pid: task.offset("pid")?,
            tgid: task.offset("tgid")?,
            comm: task.offset("comm")?,
            comm_len: comm.size.min(64),
            real_parent: task.offset("real_parent")?,
            real_cred: task.offset("real_cred")?,
            state: task.offset("__state")?,
            exit_state: task.offset("exit_state")?,
            flags: task.offset("flags")?,
            start_time: task.offset("start_time")?,
            mm: task.offset("mm")?,
            signal: task.offset("signal")?,
            thread_node: task.offset("thread_node")?,
            signal_thread_head: btf.field_offset("signal_struct", "thread_head")?,
            cred_uid: btf.field_offset("cred", "uid.val")?,
            cred_euid: btf.field_offset("cred", "euid.val")?,
            mm_rss: btf.field_offset("mm_struct", "rss_stat.count")?,
            rss_index: [
                idx("MM_FILEPAGES")?,
                idx("MM_ANONPAGES")?,
                idx("MM_SHMEMPAGES")?,
            ],
        })
    }
}

/// One task (a process, or a thread of one).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    /// Kernel address of its task_struct.
    pub addr: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// Parent's pid.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Command name.
    pub comm: String,
    /// `ps` state letter: R S D T t X Z I P.
    pub state: char,
    /// A kernel thread.
    pub kthread: bool,
    /// Start time, ns since boot (`task->start_time`).
    pub start_time: u64,
    /// Resident file pages.
    pub rss_file: u64,
    /// Resident anonymous pages.
    pub rss_anon: u64,
    /// Resident shared-memory pages.
    pub rss_shmem: u64,
}

/// A process with its threads and its place in the tree.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Process {
    /// The thread-group leader.
    pub task: Task,
    /// Other threads' pids.
    pub threads: Vec<u32>,
    /// task_struct addresses of every thread, the leader's first.
    pub thread_addrs: Vec<u64>,
    /// Ancestors up to the idle task (init has depth 1).
    pub depth: u32,
    /// Number of direct children.
    pub children: u32,
}

/// Limits of a walk.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most processes.
    pub max_processes: usize,
    /// Most threads per process.
    pub max_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_processes: 1 << 20,
            max_threads: 1 << 16,
        }
    }
}

/// Reads kernel virtual memory through the location's direct map and image mapping.
pub struct KernelMem<'m> {
    mem: &'m dyn PhysMem,
    loc: KernelLocation,
}

impl<'m> KernelMem<'m> {
    /// Kernel memory of `loc` in `mem`.
    pub fn new(mem: &'m dyn PhysMem, loc: KernelLocation) -> Self {
        Self { mem, loc }
    }

    /// The physical address of a kernel pointer, if it is one we may follow.
    pub fn phys(&self, va: u64, what: &'static str) -> Result<u64, TaskError> {
        let wild = TaskError::WildPointer { what, ptr: va };
        if va % 8 != 0 {
            return Err(wild);
        }
        if va >= self.loc.page_offset_base && va - self.loc.page_offset_base < DIRECT_MAP_SPAN {
            return Ok(va - self.loc.page_offset_base);
        }
        if va >= START_KERNEL_MAP {
            return Ok(self.loc.image_phys(va));
        }
        Err(wild)
    }

    fn read(&self, va: u64, what: &'static str, buf: &mut [u8]) -> Result<(), TaskError> {
        let base = self.phys(va & !7, what)?;
        Ok(self.mem.read(base + (va & 7), buf)?)
    }

    /// Reads a u64 at kernel virtual `va`.
    pub fn read_u64(&self, va: u64, what: &'static str) -> Result<u64, TaskError> {
        self.u64_at(va, what)
    }

    fn u64_at(&self, va: u64, what: &'static str) -> Result<u64, TaskError> {
        let mut b = [0u8; 8];
        self.read(va, what, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn u32_at(&self, va: u64, what: &'static str) -> Result<u32, TaskError> {
        let mut b = [0u8; 4];
        self.read(va, what, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Walks a `list_head` list from `head`, returning the addresses of its entries (the
    /// containing structures, `offset` bytes before each node). A loop that does not pass through
    /// the head is found with Brent's algorithm, without allocating.
    fn list(
        &self,
        head: u64,
        offset: u64,
        what: &'static str,
        max: usize,
    ) -> Result<Vec<u64>, TaskError> {
        let mut out = Vec::new();
        let (mut tortoise, mut power, mut lam) = (head, 1usize, 0usize);
        let mut node = self.u64_at(head, what)?;
        while node != head {
            if out.len() >= max {
                return Err(TaskError::TooLong(what, max));
            }
            if node == tortoise {
                return Err(TaskError::Cycle(what));
            }
            self.phys(node, what)?;
            out.push(node.wrapping_sub(offset));
            lam += 1;
            if lam == power {
                tortoise = node;
                power = power.saturating_mul(2);
                lam = 0;
            }
            node = self.u64_at(node, what)?;
        }
        Ok(out)
    }
}

/// `_QW_WMASK` (include/asm-generic/qrwlock.h): the writer bits of a qrwlock's count.
const QW_WMASK: u32 = 0x1ff;

/// Where to look to tell whether `tasklist_lock` is write-held.
#[derive(Clone, Copy, Debug)]
pub struct TasklistLock {
    cnts: u64,
}

impl TasklistLock {
    /// `addr` is `&tasklist_lock` (run-time); the layout of `rwlock_t` comes from BTF.
    pub fn new(btf: &Btf, addr: u64) -> Result<Self, TaskError> {
        let rwlock = btf
            .find("rwlock_t")
            .find_map(|id| btf.struct_layout_by_id(id).ok())
            .ok_or_else(|| BtfError::NotFound {
                what: "struct typedef",
                name: "rwlock_t".into(),
            })?;
        let qrwlock = btf.struct_layout("qrwlock")?;
        Ok(Self {
            cnts: addr + rwlock.offset("raw_lock")? + qrwlock.offset("cnts")?,
        })
    }

    /// Whether a writer holds (or is taking) the lock: a walk of the task list now could see a
    /// list being changed.
    pub fn write_held(&self, km: &KernelMem) -> Result<bool, TaskError> {
        Ok(km.u32_at(self.cnts, "tasklist_lock")? & QW_WMASK != 0)
    }
}

fn state_letter(state: u32, exit_state: u32) -> char {
    if exit_state & EXIT_DEAD != 0 {
        return 'X';
    }
    if exit_state & EXIT_ZOMBIE != 0 {
        return 'Z';
    }
    match state {
        0 => 'R',
        s if s & 0x0402 == 0x0402 => 'I', // TASK_IDLE = UNINTERRUPTIBLE | NOLOAD
        s if s & 0x0001 != 0 => 'S',
        s if s & 0x0002 != 0 => 'D',
        s if s & 0x0004 != 0 => 'T',
        s if s & 0x0008 != 0 => 't',
        s if s & 0x0040 != 0 => 'P',
        _ => '?',
    }
}

/// Reads one task.
pub fn read_task(km: &KernelMem, l: &TaskLayout, addr: u64) -> Result<Task, TaskError> {
    // At most 64: `TaskLayout::from_btf` caps it.
    let mut comm = vec![0u8; usize_from(l.comm_len)];
    km.read(addr.wrapping_add(l.comm), "task comm", &mut comm)?;
    let len = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    let comm: String = comm[..len]
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    let parent = km.u64_at(addr.wrapping_add(l.real_parent), "real_parent")?;
    let ppid = if parent == addr {
        0
    } else {
        km.u32_at(parent.wrapping_add(l.pid), "parent pid")?
    };
    let cred = km.u64_at(addr.wrapping_add(l.real_cred), "real_cred")?;
    let mm = km.u64_at(addr.wrapping_add(l.mm), "mm")?;
    let mut rss = [0u64; 3];
    if mm != 0 {
        for (slot, idx) in rss.iter_mut().zip(l.rss_index) {
            let v = km.u64_at(
                mm.wrapping_add(l.mm_rss).wrapping_add(idx.wrapping_mul(8)),
                "mm rss_stat",
            )?;
            // The counter is signed and may dip below zero: a negative one (top bit set) is 0.
            *slot = if v >> 63 == 0 { v } else { 0 };
        }
    }
    let flags = km.u32_at(addr.wrapping_add(l.flags), "flags")?;
    Ok(Task {
        addr,
        pid: km.u32_at(addr.wrapping_add(l.pid), "pid")?,
        tgid: km.u32_at(addr.wrapping_add(l.tgid), "tgid")?,
        ppid,
        uid: km.u32_at(cred.wrapping_add(l.cred_uid), "cred uid")?,
        euid: km.u32_at(cred.wrapping_add(l.cred_euid), "cred euid")?,
        comm,
        state: state_letter(
            km.u32_at(addr.wrapping_add(l.state), "state")?,
            km.u32_at(addr.wrapping_add(l.exit_state), "exit_state")?,
        ),
        kthread: flags & PF_KTHREAD != 0,
        start_time: km.u64_at(addr.wrapping_add(l.start_time), "start_time")?,
        rss_file: rss[0],
        rss_anon: rss[1],
        rss_shmem: rss[2],
    })
}

/// Reads the whole process table starting at `init_task` (kernel virtual address).
pub fn process_table(
    km: &KernelMem,
    l: &TaskLayout,
    init_task: u64,
    limits: Limits,
) -> Result<Vec<Process>, TaskError> {
    // The head must look like the idle task: pid 0, named swapper (swapper/0 on SMP).
    let idle = read_task(km, l, init_task)?;
    if idle.pid != 0 || !idle.comm.starts_with("swapper") {
        return Err(TaskError::NotInitTask(idle.pid, idle.comm));
    }
    let leaders = km.list(
        init_task.wrapping_add(l.tasks),
        l.tasks,
        "task list",
        limits.max_processes,
    )?;
    let mut procs = Vec::with_capacity(leaders.len());
    for addr in leaders {
        let task = read_task(km, l, addr)?;
        let signal = km.u64_at(addr.wrapping_add(l.signal), "signal")?;
        let mut threads = Vec::new();
        let mut thread_addrs = vec![addr];
        if signal != 0 {
            for t in km.list(
                signal.wrapping_add(l.signal_thread_head),
                l.thread_node,
                "thread list",
                limits.max_threads,
            )? {
                if t != addr {
                    threads.push(km.u32_at(t.wrapping_add(l.pid), "thread pid")?);
                    thread_addrs.push(t);
                }
            }
        }
        procs.push(Process {
            task,
            threads,
            thread_addrs,
            depth: 0,
            children: 0,
        });
    }
    let parent: HashMap<u32, u32> = procs.iter().map(|p| (p.task.pid, p.task.ppid)).collect();
    let mut children: HashMap<u32, u32> = HashMap::new();
    for p in &procs {
        *children.entry(p.task.ppid).or_default() += 1;
    }
    for p in &mut procs {
        p.children = children.get(&p.task.pid).copied().unwrap_or(0);
        let mut depth = 0u32;
        let mut cur = p.task.pid;
        // Bounded by the table size: a parent loop cannot make this spin.
        for _ in 0..=parent.len() {
            match parent.get(&cur) {
                Some(&pp) if pp != 0 && pp != cur => {
                    depth += 1;
                    cur = pp;
                }
                _ => break,
            }
        }
        p.depth = depth + 1;
    }
    Ok(procs)
}

/// Fuzzing entry point: walks a task list in arbitrary memory with a layout made of small offsets
/// taken from `data`. It must end in a table or an error, never a panic or a hang.
#[doc(hidden)]
pub fn fuzz_walk(mem: &dyn PhysMem, data: &[u8]) {
    let off = |i: usize| u64::from(data.get(i).copied().unwrap_or(0)) * 8;
    let layout = TaskLayout {
        tasks: off(0),
        pid: off(1),
        tgid: off(2),
        comm: off(3),
        comm_len: 16,
        real_parent: off(4),
        real_cred: off(5),
        state: off(6),
        exit_state: off(7),
        flags: off(8),
        start_time: off(9),
        mm: off(10),
        signal: off(11),
        thread_node: off(12),
        signal_thread_head: off(13),
        cred_uid: off(14),
        cred_euid: off(15),
        mm_rss: off(16),
        rss_index: [0, 1, 3],
    };
    let loc = KernelLocation {
        slide: 0,
        phys_base: 0,
        page_offset_base: 0xffff_8880_0000_0000,
        cr3: 0,
        levels: 4,
    };
    let km = KernelMem::new(mem, loc);
    let limits = Limits {
        max_processes: 4096,
        max_threads: 256,
    };
    let _ = process_table(&km, &layout, 0xffff_8880_0000_0000 + off(17), limits);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(0, EXIT_ZOMBIE), 'Z');
        assert_eq!(state_letter(4, 0), 'T');
    }

    fn fake(links: &[(u64, u64)]) -> crate::mem::VecMem {
        let mem = crate::mem::VecMem::new(0, vec![0u8; 0x1000]);
        for &(at, next) in links {
            mem.write(at, &(BASE + next).to_le_bytes()).unwrap();
        }
        mem
    }

    const BASE: u64 = 0xffff_8880_0000_0000;

    fn km(mem: &crate::mem::VecMem) -> KernelMem<'_> {
        KernelMem::new(
            mem,
            KernelLocation {
                slide: 0,
                phys_base: 0,
                page_offset_base: BASE,
                cr3: 0,
                levels: 4,
            },
        )
    }

    #[test]
    fn negative_rss_counters_read_as_zero() {
        let l = TaskLayout {
            tasks: 0,
            pid: 0x10,
            tgid: 0x14,
            comm: 0x20,
            comm_len: 16,
            real_parent: 0x30,
            real_cred: 0x38,
            state: 0x40,
            exit_state: 0x44,
            flags: 0x48,
            start_time: 0x50,
            mm: 0x58,
            signal: 0x60,
            thread_node: 0x68,
            signal_thread_head: 0x70,
            cred_uid: 4,
            cred_euid: 8,
            mm_rss: 0x10,
            rss_index: [0, 1, 3],
        };
        let mem = crate::mem::VecMem::new(0, vec![0u8; 0x1000]);
        let (task, cred, mm) = (0x100u64, 0x400u64, 0x800u64);
        let w = |at: u64, v: &[u8]| mem.write(at, v).unwrap();
        w(task + l.comm, b"hog\0");
        w(task + l.real_parent, &(BASE + task).to_le_bytes());
        w(task + l.real_cred, &(BASE + cred).to_le_bytes());
        w(task + l.mm, &(BASE + mm).to_le_bytes());
        w(mm + l.mm_rss, &i64::MAX.to_le_bytes()); // file
        w(mm + l.mm_rss + 8, &(-3i64).to_le_bytes()); // anon: per-CPU drift below zero
        w(mm + l.mm_rss + 3 * 8, &7i64.to_le_bytes()); // shmem
        let t = read_task(&km(&mem), &l, BASE + task).unwrap();
        assert_eq!(t.comm, "hog");
        assert_eq!((t.rss_file, t.rss_anon, t.rss_shmem), (u64::MAX >> 1, 0, 7));
    }

    #[test]
    fn list_walks_end_at_the_head_or_report_loops_and_wild_pointers() {
        let good = fake(&[(0, 0x100), (0x100, 0x200), (0x200, 0x300), (0x300, 0)]);
        let k = km(&good);
        assert_eq!(
            k.list(BASE, 0x10, "t", 100).unwrap(),
            vec![BASE + 0xf0, BASE + 0x1f0, BASE + 0x2f0]
        );
        assert!(matches!(
            k.list(BASE, 0, "t", 2),
            Err(TaskError::TooLong(..))
        ));
        // A loop B -> C -> B that never returns to the head.
        let rho = fake(&[(0, 0x100), (0x100, 0x200), (0x200, 0x300), (0x300, 0x200)]);
        assert!(matches!(
            km(&rho).list(BASE, 0, "t", 1 << 20),
            Err(TaskError::Cycle(_))
        ));
        // A pointer outside the direct map.
        let wild = fake(&[(0, 0x100)]);
        wild.write(0x100, &0x1234_5678u64.to_le_bytes()).unwrap();
        assert!(matches!(
            km(&wild).list(BASE, 0, "t", 100),
            Err(TaskError::WildPointer { .. })
        ));
    }
}
