//! Keys kept alive under a lease: a guest's [`Registration`] and a monitor's [`Member`]ship.
//!
//! One task per handle, on the handle's own runtime thread:
//!
//! 1. connect, grant a lease of `ttl_s`, put the key under it;
//! 2. every TTL/3 send a keepalive and wait (bounded) for its answer; an answer with TTL > 0
//!    extends the *proof of ownership* to `sent + ttl - margin` (`sent` is when the request left,
//!    so a slow answer never extends it past what etcd granted);
//! 3. on any error or timeout (etcd unreachable, stopped, restarted) start again after a backoff
//!    (200 ms doubling to 2 s): reconnect, keep the old lease if etcd still has it (etcd restarted
//!    with its data), else grant a new one (etcd restarted empty, or the lease ran out), and put
//!    the key again either way.
//!
//! [`Registration::close`] (and Drop) revokes the lease, bounded by [`REVOKE_TIMEOUT`], so the key
//! disappears at once instead of a TTL later.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, PutOptions};
use tokio::sync::watch;

use crate::config::{FleetConfig, FleetError};
use crate::records::{check_name, GuestRecord, MemberRecord};
use crate::shared::{BACKOFF_MAX, BACKOFF_MIN};

/// Longest [`Registration::close`] waits for etcd to revoke the lease.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the owner asks of the background task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    /// Revoke the lease, then end.
    Close,
    /// End without revoking (a crash, as far as etcd can tell): for tests.
    Abandon,
}

#[derive(Default)]
struct State {
    /// The lease currently holding the key, if etcd confirmed it.
    lease: Option<i64>,
    /// Until when the key is proven to exist (see the module doc).
    owns_until: Option<Instant>,
    /// Times the key was (re)written.
    puts: u64,
    /// A client that last talked to etcd, for the revoke on close.
    client: Option<Client>,
}

type Shared = crate::shared::Shared<State>;

/// The common machinery of [`Registration`] and [`Member`].
struct Holder {
    key: String,
    shared: Arc<Shared>,
    stop: watch::Sender<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    fn start(
        cfg: FleetConfig,
        key: String,
        value: Vec<u8>,
        what: &str,
    ) -> Result<Holder, FleetError> {
        cfg.validate()?;
        let shared = Arc::new(Shared::new(State::default()));
        let (stop, stop_rx) = watch::channel(Stop::Run);
        // Connect, grant and put, each bounded by the connect timeout (and usually far quicker).
        let first_wait = cfg.connect_timeout() * 2;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FleetError::Runtime)?;
        let task = Task {
            timeout: cfg.connect_timeout(),
            cfg,
            key: key.clone(),
            value,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("fleet-{what}"))
            .spawn(move || rt.block_on(task.run(stop_rx)))
            .map_err(FleetError::Runtime)?;
        let h = Holder {
            key,
            shared,
            stop,
            thread: Some(thread),
        };
        // Give the first registration a chance, bounded; it goes on in the background anyway.
        h.wait_put(0, first_wait);
        Ok(h)
    }

    /// Waits until the key was put more than `since` times, or `timeout`; returns the count.
    fn wait_put(&self, since: u64, timeout: Duration) -> u64 {
        self.shared.wait_until(timeout, |st| st.puts > since).puts
    }

    fn end(&mut self, how: Stop) {
        let Some(t) = self.thread.take() else {
            return;
        };
        let _ = self.stop.send(how);
        if t.join().is_err() {
            tracing::warn!("fleet: the background thread of {} panicked", self.key);
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.end(Stop::Close);
    }
}

struct Task {
    cfg: FleetConfig,
    key: String,
    value: Vec<u8>,
    shared: Arc<Shared>,
    timeout: Duration,
}

/// Runs `f` bounded by `t`.
async fn bounded<T>(
    t: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(t, f).await {
        Ok(r) => r.map_err(FleetError::from),
        Err(_) => Err(FleetError::Timeout(what)),
    }
}

/// A client for `cfg`, connected within its timeout.
pub(crate) async fn connect(cfg: &FleetConfig) -> Result<Client, FleetError> {
    let t = cfg.connect_timeout();
    let opts = ConnectOptions::new()
        .with_connect_timeout(t)
        .with_keep_alive(Duration::from_secs(1), t)
        .with_keep_alive_while_idle(true);
    bounded(t, "connect", Client::connect(cfg.urls(), Some(opts))).await
}

impl Task {
    async fn run(self, mut stop: watch::Receiver<Stop>) {
        let how = tokio::select! {
            () = self.keep() => Stop::Close,
            how = wait_stop(&mut stop) => how,
        };
        if how == Stop::Close {
            self.revoke().await;
        }
    }

