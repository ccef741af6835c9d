//! The bridge's RDMA verbs transport, run for real on Soft-RoCE (issue 12, part 3): a patched
//! guest's memory served by `rdma-bridge serve --dump` (feature `verbs`, `[rdma] device =
//! "rxe0"`) in one network namespace of a QEMU-TCG VM, and `bd-verbs-check` as the monitors in
//! another (device rxe1), the two rxe devices on the two ends of a veth pair (the wire their
//! RoCE v2 packets cross; images/README.md, "SoftRoCE VM"). Every check of the checker must
//! pass: RDMA_CONNECT, one-sided READs of the Sensor Box and the process table, a WRITE to the
//! repair hooks under the lock, and the isolation between monitors (no write without the lock,
//! none for a read-only monitor, no READ with another monitor's rkey, no queue pair after its
//! session, a per-monitor queue-pair cap). The READ latency over rxe and over TCP is printed.
//!
//! Skipped, with the reason printed, only when images.env has no SoftRoCE images (the kernel
//! variant could not be built). Bounded, 14 minutes at worst: the image guest's boot (4 min) and
//! Sensor Box (1 min), the VM (9 min, of which the checker at most 7).

use backdoors_tests::rxe::{self, RxeImages, CHECKS};
use backdoors_tests::Images;

#[test]
fn rxe_verbs_on_softroce() {
    let img = Images::load();
    let images = match RxeImages::find(&img) {
        Ok(i) => i,
        Err(why) => {
            println!("SKIPPED rxe_verbs_on_softroce: {why}");
            eprintln!("SKIPPED rxe_verbs_on_softroce: {why}");
            return;
        }
    };
    let bins = rxe::verbs_bins().unwrap_or_else(|e| panic!("{e}"));

    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let backdoor = rxe::memory_image(&img, &run_dir.join("mem.raw"));
    rxe::write_run_dir(&run_dir, backdoor);
    let initrd = dir.path().join("initrd");
    rxe::pack(&images.initrd, &run_dir, &bins, &initrd);
    // The image lives on in the initrd; free the disk early.
    std::fs::remove_dir_all(&run_dir).expect("remove the run dir");

    let run = rxe::run_vm(&images.kernel, &initrd);
    for b in &run.bench {
        println!("rxe bench: {b}");
    }
    println!("rxe wire (tx, rx packets): {:?}", run.wire);
    assert!(
        run.powered_off,
        "the SoftRoCE VM did not power off within {:?}\n{}",
        rxe::VM_TIMEOUT,
        run.diagnostics()
    );
    let missing: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| !run.checks.contains_key(*c))
        .collect();
    let failed: Vec<String> = run
        .checks
        .iter()
        .filter(|(_, (ok, _))| !ok)
        .map(|(name, (_, detail))| format!("{name}: {detail}"))
        .collect();
    assert!(
        missing.is_empty() && failed.is_empty(),
        "checks missing: {missing:?}; failed: {failed:#?}\n{}",
        run.diagnostics()
    );
    assert_eq!(
        run.checker_exit,
        Some(0),
        "bd-verbs-check did not exit 0\n{}",
        run.diagnostics()
    );
    // The RoCE traffic crossed the veth wire between the two rxe devices (not the loopback
    // device): every READ of the bench alone is a request one way and a response the other.
    let reads = u64::from(rxe::READS);
    for dev in ["vethA", "vethB"] {
        let (tx, rx) = run.wire.get(dev).copied().unwrap_or_default();
        assert!(
            tx >= reads && rx >= reads,
            "{dev} sent {tx} and received {rx} packets, fewer than the {reads} READs of the bench: \
             the RDMA traffic did not cross the wire\n{}",
            run.diagnostics()
        );
    }
    for transport in ["rdma", "tcp"] {
        assert!(
            run.bench
                .iter()
                .any(|b| b.contains(&format!("\"transport\":\"{transport}\""))),
            "no READ latency over {transport}\n{}",
            run.diagnostics()
        );
    }
}
