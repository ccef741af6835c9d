//! The client listener: one thread per connection, one request line in, one reply line out.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use super::Front;
use crate::proto::{parse_request, read_line, LineError, MAX_LINE};

/// The front end shared by the connection threads.
pub type Shared = Arc<Mutex<Front>>;

/// Locks the front end; a poisoned lock (a panicked thread) is taken over as is, since every
/// change is published whole or not at all.
pub fn lock(front: &Shared) -> MutexGuard<'_, Front> {
    front
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts client connections forever.
pub fn serve_clients(front: Shared, listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let front = Arc::clone(&front);
                let spawned = thread::Builder::new()
                    .name("client".into())
                    .spawn(move || client(&front, stream));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => tracing::warn!("accepting a client: {e}"),
        }
    }
}

/// The reply line (without newline) to one request line.
pub fn reply_to(front: &Shared, line: &str) -> String {
    match parse_request(line) {
        Err((sid, seq, e)) => format!("ERR {sid} {seq} {e}"),
        Ok(req) => {
            let result = lock(front).handle(&req);
            match result {
                Ok(text) => format!("OK {} {} {text}", req.sid, req.seq),
                Err(reason) => format!("ERR {} {} {reason}", req.sid, req.seq),
            }
        }
    }
}

/// Closes a connection whose input cannot be read on: after the ERR line, stop writing and
/// discard what the peer still sends (bounded in bytes and time), so that closing with unread
/// input does not reset the connection and lose the ERR line on its way.
pub fn close_after_error(mut reader: impl Read, writer: &TcpStream) {
    let _ = writer.shutdown(Shutdown::Write);
    let _ = writer.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut reader.by_ref().take(1 << 20), &mut io::sink());
}

fn client(front: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let reply = match read_line(&mut reader, MAX_LINE) {
            Ok(Some(line)) => reply_to(front, &line),
            Ok(None) | Err(LineError::Io(_)) => return,
            Err(e) => {
                let _ = writer.write_all(format!("ERR 0 0 {e}\n").as_bytes());
                close_after_error(reader, &writer);
                return;
            }
        };
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}
