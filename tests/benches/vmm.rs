//! bdvmm benchmarks on real guests, both engines side by side in one run:
//!
//! * pause → every vCPU acknowledged, and resume, as bdvmm itself measures them (`pause_ns`,
//!   `resume_ns` of the API replies), on a Linux guest under load — a CPU fork bomb of 300
//!   processes spinning next to `useful` — with 1 and 2 vCPUs: the tcg engine on this machine, the
//!   kvm engine inside a kvm host (nested: QEMU TCG emulating AMD-V, so its times are not hardware
//!   times; the ratio and the shape are what count);
//! * boot time from `bdvmm run` to the initramfs's `BACKDOORS: ready` (with `quiet`: every console
//!   byte is a VM exit, which nested virtualization makes expensive), both kernels, both engines;
//! * the hand-written tiny guest on this machine's own /dev/kvm, where it exists.
//!
//! `cargo bench -p backdoors-tests --bench vmm [-- --rounds N --boots N --engines tcg,kvm]`
//! Prints one line per measurement with the median and p99.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoors_tests::bench::arg;
use backdoors_tests::site::{Engine, Site};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{tiny_guest, Images};

/// The sample at `permille`/1000 of the way through `sorted` (rounded to the nearest index).
fn percentile(sorted: &[Duration], permille: usize) -> Duration {
    let i = (sorted.len().saturating_sub(1) * permille + 500) / 1000;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<58} n={:<5} median={:>10.1?} p99={:>10.1?} min={:>10.1?}",
        samples.len(),
        percentile(&samples, 500),
        percentile(&samples, 990),
        samples[0]
    );
}

/// `rounds` pause/resume pairs (after 10 warm-up pairs), 2 ms apart.
fn pause_rounds(label: &str, vm: &Vm, rounds: usize) {
    let mut c = vm.client();
    let (mut acked, mut rtt, mut resumed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds + 10 {
        let t0 = Instant::now();
        let p = c.pause(Some(Duration::from_secs(10))).expect("pause");
        let t1 = Instant::now();
        let r = c.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(2));
        if i >= 10 {
            acked.push(Duration::from_nanos(p.pause_ns));
            rtt.push(t1 - t0);
            resumed.push(Duration::from_nanos(r.resume_ns));
        }
    }
    report(
        &format!("{label} pause -> all vCPUs acked (in bdvmm)"),
        acked,
    );
    report(
        &format!("{label} resume -> all vCPUs acked (in bdvmm)"),
        resumed,
    );
    report(&format!("{label} pause round trip (API client)"), rtt);
}

fn engines() -> Vec<Engine> {
    arg("--engines")
        .unwrap_or_else(|| "tcg,kvm".into())
        .split(',')
        .map(|e| match e {
            "tcg" => Engine::Tcg,
            "kvm" => Engine::Kvm,
            other => panic!("--engines: unknown engine {other:?} (tcg, kvm)"),
        })
        .collect()
}

fn num(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rounds = num("--rounds", 200);
    let boots = num("--boots", 5);
    let img = Images::load();

    println!("--- pause and resume under load (CPU fork bomb of 300 processes + useful)");
    for engine in engines() {
        let site = Site::for_engine(engine);
        for vcpus in [1u8, 2] {
            let mut spec = VmSpec::on(
                engine,
                img.get("BD_KERNEL_BZIMAGE"),
                img.get("BD_INITRAMFS"),
                "quiet bd.halt=wait bd.scenario=forkbomb bd.mode=cpu bd.max=300 bd.seconds=3600 bd.iterations=100000",
            );
            spec.vcpus = vcpus;
            spec.site = Some(Arc::clone(&site));
            let mut vm = Vm::start(&spec);
            vm.expect("SCENARIO forkbomb: fault starts", Duration::from_secs(180));
            // Let the bomb grow to its cap.
            std::thread::sleep(Duration::from_secs(5));
            let label = format!("{} ({vcpus} vCPU, loaded)", engine.name());
            pause_rounds(&label, &vm, rounds);
        }
    }

    println!("--- boot: `bdvmm run` -> BACKDOORS: ready");
    for engine in engines() {
        let site = Site::for_engine(engine);
        for (name, key) in [
            ("patched", "BD_KERNEL_BZIMAGE"),
            ("stock", "BD_STOCK_VMLINUZ"),
        ] {
            let mut times = Vec::new();
            for _ in 0..boots {
                let mut spec = VmSpec::on(
                    engine,
                    img.get(key),
                    img.get("BD_INITRAMFS"),
                    "quiet bd.scenario=hello",
                );
                spec.site = Some(Arc::clone(&site));
                let t0 = Instant::now();
                let mut vm = Vm::start(&spec);
                vm.expect("BACKDOORS: ready", Duration::from_secs(180));
                times.push(t0.elapsed());
            }
            report(
                &format!("{} boot to /init ready ({name} kernel)", engine.name()),
                times,
            );
        }
    }

    if std::path::Path::new("/dev/kvm").exists() {
        println!("--- this machine's own /dev/kvm, tiny hand-written guest (no Linux)");
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("tiny.elf");
        std::fs::write(&kernel, tiny_guest::elf()).unwrap();
        for vcpus in [1u8, 2] {
            let spec = VmSpec {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: "tiny".into(),
                engine: Engine::Kvm,
                mem: 64,
                vcpus,
                extra: Vec::new(),
                site: Some(Site::local()),
            };
            let mut vm = Vm::start(&spec);
            vm.expect(tiny_guest::BANNER, Duration::from_secs(30));
            pause_rounds(&format!("local kvm tiny ({vcpus} vCPU)"), &vm, rounds);
        }
    }
}
