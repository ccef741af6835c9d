//! The bridge's configuration file (TOML), read once when the bridge starts with its VM.
//!
//! ```toml
//! listen = "0.0.0.0:7070"          # where monitors connect (TCP)
//! audit_log = "audit.jsonl"        # JSON lines: locks, writes, rejections, authentication failures;
//!                                  # created 0600 (an existing looser file is tightened to 0600)
//! audit_max_bytes = 67108864       # rotate before the log passes this size (0: never rotate)
//! audit_keep = 5                   # old logs kept by rotation: audit.jsonl.1 .. audit.jsonl.5
//! audit_denied_interval_ms = 10000 # repeated denials (per monitor and op) are counted: one
//!                                  # `denied` line, then a `denied_summary` per interval and at
//!                                  # the end of the session
//! idle_timeout_ms = 30000          # a peer silent (or stuck mid-frame) this long is disconnected
//!
//! # Before authentication (OpenSSH's MaxStartups and LoginGraceTime): a connection that has not
//! # yet shown a listed certificate holds a slot of its own small pool, never a monitor's.
//! max_startups = 16                # connections in the TLS handshake at once; more are closed
//! max_startups_per_source = 4      # ... of which at most this many from one IP address
//! login_grace_ms = 5000            # the whole handshake must end this long after accept
//! # After authentication every listed monitor has slots no one else can take.
//! max_sessions_per_monitor = 4     # sessions of one monitor at once; more are refused
//! max_connections = 32             # authenticated sessions of all monitors together
//!
//! [tls]                            # mutual TLS: every monitor has its own key and certificate
//! ca = "pki/ca.pem"                # the CA that signed the monitors' certificates
//! cert = "pki/bridge.pem"          # the bridge's certificate and key
//! key = "pki/bridge.key"
//!
//! [agreement]                      # delayed write agreement
//! k = 2                            # a write is applied once k monitors issued the same bytes
//! window_ms = 2000                 # ... within this window, else it expires and is reported
//!
//! [lock]                           # the pause lock (LOCK/UNLOCK): least privilege, bounded
//! max_lease_ms = 10000             # a LOCK asking for a longer lease is refused
//! duty_window_ms = 60000           # over any window this long ...
//! max_pause_per_window_ms = 20000  # ... one monitor may hold the guest paused at most this long
//!
//! [[monitor]]
//! name = "mon1"                    # must match the monitor's HELLO
//! cert = "pki/mon1.pem"            # its certificate, pinned by SHA-256: a certificate the CA
//!                                  # signed but that is not listed here gets nothing
//! read = ["sb", "ram"]             # what it may read
//! write = ["hooks"]                # what it may write
//! restart = false                  # may it reboot the guest (RESTART, for hung guests)?
//! lock = true                      # may it pause the guest (LOCK)? default false; with k = 1 a
//!                                  # WRITE is applied only while its writer holds the lock
//! regs = true                      # may it read vCPU registers (REGS: CR3, RIP, GS base —
//!                                  # they defeat KASLR)? default false; needed to locate a stock
//!                                  # kernel (`rdma-bridge ps`, bdmon on stock guests)
//!
//! [rdma]                           # optional, feature `verbs`: one-sided RDMA data path
//! device = "mlx5_0"                # the first device if absent
//!
//! [fleet]                          # optional: register the guest in etcd, obey the assignment
//! guest = "vm17"                   # required: the guest's name in the fleet ([A-Za-z0-9._-])
//! endpoints = ["127.0.0.1:2379"]   # etcd client endpoints (default: this one)
//! prefix = "/backdoors"            # keys live under it (default)
//! ttl_s = 5                        # lease TTL: the guest leaves the fleet this long after the
//!                                  # bridge dies (at once on a clean stop)
//! connect_timeout_ms = 2000        # bound on each etcd connection attempt and request
//! advertise = "10.0.0.5:7070"      # where monitors connect; default: the bound listen address
//! kernel = "patched"               # or "stock": told to monitors in the guest record
//! monitors_per_guest = 2           # assigned monitors; default agreement.k; must be
//!                                  # >= agreement.k and <= the number of [[monitor]] entries
//! ```
//!
//! With `[fleet]` the bridge registers its guest under a lease and watches the members of the
//! monitor group. Of the listed monitors only those the fleet assigns to this guest
//! (`fleet::assigned(guest, members, monitors_per_guest)`, computed here, never taken from a
//! monitor's word) may LOCK, WRITE (vote) or RESTART; the others keep their READ, FETCH_SB and
//! STATUS grants. Write agreement needs `agreement.k` of the assigned monitors. If etcd cannot be
//! reached the last known assignment stays in force: monitors that cannot prove their own
//! membership fence themselves.
//!
//! Ranges are names resolved against the VM's layout when the bridge starts — `backdoor` (bdvmm's
//! whole reserved range), `sb` (its first 16 KiB: the Sensor Box ABI v1 region), `hooks` (the
//! repair-hook mailbox at `backdoor + 0x2000`, 0x840 bytes, as the ABI fixes it), `ram` (all guest
//! RAM) — or explicit `"0xSTART+0xLEN"`. The guest cannot move or widen any of them: they are fixed
//! here, from the VMM's layout and the ABI, never from values the guest writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/missing field.
    #[error("config {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("config: {0}")]
    Invalid(String),
}

