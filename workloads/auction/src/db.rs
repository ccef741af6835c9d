//! The database tier: schema, the fenced BID transaction, the takeover's claim, in-doubt
//! resolution, and the after-run consistency [`check`].
//!
//! Fencing: the `service` row holds the owner's epoch. A BID transaction first takes that row
//! `FOR SHARE` and aborts unless the epoch is still the front end's own; a takeover
//! `UPDATE`s the row (epoch + 1), which waits for every BID transaction holding the share lock.
//! Once the update committed, no BID of an older owner can commit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::session::ItemInfo;

/// Number of items a fresh database is seeded with.
pub const ITEMS: i32 = 100;

/// A database failure. The connection is dropped and made again on next use.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Connecting failed.
    #[error("cannot connect to the database ({conninfo}): {source}; check --db and that PostgreSQL is up")]
    Connect {
        /// The connection string used.
        conninfo: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// A statement failed.
    #[error("database statement failed: {0}")]
    Query(#[from] postgres::Error),
    /// The `service` row is missing (schema not created).
    #[error("the service row is missing; let a front end create the schema")]
    NoService,
}

/// A lazily (re)connected database client.
pub struct Db {
    conninfo: String,
    client: Option<Client>,
}

/// How a BID transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BidOutcome {
    /// Committed.
    Committed,
    /// Rolled back: another front end owns the service now (its epoch).
    Fenced(i64),
    /// Rolled back: no such item.
    NoItem,
}

