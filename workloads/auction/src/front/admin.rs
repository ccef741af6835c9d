//! The admin listener, used by the monitor (and by hand):
//! `IMPORT <n>` + n records `<id> <len>\n` + len bytes → `IMPORTED <n>`;
//! `TAKEOVER` → `SERVING epoch=<e> sessions=<n> resolved=<k>`;
//! `STATUS` → `role=<r> epoch=<e> sessions=<n> open=<m> name=<name>`; failures → `ERR <why>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use super::server::{close_after_error, lock, Shared};
use super::{FrontError, Role};
use crate::proto::{read_line, LineError, MAX_LINE};

/// Accepts admin connections forever.
pub fn serve_admin(front: Shared, listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let front = Arc::clone(&front);
                let spawned = thread::Builder::new()
                    .name("admin".into())
                    .spawn(move || admin(&front, stream));
                if let Err(e) = spawned {
                    tracing::error!("cannot start an admin thread: {e}");
                }
            }
            Err(e) => tracing::warn!("accepting an admin connection: {e}"),
        }
    }
}

fn admin(front: &Shared, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let line = match read_line(&mut reader, MAX_LINE) {
            Ok(Some(line)) => line,
            Ok(None) | Err(LineError::Io(_)) => return,
            Err(e) => {
                let _ = writer.write_all(format!("ERR {e}\n").as_bytes());
                close_after_error(reader, &writer);
                return;
            }
        };
        // After a bad IMPORT the stream may be in the middle of a record: close it.
        let (reply, keep) = command(front, &line, &mut reader);
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
        if !keep {
            close_after_error(reader, &writer);
            return;
        }
    }
}

/// Executes one admin command; the reply and whether the connection can go on.
fn command(front: &Shared, line: &str, reader: &mut impl BufRead) -> (String, bool) {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    match words.as_slice() {
        ["STATUS"] => (status(front), true),
        ["TAKEOVER"] => {
            let result = lock(front).takeover();
            match result {
                Ok(t) => (
                    format!(
                        "SERVING epoch={} sessions={} resolved={}",
                        t.epoch, t.sessions, t.resolved
                    ),
                    true,
                ),
                Err(e) => (format!("ERR {e}"), true),
            }
        }
        ["IMPORT", n] => match import(front, n, reader) {
            Ok(n) => (format!("IMPORTED {n}"), true),
            Err(why) => (format!("ERR {why}"), false),
        },
        _ => (
            "ERR expected IMPORT <n> | TAKEOVER | STATUS".to_string(),
            true,
        ),
    }
}

fn status(front: &Shared) -> String {
    let f = lock(front);
    let (role, epoch) = match f.role() {
        Role::Standby => ("standby", 0),
        Role::Primary(e) => ("primary", e),
        Role::Fenced(e) => ("fenced", e),
    };
    let (sessions, open) = f.counts();
    format!(
        "role={role} epoch={epoch} sessions={sessions} open={open} name={}",
        f.config().name
    )
}

/// Why an IMPORT was refused (its `ERR` reply; the connection then closes).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The count is not a number within the slots.
    #[error("IMPORT <n>: n must be 0..={slots}")]
    Count {
        /// This front end's slots.
        slots: u32,
    },
    /// A record's head line could not be read.
    #[error("record {index}: {source}")]
    Read {
        /// Which record.
        index: usize,
        /// The error.
        source: LineError,
    },
    /// The connection closed before a record.
    #[error("record {index}: connection closed")]
    Closed {
        /// Which record.
        index: usize,
    },
    /// A record's head is not `<id> <len>` with len within the capacity.
    #[error("record {index}: expected `<id> <len>` with len <= {capacity}")]
    Head {
        /// Which record.
        index: usize,
        /// This front end's box capacity.
        capacity: u32,
    },
    /// A record's data could not be read.
    #[error("record {index}: reading {len} bytes: {source}")]
    Data {
        /// Which record.
        index: usize,
        /// Its length.
        len: u32,
        /// The error.
        source: std::io::Error,
    },
    /// The front end refused the records.
    #[error(transparent)]
    Front(#[from] FrontError),
}

/// Reads the n records of an IMPORT, then imports them all or none.
fn import(front: &Shared, n: &str, reader: &mut impl BufRead) -> Result<usize, ImportError> {
    let (slots, capacity) = {
        let f = lock(front);
        (f.config().slots, f.config().capacity)
    };
    let n: usize = n
        .parse()
        .ok()
        .filter(|&n| u32::try_from(n).is_ok_and(|n| n <= slots))
        .ok_or(ImportError::Count { slots })?;
    let mut records = Vec::with_capacity(n);
    for index in 0..n {
        let head = read_line(reader, MAX_LINE)
            .map_err(|source| ImportError::Read { index, source })?
            .ok_or(ImportError::Closed { index })?;
        let bad = || ImportError::Head { index, capacity };
        let (id, len) = head.split_once(' ').ok_or_else(bad)?;
        let id: u64 = id.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > capacity {
            return Err(bad());
        }
        let mut data = vec![0; usize::try_from(len).map_err(|_| bad())?];
        reader
            .read_exact(&mut data)
            .map_err(|source| ImportError::Data { index, len, source })?;
        records.push((id, data));
    }
    let result = lock(front).import(records);
    Ok(result?)
}
