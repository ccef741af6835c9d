//! The guest's process table, read from `init_task`'s task list with layouts from BTF.
//!
//! Every pointer comes from the guest and is checked: it must be 8-byte aligned and lie in the
//! direct map or the kernel image; strings are cut at their field.
//!
//! The guest kernel may be hostile, and one bdmon process watches every guest, so a walk is
//! bounded as a whole, not list by list ([`Limits`]):
//!
//! * **One budget of task_structs** for the task list and every thread list together
//!   ([`DEFAULT_MAX_ENTRIES`]), and **a deadline** ([`DEFAULT_MAX_TIME`]).
//! * **One visited set** shared by all those lists: a task_struct address is taken once per walk,
//!   whichever list reaches it. Reaching one again (a loop in a list, a thread list shared by
//!   several leaders, a leader that is also another process's thread) ends the walk with
//!   [`TaskError::Cycle`] or [`TaskError::Shared`]: every list step either takes a new entry from
//!   the budget or ends, so the work is linear in the budget.
//! * **Depth memoised**: each process's parent chain is followed once for the whole table (O(n)),
//!   and a loop of `real_parent` pointers is [`TaskError::Cycle`].
//!
//! [`TaskError::is_guest_fault`] tells a hostile or corrupt guest (or one too big for the budget)
//! from memory that could not be read; [`TaskError::is_over_budget`] tells a walk stopped by its
//! budget of entries or time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::btf::{Btf, BtfError};
use crate::conv::usize_from;
use crate::kernel::{KernelLocation, START_KERNEL_MAP};
use crate::layout::{Rss, Threads};
pub use crate::layout::{TaskLayout, Unresolved};
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
    /// A field the process table cannot be read without is missing from this kernel, in every
    /// shape we know of.
    #[error(
        "kernel {release}: cannot read the process table: no {field} (looked for {looked_for}; \
         {reason}); this kernel's task_struct is not one introspect knows, report it with the \
         kernel's release"
    )]
    Unsupported {
        /// The kernel's release, or "unknown release".
        release: String,
        /// The field, e.g. `task_struct.pid`.
        field: &'static str,
        /// The shapes that were tried.
        looked_for: &'static str,
        /// What the kernel's types said.
        reason: Box<crate::layout::FieldError>,
    },
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
    /// A list came back to an element other than its head, or `real_parent` pointers loop.
    #[error("cycle in {0} (a task seen twice): the guest's task lists are corrupt or hostile")]
    Cycle(&'static str),
    /// A thread list reached a task_struct another list of this walk already took (thread lists
    /// shared between processes, or a leader listed as another process's thread).
    #[error(
        "task_struct {addr:#x} reached again from {what}: thread lists shared between processes \
         (the guest's task lists are corrupt or hostile)"
    )]
    Shared {
        /// The list that reached it again.
        what: &'static str,
        /// The task_struct's address.
        addr: u64,
    },
    /// What should be `init_task` is not the idle task.
    #[error("the task at init_task is pid {0} {1:?}, not the idle task (pid 0, swapper): wrong symbols or layout")]
    NotInitTask(u32, String),
    /// The task list and thread lists together hold more task_structs than the walk's budget.
    #[error(
        "{what} took the walk past its budget of {max} task_structs (tasks and threads \
         together); a guest this big needs a larger walk budget (tasks::Limits::max_entries), \
         otherwise its task lists are hostile"
    )]
    TooLong {
        /// The list that was being walked.
        what: &'static str,
        /// The budget.
        max: usize,
    },
    /// The walk ran out of time.
    #[error(
        "the task walk ran out of its {limit:?} after {entries} task_structs (memory too slow, \
         or a hostile guest); raise tasks::Limits::max_time if the guest is just big"
    )]
    OutOfTime {
        /// The time budget.
        limit: Duration,
        /// Task_structs taken by then.
        entries: usize,
    },
}

impl TaskError {
    /// True if the guest's task lists made no sense or held more than the walk's budget of
    /// entries (a hostile or corrupt kernel, wrong symbols or layouts); false if memory could not
    /// be read (a lost session, an ungranted range), a type is missing from BTF, or the walk ran
    /// out of time (slow memory as likely as a hostile guest: the entries are bounded anyway).
    pub fn is_guest_fault(&self) -> bool {
        !matches!(
            self,
            TaskError::Mem(_)
                | TaskError::Btf(_)
                | TaskError::Unsupported { .. }
                | TaskError::OutOfTime { .. }
        )
    }