/// The schema and seed, idempotent, serialized between front ends by an advisory lock.
const SCHEMA: &str = "
    SET LOCAL client_min_messages = warning;
    SELECT pg_advisory_xact_lock(7070);
    CREATE TABLE IF NOT EXISTS service (id int PRIMARY KEY, epoch bigint NOT NULL, owner text NOT NULL);
    CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, name text NOT NULL, max_bid bigint NOT NULL, nbids bigint NOT NULL);
    CREATE TABLE IF NOT EXISTS bids (id bigserial PRIMARY KEY, sid bigint NOT NULL, seq bigint NOT NULL,
        item int NOT NULL, amount bigint NOT NULL, epoch bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX IF NOT EXISTS bids_sid_seq ON bids (sid, seq);
    INSERT INTO service VALUES (1, 0, '') ON CONFLICT DO NOTHING;
";

impl Db {
    /// A client for `conninfo` (a libpq-style string); connects on first use.
    pub fn new(conninfo: &str) -> Db {
        Db {
            conninfo: conninfo.to_string(),
            client: None,
        }
    }

    /// Connects (once) and creates the schema if absent.
    fn client(&mut self) -> Result<&mut Client, DbError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match self.client.take() {
            Some(c) => c,
            None => {
                let connect_err = |source| DbError::Connect {
                    conninfo: self.conninfo.clone(),
                    source,
                };
                let mut config: postgres::Config = self.conninfo.parse().map_err(connect_err)?;
                // A database host that vanishes must not hold the front end forever: dead
                // peers are found by keepalives (idle) and by the user timeout (unacked data).
                config
                    .keepalives(true)
                    .keepalives_idle(Duration::from_secs(5))
                    .keepalives_interval(Duration::from_secs(2))
                    .keepalives_retries(3)
                    .tcp_user_timeout(Duration::from_secs(15));
                let mut c = config.connect(NoTls).map_err(connect_err)?;
                ensure_schema(&mut c)?;
                c
            }
        };
        Ok(self.client.insert(client))
    }

    /// Runs `f` on the client; any failure drops the connection so the next call reconnects.
    fn with<T>(&mut self, f: impl FnOnce(&mut Client) -> Result<T, DbError>) -> Result<T, DbError> {
        let result = self.client().and_then(f);
        if result.is_err() {
            self.client = None;
        }
        result
    }

    /// Connects now (and creates the schema), to fail early.
    pub fn connect(&mut self) -> Result<(), DbError> {
        self.with(|_| Ok(()))
    }

    /// The current owner's epoch.
    pub fn epoch(&mut self) -> Result<i64, DbError> {
        self.with(|c| {
            let row = c
                .query_opt("SELECT epoch FROM service WHERE id = 1", &[])?
                .ok_or(DbError::NoService)?;
            Ok(row.try_get(0)?)
        })
    }

    /// Makes `owner` the owner: epoch + 1, after every BID transaction of the old owner ended.
    pub fn claim(&mut self, owner: &str) -> Result<i64, DbError> {
        self.with(|c| {
            let row = c
                .query_opt(
                    "UPDATE service SET epoch = epoch + 1, owner = $1 WHERE id = 1 RETURNING epoch",
                    &[&owner],
                )?
                .ok_or(DbError::NoService)?;
            Ok(row.try_get(0)?)
        })
    }

    /// An item for a VIEW, `None` if there is no such item.
    pub fn item(&mut self, item: i32) -> Result<Option<ItemInfo>, DbError> {
        self.with(|c| {
            let Some(row) = c.query_opt(
                "SELECT name, max_bid, nbids FROM items WHERE id = $1",
                &[&item],
            )?
            else {
                return Ok(None);
            };
            let name: String = row.try_get(0)?;
            Ok(Some(ItemInfo {
                name: reply_word(&name),
                max_bid: row.try_get(1)?,
                nbids: row.try_get(2)?,
            }))
        })
    }

    /// The fenced BID transaction. `before_commit` runs with the transaction open, just before
    /// COMMIT (crash injection).
    pub fn bid(
        &mut self,
        epoch: i64,
        sid: u64,
        seq: u64,
        item: i32,
        amount: i64,
        before_commit: &mut dyn FnMut(),
    ) -> Result<BidOutcome, DbError> {
        let (sid, seq) = (as_bigint(sid), as_bigint(seq));
        self.with(|c| {
            let mut tx = c.transaction()?;
            let row = tx
                .query_opt("SELECT epoch FROM service WHERE id = 1 FOR SHARE", &[])?
                .ok_or(DbError::NoService)?;
            let current: i64 = row.try_get(0)?;
            if current != epoch {
                tx.rollback()?;
                return Ok(BidOutcome::Fenced(current));
            }
            let updated = tx.execute(
                "UPDATE items SET max_bid = GREATEST(max_bid, $2), nbids = nbids + 1 WHERE id = $1",
                &[&item, &amount],
            )?;
            if updated == 0 {
                tx.rollback()?;
                return Ok(BidOutcome::NoItem);
            }
            tx.execute(
                "INSERT INTO bids (sid, seq, item, amount, epoch) VALUES ($1, $2, $3, $4, $5)",
                &[&sid, &seq, &item, &amount, &epoch],
            )?;
            before_commit();
            tx.commit()?;
            Ok(BidOutcome::Committed)
        })
    }

    /// Settles an in-doubt BID: whether (sid, seq) is in `bids`, after every BID transaction
    /// still holding the service row ended (the `FOR UPDATE` waits for them), so the answer is
    /// final for every transaction that could still commit it.
    pub fn committed(&mut self, sid: u64, seq: u64) -> Result<bool, DbError> {
        let (sid, seq) = (as_bigint(sid), as_bigint(seq));
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.query_opt("SELECT 1 FROM service WHERE id = 1 FOR UPDATE", &[])?;
            let found = tx
                .query_opt(
                    "SELECT 1 FROM bids WHERE sid = $1 AND seq = $2 LIMIT 1",
                    &[&sid, &seq],
                )?
                .is_some();
            tx.commit()?;
            Ok(found)
        })
    }
}

/// Creates the schema and seeds [`ITEMS`] items if absent.
pub fn ensure_schema(c: &mut Client) -> Result<(), DbError> {
    let mut tx = c.transaction()?;
    tx.batch_execute(SCHEMA)?;
    tx.execute(
        "INSERT INTO items SELECT g, 'item-' || g, 0, 0 FROM generate_series(1, $1::int) g ON CONFLICT DO NOTHING",
        &[&ITEMS],
    )?;
    tx.commit()?;
    Ok(())
}