/// Offset of the Sensor Box region inside the backdoor range, and its size (ABI v1).
pub const SB_OFFSET: u64 = 0;
/// Size of the region the guest kernel maps for the Sensor Box (ABI v1).
pub const SB_SIZE: u64 = 16 << 10;
/// Offset of the repair-hook mailbox inside the backdoor range (ABI v1).
pub const HOOKS_OFFSET: u64 = 0x2000;
/// Size of the mailbox (64-byte header + 64 slots of 32 bytes).
pub const HOOKS_SIZE: u64 = 0x840;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Listening address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Audit log path (appended to).
    pub audit_log: PathBuf,
    /// Rotate the audit log before it passes this many bytes; 0: never.
    #[serde(default = "default_audit_max_bytes")]
    pub audit_max_bytes: u64,
    /// Old audit logs kept by rotation (at least 1).
    #[serde(default = "default_audit_keep")]
    pub audit_keep: usize,
    /// Repeated denials of one monitor and op are summarised once per this many milliseconds.
    #[serde(default = "default_audit_denied_interval_ms")]
    pub audit_denied_interval_ms: u64,
    /// Most authenticated sessions, of all monitors together.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most connections still in their TLS handshake (before a listed certificate was shown).
    #[serde(default = "default_max_startups")]
    pub max_startups: usize,
    /// Most connections in their handshake from one source IP address.
    #[serde(default = "default_max_startups_per_source")]
    pub max_startups_per_source: usize,
    /// The whole TLS handshake must end this many milliseconds after `accept`.
    #[serde(default = "default_login_grace_ms")]
    pub login_grace_ms: u64,
    /// Most sessions one monitor may have at once.
    #[serde(default = "default_max_sessions_per_monitor")]
    pub max_sessions_per_monitor: usize,
    /// Idle timeout in milliseconds.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// TLS material.
    pub tls: TlsFiles,
    /// Write agreement.
    #[serde(default)]
    pub agreement: Agreement,
    /// Limits on the pause lock.
    #[serde(default)]
    pub lock: LockLimits,
    /// The monitors.
    #[serde(rename = "monitor", default)]
    pub monitors: Vec<MonitorConfig>,
    /// The RDMA verbs data path (feature `verbs`); absent: TCP only.
    #[serde(default)]
    pub rdma: Option<RdmaConfig>,
    /// Registration in etcd and the fleet's assignment; absent: a static bridge.
    #[serde(default)]
    pub fleet: Option<FleetSection>,
}

/// `[fleet]`: the [`fleet::FleetConfig`] keys, plus this guest's part.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// The guest's name in the fleet.
    pub guest: String,
    /// etcd client endpoints.
    #[serde(default = "fleet_defaults::endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix.
    #[serde(default = "fleet_defaults::prefix")]
    pub prefix: String,
    /// Lease TTL in seconds.
    #[serde(default = "fleet_defaults::ttl_s")]
    pub ttl_s: u64,
    /// Connect and request timeout in milliseconds.
    #[serde(default = "fleet_defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// `host:port` monitors connect to; the bound listen address if absent.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The guest's kernel kind, for monitors (`patched`, `stock`).
    #[serde(default = "default_kernel")]
    pub kernel: String,
    /// How many monitors the fleet assigns to this guest; `agreement.k` if absent.
    #[serde(default)]
    pub monitors_per_guest: Option<usize>,
}

