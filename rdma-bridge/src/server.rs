//! The bridge's TCP server: mutual TLS, then frames (see [`crate::wire`]), each checked by the Guard.
//!
//! One thread per monitor connection, at most `max_connections` at once. A session is:
//!
//! 1. TLS 1.3 handshake (bounded by [`HANDSHAKE_TIMEOUT`]); the monitor's certificate must chain to
//!    the CA *and* be listed in the config, which names the monitor and its grant.
//! 2. `HELLO` naming that same monitor, first; anything else first ends the session.
//! 3. Requests with strictly increasing request ids (a repeated or smaller id is a replay and ends
//!    the session), each answered in order.
//!
//! A malformed frame, an unknown op or a peer silent for `idle_timeout_ms` (also mid-frame) ends
//! that session only; every other monitor is served on. A session that ends while holding the pause
//! lock releases it at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bdvmm_api::ApiError;
use introspect::mem::PhysMem;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::json;

use crate::audit::Audit;
use crate::backend::{Backend, BackendError};
use crate::config::{BridgeConfig, SB_OFFSET};
use crate::guard::{Agreement, Grant, GrantError, Grants, Outcome};
use crate::tls;
use crate::wire::{self, code, Decoder, Frame, Message, Range, Reply, Request};

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request payload the bridge accepts (a WRITE of up to 1 MiB).
pub const MAX_REQUEST_PAYLOAD: u32 = (1 << 20) + 8;
/// Longest a LOCK waits for another monitor's lock to be released before it answers BUSY.
pub const MAX_LOCK_WAIT: Duration = Duration::from_secs(2);
/// Most times FETCH_SB copies the Sensor Box looking for a clean (even, unchanged) sequence.
pub const SB_ATTEMPTS: u32 = 1000;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listening socket or the audit log.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Grants could not be resolved.
    #[error("grants: {0}")]
    Grants(#[from] GrantError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The verbs data path.
    #[error(transparent)]
    Rdma(#[from] crate::rdma::RdmaError),
}

/// How a WRITE refused because its audit record could not be appended is answered.
const UNRECORDED_WRITE: &str = "write refused, nothing was written";

struct Holder {
    conn: u64,
    monitor: String,
    deadline: Instant,
}

struct Shared {
    backend: Arc<dyn Backend>,
    tls: Arc<ServerConfig>,
    grants: Grants,
    agreement: Agreement,
    audit: Arc<Audit>,
    lock: Mutex<Option<Holder>>,
    lock_freed: Condvar,
    conns: AtomicUsize,
    next_conn: AtomicU64,
    max_conns: usize,
    idle: Duration,
    rdma: Option<crate::rdma::RdmaGlue>,
}

/// A bound, ready server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `cfg.listen`, loads TLS material, resolves grants against the backend's layout and
    /// opens the audit log.
    pub fn bind(cfg: &BridgeConfig, backend: Arc<dyn Backend>) -> Result<Server, ServerError> {
        let tls = tls::server_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        let layout = backend.layout().clone();
        let grants = Grants::resolve(cfg, &layout.ram, layout.backdoor, |p| {
            let c = tls::load_certs(p)?;
            Ok(tls::fingerprint(&c[0]))
        })?;
        let audit = Arc::new(Audit::open_with(&cfg.audit_log, cfg.audit_options())?);
        let rdma = rdma_glue(cfg, &backend, &audit)?;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServerError::Io {
            what: format!("cannot listen on {}", cfg.listen),
            source,
        })?;
        let local = listener.local_addr().map_err(|source| ServerError::Io {
            what: "local address".into(),
            source,
        })?;
        audit.log(
            "start",
            json!({"listen": local.to_string(), "monitors": cfg.monitors.len(),
                   "k": cfg.agreement.k, "window_ms": cfg.agreement.window_ms}),
        );
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                backend,
                tls,
                grants,
                agreement: Agreement::new(
                    cfg.agreement.k,
                    Duration::from_millis(cfg.agreement.window_ms),
                ),
                audit,
                lock: Mutex::new(None),
                lock_freed: Condvar::new(),
                conns: AtomicUsize::new(0),
                next_conn: AtomicU64::new(1),
                max_conns: cfg.max_connections,
                idle: Duration::from_millis(cfg.idle_timeout_ms),
                rdma,
            }),
        })
    }

    /// Serves the RDMA data path through `nic` instead of the `[rdma]` section's device, with
    /// write agreement `k`: the seam for testing the server's RDMA policy (regions, caps, write
    /// window, release) on hosts without an RDMA device. Call before [`Server::run`].
    #[doc(hidden)]
    pub fn use_rdma_nic(
        &mut self,
        nic: Box<dyn crate::rdma::Nic>,
        k: usize,
    ) -> Result<(), ServerError> {
        let sh = Arc::get_mut(&mut self.shared).ok_or_else(|| ServerError::Io {
            what: "use_rdma_nic".into(),
            source: std::io::Error::other("the server is already running"),
        })?;
        let audit = sh.audit.clone();
        sh.rdma = Some(
            crate::rdma::RdmaGlue::new(nic, k, audit_sink(audit)).map_err(|source| {
                ServerError::Io {
                    what: "cannot start the RDMA lease timer".into(),
                    source,
                }
            })?,
        );
        Ok(())
    }

    /// The address monitors connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Logs an event in the audit log.
    pub fn audit(&self, event: &str, fields: serde_json::Value) {
        self.shared.audit.log(event, fields);
    }

    /// Accepts monitors forever (until the listener fails).
    pub fn run(&self) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    tracing::warn!("accept: {e}; backing off");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let sh = self.shared.clone();
            if sh.conns.fetch_add(1, Ordering::SeqCst) >= sh.max_conns {
                sh.conns.fetch_sub(1, Ordering::SeqCst);
                sh.audit.log(
                    "refused",
                    json!({"peer": peer.to_string(),
                    "reason": format!("more than {} connections", sh.max_conns)}),
                );
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name(format!("bridge-{peer}"))
                .spawn(move || {
                    serve(&sh, tcp, peer);
                    sh.conns.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                self.shared.conns.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("cannot spawn a connection thread: {e}");
            }
        }
    }
}

