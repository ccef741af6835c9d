//! What the Sensor Box costs the guest: fork+exit, pipe ping-pong (context switches) and page
//! faults, measured inside the guest by `bdbench`, on the patched kernel with the Sensor Box on
//! (booted with `backdoor.sb=`, which bdvmm always passes) and on the same sources built with
//! `CONFIG_BACKDOOR_SENSOR_BOX=n`. Boots alternate between the two kernels to spread drift.
//!
//! `BD_KERNEL_NOSB_BZIMAGE=<nosb>/bzImage cargo bench -p backdoors-tests --bench sb_cost [-- --boots N]`
//! (`make bench` builds the nosb variant and sets the variable.)

use std::collections::BTreeMap;
use std::time::Duration;

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;

/// Per benchmark: the per-op medians of every boot.
type Results = BTreeMap<String, Vec<f64>>;

fn run_once(kernel: &std::path::Path, initrd: &std::path::Path, into: &mut Results) {
    let spec = VmSpec::tcg(kernel, initrd, "quiet bd.scenario=bench");
    let mut vm = Vm::start(&spec);
    vm.expect("BACKDOORS: bench end", Duration::from_secs(600));
    for line in vm.stdout().lines().filter(|l| l.starts_with("BDBENCH ")) {
        let mut words = line.split_whitespace().skip(1);
        let Some(name) = words.next() else { continue };
        let median = words
            .find_map(|w| w.strip_prefix("median_ns="))
            .and_then(|v| v.trim_end_matches('\r').parse::<f64>().ok());
        if let Some(m) = median {
            into.entry(name.to_string()).or_default().push(m);
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let boots: usize = args
        .iter()
        .position(|a| a == "--boots")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let img = Images::load();
    let on = img.get("BD_KERNEL_BZIMAGE").to_path_buf();
    let Some(off) = std::env::var_os("BD_KERNEL_NOSB_BZIMAGE") else {
        println!("sb_cost: skipped: set BD_KERNEL_NOSB_BZIMAGE (images/kernel/build.sh --variant nosb); `make bench` does");
        return;
    };
    let off = std::path::PathBuf::from(off);
    let initrd = img.get("BD_INITRAMFS").to_path_buf();
    let (mut r_on, mut r_off) = (Results::new(), Results::new());
    for _ in 0..boots {
        run_once(&off, &initrd, &mut r_off);
        run_once(&on, &initrd, &mut r_on);
    }
    println!(
        "{:<8} {:>14} {:>14} {:>9}   ({boots} boots each, median of per-boot medians)",
        "bench", "SB off ns/op", "SB on ns/op", "delta"
    );
    for (name, offs) in &r_off {
        let Some(ons) = r_on.get(name) else { continue };
        let (a, b) = (median(offs), median(ons));
        println!(
            "{name:<8} {a:>14.0} {b:>14.0} {:>+8.2}%",
            (b - a) / a * 100.0
        );
    }
}
