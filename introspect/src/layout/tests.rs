//! The task layout resolved from synthetic BTF in the shapes of 5.10, 6.1 and 6.12, each walked
//! over a synthetic guest written at the fixture's own offsets (not the resolved ones).

#![allow(
    // Test fixtures: small, fixed offsets built by the test itself.
    clippy::cast_possible_truncation
)]

use super::*;
use crate::btf::encoder::B;
use crate::kernel::KernelLocation;
use crate::mem::{PhysMem, VecMem};
use crate::tasks::{process_table, KernelMem, Limits, Process};

/// How the fixture kernel's types look.
#[derive(Clone, Copy)]
struct Shape {
    /// `long state` (<= 5.13) instead of `unsigned int __state`.
    long_state: bool,
    rss: RssShape,
    /// `thread_node` and `signal_struct.thread_head` (else only `thread_group`).
    thread_node: bool,
    pid: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum RssShape {
    /// `struct mm_rss_stat { atomic_long_t count[4]; }` (<= 6.1).
    Atomic,
    /// `struct percpu_counter rss_stat[4]` (6.2+).
    PerCpu,
    Absent,
}

const V5_10: Shape = Shape {
    long_state: true,
    rss: RssShape::Atomic,
    thread_node: true,
    pid: true,
};
const V6_1: Shape = Shape {
    long_state: false,
    ..V5_10
};
const V6_12: Shape = Shape {
    rss: RssShape::PerCpu,
    ..V6_1
};

// Offsets of the fixture's task_struct (size 0x100).
const TASKS: u64 = 0;
const PID: u64 = 0x10;
const TGID: u64 = 0x14;
const COMM: u64 = 0x20;
const REAL_PARENT: u64 = 0x30;
const REAL_CRED: u64 = 0x38;
const STATE: u64 = 0x40;
const EXIT_STATE: u64 = 0x48;
const FLAGS: u64 = 0x4c;
const START_TIME: u64 = 0x50;
const MM: u64 = 0x58;
const SIGNAL: u64 = 0x60;
const THREAD_NODE: u64 = 0x68;
const THREAD_GROUP: u64 = 0x78;
const SE: u64 = 0x88;
// signal_struct.thread_head; mm_struct.rss_stat; percpu_counter.count and its size.
const THREAD_HEAD: u64 = 0x10;
const RSS_STAT: u64 = 0x40;
const PCPU_COUNT: u64 = 8;
const PCPU_SIZE: u64 = 40;

/// The fixture kernel's BTF.
fn btf(shape: Shape) -> Btf {
    let mut b = B::new();
    let int = b.int("int", 4, true);
    let uint = b.int("unsigned int", 4, false);
    let long = b.int("long", 8, true);
    let s64 = b.int("long long", 8, true);
    let chr = b.int("char", 1, true);
    let pid_t = b.typedef("pid_t", int);
    let list_head = b.peek();
    b.struct_(
        "list_head",
        16,
        &[
            ("next", list_head + 1, 0, 0),
            ("prev", list_head + 1, 64, 0),
        ],
    );
    b.ptr(list_head);
    let kuid = b.struct_("", 4, &[("val", uint, 0, 0)]);
    let kuid_t = b.typedef("kuid_t", kuid);
    let cred = b.struct_(
        "cred",
        16,
        &[("uid", kuid_t, 32, 0), ("euid", kuid_t, 64, 0)],
    );
    let cred_ptr = b.ptr(cred);
    let atomic = b.struct_("", 8, &[("counter", s64, 0, 0)]);
    let atomic_long_t = b.typedef("atomic_long_t", atomic);
    let counts = b.array(atomic_long_t, int, 4);
    let mm_rss_stat = b.struct_("mm_rss_stat", 32, &[("count", counts, 0, 0)]);
    let pcpu = b.struct_(
        "percpu_counter",
        PCPU_SIZE as u32,
        &[
            ("lock", uint, 0, 0),
            ("count", s64, PCPU_COUNT as u32 * 8, 0),
            ("list", list_head, 128, 0),
            ("counters", cred_ptr, 256, 0),
        ],
    );
    let pcpus = b.array(pcpu, int, 4);
    let rss = match shape.rss {
        RssShape::Atomic => vec![("rss_stat", mm_rss_stat, RSS_STAT as u32 * 8, 0)],
        RssShape::PerCpu => vec![("rss_stat", pcpus, RSS_STAT as u32 * 8, 0)],
        RssShape::Absent => vec![],
    };
    let mut mm_members = vec![("map_count", int, 0, 0), ("pgd", cred_ptr, 64, 0)];
    mm_members.extend(rss);
    let mm = b.struct_("mm_struct", 0x100, &mm_members);
    let mm_ptr = b.ptr(mm);
    let signal = b.struct_(
        "signal_struct",
        0x40,
        &[
            ("nr_threads", int, 0, 0),
            ("thread_head", list_head, 0x80, 0),
        ],
    );
    let signal_ptr = b.ptr(signal);
    let u64_t = b.int("long long unsigned int", 8, false);
    let se = b.struct_(
        "sched_entity",
        16,
        &[
            ("vruntime", u64_t, 0, 0),
            ("sum_exec_runtime", u64_t, 64, 0),
        ],
    );
    let comm = b.array(chr, int, 16);
    let task_ptr = b.peek() + 1;
    let bits = |off: u64| off as u32 * 8;
    let mut m = vec![
        ("tasks", list_head, bits(TASKS), 0),
        ("tgid", pid_t, bits(TGID), 0),
        ("comm", comm, bits(COMM), 0),
        ("real_parent", task_ptr, bits(REAL_PARENT), 0),
        ("real_cred", cred_ptr, bits(REAL_CRED), 0),
        ("exit_state", int, bits(EXIT_STATE), 0),
        ("flags", uint, bits(FLAGS), 0),
        ("start_time", s64, bits(START_TIME), 0),
        ("mm", mm_ptr, bits(MM), 0),
        ("signal", signal_ptr, bits(SIGNAL), 0),
        ("thread_group", list_head, bits(THREAD_GROUP), 0),
        ("se", se, bits(SE), 0),
    ];
    if shape.pid {
        m.push(("pid", pid_t, bits(PID), 0));
    }
    if shape.long_state {
        m.push(("state", long, bits(STATE), 0));
    } else {
        m.push(("__state", uint, bits(STATE), 0));
    }
    if shape.thread_node {
        m.push(("thread_node", list_head, bits(THREAD_NODE), 0));
    }
    let task = b.struct_("task_struct", 0x100, &m);
    assert_eq!(b.ptr(task), task_ptr);
    b.enum_(
        "",
        false,
        &[
            ("MM_FILEPAGES", 0),
            ("MM_ANONPAGES", 1),
            ("MM_SWAPENTS", 2),
            ("MM_SHMEMPAGES", 3),
            ("NR_MM_COUNTERS", 4),
        ],
    );
    Btf::parse(&b.build()).unwrap()
}

const BASE: u64 = 0xffff_8880_0000_0000;
const IDLE: u64 = 0x1000;
const PROC: u64 = 0x1100;
const THREAD: u64 = 0x1200;
const CRED: u64 = 0x2000;
const SIG: u64 = 0x2100;
const MMS: u64 = 0x3000;

/// A guest with the idle task and one process (pid 42, uid 1000, state `state` written as
/// `long` or u32 as the shape has it) with a second thread (pid 43) and RSS file 100, anon 200,
/// swap 999 (never read), shmem -5 (read as 0; 6.12's percpu_counter may dip below 0).
fn guest(shape: Shape, state: u32) -> VecMem {
    let mem = VecMem::new(0, vec![0u8; 0x4000]);
    let w = |at: u64, v: &[u8]| mem.write(at, v).unwrap();
    let ptr = |at: u64, to: u64| w(at, &(BASE + to).to_le_bytes());
    for (t, pid, comm) in [
        (IDLE, 0u32, &b"swapper/0"[..]),
        (PROC, 42, b"hog"),
        (THREAD, 43, b"hog"),
    ] {
        w(t + PID, &pid.to_le_bytes());
        w(t + TGID, &pid.min(42).to_le_bytes());
        w(t + COMM, comm);
        ptr(t + REAL_PARENT, IDLE);
        ptr(t + REAL_CRED, CRED);
        ptr(t + SIGNAL, SIG);
        w(t + START_TIME, &(u64::from(pid) * 1000).to_le_bytes());
    }
    w(CRED + 4, &1000u32.to_le_bytes());
    w(CRED + 8, &1001u32.to_le_bytes());
    // The task list: idle -> process.
    ptr(IDLE + TASKS, PROC + TASKS);
    ptr(PROC + TASKS, IDLE + TASKS);
    // Thread lists of both shapes: signal->thread_head -> process -> thread, and the
    // thread_group ring process -> thread.
    ptr(SIG + THREAD_HEAD, PROC + THREAD_NODE);
    ptr(PROC + THREAD_NODE, THREAD + THREAD_NODE);
    ptr(THREAD + THREAD_NODE, SIG + THREAD_HEAD);
    ptr(PROC + THREAD_GROUP, THREAD + THREAD_GROUP);
    ptr(THREAD + THREAD_GROUP, PROC + THREAD_GROUP);
    if shape.long_state {
        w(PROC + STATE, &i64::from(state).to_le_bytes());
    } else {
        w(PROC + STATE, &state.to_le_bytes());
        // The four bytes after a u32 __state are not part of it.
        w(PROC + STATE + 4, &u32::MAX.to_le_bytes());
    }
    ptr(PROC + MM, MMS);
    let (at, stride) = match shape.rss {
        RssShape::PerCpu => (MMS + RSS_STAT + PCPU_COUNT, PCPU_SIZE),
        _ => (MMS + RSS_STAT, 8),
    };
    for (i, v) in [100i64, 200, 999, -5].into_iter().enumerate() {
        w(at + i as u64 * stride, &v.to_le_bytes());
    }
    mem
}

fn walk(l: &TaskLayout, mem: &VecMem) -> Vec<Process> {
    let loc = KernelLocation {
        slide: 0,
        phys_base: 0,
        page_offset_base: BASE,
        cr3: 0,
        levels: 4,
    };
    let km = KernelMem::new(mem as &dyn PhysMem, loc);
    process_table(&km, l, BASE + IDLE, Limits::default()).unwrap()
}

/// Resolves `shape`'s layout, walks a guest whose process is in `state`, and returns the one
/// process.
fn one(shape: Shape, state: u32) -> (TaskLayout, Process) {
    let l = TaskLayout::from_btf_for(&btf(shape), "test").unwrap();
    let mut procs = walk(&l, &guest(shape, state));
    assert_eq!(procs.len(), 1);
    (l, procs.remove(0))
}

#[test]
fn linux_5_10_long_state_and_mm_rss_stat() {
    let (l, p) = one(V5_10, 1);
    assert!(l.unresolved().is_empty(), "{:?}", l.unresolved());
    assert!(l.has_rss() && l.has_threads());
    let t = &p.task;
    assert_eq!((t.pid, t.uid, t.euid, t.state), (42, 1000, 1001, 'S'));
    assert_eq!((t.rss_file, t.rss_anon, t.rss_shmem), (100, 200, 0));
    assert_eq!(p.threads, [43]);
}

#[test]
fn linux_6_1_u32_state_and_mm_rss_stat() {
    let (l, p) = one(V6_1, 2);
    assert!(l.unresolved().is_empty(), "{:?}", l.unresolved());
    let t = &p.task;
    assert_eq!((t.state, t.start_time), ('D', 42_000));
    assert_eq!((t.rss_file, t.rss_anon, t.rss_shmem), (100, 200, 0));
    assert_eq!(p.threads, [43]);
}

#[test]
fn linux_6_12_percpu_counter_rss() {
    let (l, p) = one(V6_12, 0x402);
    assert!(l.unresolved().is_empty(), "{:?}", l.unresolved());
    let t = &p.task;
    assert_eq!(t.state, 'I');
    assert_eq!((t.rss_file, t.rss_anon, t.rss_shmem), (100, 200, 0));
    assert_eq!(p.threads, [43]);
    let r = l.rss.unwrap();
    assert_eq!((r.base, r.stride), (RSS_STAT + PCPU_COUNT, PCPU_SIZE));
}

#[test]
fn without_thread_node_the_thread_group_ring_lists_threads() {
    let shape = Shape {
        thread_node: false,
        ..V5_10
    };
    let (l, p) = one(shape, 0);
    assert_eq!(l.threads, Threads::Group { node: THREAD_GROUP });
    assert_eq!((p.task.state, p.threads.as_slice()), ('R', &[43][..]));
    assert_eq!(p.thread_addrs, [BASE + PROC, BASE + THREAD]);
}

#[test]
fn without_rss_stat_the_walk_reads_rss_0_and_says_what_is_off() {
    let shape = Shape {
        rss: RssShape::Absent,
        ..V6_12
    };
    let (l, p) = one(shape, 1);
    assert!(!l.has_rss());
    let t = &p.task;
    assert_eq!(
        (t.pid, t.state, t.rss_file + t.rss_anon + t.rss_shmem),
        (42, 'S', 0)
    );
    let [u] = l.unresolved() else {
        panic!("{:?}", l.unresolved());
    };
    assert_eq!(u.field, RSS_FIELD);
    let line = u.to_string();
    assert!(
        line.starts_with("kernel test: no mm_struct.rss_stat"),
        "{line}"
    );
    assert!(
        line.contains("percpu_counter") && line.contains("memory healer"),
        "{line}"
    );
    assert!(!line.contains('\n'));
    assert_eq!(u.for_release("6.12.9").release, "6.12.9");
}

#[test]
fn without_pid_the_kernel_is_unsupported_naming_the_field() {
    let shape = Shape { pid: false, ..V6_1 };
    let e = TaskLayout::from_btf_for(&btf(shape), "6.1.0-test").unwrap_err();
    assert!(
        matches!(
            &e,
            TaskError::Unsupported {
                field: "task_struct.pid",
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("kernel 6.1.0-test: cannot read the process table: no task_struct.pid"),
        "{msg}"
    );
    assert!(!e.is_guest_fault());
    let e = TaskLayout::from_btf(&btf(shape)).unwrap_err();
    assert!(e.to_string().starts_with("kernel unknown release:"), "{e}");
}

#[test]
fn an_rss_index_past_the_array_is_refused() {
    let mut b = B::new();
    let int = b.int("int", 4, true);
    let s64 = b.int("long long", 8, true);
    let counts = b.array(s64, int, 2);
    let stat = b.struct_("mm_rss_stat", 16, &[("count", counts, 0, 0)]);
    b.struct_("mm_struct", 16, &[("rss_stat", stat, 0, 0)]);
    b.enum_(
        "",
        false,
        &[
            ("MM_FILEPAGES", 0),
            ("MM_ANONPAGES", 1),
            ("MM_SHMEMPAGES", 3),
        ],
    );
    let e = rss(&Btf::parse(&b.build()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("MM_SHMEMPAGES = 3"), "{e}");
}