/// The audit log as the RDMA glue's sink.
fn audit_sink(audit: Arc<Audit>) -> crate::rdma::AuditSink {
    Arc::new(move |event: &str, fields: serde_json::Value| {
        audit.append(event, fields).map_err(|e| e.to_string())
    })
}

/// The RDMA data path of the `[rdma]` section, if any (feature `verbs`).
fn rdma_glue(
    cfg: &BridgeConfig,
    backend: &Arc<dyn Backend>,
    audit: &Arc<Audit>,
) -> Result<Option<crate::rdma::RdmaGlue>, ServerError> {
    let Some(r) = &cfg.rdma else {
        return Ok(None);
    };
    #[cfg(not(feature = "verbs"))]
    {
        let _ = (r, backend, audit);
        Err(GrantError::NoVerbs.into())
    }
    #[cfg(feature = "verbs")]
    {
        let nic = crate::rdma::DeviceNic::open(r.device.as_deref(), backend.clone())?;
        let glue =
            crate::rdma::RdmaGlue::new(Box::new(nic), cfg.agreement.k, audit_sink(audit.clone()))
                .map_err(|source| ServerError::Io {
                what: "cannot start the RDMA lease timer".into(),
                source,
            })?;
        Ok(Some(glue))
    }
}

/// One authenticated monitor's session state.
struct Session<'a> {
    sh: &'a Shared,
    conn: u64,
    peer: SocketAddr,
    monitor: String,
    grant: Grant,
    hello: bool,
    last_id: Option<u64>,
}

/// Whether to go on after a request.
enum Next {
    Continue,
    Close(String),
}

