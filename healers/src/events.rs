//! The event log: one JSON object per line for every detection, diagnosis and repair, with timings.
//!
//! Every line has `ts_ms` (Unix ms), `guest` and `event`. Events:
//!
//! | event | fields |
//! |---|---|
//! | `attached` / `detached` | `bridge`, `reason` (detached) |
//! | `violation` | `sensor`, `value`, `threshold`, `breach`, `hms` (handlers called) |
//! | `diagnosis` | `hm`, `policy`, `uid`, `score`, `runner_up`, `processes`, `pids` |
//! | `repair` | `hm`, `round`, `uid`/`pids`, `killed`, `lock_ns`, `lock_held_us`, `dry_run` |
//! | `healed` | `hm`, `sensor`, `detected_at_ms`, `hm_called_us` (after the violating sample), `recovered_us` (since detection), `rounds`, `killed` |
//! | `no_culprit` | `hm`, `sensor`, `reason` |
//! | `not_healed` | `hm`, `sensor`, `reason`, `rounds` |
//! | `hang` | `stalled` (sensors), `for_ms`, `action`, `command_status` |
//! | `backoff` | `step` (`sample`, or the healer's name), `reason`, `fix` (what to change in the config, or null), `failures` (in a row), `sensor` (healers), `retry_in_ms`, `retry_at_ms` (Unix ms) |
//! | `pause_skipped` | a lock not taken because it would break the guest's pause budget: `step`, `reason` (used and allowed ms, window), `retry_in_ms`, `retry_at_ms` |
//! | `degraded` | once per located kernel, for each field or symbol it lacks: `release`, `field`, `looked_for`, `disables` (what is off, e.g. the memory policies without `mm_struct.rss_stat`), `reason` |
//! | `error` | `what` |
//! | `assigned` | (`[fleet]`) the fleet gave this monitor the guest: `monitor`, `bridge`, `monitors` (the guest's assigned set) |
//! | `released` | (`[fleet]`) no longer this monitor's: `monitor`, `fenced` |
//! | `fenced` / `unfenced` | (`[fleet]`, guest `-`) this monitor can no longer / can again prove its membership in etcd: `monitor`, `etcd_connected` |

use std::io::Write;

pub use bridge_client::jsonl::now_ms;
use bridge_client::jsonl::JsonLines;
use serde_json::Value;

/// Where events go.
pub struct Events {
    log: JsonLines,
}

// Durations as the whole numbers of event fields (saturating).
pub(crate) use introspect::conv::{micros, millis, nanos};

impl Events {
    /// Events to a file (appended) or, for "-", standard output.
    pub fn open(path: &str) -> std::io::Result<Events> {
        let log = if path == "-" {
            JsonLines::to_writer(Box::new(std::io::stdout()), "event log")
        } else {
            JsonLines::append(path.as_ref(), "event log")?
        };
        Ok(Events { log })
    }

    /// Events into any writer (tests).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Events {
        Events {
            log: JsonLines::to_writer(w, "event log"),
        }
    }

    /// Writes one event line.
    pub fn emit(&self, guest: &str, event: &str, fields: Value) {
        self.log
            .write(&[("guest", guest.into()), ("event", event.into())], fields);
    }
}
