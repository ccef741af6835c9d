//! introspect benchmarks on real guests: the whole process table of guests with about 1,000 and
//! 10,000 processes, read from local memory (bdvmm's memfd mapped in this process) while the
//! guest is paused; and the page-walk translation cache on the same task addresses.
//!
//! `cargo bench -p backdoors-tests --bench introspect [-- --rounds N --sizes 1000,10000]`

use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, stats};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{Images, KernelFiles};
use introspect::paging::PageWalker;
use introspect::tasks::{self, KernelMem, Limits};

fn main() {
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(100);
    let sizes: Vec<u32> = arg("--sizes")
        .unwrap_or_else(|| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let img = Images::load();
    let k = KernelFiles::load(&img, "BD_KERNEL_VMLINUX", "BD_KERNEL_SYSTEM_MAP");
    for n in sizes {
        let mut spec = VmSpec::tcg(
            img.get("BD_KERNEL_BZIMAGE"),
            img.get("BD_INITRAMFS"),
            &format!("quiet bd.scenario=spawn bd.count={n} bd.halt=wait"),
        );
        spec.mem = 4096;
        let mut vm = Vm::start(&spec);
        vm.expect("BACKDOORS: procs end", Duration::from_secs(1800));
        let (mem, _) = vm.memory();
        let (mut c, loc) = vm.pause_and_locate(&mem, &k.syms, Duration::from_secs(600));
        let km = KernelMem::new(&mem, loc.clone());
        let init = k.init_task(&loc);
        let mut times = Vec::with_capacity(rounds);
        let mut count = 0;
        for _ in 0..rounds {
            let t0 = Instant::now();
            let table = tasks::process_table(&km, &k.layout, init, Limits::default()).unwrap();
            times.push(t0.elapsed());
            count = table.len();
        }
        let (med, p99) = stats(times);
        println!("process table, {count:>6} processes (spawn {n}): median {med:>10.2?} p99 {p99:>10.2?} ({rounds} rounds)");

        // The same task_struct addresses translated through the page tables, cold then warm.
        let table = tasks::process_table(&km, &k.layout, init, Limits::default()).unwrap();
        let pw = PageWalker::new(&mem, loc.cr3, loc.levels).unwrap();
        let t0 = Instant::now();
        for p in &table {
            for off in [0u64, 8, 1024, 2048] {
                let _ = pw.translate(p.task.addr + off);
            }
        }
        let took = t0.elapsed();
        let s = pw.stats();
        println!(
            "page walks for {} task fields: {took:.2?}, translation cache hit rate {:.1}% ({} hits, {} misses)",
            table.len() * 4,
            s.hit_rate() * 100.0,
            s.hits,
            s.misses
        );
        c.resume().unwrap();
    }
}
