//! Small helpers for the bench binaries (`harness = false`): arguments and percentiles.

use std::time::Duration;

/// The value after `--name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Median and 99th percentile.
pub fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    assert!(!v.is_empty(), "no samples");
    v.sort();
    let p = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
    (p(0.5), p(0.99))
}
