//! The Backdoor Guard: what each monitor may read and write, and delayed write agreement.
//!
//! Grants are resolved once, when the bridge starts, from its config and the VM's layout
//! ([`Grants::resolve`]); they are plain data afterwards, so nothing the guest (or a monitor) does can
//! close or widen them. Every READ, READ_BATCH, FETCH_SB and WRITE is checked against them before any
//! guest memory is touched.
//!
//! **Delayed write agreement.** With `k > 1`, a WRITE is a *vote* for `(gpa, bytes)`. Each vote is
//! valid for `window` after *it* was cast (so a monitor that votes early cannot shorten the window
//! of the monitors that vote after it). The bytes are written, as one copy, when `k` distinct
//! monitors hold unexpired votes for exactly the same `(gpa, bytes)`; each waiting voter's WRITE
//! returns then. A voter whose own vote runs out first gets [`Outcome::Expired`] and nothing is
//! written for it. A monitor voting twice counts once. At most [`MAX_PENDING`] distinct writes wait
//! at a time, and at most [`MAX_PENDING_PER_MONITOR`] of them carry one monitor's vote, so memory
//! stays bounded and one monitor cannot take every slot.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use introspect::mem::MemError;

use crate::config::{BridgeConfig, RangeError, RangeSpec};
use crate::tls::TlsError;

/// Most distinct writes waiting for agreement at once.
pub const MAX_PENDING: usize = 64;
/// Most distinct writes one monitor may have waiting for agreement at once.
pub const MAX_PENDING_PER_MONITOR: usize = 4;

/// One monitor's access.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// `(gpa, len)` ranges it may read.
    pub read: Vec<(u64, u64)>,
    /// `(gpa, len)` ranges it may write.
    pub write: Vec<(u64, u64)>,
    /// May restart the guest.
    pub restart: bool,
    /// May take the pause lock (and vote on writes under k-of-n agreement).
    pub lock: bool,
    /// May read vCPU registers.
    pub regs: bool,
}

fn inside(ranges: &[(u64, u64)], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    ranges
        .iter()
        .any(|&(g, l)| gpa >= g && end <= g.saturating_add(l))
}

impl Grant {
    /// True if `[gpa, gpa + len)` lies inside one readable range.
    pub fn may_read(&self, gpa: u64, len: u64) -> bool {
        inside(&self.read, gpa, len)
    }
    /// True if `[gpa, gpa + len)` lies inside one writable range.
    pub fn may_write(&self, gpa: u64, len: u64) -> bool {
        inside(&self.write, gpa, len)
    }
}

/// Every monitor's grant, keyed by certificate fingerprint.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    by_fingerprint: HashMap<String, (String, Grant)>,
}

/// Why the grants could not be resolved at start.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// A range spec.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A monitor's certificate.
    #[error("monitor {monitor:?}: certificate {cert}: {source}")]
    Cert {
        /// The monitor.
        monitor: String,
        /// Its certificate file.
        cert: String,
        /// Why it cannot be read.
        source: TlsError,
    },
    /// Two monitors with one certificate.
    #[error("monitor {0:?} shares its certificate with another monitor")]
    SharedCert(String),
    /// An `[rdma]` section in a bridge built without verbs.
    #[error(
        "the config has an [rdma] section but this bridge was built without the `verbs` feature"
    )]
    NoVerbs,
}

