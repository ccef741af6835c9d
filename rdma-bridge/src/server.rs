//! The bridge's TCP server: mutual TLS, then frames (see [`crate::wire`]), each checked by the Guard.
//!
//! One thread per monitor connection. A session is:
//!
//! 1. TLS 1.3 handshake. Until the peer has shown a listed certificate it holds a slot of the
//!    *startup* pool (`max_startups` in all, `max_startups_per_source` per source IP address; a
//!    connection beyond either is closed at accept), and the whole handshake must end within
//!    `login_grace_ms` of accept — a deadline, not a per-read timeout, so a peer trickling bytes
//!    cannot keep its slot. The monitor's certificate must chain to the CA *and* be listed in the
//!    config, which names the monitor and its grant.
//! 2. The session then counts against its monitor's own cap (`max_sessions_per_monitor`) and the
//!    total of authenticated sessions (`max_connections`): unauthenticated peers can never take the
//!    slots of a configured monitor.
//! 3. `HELLO` naming that same monitor, first; anything else first ends the session.
//! 4. Requests with strictly increasing request ids (a repeated or smaller id is a replay and ends
//!    the session), each answered in order.
//!
//! A malformed frame, an unknown op or a peer silent for `idle_timeout_ms` (also mid-frame) ends
//! that session only; every other monitor is served on. A session that ends while holding the pause
//! lock releases it at once.
//!
//! **The pause lock** needs `lock = true` in the monitor's entry. A lease is at most
//! `[lock] max_lease_ms`; one monitor may hold the guest paused at most `max_pause_per_window_ms`
//! within any `duty_window_ms` (renewals count); monitors waiting for the lock are served first come,
//! first served, and a holder may not renew while another monitor waits.
//!
//! **Writes** with `agreement.k = 1` are applied only while their writer holds an unexpired lock
//! (the write is then one copy into a paused guest). With `k >= 2` only one monitor could hold the
//! lock, so a vote does not need to hold it: it needs the write grant *and* `lock = true`, and the
//! defence is the agreement of `k` distinct monitors on the same bytes, applied as one copy.
//!
//! **Joint pause** (`agreement.k >= 2`): a LOCK while another monitor holds the pause joins it at
//! once (audited `lock_joined`; its UNLOCK ends nothing) rather than queueing behind a holder that
//! is waiting for this very monitor's vote. The holder's lease alone bounds the pause.
//!
//! **The fleet** (`[fleet]`, [`crate::assignment`]): LOCK, WRITE and RESTART also need the monitor
//! to be one of those the fleet assigns to this guest now; a refusal is audited as `denied`.
//!
//! **REGS** needs `regs = true`, is audited, and is rate-limited per session ([`REGS_BURST`],
//! [`REGS_PER_SECOND`]): each call costs the guest a vCPU exit.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bdvmm_api::ApiError;
use introspect::mem::PhysMem;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::json;

use crate::audit::Audit;
use crate::backend::{Backend, BackendError};
use crate::config::{BridgeConfig, LockLimits, SB_OFFSET};
use crate::guard::{Agreement, Grant, GrantError, Grants, Outcome};
use crate::tls;
use crate::wire::{self, code, Decoder, Frame, Message, Range, Reply, Request};

/// Most REGS calls one session may make in a burst.
pub const REGS_BURST: u64 = 16;
/// REGS calls per second one session may sustain.
pub const REGS_PER_SECOND: u64 = 8;
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

/// The pause lock: who holds it, who waits (first come, first served), and each monitor's recent
/// pauses for the duty cycle.
#[derive(Default)]
struct LockState {
    holder: Option<Holder>,
    queue: VecDeque<u64>,
    /// Sessions that joined the holder's pause (`agreement.k >= 2`, see [`Session::lock`]).
    joined: std::collections::HashSet<u64>,
    /// Per monitor, `(start, end)` of each pause it held within the last duty window; `end` is the
    /// lease's end until the pause ends earlier.
    history: HashMap<String, VecDeque<(Instant, Instant)>>,
}

