//! Where the process walk finds each field, resolved by meaning from the kernel's BTF.
//!
//! Field by field, the shapes the kernel has had from 5.10 to 6.12 are tried in turn, the way
//! drgn's helpers branch on the types the kernel actually has (the table is in
//! `docs/introspect.md`):
//!
//! * **state**: `task_struct.__state` (u32, 5.14+) or `task_struct.state` (long, up to 5.13; its
//!   low 32 bits, little-endian, hold every state bit).
//! * **RSS**: `mm_struct.rss_stat.count[i]` (`struct mm_rss_stat` of `atomic_long_t`, up to 6.1) or
//!   `mm_struct.rss_stat[i]`, an array of `struct percpu_counter` (6.2+), whose `count` is what
//!   `/proc/<pid>/status` shows (`percpu_counter_read_positive`). Indices are the enum constants
//!   `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SHMEMPAGES`, checked against the array's length.
//! * **threads**: `signal_struct.thread_head` through `task_struct.thread_node` (3.14+), else the
//!   leader's `task_struct.thread_group` ring (before 6.7).
//!
//! The core fields (`tasks`, `pid`, `tgid`, `comm`, `real_parent`, `real_cred` and the cred's
//! `uid`, `flags`, `mm`) are needed to read a process table at all: without one,
//! [`TaskLayout::from_btf_for`] fails with [`TaskError::Unsupported`]. Any other field missing
//! disables only what needs it, recorded as an [`Unresolved`] ([`TaskLayout::unresolved`]).

mod unresolved;

pub use unresolved::{Unresolved, UNKNOWN_RELEASE};

use crate::btf::{Btf, BtfError, Member, MemberKind, StructLayout};
use crate::tasks::TaskError;

/// Why a field could not be resolved in the shape looked for (what the kernel's types say).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A type or member is missing from BTF.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// The offsets along a dotted path overflow.
    #[error("{structure}.{path}: offset overflows")]
    Overflow {
        /// The outer struct.
        structure: String,
        /// The dotted path.
        path: String,
    },
    /// A path goes through a member that is not an embedded struct or union.
    #[error("{structure}.{member} is not an embedded struct")]
    NotEmbedded {
        /// The struct that holds it.
        structure: String,
        /// The member.
        member: String,
    },
    /// An empty path.
    #[error("empty path in {0}")]
    EmptyPath(String),
    /// The member exists in another shape.
    #[error("{what} is {found}, expected {expected}")]
    Shape {
        /// `struct.path`.
        what: String,
        /// What the kernel has.
        found: String,
        /// What was looked for.
        expected: String,
    },
    /// None of the names a field has had exists.
    #[error("{0}")]
    NoneOf(&'static str),
    /// A counter index the array cannot hold.
    #[error("{name} = {value} is not an index of the {len} RSS counters")]
    Index {
        /// The enum constant.
        name: &'static str,
        /// Its value.
        value: i128,
        /// The array's length.
        len: u32,
    },
    /// A symbol is missing from the kernel's symbol table.
    #[error("the kernel's symbols have no {0}")]
    NoSymbol(String),
    /// An enum constant no index could be.
    #[error("{name} = {value} is not a plausible index")]
    Constant {
        /// The constant.
        name: String,
        /// Its value.
        value: i128,
    },
    /// A word of the wrong size.
    #[error("{found} bytes, expected {expected}")]
    Size {
        /// Its size.
        found: u64,
        /// The size the reader uses.
        expected: u64,
    },
    /// The element type of `mm_struct.rss_stat[]`.
    #[error("mm_struct.rss_stat[]: {0}")]
    RssElement(BtfError),
    /// Both shapes of a field failed.
    #[error("{0}; {1}")]
    Neither(Box<FieldError>, Box<FieldError>),
}