impl Grants {
    /// Resolves the config's ranges against the VM's layout. `fingerprint(path)` gives the SHA-256
    /// of a monitor's certificate file.
    pub fn resolve(
        cfg: &BridgeConfig,
        ram: &[(u64, u64)],
        backdoor: (u64, u64),
        fingerprint: impl Fn(&std::path::Path) -> Result<String, TlsError>,
    ) -> Result<Grants, GrantError> {
        let mut by_fingerprint = HashMap::new();
        for m in &cfg.monitors {
            let resolve = |specs: &[String]| -> Result<Vec<(u64, u64)>, GrantError> {
                let mut out = Vec::new();
                for s in specs {
                    out.extend(RangeSpec::parse(s)?.resolve(ram, backdoor));
                }
                Ok(out)
            };
            let grant = Grant {
                read: resolve(&m.read)?,
                write: resolve(&m.write)?,
                restart: m.restart,
                lock: m.lock,
                regs: m.regs,
            };
            let fp = fingerprint(&m.cert).map_err(|source| GrantError::Cert {
                monitor: m.name.clone(),
                cert: m.cert.display().to_string(),
                source,
            })?;
            if by_fingerprint.insert(fp, (m.name.clone(), grant)).is_some() {
                return Err(GrantError::SharedCert(m.name.clone()));
            }
        }
        Ok(Grants { by_fingerprint })
    }

    /// Every monitor's name and grant.
    pub fn iter(&self) -> impl Iterator<Item = &(String, Grant)> {
        self.by_fingerprint.values()
    }

    /// The monitor name and grant for a certificate fingerprint.
    pub fn lookup(&self, fingerprint: &str) -> Option<&(String, Grant)> {
        self.by_fingerprint.get(fingerprint)
    }
}

/// What became of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written; these monitors agreed (in vote order).
    Applied(Vec<String>),
    /// This vote ran out before k agreed; these had unexpired votes then (this one included).
    Expired(Vec<String>),
    /// Writing guest memory failed.
    Failed(String),
    /// Too many writes are waiting, in all or from this monitor.
    Busy(String),
}

struct Vote {
    monitor: String,
    expires: Instant,
}

struct Pending {
    gpa: u64,
    bytes: Vec<u8>,
    votes: Vec<Vote>,
    done: Option<Outcome>,
    waiters: usize,
}

impl Pending {
    fn live_voters(&self, now: Instant) -> Vec<String> {
        self.votes
            .iter()
            .filter(|v| now < v.expires)
            .map(|v| v.monitor.clone())
            .collect()
    }
}

/// k-of-n agreement on writes.
pub struct Agreement {
    k: usize,
    window: Duration,
    state: Mutex<(u64, HashMap<u64, Pending>)>,
    changed: Condvar,
}

impl Agreement {
    /// `k` identical votes, each at most `window` old, apply a write.
    pub fn new(k: usize, window: Duration) -> Agreement {
        Agreement {
            k: k.max(1),
            window,
            state: Mutex::new((0, HashMap::new())),
            changed: Condvar::new(),
        }
    }