impl LockState {
    /// Ends the current holder's pause now (UNLOCK, disconnect, restart) for the duty cycle.
    fn end_hold(&mut self, now: Instant) {
        if let Some(h) = self.holder.take() {
            if let Some(last) = self.history.get_mut(&h.monitor).and_then(|v| v.back_mut()) {
                last.1 = last.1.min(now);
            }
        }
    }

    /// Pause time `monitor` held within `[now - window, now]`.
    fn paused_within(&mut self, monitor: &str, now: Instant, window: Duration) -> Duration {
        let from = now.checked_sub(window).unwrap_or(now);
        let Some(v) = self.history.get_mut(monitor) else {
            return Duration::ZERO;
        };
        v.retain(|&(_, end)| end > from);
        v.iter()
            .map(|&(start, end)| end.min(now).saturating_duration_since(start.max(from)))
            .sum()
    }
}

/// Connections in their handshake, by source address.
#[derive(Default)]
struct Startups {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    tls: Arc<ServerConfig>,
    grants: Grants,
    agreement: Agreement,
    audit: Arc<Audit>,
    lock: Mutex<LockState>,
    lock_freed: Condvar,
    limits: LockLimits,
    startups: Mutex<Startups>,
    max_startups: usize,
    max_startups_per_source: usize,
    login_grace: Duration,
    sessions: Mutex<HashMap<String, usize>>,
    max_sessions_per_monitor: usize,
    conns: AtomicUsize,
    next_conn: AtomicU64,
    max_conns: usize,
    idle: Duration,
    rdma: Option<crate::rdma::RdmaGlue>,
    /// The fleet's assignment (`[fleet]`): only assigned monitors may LOCK, WRITE and RESTART.
    fleet: Option<crate::assignment::Assignment>,
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
                lock: Mutex::new(LockState::default()),
                lock_freed: Condvar::new(),
                limits: cfg.lock,
                startups: Mutex::new(Startups::default()),
                max_startups: cfg.max_startups,
                max_startups_per_source: cfg.max_startups_per_source,
                login_grace: Duration::from_millis(cfg.login_grace_ms),
                sessions: Mutex::new(HashMap::new()),
                max_sessions_per_monitor: cfg.max_sessions_per_monitor,
                conns: AtomicUsize::new(0),
                next_conn: AtomicU64::new(1),
                max_conns: cfg.max_connections,
                idle: Duration::from_millis(cfg.idle_timeout_ms),
                rdma,
                fleet: None,
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

    /// Enforces the fleet's assignment (the `[fleet]` section): from now on only monitors assigned
    /// to this guest may LOCK, WRITE and RESTART. Call before [`Server::run`].
    pub fn use_fleet(&mut self, a: crate::assignment::Assignment) -> Result<(), ServerError> {
        let sh = Arc::get_mut(&mut self.shared).ok_or_else(|| ServerError::Io {
            what: "use_fleet".into(),
            source: std::io::Error::other("the server is already running"),
        })?;
        sh.audit.log(
            "fleet",
            json!({"guest": a.guest(), "assigned": a.assigned(), "connected": a.watcher().connected()}),
        );
        sh.fleet = Some(a);
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
            let accepted = Instant::now();
            let sh = self.shared.clone();
            let slot = match StartupSlot::take(&sh, peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    sh.audit.unauthenticated(
                        "refused",
                        peer.ip(),
                        &peer.to_string(),
                        &reason.to_string(),
                    );
                    continue;
                }
            };
            let spawned = std::thread::Builder::new()
                .name(format!("bridge-{peer}"))
                .spawn(move || serve(&sh, tcp, peer, accepted, slot));
            if let Err(e) = spawned {
                tracing::warn!("cannot spawn a connection thread: {e}");
            }
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Why a connection was turned away before it was served (the audit line's `reason`).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} connections are already in their handshake (max_startups)")]
    Startups(usize),
    #[error(
        "{count} connections from {ip} are already in their handshake (max_startups_per_source)"
    )]
    PerSource { count: usize, ip: IpAddr },
    #[error("monitor {monitor} already has {count} sessions (max_sessions_per_monitor)")]
    PerMonitor { monitor: String, count: usize },
    #[error("more than {0} authenticated sessions (max_connections)")]
    Sessions(usize),
}

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("not done within login_grace_ms ({0} ms) of accept")]
    Late(u128),
    #[error("the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Tls(rustls::Error),
}

