//! The control socket: accepting clients, splitting their bytes into requests, sending replies
//! (with a file descriptor when asked). What a request *does* is decided in `vmm.rs`.
//!
//! ## Who may connect
//!
//! The socket hands out guest memory and the pause, so it is guarded twice:
//! - **Its mode is 0600** (0660 with `--api-group`), whatever the umask. There is no window in
//!   which it exists with a looser mode: it is bound inside a fresh private directory (mode 0700,
//!   which a umask can only tighten), given its mode (and group) there, where nobody else can
//!   reach it, and then renamed onto the requested path, which is atomic.
//! - **Every connection's peer credentials** (`SO_PEERCRED`: uid, gid and pid of the connecting
//!   process, as the kernel recorded them at `connect`) are checked against an [`AccessPolicy`]:
//!   full clients (default: bdvmm's own effective uid and root), then read-only clients. Anyone
//!   else gets one JSON error line naming the flags to use, a warning in bdvmm's log, and the
//!   connection is closed. Only the primary gid is checked, not supplementary groups.
//! - **Read-only clients** may ask `status`, `regs` and `memory`; `pause`, `resume` and `reset`
//!   are refused. Their `memory` descriptor is the memfd reopened read-only (through
//!   `/proc/self/fd/N`, `O_RDONLY`), so the kernel refuses a shared writable mapping of it
//!   (`EACCES`) and `mprotect` cannot add write access later. The memfd itself is mode 0600
//!   (`memory.rs`), so that descriptor cannot be reopened read-write through `/proc` by another
//!   uid either.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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
    /// The socket could not be given its mode or group.
    #[error("cannot restrict API socket {0} (mode {1:o}, group {2:?}): {3}; check --api-group")]
    Restrict(PathBuf, u32, Option<u32>, std::io::Error),
}

/// What a connected client may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything, including pause, resume, reset and a read-write memfd.
    Full,
    /// `status`, `regs` and a read-only memfd.
    ReadOnly,
}

/// The credentials the kernel recorded for a peer when it connected (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective (primary) group id.
    pub gid: u32,
}

impl PeerCred {
    /// The credentials of the peer of `s`.
    pub fn of(s: &UnixStream) -> std::io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                std::ptr::addr_of_mut!(cred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }
}

/// Who may use the API socket (`bdvmm run --api-allow-uid ...`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Users with full access.
    pub uids: Vec<u32>,
    /// Primary groups with full access.
    pub gids: Vec<u32>,
    /// Users with read-only access.
    pub readonly_uids: Vec<u32>,
    /// Primary groups with read-only access.
    pub readonly_gids: Vec<u32>,
    /// Group of the socket file; with one the mode is 0660 instead of 0600, so that members of
    /// the group other than the owner can reach the socket at all (and then pass the check).
    pub socket_group: Option<u32>,
}

impl AccessPolicy {
    /// The default: bdvmm's own effective uid and root, nobody read-only, mode 0600.
    pub fn owner_and_root() -> Self {
        // SAFETY: geteuid has no failure mode and touches no memory.
        let me = unsafe { libc::geteuid() };
        let mut uids = vec![me];
        if me != 0 {
            uids.push(0);
        }
        AccessPolicy {
            uids,
            ..AccessPolicy::default()
        }
    }

    /// What `peer` may do, if anything. Full access wins over read-only.
    pub fn access(&self, peer: PeerCred) -> Option<Access> {
        if self.uids.contains(&peer.uid) || self.gids.contains(&peer.gid) {
            Some(Access::Full)
        } else if self.readonly_uids.contains(&peer.uid) || self.readonly_gids.contains(&peer.gid) {
            Some(Access::ReadOnly)
        } else {
            None
        }
    }

    /// The socket file's mode.
    pub fn socket_mode(&self) -> u32 {
        if self.socket_group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A request line that is not a request.
#[derive(Debug, thiserror::Error)]
#[error("bad request ({0}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}")]
pub struct BadRequest(#[from] serde_json::Error);

/// A client connection.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    access: Access,
    peer: PeerCred,
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
    policy: AccessPolicy,
}

impl ApiServer {
    /// Listens on `path` for bdvmm's own user and root ([`AccessPolicy::owner_and_root`]).
    pub fn bind(path: &Path) -> Result<Self, ApiServerError> {
        Self::bind_with(path, AccessPolicy::owner_and_root())
    }

    /// Listens on `path` (mode 0600, or 0660 with a socket group, whatever the umask) for the
    /// clients `policy` admits. A stale socket (nobody accepting) is replaced; a live one is
    /// refused.
    pub fn bind_with(path: &Path, policy: AccessPolicy) -> Result<Self, ApiServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ApiServerError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiServerError::Busy(path.to_path_buf()));
            }
        }
        let listener = bind_restricted(path, &policy)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ApiServerError::Bind(path.to_path_buf(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            next_id: 1,
            policy,
        })
    }

    /// The listening fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts every pending client the policy admits; returns their ids and fds (to watch).
    /// A client it does not admit gets one error line and is closed.
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
            let peer = match PeerCred::of(&stream) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("API client refused: cannot read its credentials: {e}");
                    continue;
                }
            };
            let Some(access) = self.policy.access(peer) else {
                tracing::warn!(
                    "API client refused: uid {} gid {} (pid {}) is not allowed on {}",
                    peer.uid,
                    peer.gid,
                    peer.pid,
                    self.path.display()
                );
                let msg = format!(
                    "uid {} (gid {}) may not use this bdvmm API socket; its operator can allow it \
                     with --api-allow-uid/--api-allow-gid, or read-only with \
                     --api-readonly-uid/--api-readonly-gid",
                    peer.uid, peer.gid
                );
                let _ = Self::send(
                    &stream,
                    &serde_json::json!({"ok": false, "error": msg}),
                    None,
                );
                continue;
            };
            tracing::info!(
                "API client uid {} gid {} pid {}: {access:?} access",
                peer.uid,
                peer.gid,
                peer.pid
            );
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            new.push((id, stream.as_raw_fd()));
            self.conns.insert(
                id,
                Conn {
                    stream,
                    buf: Vec::new(),
                    access,
                    peer,
                },
            );
        }
        new
    }

    /// What connection `id` may do, and who it is.
    pub fn access(&self, id: u32) -> Option<(Access, PeerCred)> {
        self.conns.get(&id).map(|c| (c.access, c.peer))
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

/// Creates a fresh directory (mode 0700, which a umask can only narrow) in `parent`. A name
/// someone else made first (in a shared directory) is never reused: another is tried.
fn private_dir(parent: &Path) -> std::io::Result<PathBuf> {
    let pid = std::process::id();
    let mut last = std::io::Error::from(ErrorKind::AlreadyExists);
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut name = OsString::from(".bdvmm-api.");
        name.push(format!("{pid}.{nanos:x}{attempt}"));
        let dir = parent.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Binds `path` with its final mode (and group) already in place: bound in a private 0700
/// directory beside it, restricted there, then renamed onto `path`.
fn bind_restricted(path: &Path, policy: &AccessPolicy) -> Result<UnixListener, ApiServerError> {
    let fail = |e| ApiServerError::Bind(path.to_path_buf(), e);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let private = private_dir(&parent).map_err(fail)?;
    let staged = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&staged).map_err(fail)?;
        let mode = policy.socket_mode();
        let restrict =
            |e| ApiServerError::Restrict(path.to_path_buf(), mode, policy.socket_group, e);
        if let Some(gid) = policy.socket_group {
            std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(restrict)?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(restrict)?;
        std::fs::rename(&staged, path).map_err(fail)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
