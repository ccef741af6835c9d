//! The introspected process table of a guest with 500+ processes matches what the guest itself
//! says (pid, ppid, uid, comm for every process), on the patched and on the stock kernel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{Images, KernelFiles};
use introspect::tasks::{self, KernelMem, Limits};

fn table_matches_the_guest(kernel_key: &str, vmlinux_key: &str, map_key: &str) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get(kernel_key),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=spawn bd.count=500 bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: procs end", Duration::from_secs(300));
    let out = vm.stdout();
    let guest: BTreeSet<(u32, u32, u32, String)> = out
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROC "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.to_string(),
            ))
        })
        .collect();
    assert!(guest.len() > 500, "guest listed {} processes", guest.len());

    let k = KernelFiles::load(&img, vmlinux_key, map_key);
    let (mem, _) = vm.memory();
    let (mut c, loc) = vm.pause_and_locate(&mem, &k.syms, Duration::from_secs(30));
    let km = KernelMem::new(&mem, loc.clone());
    let t0 = Instant::now();
    let table = tasks::process_table(&km, &k.layout, k.init_task(&loc), Limits::default()).unwrap();
    let took = t0.elapsed();
    // An idle guest paused at random holds no writer on tasklist_lock.
    let lock =
        tasks::TasklistLock::new(&k.btf, k.syms.get("tasklist_lock").unwrap() + loc.slide).unwrap();
    assert!(!lock.write_held(&km).unwrap());
    c.resume().unwrap();
    eprintln!("{} processes introspected in {took:?}", table.len());

    let ours: BTreeSet<(u32, u32, u32, String)> = table
        .iter()
        .map(|p| {
            let comm = p
                .task
                .comm
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            (p.task.pid, p.task.ppid, p.task.uid, comm)
        })
        .collect();
    // /proc shows a kernel thread's full name (workqueue kthreads with their current work), the
    // kernel keeps the first 15 bytes in task->comm: a kernel thread matches by prefix.
    let kthreads: BTreeSet<u32> = table
        .iter()
        .filter(|p| p.task.kthread)
        .map(|p| p.task.pid)
        .collect();
    let same = |a: &(u32, u32, u32, String), b: &(u32, u32, u32, String)| {
        (a.0, a.1, a.2) == (b.0, b.1, b.2)
            && (a.3 == b.3 || (kthreads.contains(&a.0) && a.3.starts_with(b.3.as_str())))
    };
    let missing: Vec<_> = guest
        .iter()
        .filter(|g| !ours.iter().any(|o| same(g, o)))
        .collect();
    let extra: Vec<_> = ours
        .iter()
        .filter(|o| !guest.iter().any(|g| same(g, o)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "guest-only: {missing:?}\nintrospect-only: {extra:?}"
    );
    // The tree: init is pid 1 at depth 1, spawn's children are user1's and one level below it.
    let init = table.iter().find(|p| p.task.pid == 1).unwrap();
    assert_eq!(
        (init.depth, init.task.uid, init.task.kthread),
        (1, 0, false)
    );
    let spawner = table
        .iter()
        .filter(|p| p.task.comm == "spawn" && p.task.uid == 1000)
        .max_by_key(|p| p.children)
        .expect("the spawn process");
    assert!(spawner.children >= 500, "{spawner:?}");
    assert!(table.iter().any(|p| p.task.kthread && p.task.ppid == 2));
    assert!(table
        .iter()
        .filter(|p| !p.task.kthread)
        .all(|p| p.task.rss_anon + p.task.rss_file > 0));
}

#[test]
fn process_table_of_the_patched_kernel_matches_the_guest() {
    table_matches_the_guest(
        "BD_KERNEL_BZIMAGE",
        "BD_KERNEL_VMLINUX",
        "BD_KERNEL_SYSTEM_MAP",
    );
}

#[test]
fn process_table_of_the_stock_kernel_matches_the_guest() {
    table_matches_the_guest(
        "BD_STOCK_VMLINUZ",
        "BD_STOCK_VMLINUX",
        "BD_STOCK_SYSTEM_MAP",
    );
}
