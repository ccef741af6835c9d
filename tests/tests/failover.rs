//! Sessions survive their front end's failure (the talk's State Box case): a real multi-tier
//! service, the front end's guest failed mid-run by each fault, bdmon moves the sessions to a
//! standby front end in another guest through the backdoor; every session completes, no client
//! sees a wrong reply, the database holds every committed bid exactly once.
//! See `backdoors_tests::failover`.

use backdoors_tests::failover::{self, Fault};
use backdoors_tests::site::Engine;

fn recovers(engine: Engine, fault: Fault) {
    let r = failover::run(engine, fault);
    eprintln!(
        "{:?} {:?}: failover {}",
        engine,
        fault,
        r.failover().map(|f| f.to_string()).unwrap_or_default()
    );
    r.assert_recovered();
}

#[test]
fn tcg_sessions_survive_frozen_vcpus() {
    recovers(Engine::Tcg, Fault::Freeze);
}

#[test]
fn tcg_sessions_survive_a_kernel_panic() {
    recovers(Engine::Tcg, Fault::Panic);
}

#[test]
fn tcg_sessions_survive_a_soft_hang() {
    recovers(Engine::Tcg, Fault::SoftHang);
}

#[test]
fn tcg_sessions_survive_the_network_going_down() {
    recovers(Engine::Tcg, Fault::NetDown);
}

#[test]
fn kvm_sessions_survive_frozen_vcpus() {
    recovers(Engine::Kvm, Fault::Freeze);
}

#[test]
fn kvm_sessions_survive_a_kernel_panic() {
    recovers(Engine::Kvm, Fault::Panic);
}

#[test]
fn kvm_sessions_survive_a_soft_hang() {
    recovers(Engine::Kvm, Fault::SoftHang);
}

#[test]
fn kvm_sessions_survive_the_network_going_down() {
    recovers(Engine::Kvm, Fault::NetDown);
}
