//! [`FleetConfig`]: where etcd is and how leases are kept; the crate's error type.
//!
//! ```toml
//! [fleet]
//! endpoints = ["127.0.0.1:2379"]   # etcd client URLs ("host:port" or "http://host:port")
//! prefix = "/backdoors"            # every key lives under it
//! ttl_s = 5                        # lease TTL: a dead holder's keys vanish this long after
//! connect_timeout_ms = 2000        # one connection attempt (and each etcd request) at most this
//! ```

use std::time::Duration;

use serde::Deserialize;

/// Errors of the fleet handles.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The configuration makes no sense.
    #[error("fleet config: {0}")]
    Config(String),
    /// A name (guest or monitor) that cannot be a key.
    #[error("fleet: name {0:?} must be 1..=128 bytes of [A-Za-z0-9._-]")]
    Name(String),
    /// The background thread or its runtime could not be started.
    #[error("fleet: cannot start the background thread: {0}")]
    Runtime(std::io::Error),
    /// etcd answered with an error or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// An etcd request did not finish in time.
    #[error("etcd: {0} timed out; is etcd running and reachable?")]
    Timeout(&'static str),
    /// A record could not be encoded.
    #[error("fleet: cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where etcd is and how leases are kept; embeddable as a `[fleet]` TOML table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client endpoints, `host:port` or `http://host:port`.
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix (starts with `/`, no trailing `/`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Lease TTL in seconds (1..=60): a dead holder's keys vanish this long after its last
    /// keepalive.
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    /// Bound on one connection attempt and on each etcd request, in milliseconds (1..=60000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// The default etcd endpoint.
pub fn default_endpoints() -> Vec<String> {
    vec!["127.0.0.1:2379".into()]
}
/// The default key prefix.
pub fn default_prefix() -> String {
    "/backdoors".into()
}
/// The default lease TTL in seconds.
pub fn default_ttl_s() -> u64 {
    5
}
/// The default connect and request timeout in milliseconds.
pub fn default_connect_timeout_ms() -> u64 {
    2000
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            endpoints: default_endpoints(),
            prefix: default_prefix(),
            ttl_s: default_ttl_s(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}

impl FleetConfig {
    /// A config for these endpoints, with the defaults otherwise.
    pub fn with_endpoints(endpoints: Vec<String>) -> FleetConfig {
        FleetConfig {
            endpoints,
            ..FleetConfig::default()
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), FleetError> {
        let bad = |m: &str| Err(FleetError::Config(m.into()));
        if self.endpoints.is_empty() {
            return bad("endpoints: give at least one etcd endpoint (e.g. \"127.0.0.1:2379\")");
        }
        if self
            .endpoints
            .iter()
            .any(|e| e.trim().is_empty() || e.len() > 256)
        {
            return bad("endpoints: an endpoint is empty or longer than 256 bytes");
        }
        if !self.prefix.starts_with('/') || self.prefix.len() > 128 {
            return bad(
                "prefix must start with '/' and be at most 128 bytes (e.g. \"/backdoors\")",
            );
        }
        if self.prefix.len() > 1 && self.prefix.ends_with('/') {
            return bad("prefix must not end with '/'");
        }
        if !(1..=60).contains(&self.ttl_s) {
            return bad("ttl_s must be 1..=60 (seconds)");
        }
        if !(1..=60_000).contains(&self.connect_timeout_ms) {
            return bad("connect_timeout_ms must be 1..=60000");
        }
        Ok(())
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    /// The connect and request timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The endpoints as URLs (`http://` added where no scheme is given).
    pub fn urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| {
                let e = e.trim();
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect()
    }

    /// `<prefix>/guests/`.
    pub fn guests_dir(&self) -> String {
        format!("{}/guests/", self.prefix.trim_end_matches('/'))
    }

    /// `<prefix>/monitors/`.
    pub fn monitors_dir(&self) -> String {
        format!("{}/monitors/", self.prefix.trim_end_matches('/'))
    }

    /// `<prefix>/`: both directories.
    pub(crate) fn root(&self) -> String {
        format!("{}/", self.prefix.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: FleetConfig = toml_like("{}");
        assert_eq!(c, FleetConfig::default());
        c.validate().unwrap();
        assert_eq!(c.guests_dir(), "/backdoors/guests/");
        assert_eq!(c.urls(), vec!["http://127.0.0.1:2379".to_string()]);
        for (json, want) in [
            (r#"{"endpoints": []}"#, "at least one"),
            (r#"{"ttl_s": 0}"#, "ttl_s"),
            (r#"{"ttl_s": 61}"#, "ttl_s"),
            (r#"{"prefix": "x"}"#, "start with '/'"),
            (r#"{"prefix": "/x/"}"#, "not end"),
        ] {
            let e = toml_like(json).validate().unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert!(serde_json::from_str::<FleetConfig>(r#"{"bogus": 1}"#).is_err());
    }

    fn toml_like(json: &str) -> FleetConfig {
        serde_json::from_str(json).unwrap()
    }
}
