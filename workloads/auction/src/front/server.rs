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

/// The reply line (without newline) to one request line, or `None` if `wanted` said, once the
/// front end was free to execute the request, that nobody waits for the reply any more: the
/// request is then not executed at all. Under overload a client's attempt times out and it
/// retries the same (sid, seq) on a new connection; executing the abandoned copies too would keep
/// the front end busy with work nobody reads (congestion collapse). Skipping one is safe: the
/// retry executes it, or answers it from `last_reply` if it ran.
pub fn reply_to(front: &Shared, line: &str, wanted: impl Fn() -> bool) -> Option<String> {
    match parse_request(line) {
        Err((sid, seq, e)) => Some(format!("ERR {sid} {seq} {e}")),
        Ok(req) => {
            let mut f = lock(front);
            if !wanted() {
                return None;
            }
            let result = f.handle(&req);
            drop(f);
            Some(match result {
                Ok(text) => format!("OK {} {} {text}", req.sid, req.seq),
                Err(reason) => format!("ERR {} {} {reason}", req.sid, req.seq),
            })
        }
    }
}

/// False once the peer has closed its side of `stream` (or reset it) with nothing more to read:
/// a client that gave up on its request. A peek that cannot tell (data pending, nothing yet,
/// an error other than a reset) says true.
pub fn peer_still_there(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv into a one-byte buffer this function owns, on a descriptor `stream` keeps
    // open; MSG_PEEK leaves any data in the socket and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return false;
    }
    if n < 0 {
        let e = std::io::Error::last_os_error().raw_os_error();
        return !matches!(e, Some(libc::ECONNRESET) | Some(libc::EPIPE));
    }
    true
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
            Ok(Some(line)) => {
                // A request whose client has already gone (its attempt timed out) is not run.
                if reader.buffer().is_empty() {
                    match reply_to(front, &line, || peer_still_there(&writer)) {
                        Some(r) => r,
                        None => {
                            tracing::debug!("client gone before its request ran; skipped");
                            return;
                        }
                    }
                } else {
                    // More requests are buffered (pipelined): the client is still there.
                    reply_to(front, &line, || true).unwrap_or_default()
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_peer_that_closed_is_gone_and_one_with_data_pending_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(peer_still_there(&s), "open, nothing sent");
        c.write_all(b"REQ 1 2 LOGOUT\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(peer_still_there(&s), "data pending");
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            peer_still_there(&s),
            "closed, but its request is still unread"
        );
        let mut buf = [0u8; 64];
        let n = io::Read::read(&mut &s, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"REQ 1 2 LOGOUT\n");
        assert!(!peer_still_there(&s), "closed and nothing left");
    }
}
