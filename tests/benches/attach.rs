//! Attach cost over the bridge: a monitor that knows nothing of a guest's kernel connects and
//! locates it — a stock kernel from its own kallsyms and BTF in guest memory (no files), a patched
//! one from its Sensor Box — and how long the guest was paused for it (bdvmm's
//! `paused_ns_total`, before and after). For Debian's 6.1 the same attach with System.map and
//! vmlinux given is timed beside it (the files are read and parsed each round, as a monitor
//! without a cache would). Goals (issue 14): attach ≤ 200 ms, paused ≤ 5 ms of it.
//!
//! `cargo bench -p backdoors-tests --bench attach [-- --rounds N]` (tcg guests, 512 MiB)

use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, stats};
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;
use introspect::target::KernelFiles;
use rdma_bridge::client::BridgeMem;

const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["sb", "ram"],
    write: &[],
    restart: false,
    lock: true,
    regs: true,
};

fn paused_ns(vm: &Vm) -> u64 {
    vm.client().status().expect("status").paused_ns_total
}

fn row(what: &str, v: Vec<Duration>) {
    let n = v.len();
    let (med, p99) = stats(v);
    println!("{what:<58} median {med:>10.2?}  p99 {p99:>10.2?}  ({n} rounds)");
}

fn kernel(img: &Images, key: &str, files: Option<(&str, &str)>, rounds: usize) {
    let spec = VmSpec::tcg(
        img.get(key),
        img.get("BD_INITRAMFS"),
        "quiet bd.scenario=spawn bd.count=100 bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: procs end", Duration::from_secs(300));
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &[MON], 1, 1000);
    let bridge = BridgeProc::start(&vm, &setup);
    let mut attach = Vec::new();
    let mut paused = Vec::new();
    let mut files_attach = Vec::new();
    let mut files_paused = Vec::new();
    let mut release = String::new();
    let mut trips = 0;
    for _ in 0..rounds {
        let before = paused_ns(&vm);
        let t = Instant::now();
        let mem = BridgeMem::new(bridge.connect(&setup.id("mon1")));
        let target = mem.locate(None).expect("locate with no files");
        attach.push(t.elapsed());
        paused.push(Duration::from_nanos(paused_ns(&vm) - before));
        trips = mem.round_trips();
        release = target.release.clone();
        if let Some((vmlinux, map)) = files {
            let before = paused_ns(&vm);
            let t = Instant::now();
            let mem = BridgeMem::new(bridge.connect(&setup.id("mon1")));
            mem.locate(Some(KernelFiles::Files {
                system_map: img.get(map),
                vmlinux: img.get(vmlinux),
            }))
            .expect("locate with files");
            files_attach.push(t.elapsed());
            files_paused.push(Duration::from_nanos(paused_ns(&vm) - before));
        }
    }
    println!("--- {key}: {release}, attach over the bridge ({trips} READ round trips)");
    row("connect + locate, no files", attach);
    row("  of which the guest was paused", paused);
    if files.is_some() {
        row(
            "connect + locate, System.map + vmlinux read each time",
            files_attach,
        );
        row("  of which the guest was paused", files_paused);
    }
}

fn main() {
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(10);
    let img = Images::load();
    kernel(
        &img,
        "BD_STOCK_VMLINUZ",
        Some(("BD_STOCK_VMLINUX", "BD_STOCK_SYSTEM_MAP")),
        rounds,
    );
    kernel(&img, "BD_STOCK612_VMLINUZ", None, rounds);
    kernel(&img, "BD_KERNEL_BZIMAGE", None, rounds);
}