mod fleet_defaults {
    pub fn endpoints() -> Vec<String> {
        fleet::FleetConfig::default().endpoints
    }
    pub fn prefix() -> String {
        fleet::FleetConfig::default().prefix
    }
    pub fn ttl_s() -> u64 {
        fleet::FleetConfig::default().ttl_s
    }
    pub fn connect_timeout_ms() -> u64 {
        fleet::FleetConfig::default().connect_timeout_ms
    }
}

fn default_kernel() -> String {
    "patched".into()
}

impl FleetSection {
    /// The etcd side of the section.
    pub fn fleet_config(&self) -> fleet::FleetConfig {
        fleet::FleetConfig {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            ttl_s: self.ttl_s,
            connect_timeout_ms: self.connect_timeout_ms,
        }
    }

    /// Monitors assigned per guest, given the write agreement's `k`.
    pub fn per_guest(&self, k: usize) -> usize {
        self.monitors_per_guest.unwrap_or(k)
    }
}

/// `[rdma]`: register the monitors' grants with an RDMA device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdmaConfig {
    /// Device name (e.g. `mlx5_0`); the first device if absent.
    #[serde(default)]
    pub device: Option<String>,
}

/// TLS files of the bridge.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signs monitors' certificates.
    pub ca: PathBuf,
    /// The bridge's certificate (PEM).
    pub cert: PathBuf,
    /// The bridge's private key (PEM).
    pub key: PathBuf,
}

/// k-of-n write agreement.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// Monitors that must issue the same write.
    pub k: usize,
    /// How long a write waits for agreement, in milliseconds.
    pub window_ms: u64,
}

impl Default for Agreement {
    fn default() -> Self {
        Agreement {
            k: 1,
            window_ms: 2000,
        }
    }
}

/// `[lock]`: how long and how often one monitor may hold the guest paused.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockLimits {
    /// Longest lease one LOCK may ask for, in milliseconds.
    #[serde(default = "default_max_lease_ms")]
    pub max_lease_ms: u64,
    /// The sliding window over which a monitor's pause time is counted, in milliseconds.
    #[serde(default = "default_duty_window_ms")]
    pub duty_window_ms: u64,
    /// Most pause time (leases granted, renewals included) one monitor may hold within any
    /// `duty_window_ms`, in milliseconds.
    #[serde(default = "default_max_pause_per_window_ms")]
    pub max_pause_per_window_ms: u64,
}

impl Default for LockLimits {
    fn default() -> Self {
        LockLimits {
            max_lease_ms: default_max_lease_ms(),
            duty_window_ms: default_duty_window_ms(),
            max_pause_per_window_ms: default_max_pause_per_window_ms(),
        }
    }
}

/// One monitor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Its name (the HELLO must carry it).
    pub name: String,
    /// Its certificate (PEM).
    pub cert: PathBuf,
    /// Ranges it may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Ranges it may write.
    #[serde(default)]
    pub write: Vec<String>,
    /// May it restart the guest (RESTART)?
    #[serde(default)]
    pub restart: bool,
    /// May it take the pause lock (LOCK)? Also needed to vote on writes when `agreement.k >= 2`.
    #[serde(default)]
    pub lock: bool,
    /// May it read vCPU registers (REGS)?
    #[serde(default)]
    pub regs: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}
fn default_max_connections() -> usize {
    32
}
fn default_idle_ms() -> u64 {
    30_000
}
fn default_audit_max_bytes() -> u64 {
    64 << 20
}
fn default_audit_keep() -> usize {
    5
}
fn default_audit_denied_interval_ms() -> u64 {
    10_000
}
fn default_max_startups() -> usize {
    16
}
fn default_max_startups_per_source() -> usize {
    4
}
fn default_login_grace_ms() -> u64 {
    5_000
}
fn default_max_sessions_per_monitor() -> usize {
    4
}
fn default_max_lease_ms() -> u64 {
    10_000
}
fn default_duty_window_ms() -> u64 {
    60_000
}
fn default_max_pause_per_window_ms() -> u64 {
    20_000
}

impl BridgeConfig {
    /// How the audit log is kept.
    pub fn audit_options(&self) -> crate::audit::AuditOptions {
        crate::audit::AuditOptions {
            max_bytes: self.audit_max_bytes,
            keep: self.audit_keep,
            denied_interval: std::time::Duration::from_millis(self.audit_denied_interval_ms),
        }
    }

