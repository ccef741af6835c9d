//! The front end's protocols against a real PostgreSQL: requests and their exactly-once rules,
//! bad input, and IMPORT/TAKEOVER (all or nothing; imported sessions go on; an imported
//! pending BID that never committed is dropped and its retry executes once).
//!
//! Skipped, with the reason printed, when PostgreSQL 15 is not installed.

mod common;

use auction::adminctl::import_request;
use auction::db;
use auction::session::{self, ItemInfo, SessionState};
use common::{cluster, field, pg_present, request, Conn, Front, SERIAL};

#[test]
fn requests_follow_the_session_rules() {
    if !pg_present() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pg = cluster().unwrap();
    let a = Front::start(&pg, "A", &["--primary"]);
    let b = Front::start(&pg, "B", &[]);
    assert_eq!(request(b.client, "REQ 5 1 LOGIN ann"), "ERR 5 1 standby");

    let mut c = Conn::open(a.client);
    let exchanges = [
        (
            "REQ 5 2 VIEW 1",
            "ERR 5 2 unknown session: LOGIN with seq 1 first",
        ),
        ("REQ 5 1 LOGIN ann", "OK 5 1 welcome ann"),
        ("REQ 5 1 LOGIN ann", "OK 5 1 welcome ann"),
        (
            "REQ 5 3 VIEW 1",
            "ERR 5 3 out of order: this session expects seq 2",
        ),
        ("REQ 5 2 LOGIN ann", "ERR 5 2 already logged in"),
        (
            "REQ 5 2 VIEW 1",
            "OK 5 2 item=1 name=item-1 max=0 nbids=0 views=1",
        ),
        ("REQ 5 3 BID 1 50", "OK 5 3 bid#1 total=50 views=1"),
        ("REQ 5 3 BID 1 50", "OK 5 3 bid#1 total=50 views=1"),
        ("REQ 5 4 BID 999 5", "ERR 5 4 no item 999"),
        (
            "REQ 5 4 VIEW 1",
            "OK 5 4 item=1 name=item-1 max=50 nbids=1 views=2",
        ),
        ("REQ 5 5 LOGOUT", "OK 5 5 bye bids=1 total=50 views=2"),
        ("REQ 5 5 LOGOUT", "OK 5 5 bye bids=1 total=50 views=2"),
        ("REQ 5 6 VIEW 1", "ERR 5 6 session closed"),
        (
            "GET / HTTP/1.0",
            "ERR 0 0 expected `REQ <sid> <seq> <op> ...`",
        ),
        (
            "REQ 0 1 LOGOUT",
            "ERR 0 0 sid must be a nonzero unsigned 64-bit number",
        ),
        (
            "REQ 6 1 BID 1 -3",
            "ERR 6 1 item must be a positive 32-bit number, amount a positive 64-bit number",
        ),
    ];
    for (req, want) in exchanges {
        assert_eq!(c.send(req), want, "after {req}");
    }
    assert_eq!(
        c.send(&"x".repeat(5000)),
        "ERR 0 0 line longer than 4096 bytes"
    );
    assert_eq!(
        c.send("REQ 5 5 LOGOUT").as_str(),
        "",
        "closed after an overlong line"
    );
    let check = db::check(
        &mut pg.client().unwrap(),
        &[db::Bid {
            sid: 5,
            seq: 3,
            item: 1,
            amount: 50,
        }],
    )
    .unwrap();
    assert!(check.is_clean(), "{check:?}");
}

fn state(user: &str, views: i32, bids: &[i64], pending: Option<(i32, i64)>) -> SessionState {
    let info = ItemInfo {
        name: "item-1".into(),
        max_bid: 0,
        nbids: 0,
    };
    let mut core = session::login(user);
    for i in 0..views {
        core = core.view(i + 1, &info).unwrap();
    }
    for &amount in bids {
        let p = core.bid(1, amount).unwrap();
        core = core.commit(&p);
    }
    let pending = pending.map(|(item, amount)| core.bid(item, amount).unwrap());
    SessionState { core, pending }
}

#[test]
fn import_is_all_or_nothing_and_imported_sessions_go_on() {
    if !pg_present() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pg = cluster().unwrap();
    let b = Front::start(&pg, "B", &[]);
    let ann = session::encode(&state("ann", 2, &[10, 20], None));
    let bob = session::encode(&state("bob", 1, &[], Some((7, 70))));

    let bad = import_request([(11, &ann[..]), (12, &b"{\"k\":1}"[..])]);
    let reply = adminctl_err(&b, &bad);
    assert!(reply.contains("record 1 (session 12)"), "{reply}");
    let dup = import_request([(11, &ann[..]), (11, &ann[..])]);
    assert!(adminctl_err(&b, &dup).contains("repeated"));
    let huge = vec![b'x'; 2000];
    assert!(adminctl_err(&b, &import_request([(13, &huge[..])])).contains("len <= 1024"));
    assert!(adminctl_err(&b, b"IMPORT 9999\n").contains("n must be"));
    assert!(b.status().contains(" sessions=0 "), "{}", b.status());

    let good = import_request([(11, &ann[..]), (12, &bob[..])]);
    assert_eq!(b.admin(&good), "IMPORTED 2");
    // Importing again replaces, it does not add.
    assert_eq!(b.admin(&good), "IMPORTED 2");
    assert!(b.status().contains(" sessions=2 "), "{}", b.status());
    let serving = b.admin(b"TAKEOVER\n");
    assert_eq!(field(&serving, "sessions="), 2, "{serving}");
    assert_eq!(field(&serving, "resolved="), 1, "bob's pending BID");
    assert!(adminctl_err(&b, &good).contains("import only into a standby"));

    let mut c = Conn::open(b.client);
    // ann: LOGIN, 2 VIEWs, 2 BIDs = seq 5; a retry gets the stored reply, the next goes on.
    assert_eq!(
        c.send("REQ 11 5 BID 1 20"),
        "OK 11 5 bid#2 total=30 views=2"
    );
    assert_eq!(c.send("REQ 11 6 BID 2 5"), "OK 11 6 bid#3 total=35 views=2");
    // bob's pending BID (seq 3) never committed: dropped at takeover, so the retry executes.
    assert_eq!(
        c.send("REQ 12 3 BID 7 70"),
        "OK 12 3 bid#1 total=70 views=1"
    );
    assert_eq!(
        c.send("REQ 12 3 BID 7 70"),
        "OK 12 3 bid#1 total=70 views=1"
    );
    let bids = [
        db::Bid {
            sid: 11,
            seq: 6,
            item: 2,
            amount: 5,
        },
        db::Bid {
            sid: 12,
            seq: 3,
            item: 7,
            amount: 70,
        },
    ];
    let check = db::check(&mut pg.client().unwrap(), &bids).unwrap();
    assert!(check.is_clean(), "{check:?}");
}

/// Sends an admin request that must be refused; returns the ERR line.
fn adminctl_err(f: &Front, request: &[u8]) -> String {
    match auction::adminctl::send(f.admin, request, common::ADMIN_TIMEOUT) {
        Err(auction::adminctl::AdminError::Refused { line, .. }) => line,
        other => panic!("expected a refusal, got {other:?}"),
    }
}