fn serve(sh: &Shared, tcp: TcpStream, peer: SocketAddr) {
    let conn = sh.next_conn.fetch_add(1, Ordering::SeqCst);
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(sh.idle));
    let auth_failed = |reason: String| {
        sh.audit.log(
            "auth_failed",
            json!({"peer": peer.to_string(), "reason": reason}),
        );
    };
    let tls_conn = match ServerConnection::new(sh.tls.clone()) {
        Ok(c) => c,
        Err(e) => return auth_failed(format!("TLS session: {e}")),
    };
    let mut s = StreamOwned::new(tls_conn, tcp);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            return auth_failed(format!("TLS handshake: {e}"));
        }
    }
    let fp = match s.conn.peer_certificates().and_then(|c| c.first()) {
        Some(c) => tls::fingerprint(c),
        None => return auth_failed("no client certificate".into()),
    };
    let Some((monitor, grant)) = sh.grants.lookup(&fp).cloned() else {
        s.conn.send_close_notify();
        let _ = s.conn.complete_io(&mut s.sock);
        return auth_failed(format!(
            "certificate {fp} is not listed in the bridge config"
        ));
    };
    let _ = s.sock.set_read_timeout(Some(sh.idle));
    let mut sess = Session {
        sh,
        conn,
        peer,
        monitor,
        grant,
        hello: false,
        last_id: None,
    };
    let reason = sess.run(&mut s);
    sess.release_lock();
    sess.end_rdma();
    if sess.hello {
        sh.audit.session_end(&sess.monitor);
        sh.audit.log(
            "disconnected",
            json!({"monitor": sess.monitor, "peer": peer.to_string(), "reason": reason}),
        );
    }
    s.conn.send_close_notify();
    let _ = s.conn.complete_io(&mut s.sock);
}

type Tls = StreamOwned<ServerConnection, TcpStream>;

