//! A real service healed while its clients watch, on both engines (`backdoors_tests::service`):
//! redis-server in the Debian root filesystem guest, `redis-benchmark` windows from this machine
//! over the guest's network, and an intruder (user1) starting a CPU fork bomb (one test) or a
//! self-respawning memory hog (another). With bdmon attached the service's p99 must be back
//! within 1.2x its baseline within 2 s of the repair (the median p99 of the first windows that
//! start 2 s after it, against the median of the baseline windows; 1.5x on the kvm engine, nested
//! under TCG here, see below) and the redis-server process must be the same one throughout; without bdmon the same attack cripples the service (windows time out or
//! their p99 is many times the baseline) or the kernel's OOM killer kills it.

use backdoors_tests::service::{self, Attack, USER1};
use backdoors_tests::site::Engine;

fn healed_while_clients_watch(engine: Engine, attack: Attack) {
    backdoors_tests::panic_summary_on_stdout();
    let r = service::run(engine, attack);
    let text = r.text();
    eprintln!("{text}");
    assert!(
        !r.repairs.is_empty(),
        "bdmon repaired nothing: {:#?}\n{}\n{text}\n{}",
        r.events,
        r.bdmon_output,
        r.diagnostics
    );
    for rep in &r.repairs {
        assert_eq!(rep["uid"], USER1, "wrong kill: {rep}\n{text}");
    }
    // Back within 1.2x the baseline p99 from 2 s after the repair (the median p99 of the
    // windows there against the median of the baseline windows). On the kvm engine, which runs
    // nested inside a QEMU-TCG kvm host here, the p99 after a memory hog stays ~1.3x the
    // baseline for the rest of the run even with the guest warmed first, while the same guest on
    // the tcg engine is back at 1.0-1.1x: the emulated nested paging, not the guest, is slower.
    // There the bound is 1.5x, and the figures are in docs/benchmarks.md.
    let bound = match engine {
        Engine::Tcg => 1.2,
        Engine::Kvm => 1.5,
    };
    let back = r.p99_2s_after_repair().unwrap_or(f64::INFINITY);
    assert!(
        back <= r.baseline_p99 * bound,
        "p99 {back:.3} ms 2 s after the repair, baseline {:.3} ms (bound {bound}x)\n{text}",
        r.baseline_p99
    );
    assert_eq!(
        r.pid_after_heal.as_deref(),
        Some(r.pid_before.as_str()),
        "redis-server died or restarted while bdmon healed\n{text}\n{}",
        r.diagnostics
    );
    // Without bdmon: crippled, or the service itself killed.
    let died = r.pid_after_crippled.as_deref() != Some(r.pid_before.as_str());
    assert!(
        died || r.crippled_failures() > 0 || r.crippled_worst_p99() > r.baseline_p99 * 10.0,
        "the attack did not cripple the service without bdmon\n{text}"
    );
}

#[test]
fn tcg_a_fork_bomb_next_to_redis_is_healed_while_clients_watch() {
    healed_while_clients_watch(Engine::Tcg, Attack::ForkBomb);
}

#[test]
fn kvm_a_fork_bomb_next_to_redis_is_healed_while_clients_watch() {
    healed_while_clients_watch(Engine::Kvm, Attack::ForkBomb);
}

#[test]
fn tcg_a_memory_hog_next_to_redis_is_healed_while_clients_watch() {
    healed_while_clients_watch(Engine::Tcg, Attack::MemoryHog);
}

#[test]
fn kvm_a_memory_hog_next_to_redis_is_healed_while_clients_watch() {
    healed_while_clients_watch(Engine::Kvm, Attack::MemoryHog);
}