/// A u64 id as stored in a `bigint` column (same 64 bits, reinterpreted).
pub fn as_bigint(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// A `bigint` column back to the u64 id.
pub fn from_bigint(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// A database string made safe for one word of a reply: whitespace replaced, at most 64 bytes.
fn reply_word(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        let ch = if ch.is_whitespace() || ch.is_control() {
            '_'
        } else {
            ch
        };
        if out.len() + ch.len_utf8() > 64 {
            break;
        }
        out.push(ch);
    }
    out
}

/// A BID the client saw committed (an OK reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Bid {
    /// Session id.
    pub sid: u64,
    /// Request number.
    pub seq: u64,
    /// Item.
    pub item: i32,
    /// Amount.
    pub amount: i64,
}

/// What [`check`] found; clean when every list is empty.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Rows in `bids`.
    pub rows: usize,
    /// Committed BIDs with no row.
    pub missing: Vec<Bid>,
    /// (sid, seq) with more than one row, and how many.
    pub duplicated: Vec<(u64, u64, usize)>,
    /// Rows no client saw committed.
    pub unexpected: Vec<Bid>,
    /// Rows whose item or amount differs from the committed BID.
    pub mismatched: Vec<(Bid, Bid)>,
    /// Items whose `nbids` or `max_bid` disagree with the rows.
    pub items: Vec<String>,
}

impl CheckReport {
    /// Whether the database matches the committed BIDs exactly.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.items.is_empty()
    }
}

/// Checks that every committed BID is in `bids` exactly once with its item and amount, that
/// there are no other rows, and that every item's `nbids`/`max_bid` agree with the rows.
/// Expects a database that only this run's BIDs wrote to.
pub fn check(client: &mut Client, bids: &[Bid]) -> Result<CheckReport, DbError> {
    let mut report = CheckReport::default();
    let mut rows: BTreeMap<(u64, u64), Vec<Bid>> = BTreeMap::new();
    for row in client.query("SELECT sid, seq, item, amount FROM bids ORDER BY id", &[])? {
        let b = Bid {
            sid: from_bigint(row.try_get(0)?),
            seq: from_bigint(row.try_get(1)?),
            item: row.try_get(2)?,
            amount: row.try_get(3)?,
        };
        report.rows += 1;
        rows.entry((b.sid, b.seq)).or_default().push(b);
    }
    let committed: HashMap<(u64, u64), Bid> = bids.iter().map(|b| ((b.sid, b.seq), *b)).collect();
    for b in bids {
        if !rows.contains_key(&(b.sid, b.seq)) {
            report.missing.push(*b);
        }
    }
    let mut per_item: HashMap<i32, (i64, i64)> = HashMap::new();
    for ((sid, seq), found) in &rows {
        if found.len() > 1 {
            report.duplicated.push((*sid, *seq, found.len()));
        }
        for row in found {
            let e = per_item.entry(row.item).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(row.amount);
            match committed.get(&(*sid, *seq)) {
                None => report.unexpected.push(*row),
                Some(b) if b != row => report.mismatched.push((*b, *row)),
                Some(_) => {}
            }
        }
    }
    for row in client.query("SELECT id, nbids, max_bid FROM items ORDER BY id", &[])? {
        let (id, nbids, max_bid): (i32, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let (want_n, want_max) = per_item.get(&id).copied().unwrap_or((0, 0));
        if nbids != want_n || max_bid != want_max {
            report.items.push(format!(
                "item {id}: nbids={nbids} max_bid={max_bid}, rows say nbids={want_n} max_bid={want_max}"
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_bigint() {
        for v in [1, u64::MAX, 1 << 63, 12345] {
            assert_eq!(from_bigint(as_bigint(v)), v);
        }
    }

    #[test]
    fn reply_words_have_no_spaces_and_are_bounded() {
        assert_eq!(reply_word("a b\tc"), "a_b_c");
        assert_eq!(reply_word(&"é".repeat(40)).len(), 64);
    }
}
