//! The front end: client sessions in State Boxes, the fenced BID, import and takeover.
//!
//! One [`Front`] behind one mutex holds the Region, the database client and the sessions:
//! requests are executed one at a time. The rules that make failover exactly-once:
//! - every state change is exported to the session's box before the reply that reveals it;
//! - a BID exports a pending record before its transaction, and its committed state after;
//! - every reply is preceded by proof that this front end still owns the service: the BID's
//!   transaction checks the epoch under a share lock, every other reply re-reads the epoch
//!   after its export. A front end that finds a newer epoch is fenced: it forgets its sessions
//!   and answers `standby` from then on.

mod admin;
pub mod crash;
pub mod server;
pub mod vip;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use statebox::{BoxHandle, Region, RegionError};

use crate::db::{BidOutcome, Db, DbError};
use crate::proto::{Op, Request, STANDBY, UNAVAILABLE};
use crate::session::{self, SessionState};
use crash::{Crash, CrashPoint};
use vip::{Vip, VipError};

pub use admin::serve_admin;

/// What a front end is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its name (the `owner` it writes when it takes over).
    pub name: String,
    /// State Box slots (= most sessions at once).
    pub slots: u32,
    /// Bytes of one box.
    pub capacity: u32,
    /// The database connection string.
    pub db: String,
    /// The service IP to add on takeover.
    pub vip: Option<Vip>,
    /// Crash injection (tests).
    pub crash: Option<Crash>,
    /// How long a logged-out session's box is kept to answer a retried LOGOUT.
    pub linger: Duration,
}

/// Whether the front end serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Waits for IMPORT and TAKEOVER; answers clients `standby`.
    Standby,
    /// Owns the service at this epoch.
    Primary(i64),
    /// Found a newer owner (its epoch); forgot its sessions; answers clients `standby`.
    Fenced(i64),
}

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The State Box region refused.
    #[error("state box region: {0}")]
    Region(#[from] RegionError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The service IP could not be added (the front end serves all the same).
    #[error("serving, but the service IP was not added: {0}")]
    Vip(#[from] VipError),
    /// IMPORT into a serving front end.
    #[error("this front end serves (epoch {0}): import only into a standby")]
    Serving(i64),
    /// An imported record is not a valid session.
    #[error("record {index} (session {id}): {why}")]
    Record {
        /// Its position from 0.
        index: usize,
        /// Its session id.
        id: u64,
        /// What is wrong.
        why: String,
    },
    /// Not enough free slots for the imported sessions.
    #[error("{need} new sessions but {free} free slots: restart with more --slots")]
    Full {
        /// New sessions in the import.
        need: usize,
        /// Free slots.
        free: usize,
    },
}

/// What TAKEOVER did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takeover {
    /// The new epoch.
    pub epoch: i64,
    /// Sessions held.
    pub sessions: usize,
    /// Pending BIDs settled.
    pub resolved: usize,
}

struct Session {
    state: SessionState,
    handle: BoxHandle,
    closed_at: Option<Instant>,
}

/// The front end's state.
pub struct Front {
    cfg: Config,
    region: Region,
    db: Db,
    sessions: HashMap<u64, Session>,
    role: Role,
    bids_executed: u64,
}

/// Why a request was refused; its `Display` is the reason of the `ERR` reply. `Standby` and
/// `Unavailable` are the two a client retries (elsewhere, or later); every other one is final.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// This front end does not serve (a standby, or fenced by a newer owner).
    #[error("{}", STANDBY)]
    Standby,
    /// The database could not be reached or failed; the outcome is settled on a retry.
    #[error("{}", UNAVAILABLE)]
    Unavailable,
    /// No such session, and the request is not its LOGIN with seq 1.
    #[error("unknown session: LOGIN with seq 1 first")]
    UnknownSession,
    /// The session vanished while the request ran (fenced meanwhile).
    #[error("unknown session")]
    Vanished,
    /// A sequence number other than the last one (a retry) or the next one.
    #[error("out of order: this session expects seq {expected}")]
    OutOfOrder {
        /// The next sequence number.
        expected: u64,
    },
    /// The session logged out.
    #[error("session closed")]
    Closed,
    /// LOGIN on a session that exists.
    #[error("already logged in")]
    AlreadyLoggedIn,
    /// No such item.
    #[error("no item {0}")]
    NoItem(i32),
    /// The session's own rules refused it.
    #[error(transparent)]
    Session(#[from] session::SessionError),
    /// The session's state could not be exported to its State Box.
    #[error("session state not exported ({0}); raise --capacity")]
    NotExported(String),
    /// No State Box slot for a new session.
    #[error("no session slot: {0}")]
    NoSlot(String),
}

