//! The Guard's audit log: one JSON object per line, appended as each event happens.
//!
//! Every line has `ts_ms` (Unix time, milliseconds), `event`, and the event's fields. Events:
//!
//! | event | when | fields |
//! |---|---|---|
//! | `start` | the bridge starts | `listen`, `monitors`, `k`, `window_ms` |
//! | `auth_failed` | a TLS handshake fails, a certificate is not listed, or HELLO names someone else; before authentication only the *first* per source address and interval | `peer`, `reason` |
//! | `connected` / `disconnected` | a monitor's session begins / ends | `monitor`, `peer` (`reason` on disconnect) |
//! | `refused` | too many connections (before authentication: the *first* per source address and interval) | `peer`, `reason` (`monitor` past a monitor's cap) |
//! | `auth_failed_summary` / `refused_summary` | further pre-authentication failures / refusals of one kind from one source address, counted: once per `audit_denied_interval_ms` | `peer`, `count`, `last_reason`, `since_ms` |
//! | `lock_request` | a LOCK is about to pause the guest (written *before* it does; no record, no pause) | `monitor`, `lease_ms` |
//! | `lock` / `unlock` | the pause lock is taken (or renewed) / released | `monitor`, `lease_ms`, `lock_ns` |
//! | `lock_busy` | another monitor holds the lock | `monitor`, `holder` |
//! | `lock_expired` | a lease ran out before UNLOCK | `monitor` |
//! | `lock_released` | a monitor disconnected while holding the lock | `monitor` |
//! | `denied` | the *first* read or write outside the monitor's grant, per monitor and op | `monitor`, `op`, `gpa`, `len` |
//! | `denied_summary` | further denials of that monitor and op, counted: once per `audit_denied_interval_ms` and when its session ends | `monitor`, `op`, `count`, `last_gpa`, `last_len`, `since_ms` |
//! | `write_vote` | a monitor issued a write that waits for agreement | `monitor`, `gpa`, `len`, `sha256`, `votes` |
//! | `write_applied` | k monitors agreed; written *before* the bytes are (no record, no write) | `gpa`, `len`, `sha256`, `voters` |
//! | `write_failed` | the bytes could not be written after `write_applied` | `gpa`, `len`, `reason` |
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
//!
//! ## What the log holds against
//!
//! - **Readers.** The file is created mode 0600 (whatever the umask: the mode is given at
//!   `open`, which a umask only narrows). An existing log with group or other bits is tightened
//!   to 0600 through its open descriptor (and a warning is printed); one that is not a regular
//!   file (a symlink is not followed), or that belongs to another user, is refused at start.
//! - **A full or failing disk.** [`Audit::append`] is fallible and the bridge writes the record
//!   of a WRITE (`write_applied`) and of a LOCK (`lock_request`) *before* applying it: when the
//!   record cannot be appended, the WRITE or LOCK is refused (`INTERNAL`, with the reason) and
//!   guest memory is untouched. Other events are logged best-effort ([`Audit::log`]: a failure
//!   goes to the bridge's log). A record cut short by the failure is truncated away, so every
//!   line stays JSON. Appends are not fsync'ed: a host crash can lose the last lines.
//! - **Growth.** With `audit_max_bytes` set, the log is rotated before a line would take it past
//!   that size: `audit.jsonl` → `audit.jsonl.1` → … → `audit.jsonl.N` (`audit_keep` = N old
//!   files; the oldest is dropped).
//! - **Floods.** A monitor that keeps asking for what it was not granted gets one `denied` line
//!   per op, then a `denied_summary` with the count once per interval and when its session ends,
//!   so 10,000 denials in a session cost a handful of lines, not 10,000. The same holds before
//!   authentication, where nobody is known yet: refused connections and failed handshakes are
//!   counted per source address and kind (`Audit::unauthenticated`), at most [`MAX_PREAUTH_SOURCES`] of them at
//!   once and the rest under `peer = "*"`, so a flood of connections costs lines per source and
//!   interval, not per connection, and a bounded amount of memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::jsonl::now_ms;

