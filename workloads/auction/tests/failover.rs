//! Host failover tests: a real PostgreSQL, real front end processes, no VM.
//!
//! Front end A (primary) and B (standby) on loopback; 50 checked client sessions with addresses
//! [A, B]. A fails (SIGSTOP by the test, or it freezes itself at a chosen point of a BID); the
//! test, standing in for the monitor, reads A's State Boxes from `/proc/<A>/mem`, IMPORTs them
//! into B and tells B to TAKEOVER. The clients must all finish with no wrong reply, and the
//! database must hold every acknowledged BID exactly once.
//!
//! Skipped, with the reason printed, when PostgreSQL 15 is not installed.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use auction::adminctl;
use auction::client::{self, Load, Report};
use auction::db;
use auction::extract;
use auction::pg::Cluster;
use auction::series;
use auction::session;
use common::{cluster, field, pg_present, request, Front, SERIAL};

fn load(fronts: &[&Front]) -> Load {
    Load {
        addrs: fronts.iter().map(|f| f.client).collect(),
        sessions: 50,
        requests_per_session: 12,
        timeout: Duration::from_secs(1),
        deadline: Duration::from_secs(90),
        seed: 42,
        think: Duration::from_millis(20),
        stagger: Duration::from_millis(50),
        ..Load::default()
    }
}

/// What the monitor does: read A's boxes while A is stopped, IMPORT them into B, TAKEOVER.
/// Returns the boxes' decoded states and B's SERVING line.
fn fail_over(a: &Front, b: &Front) -> (Vec<(u64, session::SessionState)>, String) {
    let found = extract::from_process(a.pid()).expect("read A's State Boxes");
    assert!(
        found.refused.is_empty(),
        "refused slots: {:?}",
        found.refused
    );
    assert!(!found.boxes.is_empty(), "A had no sessions when it failed");
    let states = found
        .boxes
        .iter()
        .map(|bx| (bx.id, session::decode(&bx.data).expect("a valid session")))
        .collect();
    let request = adminctl::import_request(found.boxes.iter().map(|bx| (bx.id, &bx.data[..])));
    let imported = b.admin(&request);
    assert_eq!(imported, format!("IMPORTED {}", found.boxes.len()));
    let serving = b.admin(b"TAKEOVER\n");
    assert!(serving.starts_with("SERVING "), "{serving}");
    assert_eq!(
        field(&serving, "sessions="),
        i64::try_from(found.boxes.len()).unwrap()
    );
    (states, serving)
}

fn assert_clean(pg: &Cluster, report: &Report, fronts: &[&Front]) {
    let logs: Vec<String> = fronts
        .iter()
        .map(|f| format!("log of {}:\n{}", f.pid(), f.log()))
        .collect();
    let summary = format!(
        "completed={} wrong={:?} gave_up={:?}\n{}",
        report.completed,
        report.wrong,
        report.gave_up,
        logs.join("\n")
    );
    assert!(report.wrong.is_empty(), "wrong replies: {summary}");
    assert!(report.gave_up.is_empty(), "sessions gave up: {summary}");
    assert_eq!(report.completed, 50, "{summary}");
    assert!(!report.bids.is_empty());
    let check = db::check(&mut pg.client().unwrap(), &report.bids).unwrap();
    assert!(check.is_clean(), "database check: {check:?}");
    assert_eq!(check.rows, report.bids.len());
    if let Ok(path) = std::env::var("BD_AUCTION_CSV") {
        let csv = series::to_csv(&series::series(report, Duration::from_millis(100)));
        std::fs::write(path, csv).unwrap();
    }
}

