//! [`Watcher`]: the fleet's current [`View`] — members and guests — kept from etcd.
//!
//! One GET of `<prefix>/` (both directories, one revision), then a WATCH from the next revision.
//! The watch asks etcd for a progress report when it has been quiet for a second and counts as
//! broken when none comes within the connect timeout, so a stopped or unreachable etcd is noticed
//! even though a silent stream is otherwise legal. On any error, cancellation or compaction it
//! lists and watches again, with a backoff (200 ms doubling to 2 s). Between a failure and the
//! next good list the view keeps its last content and [`Watcher::connected`] is false.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;

use crate::config::{FleetConfig, FleetError};
use crate::lease::connect;
use crate::records::{classify, parse_guest, parse_member, Entry, GuestRecord};
use crate::shared::{BACKOFF_MAX, BACKOFF_MIN};

/// Most keys one listing takes in.
pub const MAX_KEYS: i64 = 100_000;
/// A watch quiet this long is asked for a progress report.
const QUIET: Duration = Duration::from_secs(1);

/// The fleet as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The monitors in the group.
    pub members: BTreeSet<String>,
    /// The registered guests, by name.
    pub guests: BTreeMap<String, GuestRecord>,
    /// The etcd revision this view reflects.
    pub revision: i64,
}

struct Inner {
    view: View,
    changed: u64,
    connected: bool,
}

type Shared = crate::shared::Shared<Inner>;

impl Shared {
    /// Replaces the view; bumps the counter when members or guests changed.
    fn set(&self, view: View) {
        let mut g = self.lock();
        let differs = g.view.members != view.members || g.view.guests != view.guests;
        g.view = view;
        if differs {
            g.changed += 1;
        }
        self.notify();
    }

    fn set_connected(&self, c: bool) {
        let mut g = self.lock();
        if g.connected != c {
            g.connected = c;
            self.notify();
        }
    }
}

/// Keeps a [`View`] of the fleet current, on a thread of its own.
pub struct Watcher {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching. Waits (bounded by twice the connect timeout) for the first listing; if
    /// etcd cannot be reached it goes on trying in the background ([`Watcher::connected`]).
    pub fn start(cfg: FleetConfig) -> Result<Watcher, FleetError> {
        cfg.validate()?;
        let shared = Arc::new(Shared::new(Inner {
            view: View::default(),
            changed: 0,
            connected: false,
        }));
        let (stop, mut stop_rx) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FleetError::Runtime)?;
        let first_wait = cfg.connect_timeout() * 2;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fleet-watch".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        () = keep(&cfg, &sh) => {}
                        _ = stop_rx.wait_for(|s| *s) => {}
                    }
                });
            })
            .map_err(FleetError::Runtime)?;
        let w = Watcher {
            shared,
            stop,
            thread: Some(thread),
        };
        drop(w.shared.wait_until(first_wait, |g| g.connected));
        Ok(w)
    }

    /// A copy of the current view.
    pub fn view(&self) -> View {
        self.shared.lock().view.clone()
    }

    /// How many times members or guests changed so far.
    pub fn changed(&self) -> u64 {
        self.shared.lock().changed
    }

    /// Waits up to `timeout` for [`Watcher::changed`] to pass `since`; returns its value.
    pub fn wait_changed(&self, since: u64, timeout: Duration) -> u64 {
        self.shared
            .wait_until(timeout, |g| g.changed > since)
            .changed
    }

    /// Whether the last listing and watch are healthy (etcd answers).
    pub fn connected(&self) -> bool {
        self.shared.lock().connected
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lists and watches, forever.
async fn keep(cfg: &FleetConfig, sh: &Shared) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match session(cfg, sh, &mut backoff).await {
            Ok(()) => {}
            Err(e) => tracing::warn!("fleet: watching {}: {e}; again in {backoff:?}", cfg.prefix),
        }
        sh.set_connected(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Adds one key-value to a view, or warns why not.
fn take_in(view: &mut View, root: &str, kv: &KeyValue) {
    let Some(entry) = classify(root, kv.key()) else {
        return;
    };
    match entry {
        Entry::Guest(name) => match parse_guest(&name, kv.value()) {
            Ok(g) => {
                view.guests.insert(name, g);
            }
            Err(why) => {
                view.guests.remove(&name);
                tracing::warn!("fleet: skipping guest record {name:?}: {why}");
            }
        },
        Entry::Monitor(name) => match parse_member(&name, kv.value()) {
            Ok(_) => {
                view.members.insert(name);
            }
            Err(why) => {
                view.members.remove(&name);
                tracing::warn!("fleet: skipping member record {name:?}: {why}");
            }
        },
    }
}

fn remove(view: &mut View, root: &str, key: &[u8]) {
    match classify(root, key) {
        Some(Entry::Guest(name)) => {
            view.guests.remove(&name);
        }
        Some(Entry::Monitor(name)) => {
            view.members.remove(&name);
        }
        None => {}
    }
}

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

/// One listing and the watch after it; returns when something failed.
async fn session(cfg: &FleetConfig, sh: &Shared, backoff: &mut Duration) -> Result<(), FleetError> {
    let t = cfg.connect_timeout();
    let root = cfg.root();
    let mut client = connect(cfg).await?;
    let got = bounded(
        t,
        "list",
        client.get(
            root.clone(),
            Some(GetOptions::new().with_prefix().with_limit(MAX_KEYS)),
        ),
    )
    .await?;
    let mut view = View {
        revision: got.header().map_or(0, |h| h.revision()),
        ..View::default()
    };
    if got.more() {
        tracing::warn!(
            "fleet: more than {MAX_KEYS} keys under {root}; the view holds the first ones"
        );
    }
    for kv in got.kvs() {
        take_in(&mut view, &root, kv);
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(view.revision + 1)
        .with_progress_notify();
    let mut stream = bounded(t, "watch", client.watch(root.clone(), Some(opts))).await?;
    sh.set(view.clone());
    sh.set_connected(true);
    *backoff = BACKOFF_MIN;
    let mut asked: Option<Instant> = None;
    loop {
        let wait = match asked {
            Some(at) => (at + t).saturating_duration_since(Instant::now()),
            None => QUIET,
        };
        let msg = match tokio::time::timeout(wait, stream.message()).await {
            Err(_) if asked.is_some() => return Err(FleetError::Timeout("watch progress report")),
            Err(_) => {
                bounded(t, "watch progress request", stream.request_progress()).await?;
                asked = Some(Instant::now());
                continue;
            }
            Ok(r) => r?,
        };
        asked = None;
        let Some(resp) = msg else {
            return Err(FleetError::Timeout("watch stream (closed by etcd)"));
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            tracing::info!(
                "fleet: the watch was cancelled ({}); listing again",
                resp.cancel_reason()
            );
            return Ok(());
        }
        let mut changed = false;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => take_in(&mut view, &root, kv),
                EventType::Delete => remove(&mut view, &root, kv.key()),
            }
            changed = true;
        }
        if let Some(h) = resp.header() {
            view.revision = view.revision.max(h.revision());
        }
        if changed {
            sh.set(view.clone());
        } else {
            sh.lock().view.revision = view.revision;
        }
        sh.set_connected(true);
    }
}