/// Why a reply could not be sent (the session then ends).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("encode: {0}")]
    Encode(#[from] wire::WireError),
    #[error("send: {0}")]
    Io(#[from] std::io::Error),
}

fn send(s: &mut Tls, frame: &Frame) -> Result<(), SendError> {
    let bytes = wire::encode(frame)?;
    s.write_all(&bytes)?;
    s.flush()?;
    Ok(())
}

fn error(id: u64, code: u16, message: impl Into<String>) -> Frame {
    let mut message: String = message.into();
    if message.len() > wire::MAX_ERROR_MESSAGE {
        let mut cut = wire::MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Frame::reply(id, Reply::Error { code, message })
}

impl Session<'_> {
    fn run(&mut self, s: &mut Tls) -> String {
        let mut dec = Decoder::with_limits(MAX_REQUEST_PAYLOAD, 2 * MAX_REQUEST_PAYLOAD as usize);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => return "closed by peer".into(),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return format!("idle for {} ms", self.sh.idle.as_millis())
                }
                Err(e) => return format!("read: {e}"),
            };
            let pushed = dec.push(&buf[..n]);
            loop {
                let frame = match pushed.clone().and_then(|_| dec.next_frame()) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        let why = format!("malformed frame: {e}");
                        self.bad_request(&why);
                        let _ = send(s, &error(0, code::BAD_REQUEST, &why));
                        return why;
                    }
                };
                let id = frame.request_id;
                let (reply, next) = self.handle(frame);
                if let Err(e) = send(s, &reply) {
                    return e.to_string();
                }
                if let Next::Close(why) = next {
                    tracing::debug!("closing session {}: {why} (request {id})", self.conn);
                    return why;
                }
            }
        }
    }

    fn bad_request(&self, reason: &str) {
        self.sh.audit.log(
            "bad_request",
            json!({"monitor": self.monitor, "peer": self.peer.to_string(), "reason": reason}),
        );
    }

    fn denied(&self, op: &str, gpa: u64, len: u64) -> Reply {
        self.sh.audit.denied(&self.monitor, op, gpa, len);
        Reply::Error {
            code: code::DENIED,
            message: format!(
                "{op} of {len:#x} bytes at {gpa:#x} is outside what monitor {} was granted",
                self.monitor
            ),
        }
    }

    fn handle(&mut self, frame: Frame) -> (Frame, Next) {
        let id = frame.request_id;
        let req = match frame.message {
            Message::Request(r) => r,
            Message::Reply(_) => {
                let why = "a monitor sent a reply frame";
                self.bad_request(why);
                return (error(id, code::BAD_REQUEST, why), Next::Close(why.into()));
            }
        };
        if let Some(last) = self.last_id {
            if id <= last {
                let why = format!(
                    "request id {id} is not greater than the previous one ({last}): replayed or reordered"
                );
                self.bad_request(&why);
                return (error(id, code::BAD_REQUEST, &why), Next::Close(why));
            }
        }
        self.last_id = Some(id);
        if !self.hello {
            return self.hello(id, req);
        }
        let reply = match req {
            Request::Hello { .. } => Reply::Error {
                code: code::BAD_REQUEST,
                message: "HELLO was already sent".into(),
            },
            Request::FetchSb => self.fetch_sb(),
            Request::Read(r) => self.read(r),
            Request::ReadBatch(rs) => self.read_batch(&rs),
            Request::Write { gpa, bytes } => self.write(gpa, &bytes),
            Request::Lock { lease_ms } => self.lock(lease_ms),
            Request::Unlock => self.unlock(),
            Request::Regs { vcpu } => self.regs(vcpu),
            Request::Status => match self.sh.backend.status() {
                Ok(st) => Reply::Status(st),
                Err(e) => Reply::Error {
                    code: code::INTERNAL,
                    message: e.to_string(),
                },
            },
            Request::RdmaConnect(blob) => self.rdma_connect(&blob),
            Request::Restart => self.restart(),
        };
        (Frame::reply(id, reply), Next::Continue)
    }

    fn hello(&mut self, id: u64, req: Request) -> (Frame, Next) {
        let peer = self.peer.to_string();
        match req {
            Request::Hello { monitor_id, .. } if monitor_id == self.monitor => {
                self.hello = true;
                self.sh
                    .audit
                    .log("connected", json!({"monitor": self.monitor, "peer": peer}));
                let mut nonce = [0u8; 8];
                let _ =
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
                (
                    Frame::reply(
                        id,
                        Reply::Hello {
                            nonce: u64::from_le_bytes(nonce),
                            backdoor_gpa: self.sh.backend.layout().backdoor.0,
                            backdoor_size: self.sh.backend.layout().backdoor.1,
                        },
                    ),
                    Next::Continue,
                )
            }
            Request::Hello { monitor_id, .. } => {
                let why = format!(
                    "HELLO names {monitor_id:?} but the certificate is {:?}'s",
                    self.monitor
                );
                self.sh
                    .audit
                    .log("auth_failed", json!({"peer": peer, "reason": why}));
                (error(id, code::UNAUTHENTICATED, &why), Next::Close(why))
            }
            _ => {
                let why = "the first request must be HELLO".to_string();
                self.sh
                    .audit
                    .log("auth_failed", json!({"peer": peer, "reason": why}));
                (error(id, code::UNAUTHENTICATED, &why), Next::Close(why))
            }
        }
    }

    fn mem(&self) -> &dyn PhysMem {
        self.sh.backend.mem()
    }

    fn read_bytes(&self, gpa: u64, len: u64) -> Result<Vec<u8>, Reply> {
        let len = usize::try_from(len).map_err(|_| Reply::Error {
            code: code::OUT_OF_RANGE,
            message: format!("a read of {len:#x} bytes at {gpa:#x} does not fit in memory"),
        })?;
        let mut buf = vec![0u8; len];
        self.mem().read(gpa, &mut buf).map_err(|e| Reply::Error {
            code: code::OUT_OF_RANGE,
            message: e.to_string(),
        })?;
        Ok(buf)
    }

    fn fetch_sb(&self) -> Reply {
        let (bd, bd_len) = self.sh.backend.layout().backdoor;
        let gpa = bd + SB_OFFSET;
        let header = introspect::sensorbox::HEADER_SIZE as u64;
        if !self.grant.may_read(gpa, header) {
            return self.denied("FETCH_SB", gpa, header);
        }
        match introspect::sensorbox::copy(self.mem(), gpa, bd_len - SB_OFFSET, SB_ATTEMPTS, |len| {
            self.grant.may_read(gpa, len)
        }) {
            Ok(bytes) => Reply::SensorBox(bytes),
            Err(introspect::sensorbox::SbError::NotAllowed(len)) => {
                self.denied("FETCH_SB", gpa, len)
            }
            Err(e) => Reply::Error {
                code: code::INTERNAL,
                message: e.to_string(),
            },
        }
    }

    fn read(&self, r: Range) -> Reply {
        if !self.grant.may_read(r.gpa, u64::from(r.len)) {
            return self.denied("READ", r.gpa, u64::from(r.len));
        }
        match self.read_bytes(r.gpa, u64::from(r.len)) {
            Ok(b) => Reply::Read(b),
            Err(e) => e,
        }
    }

    fn read_batch(&self, rs: &[Range]) -> Reply {
        let total: u64 = rs.iter().map(|r| 4 + u64::from(r.len)).sum::<u64>() + 2;
        if total > u64::from(wire::MAX_PAYLOAD) {
            return Reply::Error {
                code: code::BAD_REQUEST,
                message: format!(
                    "the batch would return {total} bytes; at most {} fit in one reply",
                    wire::MAX_PAYLOAD
                ),
            };
        }
        let mut out = Vec::with_capacity(rs.len());
        for r in rs {
            if !self.grant.may_read(r.gpa, u64::from(r.len)) {
                return self.denied("READ_BATCH", r.gpa, u64::from(r.len));
            }
            match self.read_bytes(r.gpa, u64::from(r.len)) {
                Ok(b) => out.push(b),
                Err(e) => return e,
            }
        }
        Reply::ReadBatch(out)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Reply {
        let len = bytes.len() as u64;
        if len == 0 || !self.grant.may_write(gpa, len) {
            return self.denied("WRITE", gpa, len);
        }
        let sha = tls::fingerprint(bytes);
        let outcome = self.sh.agreement.vote(
            &self.monitor,
            gpa,
            bytes,
            |voters| {
                // The record first: a write the audit log cannot hold is not made.
                let rec = json!({"gpa": gpa, "len": len, "sha256": sha, "voters": voters});
                if let Err(e) = self.sh.audit.append("write_applied", rec) {
                    // Every voter of this write gets this message (and INTERNAL, below).
                    return Err(introspect::mem::MemError::Remote(format!(
                        "{UNRECORDED_WRITE}: {e}"
                    )));
                }
                let written = self.sh.backend.mem().write(gpa, bytes);
                if let Err(e) = &written {
                    self.sh.audit.log(
                        "write_failed",
                        json!({"gpa": gpa, "len": len, "reason": e.to_string()}),
                    );
                }
                written
            },
            |votes| {
                self.sh.audit.log(
                    "write_vote",
                    json!({"monitor": self.monitor, "gpa": gpa, "len": len, "sha256": sha, "votes": votes}),
                )
            },
        );
        match outcome {
            Outcome::Applied(_) => Reply::Write,
            Outcome::Expired(voters) => {
                self.sh.audit.log(
                    "write_expired",
                    json!({"monitor": self.monitor, "gpa": gpa, "len": len, "sha256": sha, "voters": voters}),
                );
                Reply::Error {
                    code: code::EXPIRED,
                    message: format!(
                        "write of {len} bytes at {gpa:#x} was not confirmed by enough monitors in time (votes: {})",
                        voters.join(", ")
                    ),
                }
            }
            Outcome::Failed(e) if e.starts_with(UNRECORDED_WRITE) => Reply::Error {
                code: code::INTERNAL,
                message: e,
            },
            Outcome::Failed(e) => Reply::Error {
                code: code::OUT_OF_RANGE,
                message: e,
            },
            Outcome::Busy => Reply::Error {
                code: code::BUSY,
                message: "too many writes are waiting for agreement; retry".into(),
            },
        }
    }

    fn holder(&self) -> std::sync::MutexGuard<'_, Option<Holder>> {
        match self.sh.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn lock(&self, lease_ms: u32) -> Reply {
        if !(1..=600_000).contains(&lease_ms) {
            return Reply::Error {
                code: code::BAD_REQUEST,
                message: format!("lease_ms {lease_ms} is outside 1..=600000"),
            };
        }
        let mut h = self.holder();
        // Replicated monitors take turns: wait (bounded) for another holder to let go.
        let give_up = Instant::now() + MAX_LOCK_WAIT;
        loop {
            let now = Instant::now();
            match h.as_ref() {
                Some(cur) if cur.conn != self.conn && now < cur.deadline && now < give_up => {
                    let wait = cur.deadline.min(give_up) - now;
                    h = match self.sh.lock_freed.wait_timeout(h, wait) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
                _ => break,
            }
        }
        let now = Instant::now();
        if let Some(cur) = h.as_ref() {
            if cur.conn != self.conn && now < cur.deadline {
                self.sh.audit.log(
                    "lock_busy",
                    json!({"monitor": self.monitor, "holder": cur.monitor}),
                );
                return Reply::Error {
                    code: code::BUSY,
                    message: format!("monitor {} holds the lock", cur.monitor),
                };
            }
            if now >= cur.deadline {
                self.sh
                    .audit
                    .log("lock_expired", json!({"monitor": cur.monitor}));
            }
        }
        // The record first: a pause the audit log cannot hold is not taken.
        let rec = json!({"monitor": self.monitor, "lease_ms": lease_ms});
        if let Err(e) = self.sh.audit.append("lock_request", rec) {
            return Reply::Error {
                code: code::INTERNAL,
                message: format!("lock refused, the guest was not paused: {e}"),
            };
        }
        let lease = Duration::from_millis(u64::from(lease_ms));
        match self.sh.backend.pause(lease) {
            Ok(lock_ns) => {
                *h = Some(Holder {
                    conn: self.conn,
                    monitor: self.monitor.clone(),
                    deadline: now + lease,
                });
                self.rdma_lock_held(now + lease);
                self.sh.audit.log(
                    "lock",
                    json!({"monitor": self.monitor, "lease_ms": lease_ms, "lock_ns": lock_ns}),
                );
                Reply::Lock { lock_ns }
            }
            Err(e) => {
                *h = None;
                Reply::Error {
                    code: code::INTERNAL,
                    message: format!("pause failed: {e}"),
                }
            }
        }
    }

    fn unlock(&self) -> Reply {
        let mut h = self.holder();
        match h.as_ref() {
            Some(cur) if cur.conn == self.conn => {
                let expired = Instant::now() >= cur.deadline;
                *h = None;
                self.sh.lock_freed.notify_all();
                self.rdma_lock_ended("unlock");
                if expired {
                    // bdvmm already resumed the guest when the lease ran out.
                    let _ = self.sh.backend.resume();
                    self.sh
                        .audit
                        .log("lock_expired", json!({"monitor": self.monitor}));
                    return Reply::Error {
                        code: code::NOT_LOCKED,
                        message: "the lease ran out before UNLOCK; the guest was resumed then, so reads after it were not under the lock".into(),
                    };
                }
                match self.sh.backend.resume() {
                    Ok(()) => {
                        self.sh
                            .audit
                            .log("unlock", json!({"monitor": self.monitor}));
                        Reply::Unlock
                    }
                    Err(e) => Reply::Error {
                        code: code::INTERNAL,
                        message: format!("resume failed: {e}"),
                    },
                }
            }
            _ => Reply::Error {
                code: code::NOT_LOCKED,
                message: "this monitor does not hold the lock".into(),
            },
        }
    }

    fn release_lock(&self) {
        let mut h = self.holder();
        if h.as_ref().is_some_and(|cur| cur.conn == self.conn) {
            *h = None;
            self.sh.lock_freed.notify_all();
            self.rdma_lock_ended("session ended");
            let _ = self.sh.backend.resume();
            self.sh
                .audit
                .log("lock_released", json!({"monitor": self.monitor}));
        }
    }

    /// RDMA_CONNECT: this session's queue pair, with exactly this monitor's grant (see
    /// [`crate::rdma`]); a queue pair the session had is replaced.
    fn rdma_connect(&self, blob: &[u8]) -> Reply {
        let Some(rdma) = &self.sh.rdma else {
            return Reply::Error {
                code: code::UNSUPPORTED,
                message: if cfg!(feature = "verbs") {
                    "this bridge has no [rdma] section in its config".into()
                } else {
                    "this bridge was built without the `verbs` feature; use the TCP operations"
                        .into()
                },
            };
        };
        // Held across the connect, so that an UNLOCK cannot slip between reading the lease and
        // opening the write window (lock order: holder, then the RDMA glue).
        let h = self.holder();
        let now = Instant::now();
        let lease = h
            .as_ref()
            .filter(|cur| cur.conn == self.conn && now < cur.deadline)
            .map(|cur| cur.deadline);
        match rdma.connect(self.conn, &self.monitor, &self.grant, blob, lease) {
            Ok(b) => Reply::RdmaConnect(b),
            Err(e) => Reply::Error {
                code: match e {
                    crate::rdma::RdmaError::Quota { .. } => code::BUSY,
                    crate::rdma::RdmaError::Unrecorded { .. } => code::INTERNAL,
                    _ => code::BAD_REQUEST,
                },
                message: e.to_string(),
            },
        }
    }

    /// This session holds the pause lock until `deadline`: its RDMA queue pair may write.
    fn rdma_lock_held(&self, deadline: Instant) {
        if let Some(rdma) = &self.sh.rdma {
            rdma.lock_held(self.conn, deadline);
        }
    }

    /// This session no longer holds the pause lock: its RDMA queue pair may no longer write.
    fn rdma_lock_ended(&self, reason: &str) {
        if let Some(rdma) = &self.sh.rdma {
            rdma.lock_ended(self.conn, reason);
        }
    }

    /// The session ended: its RDMA queue pair, regions and protection domain are released.
    fn end_rdma(&self) {
        if let Some(rdma) = &self.sh.rdma {
            rdma.end_session(self.conn);
        }
    }

    fn restart(&self) -> Reply {
        if !self.grant.restart {
            return self.denied("RESTART", 0, 0);
        }
        // A restart ends any pause lock: the guest boots afresh.
        let mut h = self.holder();
        if let (Some(cur), Some(rdma)) = (h.take(), &self.sh.rdma) {
            rdma.lock_ended(cur.conn, "restart");
        }
        self.sh.lock_freed.notify_all();
        match self.sh.backend.restart() {
            Ok(()) => {
                self.sh
                    .audit
                    .log("restart", json!({"monitor": self.monitor}));
                Reply::Restart
            }
            Err(e) => Reply::Error {
                code: code::INTERNAL,
                message: format!("restart failed: {e}"),
            },
        }
    }

    fn regs(&self, vcpu: u8) -> Reply {
        if self.grant.read.is_empty() {
            return self.denied("REGS", 0, 0);
        }
        match self.sh.backend.regs(vcpu) {
            Ok(r) => Reply::Regs(r),
            Err(e) => Reply::Error {
                // bdvmm refusing names a vCPU it does not have; anything else is the bridge's own
                // trouble.
                code: match e {
                    BackendError::Api(ApiError::Refused(_)) | BackendError::NotLive(_) => {
                        code::NO_SUCH_VCPU
                    }
                    _ => code::INTERNAL,
                },
                message: e.to_string(),
            },
        }
    }
}
