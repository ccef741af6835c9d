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
    // The sample `permille`/1000 of the way through, rounded to the nearest index.
    let p = |permille: usize| v[((v.len() - 1) * permille + 500) / 1000];
    (p(500), p(990))
}

/// A memory image of `mib` MiB with a Sensor Box of `n` level sensors (ids from `first_id`) at
/// `backdoor`, written to `path`: what a bridge serves with `--dump` when a benchmark needs more
/// sensors than our guest kernel registers.
pub fn sensor_box_image(
    path: &std::path::Path,
    mib: usize,
    backdoor: u64,
    n: u32,
    first_id: u32,
    fill: impl Fn(&mut [u8]),
) {
    use introspect::sensorbox::{self, Sensor, SensorClass};
    let sensors: Vec<Sensor> = (0..n)
        .map(|i| Sensor {
            id: first_id + i,
            class: SensorClass::Level,
            flags: 1,
            threshold: 1000,
            value: u64::from(i),
            updated: 0,
            name: format!("SENSOR_{i}"),
        })
        .collect();
    let sb = sensorbox::encode(&sensors, 250, 2);
    let mut ram = vec![0u8; mib << 20];
    fill(&mut ram);
    let at = usize::try_from(backdoor).expect("the Sensor Box address fits in usize");
    ram[at..at + sb.len()].copy_from_slice(&sb);
    std::fs::write(path, &ram).expect("write the memory image");
}