/// Why the audit log could not be opened or appended to.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Opening or inspecting the file failed.
    #[error("cannot open audit log {path}: {source}; check audit_log and its directory")]
    Open {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path is a symlink, a directory, a device, ...
    #[error("audit log {0} is not a regular file; point audit_log at a plain file")]
    NotAFile(PathBuf),
    /// Someone else owns the file (they could read it, or swap its content).
    #[error("audit log {path} belongs to uid {owner}, not to this bridge (uid {me}); chown it or point audit_log elsewhere")]
    Owner {
        /// The log.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
    /// Its mode could not be tightened to 0600.
    #[error("audit log {path} has mode {mode:o} and cannot be made 0600: {source}")]
    Mode {
        /// The log.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// Why.
        source: std::io::Error,
    },
    /// A record could not be written (disk full, I/O error).
    #[error("cannot append to audit log {path}: {source}; free space on its filesystem (the bridge refuses WRITE and LOCK until it can record them)")]
    Append {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Rotating it failed.
    #[error("cannot rotate audit log {path}: {source}; check its directory")]
    Rotate {
        /// The log.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How the log is kept (from the bridge's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditOptions {
    /// Rotate before the file would grow past this many bytes; 0: never.
    pub max_bytes: u64,
    /// Old files kept by rotation (`.1` … `.keep`); at least 1.
    pub keep: usize,
    /// How often repeated denials of one monitor and op are summarised.
    pub denied_interval: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            max_bytes: 64 << 20,
            keep: 5,
            denied_interval: Duration::from_secs(10),
        }
    }
}

/// Denials of one monitor and op since the last line about them.
struct Denials {
    count: u64,
    since: Instant,
    last_gpa: u64,
    last_len: u64,
}

/// Most source addresses whose pre-authentication events are counted separately; beyond, they
/// share one count under `peer = "*"` (a spray of addresses cannot grow the bridge's memory).
pub const MAX_PREAUTH_SOURCES: usize = 1024;

/// Pre-authentication events of one kind from one source since the last line about them.
struct PreAuth {
    count: u64,
    since: Instant,
    last_reason: String,
}

struct Inner {
    file: File,
    size: u64,
    denials: HashMap<(String, String), Denials>,
    /// (event, source address or "*", kind of failure).
    preauth: HashMap<(String, String, String), PreAuth>,
}

/// An append-only JSON-lines log shared by every connection.
pub struct Audit {
    path: PathBuf,
    opts: AuditOptions,
    inner: Mutex<Inner>,
}

/// Opens `path` for appending, mode 0600, not following a symlink, and checks what it opened.
fn open_log(path: &Path) -> Result<File, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                AuditError::NotAFile(path.to_path_buf())
            } else {
                open_err(e)
            }
        })?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(AuditError::NotAFile(path.to_path_buf()));
    }
    // SAFETY: geteuid has no failure mode and touches no memory.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(AuditError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        // Through the open descriptor: the file we checked is the file we change.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|source| AuditError::Mode {
                path: path.to_path_buf(),
                mode,
                source,
            })?;
        tracing::warn!(
            "audit log {} had mode {mode:o}; tightened to 600",
            path.display()
        );
    }
    Ok(file)
}

/// `path` with `.n` appended.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn line(event: &str, fields: Value) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("ts_ms".into(), now_ms().into());
    m.insert("event".into(), event.into());
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    let mut out = Value::Object(m).to_string().into_bytes();
    out.push(b'\n');
    out
}

