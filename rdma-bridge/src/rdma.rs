//! The server's side of the verbs data path: which memory regions each monitor's queue pair gets,
//! when it may write, and when it goes away. The verbs themselves are in [`crate::verbs`]; the
//! device is reached through the [`Nic`] seam (`DeviceNic` with feature `verbs`), so this policy
//! is built and unit tested on any host.
//!
//! Following ReDMArk's mitigations (Rothenberger et al., USENIX Security 2021):
//!
//! * **A protection domain per connection.** `RDMA_CONNECT` registers, in a protection domain of
//!   that connection alone, exactly the monitor's own grants ([`plan_regions`]): read ranges with
//!   REMOTE_READ only, write ranges with REMOTE_WRITE only, and no write range at all when
//!   `agreement.k > 1` (a one-sided write cannot wait for other monitors' votes; writes then go
//!   through the control channel's WRITE, where the Guard counts them). An rkey from another
//!   monitor's registration names a region of another domain, so the NIC refuses it on this
//!   monitor's queue pair.
//! * **Queue-pair rights from that monitor's grant only**: REMOTE_READ if it has a read range;
//!   REMOTE_WRITE **only while the monitor holds an unexpired pause lock** (the write window):
//!   opened on LOCK ([`RdmaGlue::lock_held`]), closed on UNLOCK, when the session ends, on RESTART
//!   ([`RdmaGlue::lock_ended`]) and when the lease runs out (a timer thread, so that a monitor that
//!   never sends UNLOCK loses the right at the deadline). The window is an `ibv_modify_qp` RTS → RTS
//!   of the QP's access flags.
//! * **Bounded and released with the session.** At most [`MAX_QPS_PER_MONITOR`] queue pairs per
//!   monitor (over all its sessions) and [`crate::verbs::MAX_MONITORS`] per bridge; one per session —
//!   a second `RDMA_CONNECT` on a session replaces (releases) the first; the queue pair, its regions
//!   and its protection domain are released when the TLS session ends ([`RdmaGlue::end_session`]).
//!
//! Audited: `rdma_connected` (with the ranges and rights registered), `rdma_refused`,
//! `rdma_write_open`/`rdma_write_closed`, `rdma_released`. Not audited: the individual one-sided
//! READs and WRITEs — the bridge's CPU never sees them. What bounds them: the ranges and rights
//! registered for that monitor (in the audit log), the write window (inside an audited lock), and
//! the connection's lifetime (inside an audited session).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::guard::Grant;
use crate::verbs::{self, Access, Endpoint, RegionInfo, VerbsError, MAX_MONITORS};

/// Most RDMA queue pairs one monitor (one certificate) may hold at once, over all its sessions.
pub const MAX_QPS_PER_MONITOR: usize = 2;

/// Longest the expiry timer sleeps when no write window is open (it is woken on every change).
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// Why an `RDMA_CONNECT` or a write-window change failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The device, a registration or the exchange.
    #[error("RDMA: {0}")]
    Verbs(#[from] VerbsError),
    /// A range of the monitor's grant is not in guest memory.
    #[error("RDMA: region {region}: {source}; check the grant's ranges against the VM's memory")]
    Region {
        /// The region.
        region: String,
        /// Why.
        source: introspect::mem::MemError,
    },
    /// The audit log could not record the connection; it was undone.
    #[error("RDMA: the audit log cannot record this connection ({source}); nothing was connected")]
    Unrecorded {
        /// Why the record failed.
        source: crate::audit::AuditError,
    },
    /// The monitor already holds its quota of queue pairs.
    #[error(
        "RDMA: monitor {monitor} already has {MAX_QPS_PER_MONITOR} RDMA queue pairs (its limit); \
         end one of its sessions, or send RDMA_CONNECT again on a session that has one (it \
         replaces it)"
    )]
    Quota {
        /// The monitor.
        monitor: String,
    },
}

/// One region to register for a monitor, before it is mapped to host memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRegion {
    /// Name shown to the monitor (`read-N` / `write-N`, N the index of the range in its grant).
    pub name: String,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// The one remote right.
    pub access: Access,
}