    /// How many monitors must agree.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Votes for writing `bytes` at `gpa` and waits until the write is applied or this vote
    /// expires. `apply` does the write (called once, by the vote that completes the quorum, with
    /// the voters, so that it can record them before writing); `on_vote` is told of each vote that
    /// has to wait, with the number of unexpired votes so far.
    pub fn vote(
        &self,
        monitor: &str,
        gpa: u64,
        bytes: &[u8],
        apply: impl FnOnce(&[String]) -> Result<(), MemError>,
        on_vote: impl FnOnce(usize),
    ) -> Outcome {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let now = Instant::now();
        let mine = now + self.window;
        // Votes whose voter stopped waiting (expired) are dropped with the last waiter; prune any
        // expired vote of writes nobody waits for any more.
        st.1.retain(|_, p| p.waiters > 0 || p.done.is_some());
        let found =
            st.1.iter()
                .find(|(_, p)| p.done.is_none() && p.gpa == gpa && p.bytes == bytes)
                .map(|(id, _)| *id);
        let id = match found {
            Some(id) => id,
            None => {
                let by_me = st
                    .1
                    .values()
                    .filter(|p| p.done.is_none() && p.votes.iter().any(|v| v.monitor == monitor))
                    .count();
                if by_me >= MAX_PENDING_PER_MONITOR {
                    return Outcome::Busy(format!(
                        "monitor {monitor} already has {by_me} writes waiting for agreement (at most {MAX_PENDING_PER_MONITOR}); retry when they are applied or expired"
                    ));
                }
                if st.1.len() >= MAX_PENDING {
                    return Outcome::Busy(format!(
                        "{MAX_PENDING} writes are waiting for agreement; retry"
                    ));
                }
                st.0 += 1;
                let id = st.0;
                st.1.insert(
                    id,
                    Pending {
                        gpa,
                        bytes: bytes.to_vec(),
                        votes: Vec::new(),
                        done: None,
                        waiters: 0,
                    },
                );
                id
            }
        };
        let k = self.k;
        let Some(p) = st.1.get_mut(&id) else {
            return Outcome::Failed("agreement state lost".into());
        };
        match p.votes.iter_mut().find(|v| v.monitor == monitor) {
            Some(v) => v.expires = v.expires.max(mine),
            None => p.votes.push(Vote {
                monitor: monitor.to_owned(),
                expires: mine,
            }),
        }
        let live = p.live_voters(now);
        if live.len() >= k {
            let outcome = match apply(&live) {
                Ok(()) => Outcome::Applied(live),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            p.done = Some(outcome.clone());
            if p.waiters == 0 {
                st.1.remove(&id);
            }
            self.changed.notify_all();
            return outcome;
        }
        on_vote(live.len());
        p.waiters += 1;
        loop {
            let Some(p) = st.1.get_mut(&id) else {
                return Outcome::Failed("agreement state lost".into());
            };
            let now = Instant::now();
            let outcome = match p.done.clone() {
                Some(o) => Some(o),
                None if now >= mine => {
                    let mut voters = p.live_voters(now);
                    if !voters.iter().any(|v| v == monitor) {
                        voters.push(monitor.to_owned());
                    }
                    // This monitor's vote ends with its wait (unless it voted again later).
                    p.votes.retain(|v| v.monitor != monitor || now < v.expires);
                    Some(Outcome::Expired(voters))
                }
                None => None,
            };
            if let Some(outcome) = outcome {
                p.waiters -= 1;
                if p.waiters == 0 && (p.done.is_some() || p.votes.is_empty()) {
                    st.1.remove(&id);
                }
                return outcome;
            }
            let wait = mine.saturating_duration_since(now);
            st = match self.changed.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn grants_check_whole_ranges_and_overflow() {
        let g = Grant {
            read: vec![(0x1000, 0x1000)],
            write: vec![(0x2000, 0x40)],
            ..Grant::default()
        };
        assert!(g.may_read(0x1000, 0x1000));
        assert!(!g.may_read(0x1000, 0x1001));
        assert!(!g.may_read(0xfff, 2));
        assert!(!g.may_read(u64::MAX, 2));
        assert!(g.may_write(0x2010, 0x30));
        assert!(!g.may_write(0x2010, 0x31));
        assert!(!g.may_write(0x1000, 1));
    }

    #[test]
    fn one_vote_applies_when_k_is_one() {
        let a = Agreement::new(1, Duration::from_millis(50));
        let out = a.vote("m1", 8, b"x", |_| Ok(()), |_| panic!("waited"));
        assert_eq!(out, Outcome::Applied(vec!["m1".into()]));
    }

    #[test]
    fn two_of_three_agree_and_a_lone_vote_expires() {
        let a = Arc::new(Agreement::new(2, Duration::from_millis(300)));
        let applied = Arc::new(AtomicUsize::new(0));
        let t = {
            let (a, applied) = (a.clone(), applied.clone());
            std::thread::spawn(move || {
                a.vote(
                    "m1",
                    8,
                    b"kill",
                    |_| {
                        applied.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                    |_| {},
                )
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        // A different write does not count towards m1's.
        let a3 = a.clone();
        let lone =
            std::thread::spawn(move || a3.vote("m3", 8, b"kilo", |_| panic!("applied"), |_| {}));
        std::thread::sleep(Duration::from_millis(30));
        let out = a.vote(
            "m2",
            8,
            b"kill",
            |_| {
                applied.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
            |_| {},
        );
        assert_eq!(out, Outcome::Applied(vec!["m1".into(), "m2".into()]));
        assert_eq!(t.join().unwrap(), out);
        assert_eq!(applied.load(Ordering::SeqCst), 1);
        assert_eq!(lone.join().unwrap(), Outcome::Expired(vec!["m3".into()]));
    }

    #[test]
    fn a_monitor_voting_twice_counts_once() {
        let a = Arc::new(Agreement::new(2, Duration::from_millis(100)));
        let b = a.clone();
        let t = std::thread::spawn(move || b.vote("m1", 0, b"z", |_| panic!("applied"), |_| {}));
        std::thread::sleep(Duration::from_millis(10));
        let out = a.vote("m1", 0, b"z", |_| panic!("applied"), |_| {});
        assert_eq!(out, Outcome::Expired(vec!["m1".into()]));
        assert_eq!(t.join().unwrap(), out);
        assert!(a.state.lock().unwrap().1.is_empty(), "state leaked");
    }

    #[test]
    fn one_monitor_cannot_take_every_pending_slot() {
        let a = Arc::new(Agreement::new(2, Duration::from_millis(1500)));
        let waiting: Vec<_> = (0..MAX_PENDING_PER_MONITOR)
            .map(|i| {
                let a = a.clone();
                std::thread::spawn(move || {
                    a.vote("hog", 8, &[u8::try_from(i).unwrap()], |_| Ok(()), |_| {})
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.state.lock().unwrap().1.len() < MAX_PENDING_PER_MONITOR {
            assert!(Instant::now() < deadline, "the hog's votes never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        // One more from the hog is refused at once; another monitor's vote is taken.
        let out = a.vote("hog", 8, b"one more", |_| panic!("applied"), |_| {});
        assert!(
            matches!(&out, Outcome::Busy(m) if m.contains("hog")),
            "{out:?}"
        );
        let a2 = a.clone();
        let honest = std::thread::spawn(move || a2.vote("m1", 16, b"kill", |_| Ok(()), |_| {}));
        let out = sorted(a.vote("m2", 16, b"kill", |_| Ok(()), |_| {}));
        assert_eq!(out, Outcome::Applied(vec!["m1".into(), "m2".into()]));
        assert_eq!(sorted(honest.join().unwrap()), out);
        for t in waiting {
            assert!(matches!(t.join().unwrap(), Outcome::Expired(_)));
        }
    }

    fn sorted(o: Outcome) -> Outcome {
        match o {
            Outcome::Applied(mut v) => {
                v.sort();
                Outcome::Applied(v)
            }
            o => o,
        }
    }

    #[test]
    fn an_early_vote_does_not_shorten_the_window_of_later_ones() {
        // k = 3. A hostile monitor votes first; an honest one votes well inside that window, two
        // more after it ended. Each vote counts for its own window, so the three honest votes
        // agree (with one window for the whole write, set by the first vote, they never could).
        let a = Arc::new(Agreement::new(3, Duration::from_millis(2000)));
        let vote = |who: &'static str| {
            let a = a.clone();
            std::thread::spawn(move || a.vote(who, 8, b"kill", |_| Ok(()), |_| {}))
        };
        let early = vote("hostile");
        std::thread::sleep(Duration::from_millis(800));
        let m1 = vote("m1");
        // Past the hostile vote's window (2000 ms), well inside m1's (2800 ms).
        std::thread::sleep(Duration::from_millis(1500));
        let m2 = vote("m2");
        let out = sorted(a.vote("m3", 8, b"kill", |_| Ok(()), |_| {}));
        let all = Outcome::Applied(vec!["m1".into(), "m2".into(), "m3".into()]);
        assert_eq!(out, all);
        assert_eq!(sorted(m1.join().unwrap()), all);
        assert_eq!(sorted(m2.join().unwrap()), all);
        assert!(matches!(early.join().unwrap(), Outcome::Expired(_)));
        assert!(a.state.lock().unwrap().1.is_empty(), "state leaked");
    }
}