impl Audit {
    /// Opens (creating or appending to) the log with the default [`AuditOptions`].
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        Self::open_with(path, AuditOptions::default())
    }

    /// Opens (creating or appending to) the log.
    pub fn open_with(path: &Path, opts: AuditOptions) -> Result<Audit, AuditError> {
        let file = open_log(path)?;
        let size = file
            .metadata()
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Audit {
            path: path.to_path_buf(),
            opts: AuditOptions {
                keep: opts.keep.max(1),
                ..opts
            },
            inner: Mutex::new(Inner {
                file,
                size,
                denials: HashMap::new(),
                preauth: HashMap::new(),
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Appends one event, or says why it could not. Call it *before* doing what it records when
    /// that must not happen unrecorded (a WRITE, a LOCK).
    pub fn append(&self, event: &str, fields: Value) -> Result<(), AuditError> {
        let mut inner = self.inner();
        self.summarise_due(&mut inner, None)?;
        self.write_line(&mut inner, &line(event, fields))
    }

    /// Appends one event; a failure is reported through `tracing` and does not stop the caller.
    pub fn log(&self, event: &str, fields: Value) {
        if let Err(e) = self.append(event, fields) {
            tracing::error!("{e}");
        }
    }

    /// A request outside `monitor`'s grant: the first per monitor and op is logged in full, the
    /// rest counted into `denied_summary` lines.
    pub fn denied(&self, monitor: &str, op: &str, gpa: u64, len: u64) {
        let mut inner = self.inner();
        let key = (monitor.to_owned(), op.to_owned());
        let result = match inner.denials.get_mut(&key) {
            Some(d) => {
                d.count += 1;
                d.last_gpa = gpa;
                d.last_len = len;
                self.summarise_due(&mut inner, None)
            }
            None => {
                inner.denials.insert(
                    key,
                    Denials {
                        count: 0,
                        since: Instant::now(),
                        last_gpa: gpa,
                        last_len: len,
                    },
                );
                let l = line(
                    "denied",
                    json!({"monitor": monitor, "op": op, "gpa": gpa, "len": len}),
                );
                self.summarise_due(&mut inner, None)
                    .and_then(|()| self.write_line(&mut inner, &l))
            }
        };
        if let Err(e) = result {
            tracing::error!("{e}");
        }
    }

    /// An event before authentication (`refused`, `auth_failed`) from `source`: the first per
    /// event, source and kind (the reason up to its first `:`) in an interval is logged in full, the rest counted into
    /// `<event>_summary` lines; more than [`MAX_PREAUTH_SOURCES`] sources share one count.
    pub fn unauthenticated(&self, event: &str, source: std::net::IpAddr, peer: &str, reason: &str) {
        let mut inner = self.inner();
        // Counted per kind of failure too ("TLS handshake", "no client certificate", ...), so
        // that each kind from a source is seen once per interval.
        let kind: String = reason
            .split(':')
            .next()
            .unwrap_or(reason)
            .chars()
            .take(64)
            .collect();
        let mut key = (event.to_owned(), source.to_string(), kind);
        if !inner.preauth.contains_key(&key) && inner.preauth.len() >= MAX_PREAUTH_SOURCES {
            key.1 = "*".into();
        }
        let result = match inner.preauth.get_mut(&key) {
            Some(p) => {
                p.count += 1;
                reason.clone_into(&mut p.last_reason);
                self.summarise_due(&mut inner, None)
            }
            None => {
                inner.preauth.insert(
                    key,
                    PreAuth {
                        count: 0,
                        since: Instant::now(),
                        last_reason: reason.to_owned(),
                    },
                );
                let l = line(event, json!({"peer": peer, "reason": reason}));
                self.summarise_due(&mut inner, None)
                    .and_then(|()| self.write_line(&mut inner, &l))
            }
        };
        if let Err(e) = result {
            tracing::error!("{e}");
        }
    }

    /// `monitor`'s session ended: its pending denial counts are written out and forgotten (the
    /// next session's first denial is logged in full again).
    pub fn session_end(&self, monitor: &str) {
        let mut inner = self.inner();
        if let Err(e) = self.summarise_due(&mut inner, Some(monitor)) {
            tracing::error!("{e}");
        }
        inner.denials.retain(|(m, _), _| m != monitor);
    }

    /// Writes a `denied_summary` for every count whose interval is over (and, for `ending`,
    /// every count of that monitor).
    fn summarise_due(&self, inner: &mut Inner, ending: Option<&str>) -> Result<(), AuditError> {
        let now = Instant::now();
        let mut lines = Vec::new();
        for ((monitor, op), d) in inner.denials.iter_mut() {
            let due = now.duration_since(d.since) >= self.opts.denied_interval
                || ending == Some(monitor.as_str());
            if d.count == 0 || !due {
                continue;
            }
            lines.push(line(
                "denied_summary",
                json!({"monitor": monitor, "op": op, "count": d.count, "last_gpa": d.last_gpa,
                       "last_len": d.last_len,
                       "since_ms": introspect::conv::millis(now.duration_since(d.since))}),
            ));
            d.count = 0;
            d.since = now;
        }
        // Pre-authentication counts: a quiet source is forgotten after its interval (its next event
        // is logged in full again), which keeps the map to the sources of one interval.
        let interval = self.opts.denied_interval;
        inner.preauth.retain(|(event, source, _), p| {
            if now.duration_since(p.since) < interval {
                return true;
            }
            if p.count == 0 {
                return false;
            }
            lines.push(line(
                &format!("{event}_summary"),
                json!({"peer": source, "count": p.count, "last_reason": p.last_reason,
                       "since_ms": introspect::conv::millis(now.duration_since(p.since))}),
            ));
            p.count = 0;
            p.since = now;
            true
        });
        for l in lines {
            self.write_line(inner, &l)?;
        }
        Ok(())
    }

    /// Appends `bytes` (one line), rotating first if it would pass `max_bytes`.
    fn write_line(&self, inner: &mut Inner, bytes: &[u8]) -> Result<(), AuditError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if self.opts.max_bytes > 0
            && inner.size > 0
            && inner.size.saturating_add(len) > self.opts.max_bytes
        {
            self.rotate(inner)?;
        }
        let appended = inner
            .file
            .write_all(bytes)
            .and_then(|()| inner.file.flush());
        if let Err(source) = appended {
            // A line cut short by a full disk would leave the file with half a JSON object.
            let _ = inner.file.set_len(inner.size);
            return Err(AuditError::Append {
                path: self.path.clone(),
                source,
            });
        }
        inner.size = inner.size.saturating_add(len);
        Ok(())
    }

    /// `path.(keep-1)` → `path.keep`, …, `path` → `path.1`, and a fresh `path`.
    fn rotate(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let rotate_err = |source| AuditError::Rotate {
            path: self.path.clone(),
            source,
        };
        for n in (1..self.opts.keep).rev() {
            match std::fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(rotate_err(e)),
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1)).map_err(rotate_err)?;
        inner.file = open_log(&self.path)?;
        inner.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn created_0600_under_umask_000_and_an_open_file_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // SAFETY: umask has no failure mode. No other test in this crate creates files with a
        // mode that depends on it.
        let old = unsafe { libc::umask(0) };
        let a = Audit::open(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        a.unwrap().log("start", json!({}));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode, 0o600,
            "audit log created with mode {mode:o} under umask 000"
        );

        let loose = dir.path().join("old.jsonl");
        std::fs::write(&loose, b"").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        Audit::open(&loose).unwrap();
        let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "an existing 0644 log is tightened");
    }

    #[test]
    fn a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        let link = dir.path().join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Audit::open(&link).err().expect("a symlink must be refused");
        assert!(matches!(e, AuditError::NotAFile(_)), "{e}");
    }

    #[test]
    fn rotates_by_size_and_keeps_n_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = AuditOptions {
            max_bytes: 1000,
            keep: 2,
            ..AuditOptions::default()
        };
        let a = Audit::open_with(&path, opts).unwrap();
        for i in 0..100 {
            a.append("unlock", json!({"monitor": "mon1", "i": i}))
                .unwrap();
        }
        let mut seen = Vec::new();
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let meta = std::fs::metadata(&p).unwrap();
            assert!(
                meta.len() <= 1000,
                "{} is {} bytes",
                p.display(),
                meta.len()
            );
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            seen.extend(lines(&p).into_iter().map(|v| v["i"].as_u64().unwrap()));
        }
        assert!(!numbered(&path, 3).exists(), "only 2 old files are kept");
        seen.sort_unstable();
        // The newest records are all there, without gaps, ending with the last.
        assert_eq!(seen.last(), Some(&99));
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
        assert!(
            seen.len() > 20,
            "three files of ~1000 bytes hold more than 20 lines"
        );
    }

    #[test]
    fn a_burst_of_denials_is_counted_not_logged_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // An interval longer than the test: every summary here comes from the session's end.
        let opts = AuditOptions {
            denied_interval: Duration::from_secs(3600),
            ..AuditOptions::default()
        };
        let a = Audit::open_with(&path, opts).unwrap();
        for i in 0..10_000u64 {
            a.denied("mon2", "READ", 0x1000 * i, 8);
        }
        a.denied("mon2", "WRITE", 0x2000, 4);
        a.session_end("mon2");
        let l = lines(&path);
        assert!(
            l.len() <= 4,
            "{} lines for 10,001 denials, starting {:?}",
            l.len(),
            &l[..3]
        );
        let first: Vec<_> = l.iter().filter(|v| v["event"] == "denied").collect();
        assert_eq!(first.len(), 2, "one full line per op: {l:?}");
        assert_eq!(first[0]["gpa"], 0);
        let summary: Vec<_> = l
            .iter()
            .filter(|v| v["event"] == "denied_summary")
            .collect();
        assert_eq!(summary.len(), 1, "{l:?}");
        assert_eq!(summary[0]["monitor"], "mon2");
        assert_eq!(summary[0]["op"], "READ");
        assert_eq!(summary[0]["count"], 9_999);
        assert_eq!(summary[0]["last_gpa"], 0x1000 * 9_999);
        // A new session's first denial is logged in full again.
        a.denied("mon2", "READ", 0x42, 8);
        assert_eq!(lines(&path).last().unwrap()["event"], "denied");
    }

    #[test]
    fn a_preauth_flood_is_counted_per_source_and_bounded_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = AuditOptions {
            denied_interval: Duration::from_secs(1),
            ..AuditOptions::default()
        };
        let a = Audit::open_with(&path, opts).unwrap();
        let one: std::net::IpAddr = [127, 0, 0, 2].into();
        for _ in 0..10_000 {
            a.unauthenticated(
                "refused",
                one,
                "127.0.0.2:4000",
                "more than 4 from 127.0.0.2",
            );
        }
        a.unauthenticated("auth_failed", one, "127.0.0.2:4001", "TLS handshake: eof");
        let l = lines(&path);
        let full = |l: &[Value], event: &str| l.iter().filter(|v| v["event"] == event).count();
        assert_eq!(
            full(&l, "refused"),
            1,
            "one full line per event and source: {l:?}"
        );
        assert_eq!(full(&l, "auth_failed"), 1, "{l:?}");
        assert_eq!(l[0]["peer"], "127.0.0.2:4000");
        // Once the interval is over the count comes out (whenever it does, it adds up).
        std::thread::sleep(Duration::from_millis(1100));
        a.unauthenticated(
            "refused",
            one,
            "127.0.0.2:4002",
            "more than 4 from 127.0.0.2",
        );
        let l = lines(&path);
        let counted: u64 = l
            .iter()
            .filter(|v| v["event"] == "refused_summary")
            .map(|v| {
                assert_eq!(v["peer"], "127.0.0.2");
                v["count"].as_u64().unwrap()
            })
            .sum();
        // 9,999 after the first line, and the one that found the interval over.
        assert_eq!(counted, 10_000, "{l:?}");
        // A spray of source addresses shares one count beyond MAX_PREAUTH_SOURCES (an interval
        // longer than the test: within one interval, at most that many sources get a line).
        let path = dir.path().join("spray.jsonl");
        let a = Audit::open_with(
            &path,
            AuditOptions {
                denied_interval: Duration::from_secs(3600),
                ..AuditOptions::default()
            },
        )
        .unwrap();
        for i in 0..3 * MAX_PREAUTH_SOURCES {
            let ip: std::net::IpAddr =
                std::net::Ipv6Addr::from(u128::try_from(i).unwrap() + 1).into();
            a.unauthenticated("auth_failed", ip, "[..]:1", "TLS handshake: eof");
        }
        assert!(a.inner().preauth.len() <= MAX_PREAUTH_SOURCES + 1);
        let added = lines(&path).len();
        assert!(
            added <= MAX_PREAUTH_SOURCES + 2,
            "{added} lines for {} sources",
            3 * MAX_PREAUTH_SOURCES
        );
    }

    #[test]
    fn denials_are_summarised_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let opts = AuditOptions {
            denied_interval: Duration::ZERO,
            ..AuditOptions::default()
        };
        let a = Audit::open_with(&path, opts).unwrap();
        a.denied("mon2", "READ", 1, 1);
        a.denied("mon2", "READ", 2, 1);
        // The interval (zero here) is over at the next audit event of any kind.
        a.log("unlock", json!({"monitor": "mon1"}));
        let l = lines(&path);
        let events: Vec<_> = l.iter().map(|v| v["event"].as_str().unwrap()).collect();
        assert_eq!(events, ["denied", "denied_summary", "unlock"]);
        assert_eq!(l[1]["count"], 1);
    }
}