/// The regions a monitor's RDMA connection gets: exactly its own grant — each read range with
/// REMOTE_READ, each write range with REMOTE_WRITE, and no write range when `k > 1`.
pub fn plan_regions(grant: &Grant, k: usize) -> Vec<PlannedRegion> {
    let reads = grant
        .read
        .iter()
        .enumerate()
        .map(|(i, &(gpa, len))| PlannedRegion {
            name: format!("read-{i}"),
            gpa,
            len,
            access: Access::RemoteRead,
        });
    let writes: &[(u64, u64)] = if k == 1 { &grant.write } else { &[] };
    let writes = writes
        .iter()
        .enumerate()
        .map(|(i, &(gpa, len))| PlannedRegion {
            name: format!("write-{i}"),
            gpa,
            len,
            access: Access::RemoteWrite,
        });
    reads.chain(writes).collect()
}

/// The RDMA device as the glue uses it (the seam that tests replace).
pub trait Nic: Send {
    /// Creates a protection domain, registers `regions` in it and connects a queue pair (in it,
    /// remote read only if some region grants it, never remote write) towards `remote`. Returns
    /// the local endpoint (its `qp_num` names the connection) and the region table.
    fn accept(
        &mut self,
        remote: Endpoint,
        regions: &[PlannedRegion],
    ) -> Result<(Endpoint, Vec<RegionInfo>), RdmaError>;
    /// Adds or removes remote write on a connection's queue pair; `Ok(false)` if it is gone.
    fn set_remote_write(&mut self, qp_num: u32, on: bool) -> Result<bool, VerbsError>;
    /// Destroys a connection's queue pair, regions and protection domain; whether it existed.
    fn release(&mut self, qp_num: u32) -> bool;
}

/// Where the glue records audit events (the server's audit log): `Err` says why one could not be
/// appended. What must not happen unrecorded — a connection's registration, opening a write
/// window — is recorded first and not done when the record fails.
pub type AuditSink =
    Arc<dyn Fn(&str, serde_json::Value) -> Result<(), crate::audit::AuditError> + Send + Sync>;

/// One session's RDMA connection.
struct Conn {
    monitor: String,
    qp_num: u32,
    has_write_region: bool,
    /// The lease deadline while the write window is open.
    window: Option<Instant>,
}

struct State {
    nic: Box<dyn Nic>,
    /// By the server's session (connection) number.
    conns: HashMap<u64, Conn>,
    shutdown: bool,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    audit: AuditSink,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Closes `conn`'s write window if open; if it cannot be closed, releases the connection
    /// altogether (fail closed: a queue pair that may still write must not outlive the lock).
    fn close_window(&self, st: &mut State, session: u64, reason: &str) {
        let Some(c) = st.conns.get_mut(&session) else {
            return;
        };
        if c.window.take().is_none() {
            return;
        }
        let (monitor, qp_num) = (c.monitor.clone(), c.qp_num);
        match st.nic.set_remote_write(qp_num, false) {
            Ok(_) => {
                let _ = (self.audit)(
                    "rdma_write_closed",
                    json!({"monitor": monitor, "qp_num": qp_num, "reason": reason}),
                );
            }
            Err(e) => {
                st.conns.remove(&session);
                st.nic.release(qp_num);
                let _ = (self.audit)(
                    "rdma_released",
                    json!({"monitor": monitor, "qp_num": qp_num,
                           "reason": format!("the write window could not be closed ({reason}): {e}")}),
                );
            }
        }
    }