fn unavailable(e: &DbError) -> Refusal {
    tracing::warn!("database: {e}");
    Refusal::Unavailable
}

impl Front {
    /// A standby front end with an empty Region at the fixed State Box address.
    pub fn new(cfg: Config) -> Result<Front, FrontError> {
        let region = Region::create(cfg.slots, cfg.capacity)?;
        let db = Db::new(&cfg.db);
        Ok(Front {
            cfg,
            region,
            db,
            sessions: HashMap::new(),
            role: Role::Standby,
            bids_executed: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Connects to the database now (creating the schema), to fail early.
    pub fn connect_db(&mut self) -> Result<(), DbError> {
        self.db.connect()
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// `(sessions held, of which open)`.
    pub fn counts(&self) -> (usize, usize) {
        let open = self
            .sessions
            .values()
            .filter(|s| !s.state.core.closed)
            .count();
        (self.sessions.len(), open)
    }

    /// Executes a request; the reply text or the reason of a refusal.
    pub fn handle(&mut self, req: &Request) -> Result<String, Refusal> {
        let Role::Primary(epoch) = self.role else {
            return Err(Refusal::Standby);
        };
        self.reap_expired();
        let sid = req.sid;
        let Some(s) = self.sessions.get(&sid) else {
            return match &req.op {
                Op::Login { user } if req.seq == 1 => self.login(epoch, sid, user),
                _ => Err(Refusal::UnknownSession),
            };
        };
        if s.state.pending.is_some() {
            // Left by a failed transaction whose outcome was not known: settle it first.
            self.settle(sid).map_err(|e| unavailable(&e))?;
        }
        let core = self.core(sid)?;
        if req.seq == core.last_seq {
            self.verify(epoch)?;
            return Ok(core.last_reply);
        }
        if Some(req.seq) != core.last_seq.checked_add(1) {
            return Err(Refusal::OutOfOrder {
                expected: core.last_seq.saturating_add(1),
            });
        }
        if core.closed {
            return Err(Refusal::Closed);
        }
        match &req.op {
            Op::Login { .. } => Err(Refusal::AlreadyLoggedIn),
            Op::View { item } => self.view(epoch, sid, *item),
            Op::Bid { item, amount } => self.bid(epoch, sid, *item, *amount),
            Op::Logout => self.logout(epoch, sid),
        }
    }

    fn core(&self, sid: u64) -> Result<session::Core, Refusal> {
        self.sessions
            .get(&sid)
            .map(|s| s.state.core.clone())
            .ok_or(Refusal::Vanished)
    }

    /// Proof of ownership before a reply: the epoch is still ours. A newer one fences us.
    fn verify(&mut self, epoch: i64) -> Result<(), Refusal> {
        match self.db.epoch() {
            Ok(e) if e == epoch => Ok(()),
            Ok(newer) => {
                self.fence(newer);
                Err(Refusal::Standby)
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Another front end owns the service: forget every session (their state lives on there).
    fn fence(&mut self, newer: i64) {
        tracing::warn!(
            newer,
            "fenced: another front end took over; dropping all sessions"
        );
        self.role = Role::Fenced(newer);
        if let Some(vip) = &self.cfg.vip {
            vip.remove();
        }
        for (_, s) in self.sessions.drain() {
            if let Err(e) = self.region.delete(s.handle) {
                tracing::warn!("deleting a fenced session's box: {e}");
            }
        }
    }

    /// Exports `state` to the session's box, then keeps it in memory.
    fn store(&mut self, sid: u64, state: SessionState) -> Result<(), Refusal> {
        let s = self.sessions.get_mut(&sid).ok_or(Refusal::Vanished)?;
        self.region
            .export(&s.handle, &session::encode(&state))
            .map_err(|e| Refusal::NotExported(e.to_string()))?;
        s.state = state;
        Ok(())
    }

    fn login(&mut self, epoch: i64, sid: u64, user: &str) -> Result<String, Refusal> {
        let handle = match self.region.create_box(sid) {
            Ok(h) => h,
            Err(_) if self.reap_oldest() => self
                .region
                .create_box(sid)
                .map_err(|e| Refusal::NoSlot(e.to_string()))?,
            Err(e) => return Err(Refusal::NoSlot(e.to_string())),
        };
        let core = session::login(user);
        let reply = core.last_reply.clone();
        let state = SessionState {
            core,
            pending: None,
        };
        self.sessions.insert(
            sid,
            Session {
                state: state.clone(),
                handle,
                closed_at: None,
            },
        );
        if let Err(e) = self.store(sid, state) {
            self.forget(sid);
            return Err(e);
        }
        self.verify(epoch)?;
        Ok(reply)
    }

    /// Stores `next` (nothing in flight) as the session's state and returns its last reply.
    fn store_settled(&mut self, sid: u64, next: session::Core) -> Result<String, Refusal> {
        let reply = next.last_reply.clone();
        self.store(
            sid,
            SessionState {
                core: next,
                pending: None,
            },
        )?;
        Ok(reply)
    }

    fn view(&mut self, epoch: i64, sid: u64, item: i32) -> Result<String, Refusal> {
        let info = self
            .db
            .item(item)
            .map_err(|e| unavailable(&e))?
            .ok_or(Refusal::NoItem(item))?;
        let next = self.core(sid)?.view(item, &info)?;
        let reply = self.store_settled(sid, next)?;
        self.verify(epoch)?;
        Ok(reply)
    }

    fn bid(&mut self, epoch: i64, sid: u64, item: i32, amount: i64) -> Result<String, Refusal> {
        let core = self.core(sid)?;
        let pending = core.bid(item, amount)?;
        self.store(
            sid,
            SessionState {
                core: core.clone(),
                pending: Some(pending.clone()),
            },
        )?;
        self.bids_executed += 1;
        let (crash, n) = (self.cfg.crash, self.bids_executed);
        let outcome = self.db.bid(epoch, sid, pending.seq, item, amount, &mut || {
            Crash::maybe(crash, CrashPoint::Pending, n);
        });
        match outcome {
            Ok(BidOutcome::Committed) => {
                Crash::maybe(crash, CrashPoint::Commit, n);
                self.store(
                    sid,
                    SessionState {
                        core: core.commit(&pending),
                        pending: None,
                    },
                )?;
                Ok(pending.reply)
            }
            Ok(BidOutcome::Fenced(newer)) => {
                self.fence(newer);
                Err(Refusal::Standby)
            }
            Ok(BidOutcome::NoItem) => {
                self.store(
                    sid,
                    SessionState {
                        core,
                        pending: None,
                    },
                )?;
                Err(Refusal::NoItem(item))
            }
            Err(e) => {
                tracing::warn!("BID transaction failed, settling it: {e}");
                match self.settle(sid) {
                    Ok(true) => Ok(pending.reply),
                    Ok(false) => Err(Refusal::Unavailable),
                    Err(e) => Err(unavailable(&e)),
                }
            }
        }
    }

    fn logout(&mut self, epoch: i64, sid: u64) -> Result<String, Refusal> {
        let next = self.core(sid)?.logout()?;
        let reply = self.store_settled(sid, next)?;
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.closed_at = Some(Instant::now());
        }
        self.verify(epoch)?;
        Ok(reply)
    }

    /// Settles a session's pending BID: committed ⇒ adopt its state, else drop it. Returns
    /// whether it had committed; `Ok(false)` too if there was nothing pending.
    fn settle(&mut self, sid: u64) -> Result<bool, DbError> {
        let Some(state) = self.sessions.get(&sid).map(|s| s.state.clone()) else {
            return Ok(false);
        };
        let Some(pending) = state.pending else {
            return Ok(false);
        };
        let committed = self.db.committed(sid, pending.seq)?;
        let core = if committed {
            state.core.commit(&pending)
        } else {
            state.core
        };
        if let Err(e) = self.store(
            sid,
            SessionState {
                core,
                pending: None,
            },
        ) {
            tracing::error!("session {sid}: settled state not exported: {e}");
        }
        Ok(committed)
    }

    fn forget(&mut self, sid: u64) {
        if let Some(s) = self.sessions.remove(&sid) {
            if let Err(e) = self.region.delete(s.handle) {
                tracing::warn!("deleting session {sid}'s box: {e}");
            }
        }
    }

    fn reap_expired(&mut self) {
        let linger = self.cfg.linger;
        let expired: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.closed_at.is_some_and(|t| t.elapsed() >= linger))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in expired {
            self.forget(sid);
        }
    }

    /// Frees the slot of the session logged out longest ago; false if none is logged out.
    fn reap_oldest(&mut self) -> bool {
        let oldest = self
            .sessions
            .iter()
            .filter_map(|(sid, s)| s.closed_at.map(|t| (t, *sid)))
            .min();
        match oldest {
            Some((_, sid)) => {
                self.forget(sid);
                true
            }
            None => false,
        }
    }

    /// Takes over the service: claim the next epoch (waits for the old owner's BID transaction
    /// to end), settle every imported pending BID, add the service IP, serve. On a front end
    /// that already serves, reports its state and changes nothing.
    pub fn takeover(&mut self) -> Result<Takeover, FrontError> {
        if let Role::Primary(epoch) = self.role {
            return Ok(Takeover {
                epoch,
                sessions: self.sessions.len(),
                resolved: 0,
            });
        }
        let epoch = self.db.claim(&self.cfg.name)?;
        let pending: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.state.pending.is_some())
            .map(|(sid, _)| *sid)
            .collect();
        for sid in &pending {
            let committed = self.settle(*sid)?;
            tracing::info!(sid, committed, "settled an imported pending BID");
        }
        let done = Takeover {
            epoch,
            sessions: self.sessions.len(),
            resolved: pending.len(),
        };
        let vip = self.cfg.vip.as_ref().map(Vip::add);
        self.role = Role::Primary(epoch);
        tracing::info!(epoch, sessions = done.sessions, "serving");
        vip.transpose()?;
        Ok(done)
    }

    /// Imports sessions (box data as extracted from a failed front end) into this standby's own
    /// Region: all of them or, on any bad record, none. A session already here is replaced.
    pub fn import(&mut self, records: Vec<(u64, Vec<u8>)>) -> Result<usize, FrontError> {
        if let Role::Primary(epoch) = self.role {
            return Err(FrontError::Serving(epoch));
        }
        let mut states = Vec::with_capacity(records.len());
        let mut seen = HashSet::new();
        for (index, (id, data)) in records.iter().enumerate() {
            let bad = |why: String| FrontError::Record {
                index,
                id: *id,
                why,
            };
            if *id == 0 || !seen.insert(*id) {
                return Err(bad("session id is 0 or repeated".to_string()));
            }
            let state = session::decode(data).map_err(|e| bad(e.to_string()))?;
            if session::encode(&state).len() > usize::try_from(self.cfg.capacity).unwrap_or(0) {
                return Err(bad("does not fit this front end's --capacity".to_string()));
            }
            states.push((*id, state));
        }
        let free = usize::try_from(self.cfg.slots)
            .unwrap_or(0)
            .saturating_sub(self.region.boxes().len());
        let need = states
            .iter()
            .filter(|(id, _)| !self.sessions.contains_key(id))
            .count();
        if need > free {
            return Err(FrontError::Full { need, free });
        }
        let mut created = Vec::new();
        for (id, _) in states
            .iter()
            .filter(|(id, _)| !self.sessions.contains_key(id))
        {
            match self.region.create_box(*id) {
                Ok(h) => created.push(h),
                Err(e) => {
                    for h in created {
                        let _ = self.region.delete(h);
                    }
                    return Err(e.into());
                }
            }
        }
        for h in created {
            let placeholder = SessionState {
                core: session::login("import"),
                pending: None,
            };
            self.sessions.insert(
                h.id,
                Session {
                    state: placeholder,
                    handle: h,
                    closed_at: None,
                },
            );
        }
        let n = states.len();
        let now = Instant::now();
        for (index, (id, state)) in states.into_iter().enumerate() {
            let closed = state.core.closed;
            self.store(id, state).map_err(|e| FrontError::Record {
                index,
                id,
                why: e.to_string(),
            })?;
            if let Some(s) = self.sessions.get_mut(&id) {
                s.closed_at = closed.then_some(now);
            }
        }
        tracing::info!(n, "imported sessions");
        Ok(n)
    }
}
