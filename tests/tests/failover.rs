//! Sessions survive their front end's failure (the talk's State Box case): a real multi-tier
//! service, the front end's guest failed mid-run by each fault in turn, bdmon moves the sessions
//! to the standby front end in the other guest through the backdoor; every session completes, no
//! client sees a wrong reply, the database holds every committed bid exactly once. The two guests
//! take turns: the failed one is restarted and comes back as the standby for the next fault.
//! See `backdoors_tests::failover`.

use backdoors_tests::failover::{Fault, Pair};
use backdoors_tests::site::Engine;

fn every_fault(engine: Engine) {
    let mut pair = Pair::boot(engine);
    for (k, &fault) in Fault::ALL.iter().enumerate() {
        let failed = pair.primary;
        let r = pair.fail(fault);
        eprintln!(
            "{engine:?} {fault:?}: front {failed} failed; failover {}",
            r.failover().map(|f| f.to_string()).unwrap_or_default()
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
///
/// Not run by `make test` yet: it passed all five faults in 2 of 5 runs on 2026-12-02. Two
/// failures were the harness's, since fixed (a route removed by another test process; a guest
/// gone after its fault); one was the nested platform (a triple fault at boot); and one is
/// bdvmm's own: bdmon tried the pause lock on the frozen guest first, the frozen vCPU could not
/// acknowledge it within 5 s, and bdvmm then *exited* ("pause failed and the guest could not be
/// resumed") — the failover had already succeeded without the lock, but a VMM must not end a
/// guest because a monitor's pause failed. Run it with
/// `cargo nextest run -p backdoors-tests --test failover --run-ignored all`.
#[test]
#[ignore = "bdvmm exits when a frozen vCPU cannot acknowledge a pause (see the doc comment)"]
fn kvm_sessions_survive_every_fault() {
    every_fault(Engine::Kvm);
}
