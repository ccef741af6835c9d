//! Sessions survive their front end's failure (the talk's State Box case): a real multi-tier
//! service, the front end's guest failed mid-run by each fault in turn, bdmon moves the sessions
//! to the standby front end in the other guest through the backdoor; every session completes, no
//! client sees a wrong reply, the database holds every committed bid exactly once. The two guests
//! take turns: the failed one is restarted and comes back as the standby for the next fault.
//! See `backdoors_tests::failover`.

use backdoors_tests::failover::{Fault, Pair};
use backdoors_tests::site::Engine;

fn every_fault(engine: Engine) {
    backdoors_tests::panic_summary_on_stdout();
    let mut pair = Pair::boot(engine);
    for (k, &fault) in Fault::ALL.iter().enumerate() {
        let failed = pair.primary;
        let r = pair.fail(fault);
        eprintln!(
            "{engine:?} {fault:?}: front {failed} failed; failover {}",
            r.failover().map(|f| f.to_string()).unwrap_or_default()
        );
        println!(
            "{engine:?} {fault:?}: front {failed} failed; {} sessions completed, {} gave up, {} wrong",
            r.load.completed,
            r.load.gave_up.len(),
            r.load.wrong.len()
        );
        r.assert_recovered();
        if k + 1 < Fault::ALL.len() {
            pair.restore(failed);
        }
    }
}

/// tcg: the guests run under QEMU TCG here; frozen vCPUs are a SIGSTOP to QEMU.
#[test]
fn tcg_sessions_survive_every_fault() {
    every_fault(Engine::Tcg);
}

/// kvm: the guests run under bdvmm's kvm engine inside a kvm host; frozen vCPUs are a ptrace
/// stop of bdvmm's vCPU threads alone (`bd-kvmhost freeze-threads`), bdvmm's API still up.
/// A frozen vCPU cannot acknowledge a pause: bdvmm refuses the pause and keeps the VM (see
/// `pause.rs`), and bdmon reads a guest whose timer stopped without the lock first.
///
/// Not in `make test`: the nested platform, not the failover, ends its runs. Every fault has
/// recovered on kvm — all five in one run on 2026-12-02; on 2026-12-03 frozen vCPUs 60/60 in
/// three runs, the kernel panic 60/60 — but in both runs since the harness fixes the emulated AMD-V
/// (QEMU 7.2 TCG `-cpu max` running kvm-amd, the only way to run kvm here) ended an L2 guest by
/// itself: bdvmm exits with `KVM_EXIT_SHUTDOWN` (a triple fault; AMD reports it with the vCPU
/// reset to RIP 0xfff0): the front end restored in place, serving after the panic fault, in one
/// run; in the other a kept panicked guest, then the standby and the restored front end within a
/// minute of each other during the soft-hang fault. Then no guest is left to take the sessions
/// and all of them give up. The same happens, rarer, to single guests elsewhere in the suite
/// (hence `retries = 1` for kvm tests); a loop of the API's reset on one guest saw the whole kvm
/// host stop answering for over 30 s twice in about 110 resets. With one TCG thread
/// (`BD_KVMHOST_ACCEL=tcg,thread=single`)
/// the first guest did not reach user space in 300 s. A run takes 12–17 minutes, so a retry of
/// the whole test does not fit the CI budget. Run it with
/// `cargo nextest run -p backdoors-tests --test failover --run-ignored all -E 'test(kvm_sessions)'`.
#[test]
#[ignore = "the nested platform triple-faults L2 guests during its 12-17 min (see the doc comment)"]
fn kvm_sessions_survive_every_fault() {
    every_fault(Engine::Kvm);
}