/// Where a process's other threads are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// `task->signal->thread_head`, linked through `task_struct.thread_node` (3.14+).
    Signal {
        /// `task_struct.signal`.
        signal: u64,
        /// `signal_struct.thread_head`.
        head: u64,
        /// `task_struct.thread_node`.
        node: u64,
    },
    /// The ring through every thread's `task_struct.thread_group`, headed by the leader's
    /// (before 6.7).
    Group {
        /// `task_struct.thread_group`.
        node: u64,
    },
    /// Unknown: a process is listed with its leader only.
    None,
}

/// Where the RSS counters are in `mm_struct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rss {
    /// Offset in `mm_struct` of counter 0's 64-bit value.
    pub(crate) base: u64,
    /// Bytes from one counter to the next.
    pub(crate) stride: u64,
    /// Counter indices of file, anonymous and shared-memory pages.
    pub(crate) index: [u64; 3],
}

/// Field offsets the walk needs, resolved once from BTF.
#[derive(Clone, Debug)]
pub struct TaskLayout {
    pub(crate) tasks: u64,
    pub(crate) pid: u64,
    pub(crate) tgid: u64,
    pub(crate) comm: u64,
    pub(crate) comm_len: u64,
    pub(crate) real_parent: u64,
    pub(crate) real_cred: u64,
    pub(crate) flags: u64,
    pub(crate) mm: u64,
    pub(crate) cred_uid: u64,
    /// The low 32 bits of `__state` or `state`.
    pub(crate) state: Option<u64>,
    pub(crate) exit_state: Option<u64>,
    pub(crate) start_time: Option<u64>,
    /// `se.sum_exec_runtime`: CPU time the task has used, in ns.
    pub(crate) cpu_time: Option<u64>,
    pub(crate) cred_euid: Option<u64>,
    pub(crate) threads: Threads,
    pub(crate) rss: Option<Rss>,
    /// `mm_struct.pgd`: the process's page-table root (a kernel pointer), for reading its user
    /// memory (State Boxes).
    pub(crate) mm_pgd: Option<u64>,
    pub(crate) unresolved: Vec<Unresolved>,
}

/// The `field` of the RSS feature, as [`Unresolved::field`] names it.
pub const RSS_FIELD: &str = "mm_struct.rss_stat";

const RSS_LOOKED_FOR: &str = "mm_struct.rss_stat.count[MM_FILEPAGES|MM_ANONPAGES|MM_SHMEMPAGES] \
     (struct mm_rss_stat of atomic_long_t, <= 6.1) or mm_struct.rss_stat[...].count (an array \
     of struct percpu_counter, 6.2+)";

impl TaskLayout {
    /// Resolves every offset from the kernel's BTF; messages say "unknown release"
    /// ([`TaskLayout::from_btf_for`] names it).
    pub fn from_btf(btf: &Btf) -> Result<Self, TaskError> {
        Self::from_btf_for(btf, UNKNOWN_RELEASE)
    }

