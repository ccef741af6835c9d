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
//! max_connections = 32             # further connections are closed at once
//! idle_timeout_ms = 30000          # a peer silent (or stuck mid-frame) this long is disconnected
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
//! [[monitor]]
//! name = "mon1"                    # must match the monitor's HELLO
//! cert = "pki/mon1.pem"            # its certificate, pinned by SHA-256: a certificate the CA
//!                                  # signed but that is not listed here gets nothing
//! read = ["sb", "ram"]             # what it may read
//! write = ["hooks"]                # what it may write
//! restart = false                  # may it reboot the guest (RESTART, for hung guests)?
//!
//! [rdma]                           # optional, feature `verbs`: one-sided RDMA data path
//! device = "mlx5_0"                # the first device if absent
//! ```
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
    /// Most concurrent monitor connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Idle timeout in milliseconds.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// TLS material.
    pub tls: TlsFiles,
    /// Write agreement.
    #[serde(default)]
    pub agreement: Agreement,
    /// The monitors.
    #[serde(rename = "monitor", default)]
    pub monitors: Vec<MonitorConfig>,
    /// The RDMA verbs data path (feature `verbs`); absent: TCP only.
    #[serde(default)]
    pub rdma: Option<RdmaConfig>,
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
    }
}
