//! The monitor's side of the admin protocol: IMPORT extracted boxes, TAKEOVER, STATUS.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::{read_line, LineError, MAX_LINE};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The connection failed.
    #[error("admin connection to {addr}: {source}")]
    Io {
        /// The front end's admin address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The reply could not be read.
    #[error("admin reply from {addr}: {source}")]
    Reply {
        /// The front end's admin address.
        addr: SocketAddr,
        /// The error.
        source: LineError,
    },
    /// The front end refused.
    #[error("{addr} refused: {line}")]
    Refused {
        /// The front end's admin address.
        addr: SocketAddr,
        /// Its reply.
        line: String,
    },
}

/// Sends `request` (which ends with a newline) and returns the reply line; an `ERR` reply is
/// an error. `timeout` bounds each read and write (a TAKEOVER may wait for the old owner's
/// transaction to be aborted by the database).
pub fn send(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<String, AdminError> {
    let io = |source| AdminError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(request).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader, MAX_LINE)
        .map_err(|source| AdminError::Reply { addr, source })?
        .ok_or_else(|| io(std::io::ErrorKind::UnexpectedEof.into()))?;
    if line.starts_with("ERR") {
        return Err(AdminError::Refused { addr, line });
    }
    Ok(line)
}

/// The IMPORT request for `(id, data)` records.
pub fn import_request<'a>(records: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let records: Vec<(u64, &[u8])> = records.into_iter().collect();
    let mut out = format!("IMPORT {}\n", records.len()).into_bytes();
    for (id, data) in records {
        out.extend_from_slice(format!("{id} {}\n", data.len()).as_bytes());
        out.extend_from_slice(data);
    }
    out
}
