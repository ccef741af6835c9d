//! The fleet's assignment, as the bridge enforces it (the `[fleet]` section of the config).
//!
//! The bridge does not take a monitor's word for who serves its guest: it watches the monitor
//! group in etcd itself ([`fleet::Watcher`]) and computes `fleet::assigned(guest, members,
//! monitors_per_guest)` — the same rendezvous hashing every monitor uses. Only an assigned monitor
//! may LOCK, WRITE (vote) or RESTART; a listed but unassigned one keeps its READ, FETCH_SB and
//! STATUS grants. When etcd cannot be reached the last known member set stays in force (the
//! watcher keeps its last view): the monitors fence themselves once they cannot prove their
//! membership, so an outage never hands the guest to a monitor etcd did not assign.

use std::sync::Mutex;

/// The monitors the fleet assigns to this bridge's guest, kept current from etcd.
pub struct Assignment {
    guest: String,
    per_guest: usize,
    watcher: fleet::Watcher,
    /// `(watcher change count, assigned monitors)` of the last computation.
    cache: Mutex<(u64, Option<Vec<String>>)>,
}

impl Assignment {
    /// Enforces the assignment of `guest` to `per_guest` monitors, as `watcher` sees the group.
    pub fn new(guest: &str, per_guest: usize, watcher: fleet::Watcher) -> Assignment {
        Assignment {
            guest: guest.to_owned(),
            per_guest,
            watcher,
            cache: Mutex::new((0, None)),
        }
    }

    /// The guest's name in the fleet.
    pub fn guest(&self) -> &str {
        &self.guest
    }

    /// The watcher behind the assignment.
    pub fn watcher(&self) -> &fleet::Watcher {
        &self.watcher
    }

    /// The monitors assigned to the guest now (highest score first).
    pub fn assigned(&self) -> Vec<String> {
        let now = self.watcher.changed();
        let mut c = match self.cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let (true, Some(a)) = (c.0 == now, &c.1) {
            return a.clone();
        }
        // Read the count before the view: a change in between only costs a recomputation.
        let a = fleet::assigned(&self.guest, &self.watcher.view().members, self.per_guest);
        *c = (now, Some(a.clone()));
        a
    }

    /// `Err` unless `monitor` is assigned to the guest now.
    pub fn check(&self, monitor: &str) -> Result<(), NotAssigned> {
        let assigned = self.assigned();
        if assigned.iter().any(|m| m == monitor) {
            return Ok(());
        }
        Err(NotAssigned {
            monitor: monitor.to_owned(),
            guest: self.guest.clone(),
            assigned,
        })
    }
}

/// A monitor the fleet does not assign to the guest asked to LOCK, WRITE or RESTART.
#[derive(Debug, thiserror::Error)]
#[error(
    "monitor {monitor} is not assigned to guest {guest} in the fleet (assigned: {})",
    if assigned.is_empty() { "none".to_string() } else { assigned.join(", ") }
)]
pub struct NotAssigned {
    /// Who asked.
    pub monitor: String,
    /// The guest.
    pub guest: String,
    /// Who is assigned now.
    pub assigned: Vec<String>,
}
