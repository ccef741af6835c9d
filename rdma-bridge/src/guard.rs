//! The Backdoor Guard: what each monitor may read and write, and delayed write agreement.
//!
//! Grants are resolved once, when the bridge starts, from its config and the VM's layout
//! ([`Grants::resolve`]); they are plain data afterwards, so nothing the guest (or a monitor) does can
//! close or widen them. Every READ, READ_BATCH, FETCH_SB and WRITE is checked against them before any
//! guest memory is touched.
//!
//! **Delayed write agreement.** With `k > 1`, a WRITE is a *vote* for `(gpa, bytes)`. The bytes are
//! written only when `k` distinct monitors have voted for exactly the same `(gpa, bytes)` within
//! `window` of the first vote; each voter's WRITE returns then. If the window runs out first, every
//! waiting voter gets [`Outcome::Expired`] and nothing is written. A monitor voting twice counts once.
//! At most [`MAX_PENDING`] distinct writes wait at a time, so memory stays bounded.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use introspect::mem::MemError;

use crate::config::{BridgeConfig, RangeError, RangeSpec};
use crate::tls::TlsError;

/// Most distinct writes waiting for agreement at once.
pub const MAX_PENDING: usize = 64;

/// One monitor's access.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// `(gpa, len)` ranges it may read.
    pub read: Vec<(u64, u64)>,
    /// `(gpa, len)` ranges it may write.
    pub write: Vec<(u64, u64)>,
    /// May restart the guest.
    pub restart: bool,
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
    /// The window ran out; these had voted.
    Expired(Vec<String>),
    /// Writing guest memory failed.
    Failed(String),
    /// Too many writes are waiting.
    Busy,
}

struct Pending {
    gpa: u64,
    bytes: Vec<u8>,
    voters: Vec<String>,
    deadline: Instant,
    done: Option<Outcome>,
    waiters: usize,
}

/// k-of-n agreement on writes.
pub struct Agreement {
    k: usize,
    window: Duration,
    state: Mutex<(u64, HashMap<u64, Pending>)>,
    changed: Condvar,
}

impl Agreement {
    /// `k` identical votes within `window` apply a write.
    pub fn new(k: usize, window: Duration) -> Agreement {
        Agreement {
            k: k.max(1),
            window,
            state: Mutex::new((0, HashMap::new())),
            changed: Condvar::new(),
        }
    }

    /// Votes for writing `bytes` at `gpa` and waits until the write is applied or expires.
    /// `apply` does the write (called once, by the vote that completes the quorum, with the
    /// voters, so that it can record them before writing); `on_vote` is
    /// told of each vote that has to wait, with the number of votes so far.
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
        let found = st
            .1
            .iter()
            .find(|(_, p)| p.done.is_none() && p.gpa == gpa && p.bytes == bytes && now < p.deadline)
            .map(|(id, _)| *id);
        let id = match found {
            Some(id) => id,
            None => {
                if st.1.len() >= MAX_PENDING {
                    return Outcome::Busy;
                }
                st.0 += 1;
                let id = st.0;
                st.1.insert(
                    id,
                    Pending {
                        gpa,
                        bytes: bytes.to_vec(),
                        voters: Vec::new(),
                        deadline: now + self.window,
                        done: None,
                        waiters: 0,
                    },
                );
                id
            }
        };
        let Some(p) = st.1.get_mut(&id) else {
            return Outcome::Failed("agreement state lost".into());
        };
        if !p.voters.iter().any(|v| v == monitor) {
            p.voters.push(monitor.to_owned());
        }
        if p.voters.len() >= self.k {
            let outcome = match apply(&p.voters) {
                Ok(()) => Outcome::Applied(p.voters.clone()),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            p.done = Some(outcome.clone());
            if p.waiters == 0 {
                st.1.remove(&id);
            }
            self.changed.notify_all();
            return outcome;
        }
        on_vote(p.voters.len());
        p.waiters += 1;
        loop {
            let Some(p) = st.1.get_mut(&id) else {
                return Outcome::Failed("agreement state lost".into());
            };
            if p.done.is_none() && Instant::now() >= p.deadline {
                p.done = Some(Outcome::Expired(p.voters.clone()));
            }
            if let Some(outcome) = p.done.clone() {
                p.waiters -= 1;
                if p.waiters == 0 {
                    st.1.remove(&id);
                }
                return outcome;
            }
            let wait = p.deadline.saturating_duration_since(Instant::now());
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
            restart: false,
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
}
