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
//! | `error` | `what` |

use std::io::Write;
use std::time::Duration;

pub use bridge_client::jsonl::now_ms;
use bridge_client::jsonl::JsonLines;
use serde_json::Value;

/// Where events go.
pub struct Events {
    log: JsonLines,
}

// Durations as the whole numbers of event fields. Each saturates at `u64::MAX` (more than 584
// years in nanoseconds) rather than wrap to a small, plausible-looking number.

/// `d` in whole milliseconds.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `d` in whole microseconds.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `d` in whole nanoseconds.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

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
