//! A session's state: what the front end keeps in memory and exports, whole, to the session's
//! State Box after every change (and before the reply that reveals the change).
//!
//! The state is encoded as compact JSON (short keys). [`decode`] is the only way in from an
//! imported box and validates everything: an imported box is the failed front end's claim.

use serde::{Deserialize, Serialize};

use crate::proto::valid_user;

/// How many viewed items a session remembers.
pub const RECENT: usize = 8;
/// Longest reply a session stores (longer ones are refused before anything changes).
pub const MAX_REPLY: usize = 200;

/// The committed part of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Core {
    /// The user who logged in.
    #[serde(rename = "u")]
    pub user: String,
    /// How many VIEWs the session made.
    #[serde(rename = "v")]
    pub views: u64,
    /// The last viewed items, oldest first, at most [`RECENT`].
    #[serde(rename = "r")]
    pub recent: Vec<i32>,
    /// How many BIDs committed.
    #[serde(rename = "b")]
    pub bids: u64,
    /// Sum of the committed BIDs' amounts.
    #[serde(rename = "t")]
    pub total: i64,
    /// The last executed request number.
    #[serde(rename = "s")]
    pub last_seq: u64,
    /// The reply to `last_seq`, resent to a retry.
    #[serde(rename = "l")]
    pub last_reply: String,
    /// LOGOUT executed: only a retry of it is answered.
    #[serde(rename = "c", default, skip_serializing_if = "is_false")]
    pub closed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A BID whose database transaction may be in flight: exported before the transaction starts,
/// so that whoever holds the box afterwards can settle it (found in `bids` ⇒ adopt, else drop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The BID's request number (= `last_seq + 1`).
    #[serde(rename = "s")]
    pub seq: u64,
    /// The item bid on.
    #[serde(rename = "i")]
    pub item: i32,
    /// The amount.
    #[serde(rename = "a")]
    pub amount: i64,
    /// `bids` once committed.
    #[serde(rename = "b")]
    pub bids_after: u64,
    /// `total` once committed.
    #[serde(rename = "t")]
    pub total_after: i64,
    /// The reply once committed.
    #[serde(rename = "r")]
    pub reply: String,
}

/// Everything a session's box holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The committed state.
    #[serde(rename = "k")]
    pub core: Core,
    /// A BID in flight, if any.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// Why a session operation or an imported state was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// The bytes are not a session state.
    #[error("not a session state: {0}")]
    Decode(String),
    /// The decoded state breaks an invariant.
    #[error("invalid session state: {0}")]
    Invalid(&'static str),
    /// The session's bid total would not fit 64 bits.
    #[error("bid total would overflow; bid less")]
    Overflow,
    /// The session's counters would not fit 64 bits.
    #[error("session counters are exhausted; start a new session")]
    Exhausted,
}

/// Facts about an item read from the database for a VIEW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemInfo {
    /// The item's name (whitespace replaced, at most 64 bytes).
    pub name: String,
    /// Highest bid so far (0: none).
    pub max_bid: i64,
    /// Number of bids so far.
    pub nbids: i64,
}

/// The state of a session just opened by LOGIN (seq 1).
pub fn login(user: &str) -> Core {
    Core {
        user: user.to_string(),
        views: 0,
        recent: Vec::new(),
        bids: 0,
        total: 0,
        last_seq: 1,
        last_reply: format!("welcome {user}"),
        closed: false,
    }
}

impl Core {
    fn next_seq(&self) -> Result<u64, SessionError> {
        self.last_seq.checked_add(1).ok_or(SessionError::Exhausted)
    }

    /// The state after a VIEW of `item`, whose reply is in `last_reply`.
    pub fn view(&self, item: i32, info: &ItemInfo) -> Result<Core, SessionError> {
        let mut next = self.clone();
        next.last_seq = self.next_seq()?;
        next.views = self.views.checked_add(1).ok_or(SessionError::Exhausted)?;
        next.recent.push(item);
        if next.recent.len() > RECENT {
            next.recent.remove(0);
        }
        next.last_reply = format!(
            "item={item} name={} max={} nbids={} views={}",
            info.name, info.max_bid, info.nbids, next.views
        );
        Ok(next)
    }

    /// The pending record of a BID of `amount` on `item`.
    pub fn bid(&self, item: i32, amount: i64) -> Result<Pending, SessionError> {
        let seq = self.next_seq()?;
        let bids_after = self.bids.checked_add(1).ok_or(SessionError::Exhausted)?;
        let total_after = self
            .total
            .checked_add(amount)
            .ok_or(SessionError::Overflow)?;
        Ok(Pending {
            seq,
            item,
            amount,
            bids_after,
            total_after,
            reply: format!("bid#{bids_after} total={total_after} views={}", self.views),
        })
    }

    /// The state once `pending` committed.
    pub fn commit(&self, pending: &Pending) -> Core {
        let mut next = self.clone();
        next.last_seq = pending.seq;
        next.bids = pending.bids_after;
        next.total = pending.total_after;
        next.last_reply = pending.reply.clone();
        next
    }