    /// Resolves every offset from the BTF of kernel `release` (named in errors and in
    /// [`Unresolved`] entries). Fails only if a core field is missing.
    pub fn from_btf_for(btf: &Btf, release: &str) -> Result<Self, TaskError> {
        let core = |field: &'static str, looked_for: &'static str| {
            move |reason: FieldError| TaskError::Unsupported {
                release: release.to_owned(),
                field,
                looked_for,
                reason: Box::new(reason),
            }
        };
        let task = btf
            .struct_layout("task_struct")
            .map_err(|e| core("task_struct", "struct task_struct")(e.into()))?;
        let cred = btf
            .struct_layout("cred")
            .map_err(|e| core("cred", "struct cred")(e.into()))?;
        let t = |path, sizes: &'static [u64]| int(btf, &task, path, sizes);
        let (comm, comm_len) = chars(btf, &task, "comm")
            .map_err(core("task_struct.comm", "task_struct.comm (char array)"))?;
        let mut l = TaskLayout {
            tasks: list(btf, &task, "tasks")
                .map_err(core("task_struct.tasks", "task_struct.tasks (list_head)"))?,
            pid: t("pid", &[4]).map_err(core("task_struct.pid", "task_struct.pid (pid_t)"))?,
            tgid: t("tgid", &[4]).map_err(core("task_struct.tgid", "task_struct.tgid (pid_t)"))?,
            comm,
            comm_len: comm_len.min(64),
            real_parent: pointer(btf, &task, "real_parent").map_err(core(
                "task_struct.real_parent",
                "task_struct.real_parent (pointer)",
            ))?,
            real_cred: pointer(btf, &task, "real_cred").map_err(core(
                "task_struct.real_cred",
                "task_struct.real_cred (pointer)",
            ))?,
            flags: t("flags", &[4]).map_err(core(
                "task_struct.flags",
                "task_struct.flags (unsigned int)",
            ))?,
            mm: pointer(btf, &task, "mm")
                .map_err(core("task_struct.mm", "task_struct.mm (pointer)"))?,
            cred_uid: int(btf, &cred, "uid.val", &[4])
                .map_err(core("cred.uid.val", "cred.uid.val (kuid_t)"))?,
            state: None,
            exit_state: None,
            start_time: None,
            cpu_time: None,
            cred_euid: None,
            threads: Threads::None,
            rss: None,
            mm_pgd: None,
            unresolved: Vec::new(),
        };
        let mut miss = |field, looked_for, disables, reason: FieldError| {
            l.unresolved.push(Unresolved {
                release: release.to_owned(),
                field,
                looked_for,
                disables,
                reason: reason.to_string(),
            });
        };
        let state = state(btf, &task);
        let exit_state = t("exit_state", &[4]);
        let start_time = t("start_time", &[8]);
        let cpu_time = t("se.sum_exec_runtime", &[8]);
        let euid = int(btf, &cred, "euid.val", &[4]);
        let threads = threads(btf, &task);
        let rss = rss(btf);
        let mm_pgd = btf
            .struct_layout("mm_struct")
            .map_err(FieldError::from)
            .and_then(|mm| pointer(btf, &mm, "pgd"));
        let state = state
            .map_err(|r| {
                miss(
                    "task_struct.__state",
                    "task_struct.__state (u32, 5.14+) or task_struct.state (long, <= 5.13)",
                    "process state letters (shown as '?')",
                    r,
                )
            })
            .ok();
        let exit_state = exit_state
            .map_err(|r| {
                miss(
                    "task_struct.exit_state",
                    "task_struct.exit_state (int)",
                    "zombie and dead state letters (Z, X)",
                    r,
                )
            })
            .ok();
        let start_time = start_time
            .map_err(|r| {
                miss(
                    "task_struct.start_time",
                    "task_struct.start_time (u64 ns)",
                    "process start times (reported as 0)",
                    r,
                )
            })
            .ok();
        let cpu_time = cpu_time
            .map_err(|r| {
                miss(
                    "task_struct.se.sum_exec_runtime",
                    "task_struct.se.sum_exec_runtime (u64 ns)",
                    "CPU times (reported as 0), so the CPU-share healer",
                    r,
                )
            })
            .ok();
        let cred_euid = euid
            .map_err(|r| {
                miss(
                    "cred.euid.val",
                    "cred.euid.val (kuid_t)",
                    "effective uids (reported as the real uid)",
                    r,
                )
            })
            .ok();
        let threads = threads.unwrap_or_else(|r| {
            miss(
                "task_struct.thread_node",
                "task_struct.thread_node with signal_struct.thread_head (3.14+), or \
                 task_struct.thread_group (before 6.7)",
                "thread lists (each process is listed with its leader only, and killing a \
                 process without the guest's repair hooks signals only its leader)",
                r,
            );
            Threads::None
        });
        let rss = rss
            .map_err(|r| {
                miss(
                    RSS_FIELD,
                    RSS_LOOKED_FOR,
                    "resident set sizes (reported as 0), so the memory healer's policies",
                    r,
                )
            })
            .ok();
        l.state = state;
        l.exit_state = exit_state;
        l.start_time = start_time;
        l.cpu_time = cpu_time;
        l.cred_euid = cred_euid;
        l.threads = threads;
        let mm_pgd = mm_pgd
            .map_err(|r| {
                miss(
                    "mm_struct.pgd",
                    "mm_struct.pgd (pointer)",
                    "reading processes' own memory, so State Box extraction",
                    r,
                )
            })
            .ok();
        l.rss = rss;
        l.mm_pgd = mm_pgd;
        Ok(l)
    }