/// A slot of the startup pool, held from accept until the peer's certificate is found listed (or
/// the connection ends); released on drop.
struct StartupSlot {
    sh: Arc<Shared>,
    ip: IpAddr,
}

impl StartupSlot {
    fn take(sh: &Arc<Shared>, ip: IpAddr) -> Result<StartupSlot, Refusal> {
        let mut st = locked(&sh.startups);
        if st.total >= sh.max_startups {
            return Err(Refusal::Startups(st.total));
        }
        let n = st.by_ip.entry(ip).or_insert(0);
        if *n >= sh.max_startups_per_source {
            return Err(Refusal::PerSource { count: *n, ip });
        }
        *n += 1;
        st.total += 1;
        Ok(StartupSlot { sh: sh.clone(), ip })
    }
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut st = locked(&self.sh.startups);
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.by_ip.remove(&self.ip);
            }
        }
    }
}

/// An authenticated session's place under its monitor's cap and the total; released on drop.
struct SessionSlot<'a> {
    sh: &'a Shared,
    monitor: String,
}

impl<'a> SessionSlot<'a> {
    fn take(sh: &'a Shared, monitor: &str) -> Result<SessionSlot<'a>, Refusal> {
        let mut by = locked(&sh.sessions);
        let n = by.entry(monitor.to_owned()).or_insert(0);
        if *n >= sh.max_sessions_per_monitor {
            return Err(Refusal::PerMonitor {
                monitor: monitor.to_owned(),
                count: *n,
            });
        }
        if sh.conns.fetch_add(1, Ordering::SeqCst) >= sh.max_conns {
            sh.conns.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::Sessions(sh.max_conns));
        }
        *n += 1;
        Ok(SessionSlot {
            sh,
            monitor: monitor.to_owned(),
        })
    }
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.sh.conns.fetch_sub(1, Ordering::SeqCst);
        let mut by = locked(&self.sh.sessions);
        if let Some(n) = by.get_mut(&self.monitor) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.monitor);
            }
        }
    }
}

/// Runs the TLS handshake to its end or until `deadline` (one deadline for the whole handshake,
/// however the peer spreads its bytes).
fn handshake(s: &mut Tls, deadline: Instant, grace: Duration) -> Result<(), HandshakeError> {
    let late = || HandshakeError::Late(grace.as_millis());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        let _ = s.sock.set_read_timeout(Some(left));
        let _ = s.sock.set_write_timeout(Some(left));
        if s.conn.wants_write() {
            match s.conn.write_tls(&mut s.sock) {
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(late())
                }
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        if !s.conn.is_handshaking() {
            return Ok(());
        }
        match s.conn.read_tls(&mut s.sock) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(HandshakeError::Io(e)),
        }
        if let Err(e) = s.conn.process_new_packets() {
            // Tell the peer why (a TLS alert), best effort.
            let _ = s.conn.write_tls(&mut s.sock);
            return Err(HandshakeError::Tls(e));
        }
    }
}

/// The audit log as the RDMA glue's sink.
fn audit_sink(audit: Arc<Audit>) -> crate::rdma::AuditSink {
    Arc::new(move |event: &str, fields: serde_json::Value| audit.append(event, fields))
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
    /// REGS tokens, in thousandths of a call, and when they were last refilled.
    regs_tokens: u64,
    regs_refilled: Instant,
}

/// Whether to go on after a request.
enum Next {
    Continue,
    Close(String),
}

