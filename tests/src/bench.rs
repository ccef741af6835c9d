//! Small helpers for the bench binaries (`harness = false`): arguments, percentiles, and the
//! parsers of the load generators' reports (`tests/benches/devices.rs`).

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

/// `key=value` pairs of a line, values as numbers.
pub fn key_values(line: &str) -> impl Iterator<Item = (&str, f64)> {
    line.split_whitespace().filter_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        Some((k, v.parse::<f64>().ok()?))
    })
}

/// iperf3's received throughput in Gbit/s from its JSON report.
pub fn iperf_gbits(json: &str) -> Result<f64, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("iperf3 report is not JSON: {e}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {e}"));
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3 report has no end.sum_received.bits_per_second".into())
}

/// The PING_MBULK row of `redis-benchmark --csv`: requests per second, p50 and p99 in µs.
pub fn redis_ping(csv: &str) -> Result<(f64, f64, f64), String> {
    crate::load::csv_row(csv, Some("PING_MBULK"))
        .map(|(rps, p50, p99)| (rps, p50 * 1000.0, p99 * 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_lines_give_their_numbers_and_skip_the_rest() {
        let kv: Vec<_> =
            key_values("MBps=812.5 iops=775 lat_p50_us=10 bad=x lone lat_p99_us=27").collect();
        assert_eq!(
            kv,
            vec![
                ("MBps", 812.5),
                ("iops", 775.0),
                ("lat_p50_us", 10.0),
                ("lat_p99_us", 27.0)
            ]
        );
    }

    #[test]
    fn iperf_reports_give_the_received_rate_or_say_why_not() {
        let ok = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":3e9},
            "sum_received":{"bits_per_second":2.5e9}}}"#;
        assert_eq!(iperf_gbits(ok), Ok(2.5));
        let err =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(iperf_gbits(err).unwrap_err().contains("Connection refused"));
        assert!(iperf_gbits("{}").unwrap_err().contains("sum_received"));
        assert!(iperf_gbits("iperf3: error")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn redis_benchmark_csv_gives_rate_and_percentiles_in_microseconds() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                   \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"PING_MBULK\",\"5000.00\",\"0.190\",\"0.100\",\"0.183\",\"0.255\",\"0.351\",\"2.000\"\n";
        let (rps, p50, p99) = redis_ping(csv).unwrap();
        assert_eq!(rps, 5000.0);
        assert!((p50 - 183.0).abs() < 1e-6, "{p50}");
        assert!((p99 - 351.0).abs() < 1e-6, "{p99}");
        assert!(redis_ping("Could not connect to Redis").is_err());
        let no_row = "\"test\",\"rps\"\n\"PING_INLINE\",\"1.0\"\n";
        assert!(redis_ping(no_row).unwrap_err().contains("PING_MBULK"));
    }
}
