//! The JSON records under the prefix, and the checks on what is read back (untrusted data).

use serde::{Deserialize, Serialize};

use crate::config::FleetError;

/// Longest guest or monitor name.
pub const MAX_NAME: usize = 128;
/// Largest record value read from etcd; larger values are ignored.
pub const MAX_VALUE: usize = 4096;

/// A guest, as its bridge registers it at `<prefix>/guests/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// The guest's name (the last part of its key).
    pub name: String,
    /// `host:port` monitors connect to.
    pub bridge: String,
    /// SHA-256 (hex) of the bridge's certificate; empty if unknown.
    #[serde(default)]
    pub cert_sha256: String,
    /// `patched`, `stock` or another string.
    #[serde(default)]
    pub kernel: String,
    /// `kvm`, `tcg`, `dump` or another string.
    #[serde(default)]
    pub engine: String,
}

/// A monitor, as it joins at `<prefix>/monitors/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The monitor's name (the last part of its key).
    pub name: String,
}

/// Checks a guest or monitor name, used as the last part of a key: 1..=[`MAX_NAME`] bytes of
/// `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), FleetError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(FleetError::Name(name.to_owned()))
    }
}

/// What one key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Guest(String),
    Monitor(String),
}

/// Classifies a key: a guest's or a monitor's name under `root` (`<prefix>/`), or nothing.
pub(crate) fn classify(root: &str, key: &[u8]) -> Option<Entry> {
    if key.len() > root.len() + 16 + MAX_NAME {
        return None;
    }
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(root)?;
    let (dir, name) = rest.split_once('/')?;
    check_name(name).ok()?;
    match dir {
        "guests" => Some(Entry::Guest(name.to_owned())),
        "monitors" => Some(Entry::Monitor(name.to_owned())),
        _ => None,
    }
}

/// Parses a guest record read from etcd, or says why it is skipped.
pub(crate) fn parse_guest(name: &str, value: &[u8]) -> Result<GuestRecord, String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "value of {} bytes (at most {MAX_VALUE})",
            value.len()
        ));
    }
    let g: GuestRecord =
        serde_json::from_slice(value).map_err(|e| format!("not a guest record: {e}"))?;
    if g.name != name {
        return Err(format!("record names {:?}, not its key's {name:?}", g.name));
    }
    if g.bridge.len() > 256
        || g.cert_sha256.len() > 128
        || g.kernel.len() > 64
        || g.engine.len() > 64
    {
        return Err("a field is too long".into());
    }
    Ok(g)
}

/// Parses a member record read from etcd, or says why it is skipped.
pub(crate) fn parse_member(name: &str, value: &[u8]) -> Result<MemberRecord, String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "value of {} bytes (at most {MAX_VALUE})",
            value.len()
        ));
    }
    let m: MemberRecord =
        serde_json::from_slice(value).map_err(|e| format!("not a member record: {e}"))?;
    if m.name != name {
        return Err(format!("record names {:?}, not its key's {name:?}", m.name));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_are_checked() {
        let root = "/b/";
        assert_eq!(
            classify(root, b"/b/guests/g1"),
            Some(Entry::Guest("g1".into()))
        );
        assert_eq!(
            classify(root, b"/b/monitors/m-1"),
            Some(Entry::Monitor("m-1".into()))
        );
        for bad in [
            &b"/b/guests/"[..],
            b"/b/guests/a/b",
            b"/b/other/x",
            b"/c/guests/x",
            b"/b/guests/\xff",
        ] {
            assert_eq!(classify(root, bad), None, "{bad:?}");
        }
        assert!(parse_member("m", br#"{"name":"m"}"#).is_ok());
        assert!(parse_member("m", br#"{"name":"n"}"#).is_err());
        assert!(parse_member("m", b"junk").is_err());
        let big = format!(r#"{{"name":"g","bridge":"{}"}}"#, "x".repeat(MAX_VALUE));
        assert!(parse_guest("g", big.as_bytes()).is_err());
        assert!(parse_guest("g", br#"{"name":"g","bridge":"h:1"}"#).is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
    }
}
