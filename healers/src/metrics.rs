//! Prometheus metrics, served as text on `GET /metrics` from a local port.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Gauges and counters, keyed by name and labels.
#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(String, String), f64>>,
}

fn labels(l: &[(&str, &str)]) -> String {
    l.iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', " ");
            format!("{k}=\"{v}\"")
        })
        .collect::<Vec<_>>()
        .join(",")
}

const HELP: &[(&str, &str, &str)] = &[
    (
        "bdmon_up",
        "gauge",
        "1 if the last sample of the guest succeeded",
    ),
    ("bdmon_samples_total", "counter", "Sensor Box samples taken"),
    (
        "bdmon_sample_errors_total",
        "counter",
        "samples that failed",
    ),
    (
        "bdmon_sample_seconds",
        "gauge",
        "duration of the last sample",
    ),
    ("bdmon_sensor_value", "gauge", "sensor value V"),
    (
        "bdmon_sensor_threshold",
        "gauge",
        "sensor threshold T in force",
    ),
    (
        "bdmon_violations_total",
        "counter",
        "samples showing a sensor out of contract",
    ),
    (
        "bdmon_repairs_total",
        "counter",
        "violations healed by an HM",
    ),
    (
        "bdmon_not_healed_total",
        "counter",
        "violations an HM could not heal or found no culprit for",
    ),
    ("bdmon_killed_total", "counter", "processes an HM killed"),
    ("bdmon_hangs_total", "counter", "hung-guest reports"),
    (
        "bdmon_backoffs_total",
        "counter",
        "failed steps (by step) that made bdmon wait before trying again",
    ),
    (
        "bdmon_backoff_seconds",
        "gauge",
        "wait before the next try of a failed sample (0: not backing off)",
    ),
    (
        "bdmon_pause_skipped_total",
        "counter",
        "locks not taken because they would break the guest's pause budget",
    ),
    (
        "bdmon_budget_pause_seconds_total",
        "counter",
        "guest time bdmon held paused outside repairs (charged to the pause budget)",
    ),
    (
        "bdmon_pause_budget_used_ratio",
        "gauge",
        "share of the pause budget used in the current window",
    ),
];

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut BTreeMap<(String, String), f64>)) {
        let mut m = match self.values.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        f(&mut m);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, l: &[(&str, &str)], v: f64) {
        self.with(|m| {
            m.insert((name.to_owned(), labels(l)), v);
        });
    }

    /// Adds to a counter.
    pub fn add(&self, name: &str, l: &[(&str, &str)], v: f64) {
        self.with(|m| *m.entry((name.to_owned(), labels(l))).or_insert(0.0) += v);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let m = match self.values.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut out = String::new();
        for (name, kind, help) in HELP {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for ((n, l), v) in m.iter().filter(|((n, _), _)| n == name) {
                if l.is_empty() {
                    out.push_str(&format!("{n} {v}\n"));
                } else {
                    out.push_str(&format!("{n}{{{l}}} {v}\n"));
                }
            }
        }
        out
    }

    /// Serves `GET /metrics` on `addr` from a thread of its own; returns the bound address.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let bound = l.local_addr()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for s in l.incoming().map_while(Result::ok) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let mut line = String::new();
                    let mut r = BufReader::new(&s);
                    if r.read_line(&mut line).is_err() {
                        continue;
                    }
                    let (status, body) = if line.starts_with("GET /metrics") {
                        ("200 OK", me.render())
                    } else {
                        ("404 Not Found", "only GET /metrics\n".to_string())
                    };
                    let mut w = &s;
                    let _ = write!(
                        w,
                        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            })?;
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn renders_and_serves_prometheus_text() {
        let m = Arc::new(Metrics::default());
        m.set(
            "bdmon_sensor_value",
            &[("guest", "vm\"1"), ("sensor", "NPROCS")],
            42.0,
        );
        m.add("bdmon_repairs_total", &[("guest", "vm1"), ("hm", "P")], 1.0);
        m.add("bdmon_repairs_total", &[("guest", "vm1"), ("hm", "P")], 1.0);
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
        assert!(body.contains("bdmon_sensor_value{guest=\"vm\\\"1\",sensor=\"NPROCS\"} 42"));
        assert!(body.contains("bdmon_repairs_total{guest=\"vm1\",hm=\"P\"} 2"));
        assert!(body.contains("# TYPE bdmon_killed_total counter"));
    }
}
