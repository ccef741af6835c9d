//! The fleet handles against a real etcd (`/usr/bin/etcd`, package etcd-server).

use std::time::{Duration, Instant};

use fleet::testing::EtcdServer;
use fleet::{FleetConfig, GuestRecord, Member, Registration, Watcher};

fn config(etcd: &EtcdServer, ttl_s: u64) -> FleetConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    FleetConfig {
        ttl_s,
        connect_timeout_ms: 1000,
        ..FleetConfig::with_endpoints(vec![etcd.endpoint()])
    }
}

fn guest(name: &str) -> GuestRecord {
    GuestRecord {
        name: name.into(),
        bridge: "127.0.0.1:7070".into(),
        cert_sha256: String::new(),
        kernel: "patched".into(),
        engine: "dump".into(),
    }
}

/// Waits (bounded) until `cond` holds; panics with `what` otherwise. Returns the time it took.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_registration_appears_and_leaves_at_once_on_close() {
    let etcd = EtcdServer::start();
    let cfg = config(&etcd, 5);
    let w = Watcher::start(cfg.clone()).unwrap();
    assert!(w.connected());
    let before = w.changed();
    let r = Registration::start(cfg.clone(), guest("g1")).unwrap();
    assert!(r.registered());
    w.wait_changed(before, Duration::from_secs(5));
    wait_until("g1 in the view", Duration::from_secs(5), || {
        w.view().guests.get("g1") == Some(&guest("g1"))
    });
    let m = Member::join(cfg, "mon1").unwrap();
    wait_until("mon1 in the view", Duration::from_secs(5), || {
        w.view().members.contains("mon1")
    });
    r.close();
    m.leave();
    // Revoked: gone long before the 5 s TTL could have run out.
    let took = wait_until("g1 and mon1 gone", Duration::from_secs(2), || {
        let v = w.view();
        v.guests.is_empty() && v.members.is_empty()
    });
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(w.view().revision > 0);
}

#[test]
fn an_abandoned_registration_disappears_within_its_ttl() {
    let etcd = EtcdServer::start();
    let cfg = config(&etcd, 2);
    let w = Watcher::start(cfg.clone()).unwrap();
    let r = Registration::start(cfg, guest("g2")).unwrap();
    wait_until("g2 in the view", Duration::from_secs(5), || {
        w.view().guests.contains_key("g2")
    });
    let dropped = Instant::now();
    r.abandon();
    wait_until("g2 gone", Duration::from_secs(2 + 1), || {
        !w.view().guests.contains_key("g2")
    });
    // Not revoked: it stayed until its lease ran out (most of the TTL).
    assert!(
        dropped.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        dropped.elapsed()
    );
}

#[test]
fn a_member_is_fenced_while_etcd_is_frozen_and_rejoins_after() {
    let etcd = EtcdServer::start();
    let cfg = config(&etcd, 2);
    let m = Member::join(cfg.clone(), "mon1").unwrap();
    assert!(!m.fenced());
    let until = m.owns_until().unwrap();
    assert!(until <= Instant::now() + Duration::from_secs(2));
    let frozen = Instant::now();
    etcd.freeze();
    let took = wait_until("fenced", Duration::from_secs(2), || m.fenced());
    assert!(took <= Duration::from_secs(2));
    assert!(frozen.elapsed() <= Duration::from_secs(2) + Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    assert!(m.fenced(), "un-fenced while etcd is frozen");
    etcd.thaw();
    wait_until("un-fenced after thaw", Duration::from_secs(10), || {
        !m.fenced()
    });
    let w = Watcher::start(cfg).unwrap();
    wait_until("mon1 a member again", Duration::from_secs(5), || {
        w.view().members.contains("mon1")
    });
}

#[test]
fn after_an_etcd_restart_everything_is_back() {
    let mut etcd = EtcdServer::start();
    let cfg = config(&etcd, 3);
    let w = Watcher::start(cfg.clone()).unwrap();
    let r = Registration::start(cfg.clone(), guest("g1")).unwrap();
    let m = Member::join(cfg.clone(), "mon1").unwrap();
    wait_until("g1 and mon1 in the view", Duration::from_secs(5), || {
        let v = w.view();
        v.guests.contains_key("g1") && v.members.contains("mon1")
    });
    let (r_puts, m_puts) = (r.wait_put(0, Duration::ZERO), m.wait_put(0, Duration::ZERO));

    // Same data directory: leases and keys survive, the handles reconnect.
    etcd.restart();
    wait_until(
        "watcher connected and current",
        Duration::from_secs(10),
        || {
            let v = w.view();
            w.connected() && v.guests.contains_key("g1") && v.members.contains("mon1")
        },
    );
    r.wait_put(r_puts, Duration::from_secs(10));
    m.wait_put(m_puts, Duration::from_secs(10));
    wait_until("mon1 un-fenced", Duration::from_secs(10), || !m.fenced());
    assert!(r.registered());
    // The watch is live: a new guest shows.
    let r2 = Registration::start(cfg.clone(), guest("g2")).unwrap();
    wait_until("g2 in the view", Duration::from_secs(5), || {
        w.view().guests.contains_key("g2")
    });

    // Empty: the keys are gone; the handles grant new leases and put them again.
    etcd.restart_empty();
    wait_until(
        "everything back after an empty restart",
        Duration::from_secs(10),
        || {
            let v = w.view();
            w.connected()
                && v.guests.contains_key("g1")
                && v.guests.contains_key("g2")
                && v.members.contains("mon1")
        },
    );
    wait_until("mon1 un-fenced", Duration::from_secs(10), || !m.fenced());
    r2.close();
    wait_until("g2 gone", Duration::from_secs(3), || {
        !w.view().guests.contains_key("g2")
    });
}
