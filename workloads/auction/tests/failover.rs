//! Host failover tests: a real PostgreSQL, real front end processes, no VM.
//!
//! Front end A (primary) and B (standby) on loopback; 50 checked client sessions with addresses
//! [A, B]. A fails (SIGSTOP by the test, or it freezes itself at a chosen point of a BID); the
//! test, standing in for the monitor, reads A's State Boxes from `/proc/<A>/mem`, IMPORTs them
//! into B and tells B to TAKEOVER. The clients must all finish with no wrong reply, and the
//! database must hold every acknowledged BID exactly once.
//!
//! Skipped, with the reason printed, when PostgreSQL 15 is not installed.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use auction::adminctl;
use auction::client::{self, Load, Report};
use auction::db;
use auction::extract;
use auction::pg::{self, Cluster};
use auction::series;
use auction::session;

/// The tests share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    let l = TcpListener::bind((LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn cluster() -> Option<Cluster> {
    if let Err(e) = pg::installed() {
        println!("SKIPPED: {e}");
        return None;
    }
    Some(Cluster::start(&[LOCALHOST], free_port()).expect("start PostgreSQL"))
}

/// A front end process, killed on drop.
struct Front {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Front {
    fn start(pg: &Cluster, name: &str, extra: &[&str]) -> Front {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bd-auction-front"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--db", &pg.conninfo(LOCALHOST), "--name", name])
            .args(["--vip", "10.99.0.1/24", "--dev", "lo"])
            .args(["--ip-cmd", "true", "--arping-cmd", "true"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(log.path()).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = |key: &str| -> SocketAddr {
            let w = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("front end {name} did not start: {line:?}"));
            w.parse().unwrap()
        };
        let (client, admin) = (addr("client="), addr("admin="));
        Front {
            child,
            client,
            admin,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill() on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(i32::try_from(self.pid()).unwrap(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits until every thread of the process is stopped.
    fn wait_stopped(&self, within: Duration) {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if all_threads_stopped(self.pid()) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("front end {} never stopped\n{}", self.pid(), self.log());
    }

    fn admin(&self, request: &[u8]) -> String {
        adminctl::send(self.admin, request, ADMIN_TIMEOUT)
            .unwrap_or_else(|e| panic!("admin: {e}\n{}", self.log()))
    }

    fn status(&self) -> String {
        self.admin(b"STATUS\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.kill();
    }
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_string())
            })
            .is_some_and(|rest| rest.starts_with('T') || rest.starts_with('t'))
    })
}

fn field(line: &str, key: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn load(a: &Front, b: &Front) -> Load {
    Load {
        addrs: vec![a.client, b.client],
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

fn assert_clean(pg: &Cluster, report: &Report, a: &Front, b: &Front) {
    let summary = format!(
        "completed={} wrong={:?} gave_up={:?}\nA log:\n{}\nB log:\n{}",
        report.completed,
        report.wrong,
        report.gave_up,
        a.log(),
        b.log()
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
            "A never reached {n} sessions\n{}",
            a.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one BID to `addr` and returns the reply line.
fn stale_bid(addr: SocketAddr, sid: u64, seq: u64) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(ADMIN_TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut s, format!("REQ {sid} {seq} BID 1 7\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

#[test]
fn sigstop_of_the_primary_fails_over_exactly_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = cluster() else { return };
    let mut a = Front::start(&pg, "A", &["--primary"]);
    let b = Front::start(&pg, "B", &[]);
    assert!(b.status().starts_with("role=standby"), "{}", b.status());
    let load = load(&a, &b);
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
        let stale = stale_bid(a.client, *sid, state.core.last_seq + 1);
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
    assert_clean(&pg, &report, &a, &b);
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
    let load = load(&a, &b);
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
    assert_clean(&pg, &report, &a, &b);
    (report, pending)
}

fn pg_present() -> bool {
    match pg::installed() {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED: {e}");
            false
        }
    }
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
