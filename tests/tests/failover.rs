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
/// A frozen vCPU cannot acknowledge a pause: bdvmm refuses the pause and keeps the VM (see
/// `pause.rs`), and bdmon reads a guest whose timer stopped without the lock first.
///
/// Not in `make test` yet. In a fresh-clone CI run on 2026-12-03 (before the two fixes below)
/// both tries passed the frozen-vCPU fault without the lock and bdvmm kept the frozen guest; one
/// try then failed on the harness (the console held only the start of the standby's "front up"
/// line when it was checked), the other on the panic fault (bdmon's unlocked task walk ran out
/// of the default 1 s nested, sessions gave up before a later attempt succeeded). Fixed since
/// (`expect_standby` waits for the whole line; kvm test guests get `walk_ms = 8000`) but not yet
/// run again. Run it with `cargo nextest run -p backdoors-tests --test failover --run-ignored all`.
#[test]
#[ignore = "two fixes from its last failing run not yet verified (see the doc comment)"]
fn kvm_sessions_survive_every_fault() {
    every_fault(Engine::Kvm);
}