/// Waits until A holds at least `n` sessions (the load is under way).
fn wait_sessions(a: &Front, n: i64) {
    let end = Instant::now() + Duration::from_secs(30);
    while field(&a.status(), "sessions=") < n {
        assert!(
            Instant::now() < end,
            "{} never reached {n} sessions\n{}",
            a.pid(),
            a.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigstop_of_the_primary_fails_over_exactly_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = cluster() else { return };
    let mut a = Front::start(&pg, "A", &["--primary"]);
    let b = Front::start(&pg, "B", &[]);
    assert!(b.status().starts_with("role=standby"), "{}", b.status());
    let load = load(&[&a, &b]);
    let report = thread::scope(|s| {
        let clients = s.spawn(|| client::run(&load));
        wait_sessions(&a, 20);
        a.signal(libc::SIGSTOP);
        a.wait_stopped(Duration::from_secs(10));
        let (states, serving) = fail_over(&a, &b);
        assert_eq!(field(&serving, "epoch="), 2, "A claimed 1, B 2");
        // A runs again for a moment: whatever it had in flight or queued must be fenced, and so
        // must a new request (a BID on a session it held, with the next seq it would accept).
        a.signal(libc::SIGCONT);
        let (sid, state) = states
            .iter()
            .find(|(_, st)| !st.core.closed && st.pending.is_none())
            .expect("an open session");
        let next = state.core.last_seq + 1;
        let stale = request(a.client, &format!("REQ {sid} {next} BID 1 7"));
        assert_eq!(
            stale,
            format!("ERR {sid} {} standby", state.core.last_seq + 1)
        );
        thread::sleep(Duration::from_millis(1000));
        assert!(
            a.status().starts_with("role=fenced epoch=2"),
            "{}",
            a.status()
        );
        a.kill();
        clients.join().unwrap()
    });
    assert!(
        b.status().starts_with("role=primary epoch=2"),
        "{}",
        b.status()
    );
    if std::env::var_os("BD_AUCTION_LOGS").is_some() {
        println!("A:\n{}\nB:\n{}", a.log(), b.log());
    }
    assert_clean(&pg, &report, &[&a, &b]);
}

#[test]
fn a_standby_that_took_over_fails_over_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = cluster() else { return };
    let a = Front::start(&pg, "A", &["--primary"]);
    let b = Front::start(&pg, "B", &[]);
    let c = Front::start(&pg, "C", &[]);
    let load = load(&[&a, &b, &c]);
    let report = thread::scope(|s| {
        let clients = s.spawn(|| client::run(&load));
        wait_sessions(&a, 10);
        a.signal(libc::SIGSTOP);
        a.wait_stopped(Duration::from_secs(10));
        let (first, _) = fail_over(&a, &b);
        // B serves its imported sessions and new ones from its own Region; then it fails too.
        let n = i64::try_from(first.len()).unwrap();
        wait_sessions(&b, (n + 5).min(50));
        b.signal(libc::SIGSTOP);
        b.wait_stopped(Duration::from_secs(10));
        let (second, serving) = fail_over(&b, &c);
        assert_eq!(field(&serving, "epoch="), 3, "A 1, B 2, C 3");
        let first_ids: Vec<u64> = first.iter().map(|(id, _)| *id).collect();
        assert!(
            first_ids
                .iter()
                .all(|id| second.iter().any(|(sid, _)| sid == id)),
            "every session B imported is in B's own boxes"
        );
        clients.join().unwrap()
    });
    assert_clean(&pg, &report, &[&a, &b, &c]);
}

/// A freezes itself at `point` of its 20th BID; the pending BID's fate is settled on takeover.
fn crash_during_a_bid(point: &str) -> (Report, session::Pending) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pg = cluster().expect("checked by the caller");
    let mut a = Front::start(
        &pg,
        "A",
        &["--primary", "--crash-after", point, "--crash-on-bid", "20"],
    );
    let b = Front::start(&pg, "B", &[]);
    let load = load(&[&a, &b]);
    let (report, pending) = thread::scope(|s| {
        let clients = s.spawn(|| client::run(&load));
        a.wait_stopped(Duration::from_secs(60));
        let (states, serving) = fail_over(&a, &b);
        let pending: Vec<_> = states
            .iter()
            .filter_map(|(_, st)| st.pending.clone())
            .collect();
        assert_eq!(pending.len(), 1, "exactly the crashed BID is pending");
        assert_eq!(field(&serving, "resolved="), 1, "{serving}");
        a.kill();
        (clients.join().unwrap(), pending[0].clone())
    });
    assert_clean(&pg, &report, &[&a, &b]);
    (report, pending)
}

#[test]
fn crash_between_pending_export_and_commit_is_exactly_once() {
    if !pg_present() {
        return;
    }
    let (report, pending) = crash_during_a_bid("pending");
    // The BID was not committed by A: B dropped the pending record and executed the client's
    // retry, once.
    assert!(report
        .bids
        .iter()
        .any(|b| b.seq == pending.seq && b.item == pending.item && b.amount == pending.amount));
}

#[test]
fn crash_between_commit_and_committed_export_is_exactly_once() {
    if !pg_present() {
        return;
    }
    let (report, pending) = crash_during_a_bid("commit");
    // A committed the BID: B adopted the pending state; the client's retry got A's reply.
    assert!(report
        .bids
        .iter()
        .any(|b| b.seq == pending.seq && b.item == pending.item && b.amount == pending.amount));
}