    /// Reads and checks a config file. Relative paths inside it are taken relative to the file.
    pub fn load(path: &Path) -> Result<BridgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: BridgeConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.audit_log);
        fix(&mut cfg.tls.ca);
        fix(&mut cfg.tls.cert);
        fix(&mut cfg.tls.key);
        for m in &mut cfg.monitors {
            fix(&mut m.cert);
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.monitors.is_empty() {
            return bad("no [[monitor]] configured: nobody could connect".into());
        }
        let writers = self.monitors.iter().filter(|m| !m.write.is_empty()).count();
        if self.agreement.k == 0 {
            return bad("agreement.k must be at least 1".into());
        }
        if self.audit_keep == 0 {
            return bad(
                "audit_keep must be at least 1 (old audit logs kept by rotation); to never rotate, set audit_max_bytes = 0".into(),
            );
        }
        if writers > 0 && self.agreement.k > writers {
            return bad(format!(
                "agreement.k = {} but only {writers} monitor(s) may write: no write could ever be applied",
                self.agreement.k
            ));
        }
        if !(1..=600_000).contains(&self.agreement.window_ms) {
            return bad("agreement.window_ms must be 1..=600000".into());
        }
        if self.max_connections == 0 || self.max_connections > 4096 {
            return bad("max_connections must be 1..=4096".into());
        }
        if !(100..=3_600_000).contains(&self.idle_timeout_ms) {
            return bad("idle_timeout_ms must be 100..=3600000".into());
        }
        if self.max_startups == 0 || self.max_startups > 1024 {
            return bad("max_startups must be 1..=1024".into());
        }
        if self.max_startups_per_source == 0 || self.max_startups_per_source > self.max_startups {
            return bad("max_startups_per_source must be 1..=max_startups".into());
        }
        if !(100..=60_000).contains(&self.login_grace_ms) {
            return bad("login_grace_ms must be 100..=60000".into());
        }
        if self.max_sessions_per_monitor == 0 || self.max_sessions_per_monitor > 64 {
            return bad("max_sessions_per_monitor must be 1..=64".into());
        }
        let l = &self.lock;
        if !(1..=600_000).contains(&l.max_lease_ms) {
            return bad("lock.max_lease_ms must be 1..=600000".into());
        }
        if !(1..=86_400_000).contains(&l.duty_window_ms) {
            return bad("lock.duty_window_ms must be 1..=86400000".into());
        }
        if l.max_pause_per_window_ms == 0 || l.max_pause_per_window_ms > l.duty_window_ms {
            return bad("lock.max_pause_per_window_ms must be 1..=lock.duty_window_ms".into());
        }
        if l.max_lease_ms > l.max_pause_per_window_ms {
            return bad(format!(
                "lock.max_lease_ms ({}) exceeds lock.max_pause_per_window_ms ({}): no such lease could be granted",
                l.max_lease_ms, l.max_pause_per_window_ms
            ));
        }
        if self.agreement.k >= 2 {
            if let Some(m) = self
                .monitors
                .iter()
                .find(|m| !m.write.is_empty() && !m.lock)
            {
                return bad(format!(
                    "monitor {:?} may write but has no `lock = true`: with agreement.k >= 2 a write vote needs the lock permission",
                    m.name
                ));
            }
        }
        if let Some(f) = &self.fleet {
            f.fleet_config()
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("[fleet]: {e}")))?;
            if fleet::check_name(&f.guest).is_err() {
                return bad(format!(
                    "[fleet] guest = {:?}: a name of 1..={} bytes of [A-Za-z0-9._-]",
                    f.guest,
                    fleet::MAX_NAME
                ));
            }
            let n = f.per_guest(self.agreement.k);
            if n < self.agreement.k || n > self.monitors.len() {
                return bad(format!(
                    "[fleet] monitors_per_guest = {n} must be at least agreement.k ({}) and at most the {} listed monitor(s)",
                    self.agreement.k,
                    self.monitors.len()
                ));
            }
            if let Some(a) = &f.advertise {
                if a.is_empty() || a.len() > 256 || !a.contains(':') {
                    return bad(format!("[fleet] advertise = {a:?}: expected host:port"));
                }
            }
            if f.kernel.is_empty() || f.kernel.len() > 64 {
                return bad(
                    "[fleet] kernel must be 1..=64 bytes (e.g. \"patched\" or \"stock\")".into(),
                );
            }
        }
        for (i, m) in self.monitors.iter().enumerate() {
            if m.name.is_empty() || m.name.len() > crate::wire::MAX_MONITOR_ID {
                return bad(format!("monitor #{i}: name must be 1..=64 bytes"));
            }
            if self.monitors[..i].iter().any(|o| o.name == m.name) {
                return bad(format!("monitor {:?} is listed twice", m.name));
            }
            for r in m.read.iter().chain(&m.write) {
                RangeSpec::parse(r).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// A range as written in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// bdvmm's whole backdoor range.
    Backdoor,
    /// The Sensor Box region.
    SensorBox,
    /// The repair-hook mailbox.
    Hooks,
    /// All guest RAM.
    Ram,
    /// `[gpa, gpa + len)`.
    Explicit {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// A range spec that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not one of the forms.
    #[error("range {0:?}: expected backdoor, sb, hooks, ram or 0xSTART+0xLEN")]
    Syntax(String),
    /// `len` is zero or the end overflows.
    #[error("range {0:?} is empty or wraps around")]
    Empty(String),
}

impl RangeSpec {
    /// Parses `backdoor`, `sb`, `hooks`, `ram` or `0xSTART+0xLEN`.
    pub fn parse(s: &str) -> Result<RangeSpec, RangeError> {
        match s {
            "backdoor" => return Ok(RangeSpec::Backdoor),
            "sb" => return Ok(RangeSpec::SensorBox),
            "hooks" => return Ok(RangeSpec::Hooks),
            "ram" => return Ok(RangeSpec::Ram),
            _ => {}
        }
        let err = || RangeError::Syntax(s.to_owned());
        let (a, b) = s.split_once('+').ok_or_else(err)?;
        let num = |t: &str| {
            let t = t.trim();
            t.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|| t.parse())
                .map_err(|_| err())
        };
        let (gpa, len) = (num(a)?, num(b)?);
        if len == 0 || gpa.checked_add(len).is_none() {
            return Err(RangeError::Empty(s.to_owned()));
        }
        Ok(RangeSpec::Explicit { gpa, len })
    }

    /// The guest-physical ranges this names, given the VM's RAM and backdoor range.
    pub fn resolve(&self, ram: &[(u64, u64)], backdoor: (u64, u64)) -> Vec<(u64, u64)> {
        let (bd, bd_len) = backdoor;
        match self {
            RangeSpec::Backdoor => vec![(bd, bd_len)],
            RangeSpec::SensorBox => vec![(bd + SB_OFFSET, SB_SIZE.min(bd_len))],
            RangeSpec::Hooks if bd_len >= HOOKS_OFFSET + HOOKS_SIZE => {
                vec![(bd + HOOKS_OFFSET, HOOKS_SIZE)]
            }
            RangeSpec::Hooks => vec![],
            RangeSpec::Ram => ram.to_vec(),
            RangeSpec::Explicit { gpa, len } => vec![(*gpa, *len)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_specs_parse_and_resolve() {
        assert_eq!(RangeSpec::parse("sb"), Ok(RangeSpec::SensorBox));
        assert_eq!(
            RangeSpec::parse("0x1000+0x200"),
            Ok(RangeSpec::Explicit {
                gpa: 0x1000,
                len: 0x200
            })
        );
        assert_eq!(
            RangeSpec::parse("4096+16"),
            Ok(RangeSpec::Explicit { gpa: 4096, len: 16 })
        );
        for bad in [
            "",
            "all",
            "0x10",
            "0x10+0",
            "0xffffffffffffffff+2",
            "0xzz+1",
        ] {
            assert!(RangeSpec::parse(bad).is_err(), "{bad}");
        }
        let bd = (0xf0_0000, 1 << 20);
        assert_eq!(
            RangeSpec::Hooks.resolve(&[], bd),
            vec![(0xf0_2000, HOOKS_SIZE)]
        );
        assert_eq!(
            RangeSpec::SensorBox.resolve(&[], bd),
            vec![(0xf0_0000, SB_SIZE)]
        );
        assert_eq!(RangeSpec::Ram.resolve(&[(0, 5)], bd), vec![(0, 5)]);
    }

    #[test]
    fn configs_that_cannot_work_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        let base = r#"
audit_log = "a.jsonl"
[tls]
ca = "ca.pem"
cert = "b.pem"
key = "b.key"
"#;
        let cases = [
            ("", "no [[monitor]]"),
            (
                "[agreement]\nk = 3\nwindow_ms = 10\n[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\nwrite = [\"hooks\"]\n",
                "no write could ever be applied",
            ),
            (
                "[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\nread = [\"everything\"]\n",
                "expected backdoor",
            ),
            (
                "[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[[monitor]]\nname = \"m\"\ncert = \"n.pem\"\n",
                "listed twice",
            ),
            ("bogus = 1\n", "unknown field"),

            (
                "[agreement]\nk = 2\nwindow_ms = 10\n[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\nwrite = [\"hooks\"]\nlock = true\n[[monitor]]\nname = \"n\"\ncert = \"n.pem\"\nwrite = [\"hooks\"]\n",
                "needs the lock permission",
            ),
            (
                "[lock]\nmax_lease_ms = 5000\nmax_pause_per_window_ms = 1000\n[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n",
                "no such lease could be granted",
            ),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\n", "missing field `guest`"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"a/b\"\n", "[fleet] guest"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"g\"\nttl_s = 0\n", "ttl_s must be 1..=60"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"g\"\nendpoints = []\n", "at least one etcd endpoint"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"g\"\nmonitors_per_guest = 2\n", "monitors_per_guest = 2"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"g\"\nmonitors_per_guest = 0\n", "at least agreement.k"),
            ("[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[fleet]\nguest = \"g\"\nbogus = 1\n", "unknown field"),
        ];
        for (extra, want) in cases {
            std::fs::write(&p, format!("{base}{extra}")).unwrap();
            let e = BridgeConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        std::fs::write(
            &p,
            format!("audit_keep = 0\n{base}[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n"),
        )
        .unwrap();
        let e = BridgeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("audit_keep must be at least 1"), "{e}");
        std::fs::write(
            &p,
            format!("{base}[[monitor]]\nname = \"m\"\ncert = \"m.pem\"\nread = [\"sb\"]\n"),
        )
        .unwrap();
        let cfg = BridgeConfig::load(&p).unwrap();
        assert_eq!(cfg.monitors[0].cert, dir.path().join("m.pem"));
        assert_eq!(cfg.agreement.k, 1);
        assert!(cfg.fleet.is_none());
    }

    #[test]
    fn the_fleet_section_has_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        let text = "audit_log = \"a.jsonl\"\n[tls]\nca = \"ca.pem\"\ncert = \"b.pem\"\nkey = \"b.key\"\n\
            [agreement]\nk = 2\nwindow_ms = 100\n\
            [[monitor]]\nname = \"m\"\ncert = \"m.pem\"\n[[monitor]]\nname = \"n\"\ncert = \"n.pem\"\n\
            [[monitor]]\nname = \"o\"\ncert = \"o.pem\"\n[fleet]\nguest = \"vm-1\"\n";
        std::fs::write(&p, text).unwrap();
        let cfg = BridgeConfig::load(&p).unwrap();
        let f = cfg.fleet.as_ref().unwrap();
        assert_eq!(f.fleet_config(), fleet::FleetConfig::default());
        assert_eq!(f.kernel, "patched");
        assert_eq!(f.advertise, None);
        assert_eq!(f.per_guest(cfg.agreement.k), 2);
        std::fs::write(
            &p,
            format!("{text}endpoints = [\"http://10.0.0.1:2379\"]\nttl_s = 3\nmonitors_per_guest = 3\nadvertise = \"10.0.0.5:7070\"\nkernel = \"stock\"\n"),
        )
        .unwrap();
        let cfg = BridgeConfig::load(&p).unwrap();
        let f = cfg.fleet.as_ref().unwrap();
        assert_eq!(f.fleet_config().ttl_s, 3);
        assert_eq!(f.per_guest(cfg.agreement.k), 3);
        assert_eq!(f.advertise.as_deref(), Some("10.0.0.5:7070"));
        // Fewer than k assigned monitors could never agree on a write.
        std::fs::write(&p, format!("{text}monitors_per_guest = 1\n")).unwrap();
        let e = BridgeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("at least agreement.k (2)"), "{e}");
    }
}