    /// Keeps the key alive, forever.
    async fn keep(&self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session().await {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::warn!(
                        "fleet: keeping {} alive: {e}; retrying in {backoff:?}",
                        self.key
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's worth of keeping the key: returns when something failed.
    async fn session(&self) -> Result<(), FleetError> {
        let t = self.timeout;
        let mut client = connect(&self.cfg).await?;
        self.shared.lock().client = Some(client.clone());
        let ttl = i64::try_from(self.cfg.ttl_s).unwrap_or(5);
        // An old lease etcd still has (it restarted with its data, or we lost only the
        // connection) is kept; otherwise a new one.
        let old = self.shared.lock().lease;
        let mut lease = None;
        if let Some(id) = old {
            let sent = Instant::now();
            let probe = async {
                let (mut keeper, mut stream) =
                    bounded(t, "lease keepalive", client.lease_keep_alive(id)).await?;
                bounded(t, "lease keepalive", keeper.keep_alive()).await?;
                let r = bounded(t, "lease keepalive", stream.message()).await?;
                Ok::<_, FleetError>((keeper, stream, r))
            };
            match probe.await {
                Ok((keeper, stream, Some(r))) if r.ttl() > 0 => {
                    lease = Some((id, keeper, stream, sent, r.ttl()));
                }
                Ok(_) => self.lost_lease(id),
                Err(e) if lease_gone(&e) => self.lost_lease(id),
                Err(e) => return Err(e),
            }
        }
        let (id, mut keeper, mut stream, mut sent, mut granted) = match lease {
            Some(l) => l,
            None => {
                let sent = Instant::now();
                let g = bounded(t, "lease grant", client.lease_grant(ttl, None)).await?;
                let id = g.id();
                let (keeper, stream) =
                    bounded(t, "lease keepalive", client.lease_keep_alive(id)).await?;
                (id, keeper, stream, sent, g.ttl())
            }
        };
        let put = PutOptions::new().with_lease(id);
        bounded(
            t,
            "put",
            client.put(self.key.clone(), self.value.clone(), Some(put)),
        )
        .await?;
        {
            let mut st = self.shared.lock();
            st.lease = Some(id);
            st.owns_until = Some(owned_until(sent, granted));
            st.puts += 1;
            self.shared.notify();
        }
        tracing::debug!("fleet: {} put under lease {id:x}", self.key);
        let period = self.cfg.ttl() / 3;
        loop {
            tokio::time::sleep_until((sent + period).into()).await;
            sent = Instant::now();
            let wait = period.max(Duration::from_millis(100));
            let reply = async {
                bounded(wait, "lease keepalive", keeper.keep_alive()).await?;
                bounded(wait, "lease keepalive", stream.message()).await
            };
            match reply.await {
                Ok(Some(r)) if r.ttl() > 0 => granted = r.ttl(),
                Ok(Some(_)) => {
                    self.lost_lease(id);
                    return Ok(());
                }
                Ok(None) => return Err(FleetError::Timeout("lease keepalive stream (closed)")),
                Err(e) if lease_gone(&e) => {
                    self.lost_lease(id);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            let mut st = self.shared.lock();
            st.owns_until = Some(owned_until(sent, granted));
            self.shared.notify();
        }
    }

    /// etcd no longer has lease `id`: nothing is proven any more; the next session grants anew.
    fn lost_lease(&self, id: i64) {
        tracing::warn!(
            "fleet: etcd lost lease {id:x} of {}; joining again with a new one",
            self.key
        );
        let mut st = self.shared.lock();
        st.lease = None;
        st.owns_until = None;
        self.shared.notify();
    }

    async fn revoke(&self) {
        let (lease, client) = {
            let mut st = self.shared.lock();
            st.owns_until = None;
            (st.lease.take(), st.client.clone())
        };
        let Some(id) = lease else { return };
        let attempt = async {
            let mut c = match client {
                Some(c) => c,
                None => connect(&self.cfg).await?,
            };
            bounded(REVOKE_TIMEOUT, "lease revoke", c.lease_revoke(id)).await
        };
        match tokio::time::timeout(REVOKE_TIMEOUT, attempt).await {
            Ok(Ok(_)) => tracing::debug!("fleet: revoked the lease of {}", self.key),
            Ok(Err(e)) => tracing::warn!(
                "fleet: revoking the lease of {}: {e}; it ends within its TTL",
                self.key
            ),
            Err(_) => tracing::warn!(
                "fleet: revoking the lease of {} timed out; it ends within its TTL",
                self.key
            ),
        }
    }
}

/// Whether `e` says etcd does not have the lease (rather than that it could not be asked).
fn lease_gone(e: &FleetError) -> bool {
    match e {
        FleetError::Etcd(etcd_client::Error::LeaseKeepAliveError(m)) => m.contains("not found"),
        FleetError::Etcd(etcd_client::Error::GRpcStatus(s)) => {
            s.message().contains("lease not found")
        }
        _ => false,
    }
}

async fn wait_stop(stop: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let now = *stop.borrow_and_update();
        if now != Stop::Run {
            return now;
        }
        if stop.changed().await.is_err() {
            // The handle is gone without a word: behave as close.
            return Stop::Close;
        }
    }
}

/// `sent + ttl - margin`, the margin a quarter of the TTL and at least 100 ms: room for a
/// loaded monitor to notice before etcd expires the lease and another monitor takes over.
fn owned_until(sent: Instant, ttl_s: i64) -> Instant {
    let ttl = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(0));
    let margin = (ttl / 4).max(Duration::from_millis(100));
    sent + ttl.saturating_sub(margin)
}

/// A guest's registration: `<prefix>/guests/<name>` kept alive under the guest's lease.
pub struct Registration {
    holder: Holder,
}

impl Registration {
    /// Registers `guest` and keeps it registered until [`Registration::close`] (or drop).
    ///
    /// Waits a few seconds at most for the first registration; if etcd cannot be reached it goes
    /// on trying in the background ([`Registration::registered`] tells). Errors only for a bad
    /// config or name, or when the background thread cannot start.
    pub fn start(cfg: FleetConfig, guest: GuestRecord) -> Result<Registration, FleetError> {
        check_name(&guest.name)?;
        let key = format!("{}{}", cfg.guests_dir(), guest.name);
        let value = serde_json::to_vec(&guest)?;
        Ok(Registration {
            holder: Holder::start(cfg, key, value, "guest")?,
        })
    }

    /// The key this registration keeps.
    pub fn key(&self) -> &str {
        &self.holder.key
    }

    /// Whether etcd currently holds the key under a live lease, as far as this process knows.
    pub fn registered(&self) -> bool {
        self.holder
            .shared
            .lock()
            .owns_until
            .is_some_and(|t| Instant::now() < t)
    }

    /// Waits up to `timeout` for the key to be (re)written more than `since` times; returns how
    /// many times it has been written.
    pub fn wait_put(&self, since: u64, timeout: Duration) -> u64 {
        self.holder.wait_put(since, timeout)
    }

    /// Revokes the lease (bounded by [`REVOKE_TIMEOUT`]): the guest leaves the fleet at once.
    pub fn close(mut self) {
        self.holder.end(Stop::Close);
    }

    /// Stops without revoking, as a crashed process would: the key stays until its lease runs
    /// out. For tests.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.holder.end(Stop::Abandon);
    }
}

/// A monitor's membership: `<prefix>/monitors/<name>` under its lease, with fencing.
pub struct Member {
    holder: Holder,
    name: String,
}

impl Member {
    /// Joins the group as `name` and stays in it until [`Member::leave`] (or drop), re-joining
    /// with a new lease whenever etcd lost the old one.
    ///
    /// Waits a few seconds at most for the first join; see [`Registration::start`].
    pub fn join(cfg: FleetConfig, name: &str) -> Result<Member, FleetError> {
        check_name(name)?;
        let key = format!("{}{name}", cfg.monitors_dir());
        let value = serde_json::to_vec(&MemberRecord {
            name: name.to_owned(),
        })?;
        Ok(Member {
            holder: Holder::start(cfg, key, value, "member")?,
            name: name.to_owned(),
        })
    }

    /// This monitor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instant until which this monitor can prove its membership: when the last successful
    /// keepalive was sent, plus the TTL etcd answered, minus a safety margin (a quarter of the TTL, at
    /// least 100 ms). `None` when it never joined or etcd said the lease is gone.
    pub fn owns_until(&self) -> Option<Instant> {
        self.holder.shared.lock().owns_until
    }

    /// True when this monitor cannot prove its membership now: it must not act on any guest.
    pub fn fenced(&self) -> bool {
        self.owns_until().is_none_or(|t| Instant::now() >= t)
    }

    /// Waits up to `timeout` for the key to be (re)written more than `since` times (each join and
    /// re-join writes it); returns how many times it has been written.
    pub fn wait_put(&self, since: u64, timeout: Duration) -> u64 {
        self.holder.wait_put(since, timeout)
    }

    /// Leaves the group at once (revokes the lease, bounded by [`REVOKE_TIMEOUT`]).
    pub fn leave(mut self) {
        self.holder.end(Stop::Close);
    }

    /// Stops without revoking, as a crashed process would. For tests.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.holder.end(Stop::Abandon);
    }
}