    /// True if the walk stopped at its budget of entries or of time (see [`Limits`]).
    pub fn is_over_budget(&self) -> bool {
        matches!(
            self,
            TaskError::TooLong { .. } | TaskError::OutOfTime { .. }
        )
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
    /// Parent's process id (its thread group: what getppid() returns).
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
    /// CPU time used, ns (`task->se.sum_exec_runtime`; 0 if the kernel's layout lacks it).
    pub cpu_ns: u64,
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
    /// CPU time of every live thread, ns (the sum of their `se.sum_exec_runtime`).
    pub cpu_ns: u64,
}

/// Task_structs one walk takes at most by default: processes and threads together.
pub const DEFAULT_MAX_ENTRIES: usize = 65_536;
/// How long one walk may take by default: half of bdmon's default 2 s lease, so that a walk that
/// uses it all still leaves time to kill under the same lock.
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(1);

/// The budget of one whole walk: the task list and every thread list share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most task_structs taken, leaders and threads together, each at most once
    /// ([`DEFAULT_MAX_ENTRIES`]).
    pub max_entries: usize,
    /// Longest the walk may take ([`DEFAULT_MAX_TIME`]).
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_time: DEFAULT_MAX_TIME,
        }
    }
}

/// What a walk cost, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WalkStats {
    /// Task_structs taken from the budget (processes and threads).
    pub entries: usize,
    /// Steps along `real_parent` chains to compute every depth.
    pub parent_steps: usize,
}

/// A process table and what reading it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The processes, in task-list order.
    pub processes: Vec<Process>,
    /// The cost.
    pub stats: WalkStats,
}

/// One walk's budget and visited set: every task_struct address reached by any list, with the
/// index of the process it belongs to.
struct Walk {
    max: usize,
    limit: Duration,
    deadline: Option<Instant>,
    seen: HashMap<u64, usize>,
    stats: WalkStats,
}

impl Walk {
    fn new(limits: Limits) -> Walk {
        Walk {
            max: limits.max_entries,
            limit: limits.max_time,
            deadline: Instant::now().checked_add(limits.max_time),
            seen: HashMap::new(),
            stats: WalkStats::default(),
        }
    }

