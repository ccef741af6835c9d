//! [`Unresolved`]: a field or symbol this kernel does not have in any shape we know, and the one
//! feature that is off because of it.

use std::fmt;

/// What messages say when the kernel's release is not known where the layout is resolved.
pub const UNKNOWN_RELEASE: &str = "unknown release";

/// A field (or symbol) that could not be resolved, and what is disabled without it. Everything
/// else keeps working.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    /// The kernel's release (`uname -r`), or [`UNKNOWN_RELEASE`].
    pub release: String,
    /// The field by meaning, e.g. `mm_struct.rss_stat`.
    pub field: &'static str,
    /// Every shape that was tried, e.g. `mm_struct.rss_stat.count[] (<= 6.1) or ...`.
    pub looked_for: &'static str,
    /// What is off without it, and what is reported instead.
    pub disables: &'static str,
    /// What the kernel's types said (the closest shape's error).
    pub reason: String,
}

impl Unresolved {
    /// The same, for kernel `release`.
    pub fn for_release(&self, release: &str) -> Unresolved {
        Unresolved {
            release: release.to_owned(),
            ..self.clone()
        }
    }
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {}: no {} (looked for {}; {}): {}",
            self.release, self.field, self.looked_for, self.reason, self.disables
        )
    }
}
