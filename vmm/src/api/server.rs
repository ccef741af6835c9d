//! The control socket: accepting clients, splitting their bytes into requests, sending replies
//! (with a file descriptor when asked). What a request *does* is decided in `vmm.rs`.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::protocol::{Request, MAX_REQUEST};

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Someone is serving on that path.
    #[error("API socket {0} is in use by another process; choose another --api path or stop that process")]
    Busy(PathBuf),
    /// Something that is not a socket is there.
    #[error("API path {0} exists and is not a socket; remove it or choose another --api path")]
    NotASocket(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on API socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// A request line that is not a request.
#[derive(Debug, thiserror::Error)]
#[error("bad request ({0}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}")]
pub struct BadRequest(#[from] serde_json::Error);

/// A client connection.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What reading a connection produced.
pub enum Incoming {
    /// Complete request lines (each parsed, or the reason it could not be).
    Requests(Vec<Result<Request, BadRequest>>),
    /// The peer is gone (or broke the protocol); the connection is closed.
    Closed,
}

/// The listening socket and its clients.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<u32, Conn>,
    next_id: u32,
}

impl ApiServer {
    /// Listens on `path`. A stale socket (nobody accepting) is replaced; a live one is refused.
    pub fn bind(path: &Path) -> Result<Self, ApiServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ApiServerError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiServerError::Busy(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            next_id: 1,
        })
    }

    /// The listening fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts every pending client; returns their ids and fds (to watch).
    pub fn accept(&mut self) -> Vec<(u32, RawFd)> {
        let mut new = Vec::new();
        while let Ok((stream, _)) = self.listener.accept() {
            // Replies are small; a client that does not read them for a second is dropped.
            if stream.set_nonblocking(false).is_err()
                || stream
                    .set_write_timeout(Some(Duration::from_secs(1)))
                    .is_err()
            {
                continue;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            new.push((id, stream.as_raw_fd()));
            self.conns.insert(
                id,
                Conn {
                    stream,
                    buf: Vec::new(),
                },
            );
        }
        new
    }

    /// The fd of connection `id`.
    pub fn conn_fd(&self, id: u32) -> Option<RawFd> {
        self.conns.get(&id).map(|c| c.stream.as_raw_fd())
    }

    /// Reads what connection `id` has sent. On `Closed`, the caller must stop watching the fd and
    /// then call [`ApiServer::close`].
    pub fn read(&mut self, id: u32) -> Incoming {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Incoming::Closed;
        };
        let mut chunk = [0u8; 4096];
        // The fd is readable, so one non-blocking read returns at once.
        // SAFETY: recv into a valid buffer of the stated length on a valid socket.
        let n = unsafe {
            libc::recv(
                conn.stream.as_raw_fd(),
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let n = match usize::try_from(n) {
            Ok(0) => return Incoming::Closed,
            Ok(n) => n,
            // Negative: an error.
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                    return Incoming::Requests(Vec::new());
                }
                return Incoming::Closed;
            }
        };
        conn.buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        while let Some(nl) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            out.push(serde_json::from_str::<Request>(text).map_err(BadRequest));
        }
        if conn.buf.len() > MAX_REQUEST {
            // A line longer than any valid request: answer once, then hang up.
            let _ = Self::send(
                &conn.stream,
                &serde_json::json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes; closing")}),
                None,
            );
            return Incoming::Closed;
        }
        Incoming::Requests(out)
    }

    fn send(stream: &UnixStream, value: &Value, fd: Option<RawFd>) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(value)?;
        bytes.push(b'\n');
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = stream
                .send_with_fd(&bytes[..], fd)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        std::io::Write::write_all(&mut &*stream, &bytes[sent..])
    }

    /// Sends a reply; false if the client cannot take it (the caller then closes it).
    pub fn reply(&mut self, id: u32, value: &Value, fd: Option<RawFd>) -> bool {
        match self.conns.get(&id) {
            Some(conn) => Self::send(&conn.stream, value, fd).is_ok(),
            None => false,
        }
    }

    /// Drops connection `id`. Stop watching its fd *before* this: the number may be reused.
    pub fn close(&mut self, id: u32) {
        self.conns.remove(&id);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