    /// The expiry timer: closes every write window whose lease has run out.
    fn expire_loop(&self) {
        let mut st = self.state();
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            let expired: Vec<u64> = st
                .conns
                .iter()
                .filter(|(_, c)| c.window.is_some_and(|d| d <= now))
                .map(|(s, _)| *s)
                .collect();
            for s in expired {
                self.close_window(&mut st, s, "lease expired");
            }
            let next = st.conns.values().filter_map(|c| c.window).min();
            let wait = next.map_or(IDLE_WAKE, |d| d.saturating_duration_since(Instant::now()));
            st = match self.changed.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// The RDMA connections of every monitor session, their write windows and the expiry timer.
pub struct RdmaGlue {
    inner: Arc<Inner>,
    k: usize,
    timer: Option<JoinHandle<()>>,
}

impl RdmaGlue {
    /// Starts the glue over `nic` (and its expiry timer thread), for write agreement `k`.
    pub fn new(nic: Box<dyn Nic>, k: usize, audit: AuditSink) -> std::io::Result<RdmaGlue> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                nic,
                conns: HashMap::new(),
                shutdown: false,
            }),
            changed: Condvar::new(),
            audit,
        });
        let t = inner.clone();
        let timer = std::thread::Builder::new()
            .name("rdma-lease".into())
            .spawn(move || t.expire_loop())?;
        Ok(RdmaGlue {
            inner,
            k,
            timer: Some(timer),
        })
    }

    /// Connects session `session`'s queue pair for `monitor` with exactly `grant`'s regions and
    /// returns the bridge's connect blob. A queue pair the session already has is released first.
    /// `lock_deadline` is the lease deadline if the session holds the pause lock now (the write
    /// window then opens at once).
    pub fn connect(
        &self,
        session: u64,
        monitor: &str,
        grant: &Grant,
        blob: &[u8],
        lock_deadline: Option<Instant>,
    ) -> Result<Vec<u8>, RdmaError> {
        let (remote, _) = verbs::decode_connect(blob)?;
        let plan = plan_regions(grant, self.k);
        let audit = &self.inner.audit;
        let mut st = self.inner.state();
        if let Some(old) = st.conns.get(&session).map(|c| c.qp_num) {
            self.inner
                .close_window(&mut st, session, "replaced by a new RDMA_CONNECT");
            if st.conns.remove(&session).is_some() {
                st.nic.release(old);
                let _ = audit(
                    "rdma_released",
                    json!({"monitor": monitor, "qp_num": old, "reason": "replaced by a new RDMA_CONNECT"}),
                );
            }
        }
        let refuse = |e: RdmaError| {
            let _ = audit(
                "rdma_refused",
                json!({"monitor": monitor, "reason": e.to_string()}),
            );
            Err(e)
        };
        if st.conns.values().filter(|c| c.monitor == monitor).count() >= MAX_QPS_PER_MONITOR {
            return refuse(RdmaError::Quota {
                monitor: monitor.to_owned(),
            });
        }
        if st.conns.len() >= MAX_MONITORS {
            return refuse(VerbsError::TooManyMonitors.into());
        }
        let (local, regions) = match st.nic.accept(remote, &plan) {
            Ok(x) => x,
            Err(e) => return refuse(e),
        };
        let reply = match verbs::encode_connect(&local, &regions) {
            Ok(b) => b,
            Err(e) => {
                st.nic.release(local.qp_num);
                return refuse(e.into());
            }
        };
        let shown: Vec<_> = regions
            .iter()
            .map(|r| {
                json!({"name": r.name, "gpa": r.gpa, "len": r.len,
                       "access": match r.access { Access::RemoteRead => "read", Access::RemoteWrite => "write" }})
            })
            .collect();
        // Recorded before the monitor learns the rkeys; unrecorded, the connection is undone.
        if let Err(e) = audit(
            "rdma_connected",
            json!({"monitor": monitor, "qp_num": local.qp_num, "regions": shown}),
        ) {
            st.nic.release(local.qp_num);
            return Err(RdmaError::Unrecorded { source: e });
        }
        st.conns.insert(
            session,
            Conn {
                monitor: monitor.to_owned(),
                qp_num: local.qp_num,
                has_write_region: regions.iter().any(|r| r.access == Access::RemoteWrite),
                window: None,
            },
        );
        if let Some(deadline) = lock_deadline {
            self.open_window(&mut st, session, deadline);
        }
        Ok(reply)
    }

    fn open_window(&self, st: &mut State, session: u64, deadline: Instant) {
        if deadline <= Instant::now() {
            return;
        }
        let Some(c) = st.conns.get_mut(&session) else {
            return;
        };
        if !c.has_write_region {
            return;
        }
        if c.window.is_some() {
            // A renewal: the window stays open until the new deadline.
            c.window = Some(deadline);
            self.inner.changed.notify_all();
            return;
        }
        let (monitor, qp_num) = (c.monitor.clone(), c.qp_num);
        // Recorded first: a write window the audit log cannot hold is not opened.
        let ms = introspect::conv::millis(deadline.saturating_duration_since(Instant::now()));
        if let Err(e) = (self.inner.audit)(
            "rdma_write_open",
            json!({"monitor": monitor, "qp_num": qp_num, "lease_ms": ms}),
        ) {
            tracing::error!(%monitor, "RDMA write window not opened: the audit log failed: {e}");
            return;
        }
        match st.nic.set_remote_write(qp_num, true) {
            Ok(true) => {
                if let Some(c) = st.conns.get_mut(&session) {
                    c.window = Some(deadline);
                }
                self.inner.changed.notify_all();
            }
            Ok(false) => {}
            Err(e) => {
                let _ = (self.inner.audit)(
                    "rdma_write_error",
                    json!({"monitor": monitor, "qp_num": qp_num,
                           "reason": format!("the write window could not be opened: {e}")}),
                );
            }
        }
    }

    /// Session `session` holds the pause lock until `deadline` (taken or renewed): its queue pair
    /// (if it has one with a write region) may write until then.
    pub fn lock_held(&self, session: u64, deadline: Instant) {
        let mut st = self.inner.state();
        self.open_window(&mut st, session, deadline);
    }

    /// Session `session` no longer holds the pause lock (`reason`: UNLOCK, RESTART, ...): its
    /// queue pair loses the write right.
    pub fn lock_ended(&self, session: u64, reason: &str) {
        let mut st = self.inner.state();
        self.inner.close_window(&mut st, session, reason);
        self.inner.changed.notify_all();
    }

    /// Session `session` ended: its queue pair, regions and protection domain are released.
    pub fn end_session(&self, session: u64) {
        let mut st = self.inner.state();
        self.inner.close_window(&mut st, session, "session ended");
        if let Some(c) = st.conns.remove(&session) {
            st.nic.release(c.qp_num);
            let _ = (self.inner.audit)(
                "rdma_released",
                json!({"monitor": c.monitor, "qp_num": c.qp_num, "reason": "session ended"}),
            );
        }
        self.inner.changed.notify_all();
    }

    /// Connected queue pairs (all monitors).
    pub fn connections(&self) -> usize {
        self.inner.state().conns.len()
    }
}

