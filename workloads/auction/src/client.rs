//! The client load: many sessions, each on its own thread and TCP connection, each checking
//! every reply against its own model of the session.
//!
//! On an I/O error, a timeout, or `ERR standby`/`ERR unavailable`, a session reconnects (trying
//! the addresses in turn) and resends the same (sid, seq) until the overall deadline. A reply
//! whose text differs from what the model expects, or any other ERR, is a wrong reply: recorded,
//! never retried, and the session stops there.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::db::Bid;
use crate::proto::{
    format_request, parse_reply, read_line, Op, Reply, Request, MAX_LINE, STANDBY, UNAVAILABLE,
};

/// A load to run.
#[derive(Debug, Clone)]
pub struct Load {
    /// The front ends, tried in turn.
    pub addrs: Vec<SocketAddr>,
    /// Number of sessions.
    pub sessions: usize,
    /// Requests per session (≥ 2): LOGIN, a mix of VIEW and BID, LOGOUT.
    pub requests_per_session: usize,
    /// Timeout of one attempt (connect, or write and read the reply).
    pub timeout: Duration,
    /// The whole run's deadline; a session not done by then gives up.
    pub deadline: Duration,
    /// Seed of the sessions' ids and operations.
    pub seed: u64,
    /// Pause between a session's requests.
    pub think: Duration,
    /// Delay between the starts of consecutive sessions.
    pub stagger: Duration,
    /// Items are 1..=items.
    pub items: i32,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            addrs: Vec::new(),
            sessions: 50,
            requests_per_session: 12,
            timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            seed: 1,
            think: Duration::from_millis(20),
            stagger: Duration::from_millis(50),
            items: crate::db::ITEMS,
        }
    }
}

/// One request as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// The session's index in the load.
    pub session: usize,
    /// Its sid.
    pub sid: u64,
    /// Request number.
    pub seq: u64,
    /// LOGIN, VIEW, BID or LOGOUT.
    pub op: &'static str,
    /// First attempt's start, Unix ns.
    pub start_ns: u64,
    /// Final reply (or giving up), Unix ns.
    pub end_ns: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Whether it got the expected OK.
    pub ok: bool,
}

/// A reply that did not match the model (or an ERR that is not a retry signal).
#[derive(Debug, Clone, Serialize)]
pub struct WrongReply {
    /// Session id.
    pub sid: u64,
    /// Request number.
    pub seq: u64,
    /// What was sent.
    pub request: String,
    /// What came back.
    pub got: String,
    /// What the model expected.
    pub expected: String,
}

/// What a run found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// Sessions that got every reply right.
    pub completed: usize,
    /// Wrong replies.
    pub wrong: Vec<WrongReply>,
    /// Sessions that ran out of time (sid).
    pub gave_up: Vec<u64>,
    /// Every request.
    pub requests: Vec<RequestRecord>,
    /// Every BID acknowledged with OK.
    pub bids: Vec<Bid>,
}