    /// Fails once the deadline has passed.
    fn in_time(&self) -> Result<(), TaskError> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(TaskError::OutOfTime {
                limit: self.limit,
                entries: self.stats.entries,
            }),
            _ => Ok(()),
        }
    }

    /// Takes the task_struct at `addr` for process `owner`: a new one costs one entry of the
    /// budget. One already taken by any list of this walk is an error: a cycle if it belongs to
    /// the list being walked (`list_owner`; `None` for the task list, whose entries are all its
    /// own), otherwise a list shared with another process.
    fn take(
        &mut self,
        addr: u64,
        owner: usize,
        list_owner: Option<usize>,
        what: &'static str,
    ) -> Result<(), TaskError> {
        if let Some(&had) = self.seen.get(&addr) {
            return Err(if list_owner.is_none_or(|o| o == had) {
                TaskError::Cycle(what)
            } else {
                TaskError::Shared { what, addr }
            });
        }
        if self.stats.entries >= self.max {
            return Err(TaskError::TooLong {
                what,
                max: self.max,
            });
        }
        self.in_time()?;
        self.seen.insert(addr, owner);
        self.stats.entries += 1;
        Ok(())
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

    /// Reads a u32 at kernel virtual `va`.
    pub fn read_u32(&self, va: u64, what: &'static str) -> Result<u32, TaskError> {
        self.u32_at(va, what)
    }

    fn u32_at(&self, va: u64, what: &'static str) -> Result<u32, TaskError> {
        let mut b = [0u8; 4];
        self.read(va, what, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Walks a `list_head` list from `head` and returns its entries (the containing structures,
    /// `offset` bytes before each node). Each entry is taken from `walk` for process `owner` (or,
    /// with `owner` `None`, for a new process per entry): an entry any list of the walk already
    /// took ends the walk with an error, so a list cannot loop and lists cannot share entries.
    /// `skip` (a thread list's own leader) is passed over once.
    fn list(
        &self,
        walk: &mut Walk,
        head: u64,
        offset: u64,
        what: &'static str,
        owner: Option<usize>,
        mut skip: Option<u64>,
    ) -> Result<Vec<u64>, TaskError> {
        let mut out = Vec::new();
        let mut node = self.u64_at(head, what)?;
        while node != head {
            self.phys(node, what)?;
            let entry = node.wrapping_sub(offset);
            if skip == Some(entry) {
                skip = None;
            } else {
                walk.take(entry, owner.unwrap_or(out.len()), owner, what)?;
                out.push(entry);
            }
            node = self.u64_at(node, what)?;
        }
        Ok(out)
    }

    /// Fills `buf` from kernel virtual `va` as memory is now, past any cache
    /// ([`PhysMem::read_fresh`]): the kill path's checks right before it writes.
    pub fn read_fresh(&self, va: u64, what: &'static str, buf: &mut [u8]) -> Result<(), TaskError> {
        let base = self.phys(va & !7, what)?;
        Ok(self.mem.read_fresh(base + (va & 7), buf)?)
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

/// 'X' or 'Z' for a task that is exiting.
fn exit_letter(exit_state: u32) -> Option<char> {
    if exit_state & EXIT_DEAD != 0 {
        Some('X')
    } else if exit_state & EXIT_ZOMBIE != 0 {
        Some('Z')
    } else {
        None
    }
}

fn state_letter(state: u32, exit_state: u32) -> char {
    if let Some(c) = exit_letter(exit_state) {
        return c;
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
        // What getppid() says: the thread group of the thread that forked it.
        km.u32_at(parent.wrapping_add(l.tgid), "parent tgid")?
    };
    let cred = km.u64_at(addr.wrapping_add(l.real_cred), "real_cred")?;
    let mm = km.u64_at(addr.wrapping_add(l.mm), "mm")?;
    let rss = match l.rss {
        Some(r) if mm != 0 => read_rss(km, &r, mm)?,
        _ => [0; 3],
    };
    let flags = km.u32_at(addr.wrapping_add(l.flags), "flags")?;
    let uid = km.u32_at(cred.wrapping_add(l.cred_uid), "cred uid")?;
    let opt_u32 = |off: Option<u64>, what| -> Result<Option<u32>, TaskError> {
        off.map(|o| km.u32_at(addr.wrapping_add(o), what))
            .transpose()
    };
    // `__state` is a u32; the older `state` a long whose low 32 bits (little-endian: the first
    // four bytes) hold every state bit.
    let state = opt_u32(l.state, "state")?;
    let exit_state = opt_u32(l.exit_state, "exit_state")?.unwrap_or(0);
    Ok(Task {
        addr,
        pid: km.u32_at(addr.wrapping_add(l.pid), "pid")?,
        tgid: km.u32_at(addr.wrapping_add(l.tgid), "tgid")?,
        ppid,
        uid,
        euid: match l.cred_euid {
            Some(o) => km.u32_at(cred.wrapping_add(o), "cred euid")?,
            None => uid,
        },
        comm,
        state: match state {
            Some(s) => state_letter(s, exit_state),
            None => exit_letter(exit_state).unwrap_or('?'),
        },
        kthread: flags & PF_KTHREAD != 0,
        start_time: match l.start_time {
            Some(o) => km.u64_at(addr.wrapping_add(o), "start_time")?,
            None => 0,
        },
        cpu_ns: match l.cpu_time {
            Some(o) => km.u64_at(addr.wrapping_add(o), "se.sum_exec_runtime")?,
            None => 0,
        },
        rss_file: rss[0],
        rss_anon: rss[1],
        rss_shmem: rss[2],
    })
}

/// The file, anonymous and shared-memory page counts of the `mm_struct` at `mm`: each a signed
/// 64-bit counter (an `atomic_long_t`, or a `percpu_counter`'s `count`) that may dip below zero,
/// read as 0 then.
fn read_rss(km: &KernelMem, r: &Rss, mm: u64) -> Result<[u64; 3], TaskError> {
    let mut rss = [0u64; 3];
    for (slot, idx) in rss.iter_mut().zip(r.index) {
        let at = mm
            .wrapping_add(r.base)
            .wrapping_add(idx.wrapping_mul(r.stride));
        let v = km.u64_at(at, "mm rss_stat")?;
        *slot = if v >> 63 == 0 { v } else { 0 };
    }
    Ok(rss)
}

/// Marks `init_task` in the visited set: no list may reach the idle task but through its head.
const IDLE: usize = usize::MAX;

/// Reads the whole process table starting at `init_task` (kernel virtual address), within
/// `limits` (see the module's documentation).
pub fn process_table(
    km: &KernelMem,
    l: &TaskLayout,
    init_task: u64,
    limits: Limits,
) -> Result<Vec<Process>, TaskError> {
    walk_table(km, l, init_task, limits).map(|t| t.processes)
}

/// [`process_table`], and what the walk cost.
pub fn walk_table(
    km: &KernelMem,
    l: &TaskLayout,
    init_task: u64,
    limits: Limits,
) -> Result<Table, TaskError> {
    let mut walk = Walk::new(limits);
    // The head must look like the idle task: pid 0, named swapper (swapper/0 on SMP).
    let idle = read_task(km, l, init_task)?;
    if idle.pid != 0 || !idle.comm.starts_with("swapper") {
        return Err(TaskError::NotInitTask(idle.pid, idle.comm));
    }
    walk.seen.insert(init_task, IDLE);
    let leaders = km.list(
        &mut walk,
        init_task.wrapping_add(l.tasks),
        l.tasks,
        "task list",
        None,
        None,
    )?;
    let mut procs = Vec::with_capacity(leaders.len());
    let mut parents = Vec::with_capacity(leaders.len());
    for (i, addr) in leaders.into_iter().enumerate() {
        walk.in_time()?;
        let task = read_task(km, l, addr)?;
        parents.push(km.u64_at(addr.wrapping_add(l.real_parent), "real_parent")?);
        let mut threads = Vec::new();
        let mut thread_addrs = vec![addr];
        let mut cpu_ns = task.cpu_ns;
        for t in thread_list(km, l, &mut walk, i, addr)? {
            threads.push(km.u32_at(t.wrapping_add(l.pid), "thread pid")?);
            if let Some(o) = l.cpu_time {
                let ns = km.u64_at(t.wrapping_add(o), "thread se.sum_exec_runtime")?;
                cpu_ns = cpu_ns.saturating_add(ns);
            }
            thread_addrs.push(t);
        }
        procs.push(Process {
            task,
            threads,
            thread_addrs,
            depth: 0,
            children: 0,
            cpu_ns,
        });
    }
    // Each process's parent, as an index into the table: `real_parent` may be any thread of the
    // parent process. The idle task, or a task not in the table, is no parent (depth 1).
    let parent: Vec<Option<usize>> = parents
        .iter()
        .enumerate()
        .map(|(i, p)| walk.seen.get(p).copied().filter(|&o| o != IDLE && o != i))
        .collect();
    let depths = depths(&parent, &mut walk.stats)?;
    for (p, depth) in procs.iter_mut().zip(depths) {
        p.depth = depth;
    }
    for &pp in parent.iter().flatten() {
        if let Some(p) = procs.get_mut(pp) {
            p.children = p.children.saturating_add(1);
        }
    }
    Ok(Table {
        processes: procs,
        stats: walk.stats,
    })
}

/// The other threads of the leader at `addr` (process `i` of the walk), from whichever thread
/// list the kernel has; none if it has neither.
fn thread_list(
    km: &KernelMem,
    l: &TaskLayout,
    walk: &mut Walk,
    i: usize,
    addr: u64,
) -> Result<Vec<u64>, TaskError> {
    match l.threads {
        Threads::Signal { signal, head, node } => {
            let signal = km.u64_at(addr.wrapping_add(signal), "signal")?;
            if signal == 0 {
                return Ok(Vec::new());
            }
            let head = signal.wrapping_add(head);
            km.list(walk, head, node, "thread list", Some(i), Some(addr))
        }
        // The leader's own node heads the ring, so it is not among the entries.
        Threads::Group { node } => km.list(
            walk,
            addr.wrapping_add(node),
            node,
            "thread list",
            Some(i),
            None,
        ),
        Threads::None => Ok(Vec::new()),
    }
}

/// The depth of every process (1 for one whose parent is not in the table), each parent link
/// followed once for the whole table; a loop of parents is an error.
fn depths(parent: &[Option<usize>], stats: &mut WalkStats) -> Result<Vec<u32>, TaskError> {
    const UNKNOWN: u32 = 0;
    const ON_PATH: u32 = u32::MAX;
    let mut depth = vec![UNKNOWN; parent.len()];
    let mut path = Vec::new();
    for start in 0..parent.len() {
        // Climb until a process whose depth is known, or one without a parent.
        let mut cur = start;
        let base = loop {
            match depth.get(cur).copied() {
                Some(ON_PATH) => return Err(TaskError::Cycle("parent chain")),
                Some(UNKNOWN) => {}
                Some(d) => break d,
                None => break 0,
            }
            path.push(cur);
            if let Some(d) = depth.get_mut(cur) {
                *d = ON_PATH;
            }
            stats.parent_steps += 1;
            match parent.get(cur).copied().flatten() {
                Some(p) => cur = p,
                None => break 0,
            }
        };
        // Unwind: each process on the path is one deeper than the one above it.
        let mut d = base;
        while let Some(i) = path.pop() {
            d = d.saturating_add(1);
            if let Some(slot) = depth.get_mut(i) {
                *slot = d;
            }
        }
    }
    Ok(depth)
}

/// Fuzzing entry point: walks a task list in arbitrary memory with a layout made of small offsets
/// taken from `data`. It must end in a table or an error, never a panic or a hang.
#[doc(hidden)]
pub fn fuzz_walk(mem: &dyn PhysMem, data: &[u8]) {
    let off = |i: usize| u64::from(data.get(i).copied().unwrap_or(0)) * 8;
    // Byte 19 picks the shapes: the thread list, the RSS counters, which optional fields exist.
    let shape = data.get(19).copied().unwrap_or(0);
    let has = |bit: u8, v: u64| (shape & (1 << bit) != 0).then_some(v);
    let layout = TaskLayout {
        tasks: off(0),
        pid: off(1),
        tgid: off(2),
        comm: off(3),
        comm_len: 16,
        real_parent: off(4),
        real_cred: off(5),
        flags: off(8),
        mm: off(10),
        mm_pgd: None,
        cred_uid: off(14),
        state: has(0, off(6)),
        exit_state: has(1, off(7)),
        start_time: has(2, off(9)),
        cpu_time: has(2, off(17)),
        cred_euid: has(3, off(15)),
        threads: match shape >> 6 {
            0 => Threads::Signal {
                signal: off(11),
                head: off(13),
                node: off(12),
            },
            1 => Threads::Group { node: off(12) },
            _ => Threads::None,
        },
        rss: has(4, 0).map(|_| Rss {
            base: off(16),
            stride: if shape & (1 << 5) != 0 { 40 } else { 8 },
            index: [0, 1, 3],
        }),
        unresolved: Vec::new(),
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
        max_entries: 4096,
        max_time: Duration::from_secs(1),
    };
    let _ = process_table(&km, &layout, 0xffff_8880_0000_0000 + off(17), limits);
    // The walk's parts on their own, so that every input reaches them, not only one whose
    // init_task looks like the idle task: lists sharing one budget and visited set ...
    let mut walk = Walk::new(limits);
    let head = 0xffff_8880_0000_0000 + off(18);
    if let Ok(leaders) = km.list(&mut walk, head, layout.tasks, "task list", None, None) {
        for (i, &t) in leaders.iter().enumerate() {
            if thread_list(&km, &layout, &mut walk, i, t).is_err() {
                break;
            }
        }
    }
    // ... and depths over parent links taken from the input (0xff: no parent).
    let n = data.len().clamp(1, 4096);
    let parent: Vec<Option<usize>> = data
        .iter()
        .take(n)
        .map(|&b| (b != 0xff).then_some(usize::from(b) % n))
        .collect();
    let _ = depths(&parent, &mut WalkStats::default());
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

    const BASE: u64 = 0xffff_8880_0000_0000;

    /// The offsets of the synthetic task_structs, signal_structs, creds and mm_structs below.
    const LAYOUT: TaskLayout = TaskLayout {
        tasks: 0,
        pid: 0x10,
        tgid: 0x14,
        comm: 0x20,
        comm_len: 16,
        real_parent: 0x30,
        real_cred: 0x38,
        state: Some(0x40),
        exit_state: Some(0x44),
        flags: 0x48,
        start_time: Some(START_TIME),
        cpu_time: None,
        mm: 0x58,
        mm_pgd: None,
        threads: Threads::Signal {
            signal: SIGNAL,
            head: THREAD_HEAD,
            node: THREAD_NODE,
        },
        cred_uid: 4,
        cred_euid: Some(8),
        rss: Some(Rss {
            base: MM_RSS,
            stride: 8,
            index: [0, 1, 3],
        }),
        unresolved: Vec::new(),
    };
    const START_TIME: u64 = 0x50;
    const SIGNAL: u64 = 0x60;
    const THREAD_NODE: u64 = 0x68;
    const THREAD_HEAD: u64 = 0x70;
    const MM_RSS: u64 = 0x10;

    #[test]
    fn negative_rss_counters_read_as_zero() {
        let l = LAYOUT;
        let mem = crate::mem::VecMem::new(0, vec![0u8; 0x1000]);
        let (task, cred, mm) = (0x100u64, 0x400u64, 0x800u64);
        let w = |at: u64, v: &[u8]| mem.write(at, v).unwrap();
        w(task + l.comm, b"hog\0");
        w(task + l.real_parent, &(BASE + task).to_le_bytes());
        w(task + l.real_cred, &(BASE + cred).to_le_bytes());
        w(task + l.mm, &(BASE + mm).to_le_bytes());
        w(mm + MM_RSS, &i64::MAX.to_le_bytes()); // file
        w(mm + MM_RSS + 8, &(-3i64).to_le_bytes()); // anon: per-CPU drift below zero
        w(mm + MM_RSS + 3 * 8, &7i64.to_le_bytes()); // shmem
        let t = read_task(&km(&mem), &l, BASE + task).unwrap();
        assert_eq!(t.comm, "hog");
        assert_eq!((t.rss_file, t.rss_anon, t.rss_shmem), (u64::MAX >> 1, 0, 7));
    }

    /// Counts the reads that reach guest memory.
    struct Counting<'m>(&'m crate::mem::VecMem, std::cell::Cell<u64>);

    impl PhysMem for Counting<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.1.set(self.1.get() + 1);
            self.0.read(gpa, buf)
        }
    }

    /// A synthetic guest: task_structs of [`LAYOUT`] every 0x100 bytes from 0x1_0000 (task 0 is
    /// `init_task`), signal_structs every 0x100 bytes from 0x80_0000, one cred (uid 1000).
    struct Guest {
        mem: crate::mem::VecMem,
    }

    const CRED: u64 = 0x800;

    fn t(i: u64) -> u64 {
        0x1_0000 + i * 0x100
    }

    fn sig(j: u64) -> u64 {
        0x80_0000 + j * 0x100
    }

    impl Guest {
        /// Room for `tasks` task_structs and `signals` signal_structs; task 0 is the idle task.
        fn new(tasks: u64) -> Guest {
            let size = usize::try_from(sig(tasks.max(1))).unwrap();
            let g = Guest {
                mem: crate::mem::VecMem::new(0, vec![0u8; size]),
            };
            g.w(CRED + 4, &1000u32.to_le_bytes());
            g.task(0, 0, 0, b"swapper/0");
            g
        }

        fn w(&self, at: u64, v: &[u8]) {
            self.mem.write(at, v).unwrap();
        }

        fn ptr(&self, at: u64, to: u64) {
            self.w(at, &(BASE + to).to_le_bytes());
        }

        /// Task `i` with `pid`, child of task `parent`, no threads.
        fn task(&self, i: u64, pid: u32, parent: u64, comm: &[u8]) {
            let a = t(i);
            self.w(a + LAYOUT.pid, &pid.to_le_bytes());
            self.w(a + LAYOUT.tgid, &pid.to_le_bytes());
            self.w(a + LAYOUT.comm, comm);
            self.w(a + START_TIME, &(u64::from(pid) * 1000).to_le_bytes());
            self.ptr(a + LAYOUT.real_parent, t(parent));
            self.ptr(a + LAYOUT.real_cred, CRED);
        }

        /// Links `nodes` (addresses of list_heads) into the list at `head`.
        fn list(&self, head: u64, nodes: &[u64]) {
            let mut at = head;
            for &n in nodes {
                self.ptr(at, n);
                at = n;
            }
            self.ptr(at, head);
        }

        /// The task list: init_task, then `leaders` (task indices).
        fn leaders(&self, leaders: &[u64]) {
            let nodes: Vec<u64> = leaders.iter().map(|&i| t(i) + LAYOUT.tasks).collect();
            self.list(t(0) + LAYOUT.tasks, &nodes);
        }

        /// Gives leader `leader` the signal_struct `j`, whose thread list holds `threads`.
        fn threads(&self, leader: u64, j: u64, threads: &[u64]) {
            self.ptr(t(leader) + SIGNAL, sig(j));
            let nodes: Vec<u64> = threads.iter().map(|&i| t(i) + THREAD_NODE).collect();
            self.list(sig(j) + THREAD_HEAD, &nodes);
        }

        fn walk(&self, limits: Limits) -> (Result<Table, TaskError>, u64) {
            let c = Counting(&self.mem, std::cell::Cell::new(0));
            let r = walk_table(&km(&c), &LAYOUT, BASE + t(0), limits);
            (r, c.1.get())
        }
    }

    fn km(mem: &dyn PhysMem) -> KernelMem<'_> {
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
    fn a_small_guest_walks_into_its_table() {
        let g = Guest::new(8);
        g.task(1, 1, 0, b"init");
        g.task(2, 50, 1, b"sh");
        g.task(3, 51, 2, b"sh"); // a thread of pid 50
        g.w(t(3) + LAYOUT.tgid, &50u32.to_le_bytes());
        g.task(4, 60, 3, b"child"); // forked by the thread: its ppid is the process, 50
        g.leaders(&[1, 2, 4]);
        g.threads(2, 0, &[2, 3]);
        let table = g.walk(Limits::default()).0.unwrap();
        let p: Vec<(u32, u32, u32, u32, Vec<u32>)> = table
            .processes
            .iter()
            .map(|p| {
                let t = &p.task;
                (t.pid, t.ppid, p.depth, p.children, p.threads.clone())
            })
            .collect();
        assert_eq!(
            p,
            [
                (1, 0, 1, 1, vec![]),
                (50, 1, 2, 1, vec![51]),
                (60, 50, 3, 0, vec![])
            ]
        );
        assert_eq!(table.processes[1].thread_addrs, [BASE + t(2), BASE + t(3)]);
        assert_eq!(table.stats.entries, 4);
    }

    #[test]
    fn one_thread_list_shared_by_4096_leaders_ends_within_the_budget() {
        // The probe of issue 12: every leader's signal_struct is the same one, whose thread list
        // holds the first leader and 4,096 threads. Walked per leader, that was 4,096 x 4,097
        // task_structs (24 MiB and growing); a task_struct is now taken once per walk.
        const N: u64 = 4096;
        let g = Guest::new(2 * N + 1);
        for i in 1..=N {
            g.task(i, u32::try_from(i + 100).unwrap(), 0, b"bomb");
        }
        for i in N + 1..=2 * N {
            g.task(i, u32::try_from(i + 100).unwrap(), 0, b"thread");
            g.w(t(i) + LAYOUT.tgid, &101u32.to_le_bytes());
        }
        let leaders: Vec<u64> = (1..=N).collect();
        g.leaders(&leaders);
        let threads: Vec<u64> = std::iter::once(1).chain(N + 1..=2 * N).collect();
        g.threads(1, 0, &threads);
        for i in 2..=N {
            g.ptr(t(i) + SIGNAL, sig(0));
        }
        let (r, reads) = g.walk(Limits::default());
        match r {
            Err(e @ TaskError::Shared { .. }) => assert!(e.is_guest_fault(), "{e}"),
            other => panic!(
                "expected a shared thread list, got {:?}",
                other.map(|t| t.stats)
            ),
        }
        // Linear in the task_structs there are (8,193), not in leaders x threads (16.8 million).
        assert!(reads < 20 * (2 * N + 1), "{reads} reads");
    }

    #[test]
    fn tasks_and_threads_share_one_budget_of_entries_and_time() {
        // 600 processes of 2 threads each: 1,200 task_structs, each list short.
        let g = Guest::new(1201);
        let leaders: Vec<u64> = (1..=600).collect();
        for &i in &leaders {
            g.task(i, u32::try_from(i + 100).unwrap(), 0, b"p");
            g.task(i + 600, u32::try_from(i + 1000).unwrap(), 0, b"t");
            g.threads(i, i, &[i, i + 600]);
        }
        g.leaders(&leaders);
        let ok = g.walk(Limits::default()).0.unwrap();
        assert_eq!((ok.processes.len(), ok.stats.entries), (600, 1200));
        let small = Limits {
            max_entries: 1000,
            ..Limits::default()
        };
        let e = g.walk(small).0.unwrap_err();
        assert!(
            matches!(
                e,
                TaskError::TooLong {
                    what: "thread list",
                    max: 1000
                }
            ),
            "{e}"
        );
        assert!(e.is_guest_fault() && e.is_over_budget());
        let no_time = Limits {
            max_time: Duration::ZERO,
            ..Limits::default()
        };
        let e = g.walk(no_time).0.unwrap_err();
        assert!(matches!(e, TaskError::OutOfTime { .. }), "{e}");
        assert!(e.is_over_budget() && !e.is_guest_fault());
        // A read failure is not the guest's fault.
        assert!(!TaskError::Mem(MemError::Io("gone".into())).is_guest_fault());
    }

    #[test]
    fn a_4096_deep_parent_chain_is_followed_once() {
        // Each process the parent of the next: depth was recomputed from every process up to
        // init (8.4 million steps for 4,096, quadratic); now each link is followed once.
        const N: u64 = 4096;
        let g = Guest::new(N + 1);
        for i in 1..=N {
            g.task(i, u32::try_from(i).unwrap(), i - 1, b"deep");
        }
        let leaders: Vec<u64> = (1..=N).rev().collect();
        g.leaders(&leaders);
        let table = g.walk(Limits::default()).0.unwrap();
        for p in &table.processes {
            assert_eq!(p.depth, p.task.pid);
            assert_eq!(p.task.ppid, p.task.pid - 1);
            assert_eq!(p.children, u32::from(p.task.pid < 4096));
        }
        assert_eq!(table.stats.parent_steps, 4096);
    }

    #[test]
    fn cycles_in_task_thread_and_parent_lists_are_errors() {
        let g = Guest::new(8);
        for i in 1..=4 {
            g.task(i, u32::try_from(i + 10).unwrap(), 0, b"x");
        }
        // Task list: 1 -> 2 -> 3 -> 2 ...
        g.leaders(&[1, 2, 3]);
        g.ptr(t(3) + LAYOUT.tasks, t(2) + LAYOUT.tasks);
        let e = g.walk(Limits::default()).0.unwrap_err();
        assert!(matches!(e, TaskError::Cycle("task list")), "{e}");
        // Thread list of 1: 1 -> 4 -> 1 (the leader twice).
        g.leaders(&[1, 2, 3]);
        g.threads(1, 0, &[1, 4]);
        g.ptr(t(4) + THREAD_NODE, t(1) + THREAD_NODE);
        let e = g.walk(Limits::default()).0.unwrap_err();
        assert!(matches!(e, TaskError::Cycle("thread list")), "{e}");
        // Thread list of 1 reaching init_task.
        g.threads(1, 0, &[1, 0]);
        let e = g.walk(Limits::default()).0.unwrap_err();
        assert!(matches!(e, TaskError::Shared { .. }), "{e}");
        g.threads(1, 0, &[1, 4]);
        assert!(g.walk(Limits::default()).0.is_ok());
        // Parents: 2 -> 3 -> 2.
        g.ptr(t(2) + LAYOUT.real_parent, t(3));
        g.ptr(t(3) + LAYOUT.real_parent, t(2));
        let e = g.walk(Limits::default()).0.unwrap_err();
        assert!(matches!(e, TaskError::Cycle("parent chain")), "{e}");
        assert!(e.is_guest_fault());
    }

    #[test]
    fn wild_pointers_in_lists_are_errors() {
        let g = Guest::new(4);
        g.task(1, 11, 0, b"x");
        g.leaders(&[1]);
        g.w(t(1) + LAYOUT.tasks, &0x1234_5678u64.to_le_bytes());
        assert!(matches!(
            g.walk(Limits::default()).0,
            Err(TaskError::WildPointer { .. })
        ));
    }
}