    /// The fields this kernel does not have in any shape we know, each with what it disables.
    pub fn unresolved(&self) -> &[Unresolved] {
        &self.unresolved
    }

    /// Whether resident set sizes can be read (the memory healer's policies need them).
    pub fn has_rss(&self) -> bool {
        self.rss.is_some()
    }

    /// Whether CPU times can be read (the CPU-share healer needs them).
    pub fn has_cpu_time(&self) -> bool {
        self.cpu_time.is_some()
    }

    /// Whether a process's threads can be listed.
    pub fn has_threads(&self) -> bool {
        self.threads != Threads::None
    }
}

/// The member at dotted `path` of `s` (through embedded structs and unions) and its byte offset
/// from the start of `s`.
pub(crate) fn member_at(
    btf: &Btf,
    s: &StructLayout,
    path: &str,
) -> Result<(u64, Member), FieldError> {
    let mut layout = s.clone();
    let mut total = 0u64;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let off = layout.offset(part)?;
        total = total.checked_add(off).ok_or_else(|| FieldError::Overflow {
            structure: s.name.clone(),
            path: path.to_owned(),
        })?;
        let m = layout.member(part)?.clone();
        if parts.peek().is_none() {
            return Ok((total, m));
        }
        if !matches!(m.kind, MemberKind::Struct(_) | MemberKind::Union(_)) {
            return Err(FieldError::NotEmbedded {
                structure: layout.name.clone(),
                member: part.to_owned(),
            });
        }
        layout = btf.struct_layout_by_id(m.type_id)?;
    }
    Err(FieldError::EmptyPath(s.name.clone()))
}

fn kind_name(k: &MemberKind) -> String {
    match k {
        MemberKind::Int { .. } => "an integer".into(),
        MemberKind::Pointer => "a pointer".into(),
        MemberKind::Array { len, .. } => format!("an array of {len}"),
        MemberKind::Struct(n) => format!("struct {n}"),
        MemberKind::Union(n) => format!("union {n}"),
        MemberKind::Enum => "an enum".into(),
        MemberKind::Other => "another kind of type".into(),
    }
}

/// Offset of an integer member of one of `sizes` bytes.
/// `struct.path` is `found`, not what was `expected`.
fn shape(s: &StructLayout, path: &str, found: String, expected: &str) -> FieldError {
    FieldError::Shape {
        what: format!("{}.{path}", s.name),
        found,
        expected: expected.to_owned(),
    }
}

pub(crate) fn int(
    btf: &Btf,
    s: &StructLayout,
    path: &str,
    sizes: &[u64],
) -> Result<u64, FieldError> {
    let (off, m) = member_at(btf, s, path)?;
    if matches!(m.kind, MemberKind::Int { .. } | MemberKind::Enum) && sizes.contains(&m.size) {
        return Ok(off);
    }
    Err(shape(
        s,
        path,
        format!("{} of {} bytes", kind_name(&m.kind), m.size),
        &format!("an integer of {sizes:?} bytes"),
    ))
}

pub(crate) fn pointer(btf: &Btf, s: &StructLayout, path: &str) -> Result<u64, FieldError> {
    let (off, m) = member_at(btf, s, path)?;
    if m.kind == MemberKind::Pointer && m.size == 8 {
        return Ok(off);
    }
    Err(shape(s, path, kind_name(&m.kind), "a pointer"))
}

fn list(btf: &Btf, s: &StructLayout, path: &str) -> Result<u64, FieldError> {
    let (off, m) = member_at(btf, s, path)?;
    if matches!(&m.kind, MemberKind::Struct(n) if n == "list_head") && m.size == 16 {
        return Ok(off);
    }
    Err(shape(s, path, kind_name(&m.kind), "struct list_head"))
}

