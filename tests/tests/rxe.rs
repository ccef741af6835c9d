//! The bridge's RDMA verbs transport, run for real on Soft-RoCE (issue 12, part 3): a patched
//! guest's memory served by `rdma-bridge serve --dump` (feature `verbs`, `[rdma] device =
//! "rxe0"`) in one network namespace of a QEMU-TCG VM, and `bd-verbs-check` as the monitors in
//! another, over an rxe device on each end of a veth pair. Every check of the checker must
//! pass: RDMA_CONNECT, one-sided READs of the Sensor Box and the process table, a WRITE to the
//! repair hooks under the lock, and the isolation between monitors (no write without the lock,
//! none for a read-only monitor, no READ with another monitor's rkey, no queue pair after its
//! session, a per-monitor queue-pair cap). The READ latency over rxe and over TCP is printed.
//!
//! Skipped, with the reason printed, only when images.env has no SoftRoCE images (the kernel
//! variant could not be built). Bounded: the image guest's boot (≤ 5 min) plus the VM
//! (`VM_TIMEOUT`, 12 min).

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
