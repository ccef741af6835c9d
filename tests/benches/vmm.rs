//! bdvmm benchmarks on real guests: pause→acknowledged and resume latency for both engines, and
//! tcg boot time from `bdvmm run` to the initramfs's `BACKDOORS: ready` marker.
//!
//! `cargo bench -p backdoors-tests --bench vmm [-- --rounds N --boots N]`
//! Prints one line per measurement with the median and p99.

use std::time::{Duration, Instant};

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{tiny_guest, Images};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<48} n={:<5} median={:>10.1?} p99={:>10.1?} min={:>10.1?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[0]
    );
}

fn pause_rounds(engine: &str, vm: &Vm, rounds: usize) {
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
        &format!("{engine} pause -> all vCPUs acked (in bdvmm)"),
        acked,
    );
    report(&format!("{engine} pause round trip (API client)"), rtt);
    report(
        &format!("{engine} resume -> all vCPUs acked (in bdvmm)"),
        resumed,
    );
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = arg("--rounds", 200);
    let boots = arg("--boots", 5);
    let img = Images::load();

    // tcg: the patched kernel with a busy counter program, so the guest is really running.
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "bd.scenario=counter bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("COUNTER ready", Duration::from_secs(60));
    pause_rounds("tcg", &vm, rounds);
    drop(vm);

    if std::path::Path::new("/dev/kvm").exists() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("tiny.elf");
        std::fs::write(&kernel, tiny_guest::elf()).unwrap();
        for vcpus in [1u8, 2] {
            let spec = VmSpec {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: "tiny".into(),
                engine: "kvm".into(),
                mem: 64,
                vcpus,
                extra: Vec::new(),
                netns: None,
            };
            let mut vm = Vm::start(&spec);
            vm.expect(tiny_guest::BANNER, Duration::from_secs(30));
            pause_rounds(&format!("kvm({vcpus} vCPU)"), &vm, rounds);
        }
    } else {
        println!("kvm: skipped (no /dev/kvm)");
    }

    for (name, key) in [
        ("patched", "BD_KERNEL_BZIMAGE"),
        ("stock", "BD_STOCK_VMLINUZ"),
    ] {
        let mut times = Vec::new();
        for _ in 0..boots {
            let spec = VmSpec::tcg(img.get(key), img.get("BD_INITRAMFS"), "bd.scenario=hello");
            let t0 = Instant::now();
            let mut vm = Vm::start(&spec);
            vm.expect("BACKDOORS: ready", Duration::from_secs(120));
            times.push(t0.elapsed());
        }
        report(&format!("tcg boot to /init ready ({name} kernel)"), times);
    }
}