    /// The state after LOGOUT: closed, only a retry of the LOGOUT is answered.
    pub fn logout(&self) -> Result<Core, SessionError> {
        let mut next = self.clone();
        next.last_seq = self.next_seq()?;
        next.closed = true;
        next.last_reply = format!(
            "bye bids={} total={} views={}",
            self.bids, self.total, self.views
        );
        Ok(next)
    }
}

/// Encodes a state for its box.
pub fn encode(state: &SessionState) -> Vec<u8> {
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(state).unwrap_or_default()
}

/// Decodes and validates a state read from a box.
pub fn decode(bytes: &[u8]) -> Result<SessionState, SessionError> {
    let state: SessionState =
        serde_json::from_slice(bytes).map_err(|e| SessionError::Decode(e.to_string()))?;
    validate(&state)?;
    Ok(state)
}

fn validate(s: &SessionState) -> Result<(), SessionError> {
    let c = &s.core;
    if !valid_user(&c.user) {
        return Err(SessionError::Invalid("bad user name"));
    }
    if c.recent.len() > RECENT || c.recent.iter().any(|&i| i <= 0) {
        return Err(SessionError::Invalid("bad recent items"));
    }
    if c.last_seq == 0 || c.last_reply.len() > MAX_REPLY || c.last_reply.contains('\n') {
        return Err(SessionError::Invalid("bad last request"));
    }
    if c.total < 0 || (c.bids == 0 && c.total != 0) {
        return Err(SessionError::Invalid("bad bid totals"));
    }
    if let Some(p) = &s.pending {
        let ok = !c.closed
            && Some(p.seq) == c.last_seq.checked_add(1)
            && p.item > 0
            && p.amount > 0
            && Some(p.bids_after) == c.bids.checked_add(1)
            && Some(p.total_after) == c.total.checked_add(p.amount)
            && p.reply.len() <= MAX_REPLY
            && !p.reply.contains('\n');
        if !ok {
            return Err(SessionError::Invalid("bad pending bid"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ItemInfo {
        ItemInfo {
            name: "item-4".into(),
            max_bid: 10,
            nbids: 2,
        }
    }

    #[test]
    fn a_session_runs_and_round_trips() {
        let c = login("ann");
        assert_eq!(c.last_reply, "welcome ann");
        let c = c.view(4, &info()).unwrap();
        assert_eq!(c.last_reply, "item=4 name=item-4 max=10 nbids=2 views=1");
        let p = c.bid(4, 30).unwrap();
        assert_eq!(p.seq, 3);
        assert_eq!(p.reply, "bid#1 total=30 views=1");
        let pending = SessionState {
            core: c.clone(),
            pending: Some(p.clone()),
        };
        assert_eq!(decode(&encode(&pending)).unwrap(), pending);
        let c = c.commit(&p);
        let c = c.logout().unwrap();
        assert_eq!(c.last_reply, "bye bids=1 total=30 views=1");
        assert!(c.closed);
        let s = SessionState {
            core: c,
            pending: None,
        };
        assert_eq!(decode(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn recent_keeps_the_last_eight() {
        let mut c = login("bob");
        for i in 1..=10 {
            c = c.view(i, &info()).unwrap();
        }
        assert_eq!(c.recent, (3..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_worst_case_state_fits_the_default_capacity() {
        let mut c = login(&"u".repeat(32));
        let big = ItemInfo {
            name: "n".repeat(64),
            max_bid: i64::MAX,
            nbids: i64::MAX,
        };
        for _ in 0..RECENT {
            c = c.view(i32::MAX, &big).unwrap();
        }
        c.views = u64::MAX - 1;
        c.last_seq = u64::MAX - 2;
        c.bids = u64::MAX - 1;
        c.total = i64::MAX / 2;
        let p = c.bid(i32::MAX, i64::MAX / 2).unwrap();
        let s = SessionState {
            core: c,
            pending: Some(p),
        };
        let n = encode(&s).len();
        assert!(n <= 1024, "{n} bytes");
    }

    #[test]
    fn bad_states_are_refused() {
        assert!(matches!(decode(b"\xff\x00"), Err(SessionError::Decode(_))));
        let mut s = SessionState {
            core: login("ann"),
            pending: None,
        };
        s.core.user = "a b".into();
        assert!(decode(&encode(&s)).is_err());
        let c = login("ann");
        let mut p = c.bid(1, 5).unwrap();
        p.total_after = 6;
        let s = SessionState {
            core: c,
            pending: Some(p),
        };
        assert_eq!(
            decode(&encode(&s)),
            Err(SessionError::Invalid("bad pending bid"))
        );
    }

    #[test]
    fn overflow_is_refused() {
        let mut c = login("ann");
        c.bids = 1;
        c.total = i64::MAX;
        assert_eq!(c.bid(1, 1), Err(SessionError::Overflow));
    }
}
