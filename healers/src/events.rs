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
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Where events go.
pub struct Events {
    out: Mutex<Box<dyn Write + Send>>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
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
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        Ok(Events {
            out: Mutex::new(out),
        })
    }

    /// Events into any writer (tests).
    pub fn to_writer(w: Box<dyn Write + Send>) -> Events {
        Events { out: Mutex::new(w) }
    }

    /// Writes one event line.
    pub fn emit(&self, guest: &str, event: &str, fields: Value) {
        let mut m = Map::new();
        m.insert("ts_ms".into(), now_ms().into());
        m.insert("guest".into(), guest.into());
        m.insert("event".into(), event.into());
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        let mut line = Value::Object(m).to_string();
        line.push('\n');
        let mut out = match self.out.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|_| out.flush()) {
            tracing::error!("event log: {e}");
        }
    }
}
