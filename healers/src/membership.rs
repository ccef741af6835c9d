//! bdmon in a fleet: it joins etcd under a lease, watches the fleet's guests and monitors, and
//! keeps the dispatcher watching exactly the guests that rendezvous hashing over the live
//! monitors assigns to it ([`fleet::assigned`], `monitors_per_guest` each). Each guest's bridge
//! computes the same assignment from the same etcd view and refuses LOCK and WRITE from any other
//! monitor, so the bridge's k-of-n agreement is among the assigned monitors.
//!
//! Failure cases (see docs/architecture.md, "A fleet of monitors"):
//! - a monitor dies: its lease runs out within `ttl_s`, it leaves every view, and its guests are
//!   assigned to the next monitors in each guest's ranking;
//! - a monitor loses etcd: once it can no longer prove its lease (the last confirmed keepalive
//!   plus the TTL, less a margin) it is *fenced*: it stops watching every fleet guest and takes
//!   no lock (a repair under way finds [`GuestError::Fenced`](crate::guest::GuestError) at its
//!   next lock) — before etcd lets the lease expire and the others take over;
//! - etcd restarts: leases and keys are put again by their holders; the watchers list again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};

use fleet::{FleetError, Member, Watcher};
use serde_json::json;

use crate::config::{Config, Ownership};
use crate::dispatcher::Handle;
use crate::events::Events;

/// This monitor's membership and its view of the fleet.
pub struct Membership {
    member: Arc<Member>,
    watcher: Watcher,
    name: String,
    k: usize,
    seen: Option<u64>,
    fenced: bool,
    /// Fleet guests watched now, with their bridge address.
    mine: BTreeMap<String, String>,
}

impl Membership {
    /// Joins the fleet of `cfg` (which must have `[fleet]`).
    pub fn start(cfg: &Config) -> Result<Option<Membership>, FleetError> {
        let Some(f) = &cfg.fleet else {
            return Ok(None);
        };
        let watcher = Watcher::start(f.fleet_config())?;
        let member = Member::join(f.fleet_config(), &f.monitor)?;
        Ok(Some(Membership {
            member: Arc::new(member),
            watcher,
            name: f.monitor.clone(),
            k: f.monitors_per_guest,
            seen: None,
            fenced: false,
            mine: BTreeMap::new(),
        }))
    }

    /// Brings the dispatcher's fleet guests in line with the assignment (all of them dropped while
    /// fenced). Cheap when nothing changed: call it often.
    pub fn reconcile(&mut self, cfg: &Config, h: &Handle, events: &Events) {
        let fenced = self.member.fenced();
        if fenced != self.fenced {
            self.fenced = fenced;
            self.seen = None;
            if fenced {
                tracing::warn!(
                    "fleet: {} cannot prove its membership (etcd unreachable?): fenced, acting on no fleet guest",
                    self.name
                );
            } else {
                tracing::warn!("fleet: {} is a confirmed member again", self.name);
            }
            events.emit(
                "-",
                if fenced { "fenced" } else { "unfenced" },
                json!({"monitor": self.name, "etcd_connected": self.watcher.connected()}),
            );
        }
        let changed = self.watcher.changed();
        if self.seen == Some(changed) {
            return;
        }
        self.seen = Some(changed);
        let view = self.watcher.view();
        let statics: BTreeSet<&str> = cfg.guests.iter().map(|g| g.name.as_str()).collect();
        let want: BTreeMap<String, String> = if fenced {
            BTreeMap::new()
        } else {
            view.guests
                .values()
                .filter(|g| !statics.contains(g.name.as_str()))
                .filter(|g| fleet::assigned(&g.name, &view.members, self.k).contains(&self.name))
                .map(|g| (g.name.clone(), g.bridge.clone()))
                .collect()
        };
        let gone: Vec<String> = self
            .mine
            .iter()
            .filter(|(n, b)| want.get(*n) != Some(*b))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            h.remove(&name);
            self.mine.remove(&name);
            events.emit(
                &name,
                "released",
                json!({"monitor": self.name, "fenced": fenced}),
            );
        }
        for (name, bridge) in want {
            if self.mine.contains_key(&name) {
                continue;
            }
            if h.ending(&name) {
                // Released a moment ago and its loop not ended yet (a repair it is finishing):
                // look again at the next call.
                self.seen = None;
                continue;
            }
            let Some(mut g) = cfg.fleet_guest(&name, &bridge) else {
                continue;
            };
            let member: Weak<Member> = Arc::downgrade(&self.member);
            g.fence = Some(Ownership(Arc::new(move || {
                member.upgrade().is_none_or(|m| m.fenced())
            })));
            if h.add(g) {
                let monitors = fleet::assigned(&name, &view.members, self.k);
                events.emit(
                    &name,
                    "assigned",
                    json!({"monitor": self.name, "bridge": bridge, "monitors": monitors}),
                );
                self.mine.insert(name, bridge);
            }
        }
    }

    /// Fleet guests watched now.
    pub fn guests(&self) -> Vec<String> {
        self.mine.keys().cloned().collect()
    }

    /// Stops watching every fleet guest and leaves the fleet at once (the lease is revoked, so
    /// the others take the guests over without waiting for the TTL).
    pub fn leave(mut self, h: &Handle) {
        for name in std::mem::take(&mut self.mine).into_keys() {
            h.remove(&name);
        }
        // Every lock released before the lease goes, and the guests with it to other monitors.
        h.wait_removed();
        match Arc::try_unwrap(self.member) {
            Ok(m) => m.leave(),
            Err(m) => drop(m),
        }
    }
}