/// A tiny deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in 1..=n (n ≥ 1).
    fn upto(&mut self, n: u64) -> u64 {
        1 + self.next() % n.max(1)
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The session's operations: LOGIN, a mix of VIEW and BID, LOGOUT.
fn plan(rng: &mut Rng, index: usize, n: usize, items: i32) -> Vec<Op> {
    let items = u64::try_from(items.max(1)).unwrap_or(1);
    let item = |rng: &mut Rng| i32::try_from(rng.upto(items)).unwrap_or(1);
    let mut ops = vec![Op::Login {
        user: format!("user{index}"),
    }];
    for _ in 2..n.max(2) {
        ops.push(if rng.next() % 2 == 0 {
            Op::View { item: item(rng) }
        } else {
            Op::Bid {
                item: item(rng),
                amount: i64::try_from(rng.upto(1000)).unwrap_or(1),
            }
        });
    }
    ops.push(Op::Logout);
    ops
}

/// The client's own model of a session.
#[derive(Default)]
struct Model {
    views: u64,
    bids: u64,
    total: i64,
    /// item → (own bids on it, own highest amount)
    items: HashMap<i32, (i64, i64)>,
}

/// A reply that is not the one the session's model expects.
#[derive(Debug, thiserror::Error)]
#[error("expected {expected:?}")]
struct Unexpected {
    /// The expected text, or its shape.
    expected: String,
}

impl Model {
    /// Whether `text` is the right reply to `op`; the expected text (or its shape) otherwise.
    fn check(&self, op: &Op, text: &str) -> Result<(), Unexpected> {
        let expected = match op {
            Op::Login { user } => format!("welcome {user}"),
            Op::Bid { amount, .. } => format!(
                "bid#{} total={} views={}",
                self.bids + 1,
                self.total.saturating_add(*amount),
                self.views
            ),
            Op::Logout => format!(
                "bye bids={} total={} views={}",
                self.bids, self.total, self.views
            ),
            Op::View { item } => return self.check_view(*item, text),
        };
        if text == expected {
            Ok(())
        } else {
            Err(Unexpected { expected })
        }
    }

    fn check_view(&self, item: i32, text: &str) -> Result<(), Unexpected> {
        let (own_n, own_max) = self.items.get(&item).copied().unwrap_or((0, 0));
        let views = self.views + 1;
        let expected = format!(
            "item={item} name=item-{item} max=<at least {own_max}> nbids=<at least {own_n}> views={views}"
        );
        let words: Vec<&str> = text.split(' ').collect();
        let num = |w: &str, key: &str| -> Option<i64> { w.strip_prefix(key)?.parse().ok() };
        let ok = match words.as_slice() {
            [i, name, max, nbids, v] => {
                *i == format!("item={item}")
                    && *name == format!("name=item-{item}")
                    && num(max, "max=").is_some_and(|m| m >= own_max)
                    && num(nbids, "nbids=").is_some_and(|n| n >= own_n)
                    && *v == format!("views={views}")
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Unexpected { expected })
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::View { .. } => self.views += 1,
            Op::Bid { item, amount } => {
                self.bids += 1;
                self.total = self.total.saturating_add(*amount);
                let e = self.items.entry(*item).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(*amount);
            }
            Op::Login { .. } | Op::Logout => {}
        }
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// What one attempt got.
enum Attempt {
    /// A reply line.
    Line(String),
    /// No reply (connect, write or read failed or timed out).
    Failed,
}

fn attempt(conn: &mut Option<Conn>, addr: SocketAddr, line: &str, timeout: Duration) -> Attempt {
    if conn.is_none() {
        let Ok(s) = TcpStream::connect_timeout(&addr, timeout) else {
            return Attempt::Failed;
        };
        let _ = s.set_nodelay(true);
        let ready =
            s.set_read_timeout(Some(timeout)).is_ok() && s.set_write_timeout(Some(timeout)).is_ok();
        let Ok(r) = s.try_clone() else {
            return Attempt::Failed;
        };
        if !ready {
            return Attempt::Failed;
        }
        *conn = Some(Conn {
            reader: BufReader::new(r),
            writer: s,
        });
    }
    let Some(c) = conn.as_mut() else {
        return Attempt::Failed;
    };
    if c.writer.write_all(line.as_bytes()).is_err() {
        *conn = None;
        return Attempt::Failed;
    }
    match read_line(&mut c.reader, MAX_LINE) {
        Ok(Some(l)) => Attempt::Line(l),
        _ => {
            *conn = None;
            Attempt::Failed
        }
    }
}

/// What one session did.
#[derive(Default)]
struct Outcome {
    completed: bool,
    gave_up: bool,
    wrong: Vec<WrongReply>,
    requests: Vec<RequestRecord>,
    bids: Vec<Bid>,
}

/// The sid of session `index` under `seed` (nonzero).
pub fn sid_of(seed: u64, index: usize) -> u64 {
    let mut r = Rng(seed
        ^ u64::try_from(index)
            .unwrap_or(0)
            .wrapping_mul(0x2545_F491_4F6C_DD1D));
    r.next() | 1
}

fn run_session(load: &Load, index: usize, end: Instant) -> Outcome {
    let sid = sid_of(load.seed, index);
    let mut rng = Rng(sid);
    let ops = plan(&mut rng, index, load.requests_per_session, load.items);
    let mut out = Outcome::default();
    let mut model = Model::default();
    let mut conn: Option<Conn> = None;
    let mut cur = 0;
    let n_addrs = load.addrs.len().max(1);
    for (i, op) in ops.iter().enumerate() {
        if i > 0 && !load.think.is_zero() {
            thread::sleep(load.think);
        }
        let seq = u64::try_from(i + 1).unwrap_or(u64::MAX);
        let line = format_request(&Request {
            sid,
            seq,
            op: op.clone(),
        });
        let mut rec = RequestRecord {
            session: index,
            sid,
            seq,
            op: op.name(),
            start_ns: unix_ns(),
            end_ns: 0,
            attempts: 0,
            ok: false,
        };
        let wrong = |got: String, expected: String| WrongReply {
            sid,
            seq,
            request: line.trim_end().to_string(),
            got,
            expected,
        };
        let verdict = loop {
            if Instant::now() >= end {
                break Err(None);
            }
            let Some(addr) = load.addrs.get(cur % n_addrs).copied() else {
                break Err(None);
            };
            rec.attempts += 1;
            let got = match attempt(&mut conn, addr, &line, load.timeout) {
                Attempt::Failed => {
                    cur += 1;
                    continue;
                }
                Attempt::Line(l) => l,
            };
            match parse_reply(&got) {
                Some(Reply::Ok {
                    sid: s,
                    seq: q,
                    text,
                }) if s == sid && q == seq => {
                    break model
                        .check(op, &text)
                        .map_err(|e| Some(wrong(got, e.expected)));
                }
                Some(Reply::Err {
                    sid: s,
                    seq: q,
                    reason,
                }) if s == sid && q == seq && (reason == STANDBY || reason == UNAVAILABLE) => {
                    if reason == STANDBY {
                        conn = None;
                        cur += 1;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                _ => break Err(Some(wrong(got, format!("OK {sid} {seq} ...")))),
            }
        };
        rec.end_ns = unix_ns();
        match verdict {
            Ok(()) => {
                rec.ok = true;
                if let Op::Bid { item, amount } = op {
                    out.bids.push(Bid {
                        sid,
                        seq,
                        item: *item,
                        amount: *amount,
                    });
                }
                model.apply(op);
                out.requests.push(rec);
            }
            Err(w) => {
                out.requests.push(rec);
                match w {
                    Some(w) => out.wrong.push(w),
                    None => out.gave_up = true,
                }
                return out;
            }
        }
    }
    out.completed = true;
    out
}

/// Runs the load and reports.
pub fn run(load: &Load) -> Report {
    let start = Instant::now();
    let end = start + load.deadline;
    let outcomes: Vec<Outcome> = thread::scope(|scope| {
        let handles: Vec<_> = (0..load.sessions)
            .map(|index| {
                let delay = load
                    .stagger
                    .saturating_mul(u32::try_from(index).unwrap_or(u32::MAX));
                scope.spawn(move || {
                    thread::sleep(delay);
                    run_session(load, index, end)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut report = Report::default();
    for (index, o) in outcomes.into_iter().enumerate() {
        if o.completed {
            report.completed += 1;
        }
        if o.gave_up {
            report.gave_up.push(sid_of(load.seed, index));
        }
        report.wrong.extend(o.wrong);
        report.requests.extend(o.requests);
        report.bids.extend(o.bids);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_start_with_login_and_end_with_logout() {
        let mut rng = Rng(5);
        let ops = plan(&mut rng, 3, 12, 100);
        assert_eq!(ops.len(), 12);
        assert_eq!(
            ops[0],
            Op::Login {
                user: "user3".into()
            }
        );
        assert_eq!(ops[11], Op::Logout);
        assert!(ops[1..11]
            .iter()
            .all(|o| matches!(o, Op::View { .. } | Op::Bid { .. })));
    }

    #[test]
    fn sids_are_nonzero_and_distinct() {
        let sids: std::collections::HashSet<u64> = (0..1000).map(|i| sid_of(7, i)).collect();
        assert_eq!(sids.len(), 1000);
        assert!(!sids.contains(&0));
    }

    #[test]
    fn the_model_checks_replies() {
        let mut m = Model::default();
        let view = Op::View { item: 4 };
        assert!(m
            .check(&view, "item=4 name=item-4 max=0 nbids=0 views=1")
            .is_ok());
        assert!(m
            .check(&view, "item=4 name=item-4 max=0 nbids=0 views=2")
            .is_err());
        m.apply(&view);
        let bid = Op::Bid {
            item: 4,
            amount: 30,
        };
        assert!(m.check(&bid, "bid#1 total=30 views=1").is_ok());
        assert!(m.check(&bid, "bid#1 total=30 views=0").is_err());
        m.apply(&bid);
        assert!(
            m.check(&view, "item=4 name=item-4 max=20 nbids=1 views=2")
                .is_err(),
            "max below our own bid"
        );
        assert!(m.check(&Op::Logout, "bye bids=1 total=30 views=1").is_ok());
    }
}