impl Drop for RdmaGlue {
    fn drop(&mut self) {
        self.inner.state().shutdown = true;
        self.inner.changed.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

/// The real device: a `VerbsTarget` registering the backend's guest
/// memory (feature `verbs`).
#[cfg(feature = "verbs")]
pub struct DeviceNic {
    target: verbs::VerbsTarget,
    backend: Arc<dyn crate::backend::Backend>,
}

#[cfg(feature = "verbs")]
impl DeviceNic {
    /// Opens `device` (the first one when `None`).
    pub fn open(
        device: Option<&str>,
        backend: Arc<dyn crate::backend::Backend>,
    ) -> Result<DeviceNic, RdmaError> {
        Ok(DeviceNic {
            target: verbs::VerbsTarget::open(device)?,
            backend,
        })
    }
}

#[cfg(feature = "verbs")]
impl Nic for DeviceNic {
    fn accept(
        &mut self,
        remote: Endpoint,
        regions: &[PlannedRegion],
    ) -> Result<(Endpoint, Vec<RegionInfo>), RdmaError> {
        let mut specs = Vec::with_capacity(regions.len());
        let writable = self.backend.mem().writable();
        for r in regions {
            if r.access == Access::RemoteWrite && !writable {
                // A read-only mapping (a dump served without --dump-writable) cannot be registered
                // for writing; the TCP WRITE is refused there too.
                tracing::warn!(
                    region = %r.name,
                    "guest memory is mapped read-only: no RDMA write region (serve a dump with \
                     --dump-writable to allow writes)"
                );
                continue;
            }
            let region = |source| RdmaError::Region {
                region: r.name.clone(),
                source,
            };
            let len = usize::try_from(r.len).map_err(|_| {
                region(introspect::mem::MemError::OutOfRange {
                    gpa: r.gpa,
                    len: r.len,
                })
            })?;
            let host = self.backend.mem().host_ptr(r.gpa, len).map_err(region)?;
            specs.push(verbs::RegionSpec {
                name: r.name.clone(),
                gpa: r.gpa,
                host,
                len,
                access: r.access,
            });
        }
        // SAFETY: every host pointer is inside the backend's mapping of guest memory, which this
        // value keeps alive (`backend`) for as long as the target and so every registration; no
        // Rust references into guest memory exist (it is only accessed by volatile copies).
        let a = unsafe { self.target.accept(remote, specs) }?;
        Ok((a.endpoint, a.regions))
    }

    fn set_remote_write(&mut self, qp_num: u32, on: bool) -> Result<bool, VerbsError> {
        self.target.set_remote_write(qp_num, on)
    }

    fn release(&mut self, qp_num: u32) -> bool {
        self.target.release(qp_num)
    }
}

#[cfg(test)]
mod tests;
