//! A client for the control API (used by `bdvmm ctl`, the bridge, tests and benchmarks).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use introspect::mem::{MappedMem, MemError, Range};

use crate::protocol::{
    MemoryReply, PauseReply, RegsReply, Request, ResumeReply, StatusReply, VcpuRegs,
};

/// Longest reply the client accepts.
const MAX_REPLY: usize = 1 << 20;

/// Errors talking to bdvmm.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Cannot connect.
    #[error("cannot connect to the bdvmm API at {0}: {1}; is bdvmm running with --api {0}?")]
    Connect(String, std::io::Error),
    /// I/O on an open connection.
    #[error("bdvmm API connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// bdvmm closed the connection.
    #[error("bdvmm closed the API connection (has the guest stopped?)")]
    Closed,
    /// A reply we could not understand.
    #[error("bad reply from bdvmm: {0}")]
    BadReply(String),
    /// bdvmm refused the request.
    #[error("bdvmm: {0}")]
    Refused(String),
    /// `memory` came without a file descriptor.
    #[error("bdvmm sent no memfd with the memory reply")]
    NoFd,
}

/// One connection to bdvmm's control socket.
pub struct ApiClient {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl ApiClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ApiError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| ApiError::Connect(path.display().to_string(), e))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            pending: Vec::new(),
        })
    }

    /// Reads one reply line, with the file descriptor that came with it, if any.
    fn read_line(&mut self) -> Result<(Vec<u8>, Option<File>), ApiError> {
        let mut fd = None;
        loop {
            if let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
                return Ok((self.pending.drain(..=nl).collect(), fd));
            }
            if self.pending.len() > MAX_REPLY {
                return Err(ApiError::BadReply("reply too long".into()));
            }
            let mut buf = [0u8; 8192];
            let (n, got) = self
                .stream
                .recv_with_fd(&mut buf)
                .map_err(|e| ApiError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
            if n == 0 && got.is_none() {
                return Err(ApiError::Closed);
            }
            fd = fd.or(got);
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    fn call(&mut self, req: &Request) -> Result<(Value, Option<File>), ApiError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ApiError::BadReply(e.to_string()))?;
        line.push(b'\n');
        if let Err(e) = self.stream.write_all(&line) {
            // bdvmm may have refused this client at connect (its credentials are not allowed)
            // and closed: its one error line is still there to read, and says why.
            return match self.read_line() {
                Ok((parting, _)) => Err(refusal(&parting).unwrap_or(ApiError::Io(e))),
                Err(_) => Err(ApiError::Io(e)),
            };
        }
        let (line, fd) = self.read_line()?;
        let v: Value = serde_json::from_slice(&line)
            .map_err(|e| ApiError::BadReply(format!("{e}: {}", String::from_utf8_lossy(&line))))?;
        if v["ok"] == Value::Bool(true) {
            return Ok((v, fd));
        }
        let msg = v["error"].as_str().unwrap_or("unspecified error");
        Err(ApiError::Refused(msg.to_string()))
    }

    fn typed<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ApiError> {
        let (v, _) = self.call(req)?;
        serde_json::from_value(v).map_err(|e| ApiError::BadReply(e.to_string()))
    }

    /// Pauses the guest (or renews this connection's lease).
    pub fn pause(&mut self, lease: Option<Duration>) -> Result<PauseReply, ApiError> {
        self.typed(&Request::Pause {
            // Saturates: bdvmm refuses a lease out of its range rather than shortening it.
            lease_ms: lease.map(introspect::conv::millis),
        })
    }

    /// Resumes the guest.
    pub fn resume(&mut self) -> Result<ResumeReply, ApiError> {
        self.typed(&Request::Resume)
    }

    /// Registers of `vcpu`.
    pub fn regs(&mut self, vcpu: u8) -> Result<VcpuRegs, ApiError> {
        Ok(self.typed::<RegsReply>(&Request::Regs { vcpu })?.regs)
    }

    /// Restarts the guest in place (both engines).
    pub fn reset(&mut self) -> Result<(), ApiError> {
        self.call(&Request::Reset).map(|_| ())
    }

    /// VM status.
    pub fn status(&mut self) -> Result<StatusReply, ApiError> {
        self.typed(&Request::Status)
    }

    /// The guest's memfd and its map.
    pub fn memory(&mut self) -> Result<(File, MemoryReply), ApiError> {
        let (v, fd) = self.call(&Request::Memory)?;
        let reply = serde_json::from_value(v).map_err(|e| ApiError::BadReply(e.to_string()))?;
        Ok((fd.ok_or(ApiError::NoFd)?, reply))
    }

    /// Sends raw bytes and returns the reply as JSON, whatever it says (for tests of bad input).
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value, ApiError> {
        self.stream.write_all(bytes)?;
        let (line, _) = self.read_line()?;
        serde_json::from_slice(&line).map_err(|e| ApiError::BadReply(e.to_string()))
    }
}

/// The error a reply line carries, if it is one.
fn refusal(line: &[u8]) -> Option<ApiError> {
    let v: Value = serde_json::from_slice(line).ok()?;
    (v["ok"] == Value::Bool(false)).then(|| {
        ApiError::Refused(
            v["error"]
                .as_str()
                .unwrap_or("unspecified error")
                .to_string(),
        )
    })
}

/// Maps a guest's memfd (as the `memory` call hands it out), for introspection and repairs:
/// read-write, or read-only when bdvmm handed out a read-only descriptor (a client it admits
/// read-only only).
pub fn map_memory(file: File, map: &MemoryReply) -> Result<MappedMem, MemError> {
    let ranges = map
        .ranges
        .iter()
        .map(|r| Range {
            gpa: r.gpa,
            size: r.size,
            offset: r.offset,
        })
        .collect();
    // SAFETY: F_GETFL on a valid, owned descriptor; no memory is touched.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
    let writable = flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDWR;
    MappedMem::new(file, map.size, ranges, writable)
}
