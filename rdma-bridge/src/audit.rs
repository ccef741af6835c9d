//! The Guard's audit log: one JSON object per line, appended and flushed as each event happens.
//!
//! Every line has `ts_ms` (Unix time, milliseconds), `event`, and the event's fields. Events:
//!
//! | event | when | fields |
//! |---|---|---|
//! | `start` | the bridge starts | `listen`, `monitors`, `k`, `window_ms` |
//! | `auth_failed` | a TLS handshake fails, a certificate is not listed, or HELLO names someone else | `peer`, `reason` |
//! | `connected` / `disconnected` | a monitor's session begins / ends | `monitor`, `peer` (`reason` on disconnect) |
//! | `refused` | too many connections | `peer` |
//! | `lock` / `unlock` | the pause lock is taken (or renewed) / released | `monitor`, `lease_ms`, `lock_ns` |
//! | `lock_busy` | another monitor holds the lock | `monitor`, `holder` |
//! | `lock_expired` | a lease ran out before UNLOCK | `monitor` |
//! | `lock_released` | a monitor disconnected while holding the lock | `monitor` |
//! | `denied` | a read or write outside the monitor's grant | `monitor`, `op`, `gpa`, `len` |
//! | `write_vote` | a monitor issued a write that waits for agreement | `monitor`, `gpa`, `len`, `sha256`, `votes` |
//! | `write_applied` | k monitors agreed and the bytes were written | `gpa`, `len`, `sha256`, `voters` |
//! | `write_expired` | the window ran out before k agreed | `gpa`, `len`, `sha256`, `voters` |
//! | `bad_request` | a malformed frame, an unknown op, a replayed request id | `monitor`, `peer`, `reason` |
//! | `restart` | a monitor restarted the guest | `monitor` |
//! | `rdma_connected` | a monitor connected an RDMA queue pair (own protection domain) | `monitor`, `qp_num`, `regions` (`name`, `gpa`, `len`, `access`: what was registered) |
//! | `rdma_refused` | an RDMA_CONNECT was refused (quota, bad blob, device) | `monitor`, `reason` |
//! | `rdma_write_open` | the holder of the lock may write its hooks over RDMA | `monitor`, `qp_num`, `lease_ms` |
//! | `rdma_write_closed` | that right is withdrawn | `monitor`, `qp_num`, `reason` (`unlock`, `lease expired`, `session ended`, `restart`, ...) |
//! | `rdma_write_error` | the write right could not be given (the QP is in the error state) | `monitor`, `qp_num`, `reason` |
//! | `rdma_released` | a queue pair, its regions and protection domain were destroyed | `monitor`, `qp_num`, `reason` |
//! | `vm_exited` | bdvmm went away; the bridge stops | |

use std::path::Path;

use serde_json::Value;

use crate::jsonl::JsonLines;

/// An append-only JSON-lines log shared by every connection.
pub struct Audit {
    log: JsonLines,
}

impl Audit {
    /// Opens (creating or appending to) the log.
    pub fn open(path: &Path) -> std::io::Result<Audit> {
        Ok(Audit {
            log: JsonLines::append(path, "audit log")?,
        })
    }

    /// Appends one event. A failing disk is reported by tracing; it does not stop the bridge.
    pub fn log(&self, event: &str, fields: Value) {
        self.log.write(&[("event", event.into())], fields);
    }
}