fn serve(sh: &Shared, tcp: TcpStream, peer: SocketAddr, accepted: Instant, slot: StartupSlot) {
    let conn = sh.next_conn.fetch_add(1, Ordering::SeqCst);
    let _ = tcp.set_nodelay(true);
    let auth_failed = |reason: String| {
        sh.audit
            .unauthenticated("auth_failed", peer.ip(), &peer.to_string(), &reason);
    };
    let tls_conn = match ServerConnection::new(sh.tls.clone()) {
        Ok(c) => c,
        Err(e) => return auth_failed(format!("TLS session: {e}")),
    };
    let mut s = StreamOwned::new(tls_conn, tcp);
    if let Err(e) = handshake(&mut s, accepted + sh.login_grace, sh.login_grace) {
        return auth_failed(format!("TLS handshake: {e}"));
    }
    let _ = s.sock.set_write_timeout(Some(sh.idle));
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
    // Authenticated: leave the startup pool for this monitor's own slots.
    drop(slot);
    let _session_slot = match SessionSlot::take(sh, &monitor) {
        Ok(slot) => slot,
        Err(reason) => {
            sh.audit.log(
                "refused",
                json!({"monitor": monitor, "peer": peer.to_string(), "reason": reason.to_string()}),
            );
            s.conn.send_close_notify();
            let _ = s.conn.complete_io(&mut s.sock);
            return;
        }
    };
    let _ = s.sock.set_read_timeout(Some(sh.idle));
    let _ = s.sock.set_write_timeout(Some(sh.idle));
    let mut sess = Session {
        sh,
        conn,
        peer,
        monitor,
        grant,
        hello: false,
        last_id: None,
        regs_tokens: REGS_BURST * 1000,
        regs_refilled: Instant::now(),
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

    /// Refuses `op` if the fleet does not assign this guest to this monitor now (`[fleet]`).
    fn unassigned(&self, op: &str) -> Option<Reply> {
        let fleet = self.sh.fleet.as_ref()?;
        let message = fleet.check(&self.monitor).err()?.to_string();
        self.sh.audit.log(
            "denied",
            json!({"monitor": self.monitor, "op": op, "reason": "not assigned in the fleet",
                   "guest": fleet.guest(), "assigned": fleet.assigned()}),
        );
        Some(Reply::Error {
            code: code::DENIED,
            message,
        })
    }

    /// Refuses an operation this monitor's entry does not allow, and says which setting would.
    fn not_permitted(&self, op: &str, setting: &str) -> Reply {
        self.sh.audit.log(
            "denied",
            json!({"monitor": self.monitor, "op": op, "reason": format!("no `{setting}`")}),
        );
        Reply::Error {
            code: code::DENIED,
            message: format!(
                "monitor {} may not {op}: its [[monitor]] entry in the bridge config needs `{setting}`",
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
        if let Some(refused) = self.unassigned("WRITE") {
            return refused;
        }
        if self.sh.agreement.k() >= 2 {
            // k-of-n: one monitor alone cannot write, so a vote need not hold the lock (only one
            // monitor could); it needs the lock permission as well as the write grant.
            if !self.grant.lock {
                return self.not_permitted("WRITE (vote under k-of-n agreement)", "lock = true");
            }
            return self.vote(gpa, bytes);
        }
        // k = 1: applied only into a guest this writer holds paused, under the lock's mutex so
        // that the lease cannot end or pass to another monitor halfway.
        let st = self.state();
        let now = Instant::now();
        let why = match st.holder.as_ref() {
            Some(h) if h.conn == self.conn && now < h.deadline => None,
            Some(h) if h.conn == self.conn => {
                Some("the lease of this monitor's lock ran out; LOCK again before writing")
            }
            _ => Some("WRITE needs the pause lock: LOCK first, write, then UNLOCK"),
        };
        if let Some(why) = why {
            self.sh.audit.log(
                "denied",
                json!({"monitor": self.monitor, "op": "WRITE", "gpa": gpa, "len": len,
                       "reason": "not holding the lock"}),
            );
            return Reply::Error {
                code: code::NOT_LOCKED,
                message: why.into(),
            };
        }
        let reply = self.vote(gpa, bytes);
        drop(st);
        reply
    }

    fn vote(&self, gpa: u64, bytes: &[u8]) -> Reply {
        let len = bytes.len() as u64;
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
            Outcome::Busy(message) => Reply::Error {
                code: code::BUSY,
                message,
            },
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LockState> {
        locked(&self.sh.lock)
    }

    fn lock_busy(&self, holder: Option<&str>, message: String) -> Reply {
        self.sh.audit.log(
            "lock_busy",
            json!({"monitor": self.monitor, "holder": holder, "reason": message}),
        );
        Reply::Error {
            code: code::BUSY,
            message,
        }
    }

    fn lock(&self, lease_ms: u32) -> Reply {
        if !self.grant.lock {
            return self.not_permitted("LOCK", "lock = true");
        }
        if let Some(refused) = self.unassigned("LOCK") {
            return refused;
        }
        let max = self.sh.limits.max_lease_ms;
        if lease_ms == 0 || u64::from(lease_ms) > max {
            return Reply::Error {
                code: code::BAD_REQUEST,
                message: format!(
                    "lease_ms {lease_ms} is outside 1..={max} (the bridge's [lock] max_lease_ms); ask for a shorter lease"
                ),
            };
        }
        let lease = Duration::from_millis(u64::from(lease_ms));
        let mut st = self.state();
        let now = Instant::now();
        let renewing = st
            .holder
            .as_ref()
            .is_some_and(|h| h.conn == self.conn && now < h.deadline);
        if !renewing && self.sh.agreement.k() >= 2 {
            // k-of-n: the monitors that must agree on a repair diagnose the same paused guest.
            // A LOCK while another monitor holds the pause joins it (at once, for the rest of the
            // holder's lease) instead of queueing behind a holder that waits for this monitor's
            // vote. Joining pauses nothing more: the holder's lease still bounds the pause.
            if let Some(h) = st
                .holder
                .as_ref()
                .filter(|h| h.conn != self.conn && now < h.deadline)
            {
                let (holder, left) = (h.monitor.clone(), h.deadline - now);
                st.joined.insert(self.conn);
                self.sh.audit.log(
                    "lock_joined",
                    json!({"monitor": self.monitor, "holder": holder,
                           "left_ms": u64::try_from(left.as_millis()).unwrap_or(u64::MAX)}),
                );
                return Reply::Lock { lock_ns: 0 };
            }
        }
        if renewing {
            if !st.queue.is_empty() {
                return self.lock_busy(
                    None,
                    "another monitor is waiting for the lock: a holder may not renew then; UNLOCK, and LOCK again later".into(),
                );
            }
        } else {
            // Wait (bounded) for our turn: first come, first served among waiting monitors.
            st.queue.push_back(self.conn);
            let give_up = now + MAX_LOCK_WAIT;
            loop {
                let now = Instant::now();
                let held_until = st
                    .holder
                    .as_ref()
                    .filter(|h| h.conn != self.conn && now < h.deadline)
                    .map(|h| h.deadline);
                let first = st.queue.front() == Some(&self.conn);
                if held_until.is_none() && first {
                    break;
                }
                if now >= give_up {
                    st.queue.retain(|&c| c != self.conn);
                    self.sh.lock_freed.notify_all();
                    let holder = st.holder.as_ref().map(|h| h.monitor.clone());
                    let message = match &holder {
                        Some(h) => format!("monitor {h} holds the lock"),
                        None => "other monitors are waiting for the lock before this one".into(),
                    };
                    return self.lock_busy(holder.as_deref(), message);
                }
                let wait = held_until.unwrap_or(give_up).min(give_up) - now;
                st = match self.sh.lock_freed.wait_timeout(st, wait) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
            st.queue.pop_front();
            // Whoever is next waits for this monitor now; let them re-check.
            self.sh.lock_freed.notify_all();
            if let Some(old) = st.holder.take() {
                if let Some(rdma) = &self.sh.rdma {
                    rdma.lock_ended(old.conn, "lease expired");
                }
                self.sh
                    .audit
                    .log("lock_expired", json!({"monitor": old.monitor}));
            }
        }
        let now = Instant::now();
        // The duty cycle: a renewal's unused rest of the lease is given back first.
        if renewing {
            if let Some(last) = st.history.get_mut(&self.monitor).and_then(|v| v.back_mut()) {
                last.1 = last.1.min(now);
            }
        }
        let limits = self.sh.limits;
        let window = Duration::from_millis(limits.duty_window_ms);
        let budget = Duration::from_millis(limits.max_pause_per_window_ms);
        let used = st.paused_within(&self.monitor, now, window);
        if used + lease > budget {
            if renewing {
                // Keep what was left of the current lease: the refusal takes nothing back.
                let deadline = st.holder.as_ref().map(|h| h.deadline);
                if let (Some(last), Some(deadline)) = (
                    st.history.get_mut(&self.monitor).and_then(|v| v.back_mut()),
                    deadline,
                ) {
                    last.1 = deadline;
                }
            }
            return self.lock_busy(
                None,
                format!(
                    "monitor {} held the guest paused {} ms of the last {} ms; with {lease_ms} ms more it would exceed [lock] max_pause_per_window_ms = {}: wait before locking again",
                    self.monitor,
                    used.as_millis(),
                    limits.duty_window_ms,
                    limits.max_pause_per_window_ms
                ),
            );
        }
        // The record first: a pause the audit log cannot hold is not taken.
        let rec = json!({"monitor": self.monitor, "lease_ms": lease_ms});
        if let Err(e) = self.sh.audit.append("lock_request", rec) {
            return Reply::Error {
                code: code::INTERNAL,
                message: format!("lock refused, the guest was not paused: {e}"),
            };
        }
        match self.sh.backend.pause(lease) {
            Ok(lock_ns) => {
                st.holder = Some(Holder {
                    conn: self.conn,
                    monitor: self.monitor.clone(),
                    deadline: now + lease,
                });
                st.history
                    .entry(self.monitor.clone())
                    .or_default()
                    .push_back((now, now + lease));
                self.rdma_lock_held(now + lease);
                self.sh.audit.log(
                    "lock",
                    json!({"monitor": self.monitor, "lease_ms": lease_ms, "lock_ns": lock_ns}),
                );
                Reply::Lock { lock_ns }
            }
            Err(e) => {
                st.end_hold(now);
                self.sh.lock_freed.notify_all();
                self.rdma_lock_ended("pause failed");
                Reply::Error {
                    code: code::INTERNAL,
                    message: format!("pause failed: {e}"),
                }
            }
        }
    }

    fn unlock(&self) -> Reply {
        let mut st = self.state();
        if st.joined.remove(&self.conn) {
            self.sh
                .audit
                .log("unlock_joined", json!({"monitor": self.monitor}));
            return Reply::Unlock;
        }
        match st.holder.as_ref() {
            Some(cur) if cur.conn == self.conn => {
                let now = Instant::now();
                let expired = now >= cur.deadline;
                st.end_hold(now);
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
        let mut st = self.state();
        st.queue.retain(|&c| c != self.conn);
        st.joined.remove(&self.conn);
        if st.holder.as_ref().is_some_and(|cur| cur.conn == self.conn) {
            st.end_hold(Instant::now());
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
        let st = self.state();
        let now = Instant::now();
        let lease = st
            .holder
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
        if let Some(refused) = self.unassigned("RESTART") {
            return refused;
        }
        // A restart ends any pause lock: the guest boots afresh.
        let mut st = self.state();
        if let (Some(cur), Some(rdma)) = (st.holder.as_ref(), &self.sh.rdma) {
            rdma.lock_ended(cur.conn, "restart");
        }
        st.end_hold(Instant::now());
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

    fn regs(&mut self, vcpu: u8) -> Reply {
        if !self.grant.regs {
            return self.not_permitted("REGS", "regs = true");
        }
        // A token bucket per session: each REGS forces a vCPU exit on kvm.
        let now = Instant::now();
        let elapsed = now.duration_since(self.regs_refilled);
        let earned = u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(REGS_PER_SECOND);
        self.regs_tokens = self
            .regs_tokens
            .saturating_add(earned)
            .min(REGS_BURST * 1000);
        self.regs_refilled = now;
        if self.regs_tokens < 1000 {
            self.sh.audit.log(
                "denied",
                json!({"monitor": self.monitor, "op": "REGS", "reason": "rate limit"}),
            );
            return Reply::Error {
                code: code::BUSY,
                message: format!(
                    "REGS is limited to {REGS_PER_SECOND} per second (bursts of {REGS_BURST}) per session; retry later"
                ),
            };
        }
        self.regs_tokens -= 1000;
        self.sh
            .audit
            .log("regs", json!({"monitor": self.monitor, "vcpu": vcpu}));
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