/// Offset and length of a char array.
fn chars(btf: &Btf, s: &StructLayout, path: &str) -> Result<(u64, u64), FieldError> {
    let (off, m) = member_at(btf, s, path)?;
    match m.kind {
        MemberKind::Array {
            elem_size: 1, len, ..
        } if len > 0 => Ok((off, u64::from(len))),
        k => Err(shape(s, path, kind_name(&k), "a char array")),
    }
}

/// `__state` (5.14+) or `state` (up to 5.13): where the low 32 bits of the state are.
fn state(btf: &Btf, task: &StructLayout) -> Result<u64, FieldError> {
    if task.has("__state") {
        int(btf, task, "__state", &[4])
    } else if task.has("state") {
        int(btf, task, "state", &[8, 4])
    } else {
        Err(FieldError::NoneOf(
            "task_struct has neither __state nor state",
        ))
    }
}

/// The thread list of whichever shape this kernel has.
fn threads(btf: &Btf, task: &StructLayout) -> Result<Threads, FieldError> {
    let signal_list = || -> Result<Threads, FieldError> {
        let signal = btf.struct_layout("signal_struct")?;
        Ok(Threads::Signal {
            signal: pointer(btf, task, "signal")?,
            head: list(btf, &signal, "thread_head")?,
            node: list(btf, task, "thread_node")?,
        })
    };
    let group = || list(btf, task, "thread_group").map(|node| Threads::Group { node });
    signal_list()
        .or_else(|e1| group().map_err(|e2| FieldError::Neither(Box::new(e1), Box::new(e2))))
}

/// The RSS counters of whichever shape this kernel has.
fn rss(btf: &Btf) -> Result<Rss, FieldError> {
    let mm = btf.struct_layout("mm_struct")?;
    let (at, m) = member_at(btf, &mm, "rss_stat")?;
    let (base, stride, len) = match &m.kind {
        // Up to 6.1: struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }.
        MemberKind::Struct(_) => {
            let s = btf.struct_layout_by_id(m.type_id)?;
            let (off, c) = member_at(btf, &s, "count")?;
            match c.kind {
                MemberKind::Array {
                    elem_size: 8, len, ..
                } => (at.saturating_add(off), 8, len),
                k => {
                    return Err(shape(
                        &mm,
                        "rss_stat.count",
                        kind_name(&k),
                        "an array of atomic_long_t",
                    ))
                }
            }
        }
        // 6.2+: struct percpu_counter rss_stat[NR_MM_COUNTERS].
        MemberKind::Array {
            elem_type,
            elem_size,
            len,
        } => {
            let pc = btf
                .struct_layout_by_id(*elem_type)
                .map_err(FieldError::RssElement)?;
            if pc.name != "percpu_counter" {
                return Err(shape(
                    &mm,
                    "rss_stat",
                    format!("an array of struct {:?}", pc.name),
                    "struct percpu_counter",
                ));
            }
            let off = int(btf, &pc, "count", &[8])?;
            if off.saturating_add(8) > *elem_size {
                return Err(FieldError::NoneOf(
                    "percpu_counter.count lies outside its struct",
                ));
            }
            (at.saturating_add(off), *elem_size, *len)
        }
        k => {
            return Err(shape(
                &mm,
                "rss_stat",
                kind_name(k),
                "struct mm_rss_stat or an array of struct percpu_counter",
            ))
        }
    };
    let idx = |name: &'static str| -> Result<u64, FieldError> {
        let v = btf.enum_constant(name)?;
        u64::try_from(v)
            .ok()
            .filter(|&i| i < u64::from(len))
            .ok_or(FieldError::Index {
                name,
                value: v,
                len,
            })
    };
    Ok(Rss {
        base,
        stride,
        index: [
            idx("MM_FILEPAGES")?,
            idx("MM_ANONPAGES")?,
            idx("MM_SHMEMPAGES")?,
        ],
    })
}

#[cfg(test)]
mod tests;
