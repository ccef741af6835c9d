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

/// Not run by `make test` yet: it passed all five faults once (2026-12-02, 628 s), then failed
/// once with one wrong reply in 720 requests — after the soft-hang failover the standby answered
/// a retried LOGOUT (seq 12) with "unknown session": the session was not among the 33 State
/// Boxes moved. Until that is understood, a green `make test` would claim more than is known.
/// Run it with `cargo nextest run -p backdoors-tests --test failover --run-ignored all`.
#[test]
#[ignore = "one wrong reply seen after the soft-hang failover (see the doc comment)"]
fn tcg_sessions_survive_every_fault() {
    every_fault(Engine::Tcg);
}

/// Not run by `make test` yet: on the kvm engine the frozen-vCPU fault (SIGSTOP to bdvmm's vCPU
/// threads inside the kvm host) leaves bdvmm's control loop unable to answer STATUS (seen:
/// the bridge's STATUS times out after 10 s, every time), so bdmon never judges the guest hung
/// and the sessions are not moved; the other faults have not been run on kvm. Run it with
/// `cargo nextest run -p backdoors-tests --test failover --run-ignored all`.
#[test]
#[ignore = "kvm: bdvmm's control loop stops answering when its vCPU threads are frozen (see the doc comment)"]
fn kvm_sessions_survive_every_fault() {
    every_fault(Engine::Kvm);
}
