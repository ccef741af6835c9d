//! Prometheus metrics, served as text on `GET /metrics` from a local port.
//!
//! The endpoint is a small HTTP/1.0 server that no client can monopolise ([`ServeLimits`]):
//! each client is served on a thread of its own from a bounded pool (4 by default; one more is
//! answered `503` and closed at once), under one overall deadline per connection (5 s from accept
//! to the last byte written, however slowly the client sends or reads), with the request line and
//! headers bounded (8 KiB; a longer request is answered `414` and closed without buffering the
//! rest). A slow or hostile client therefore delays no other scrape, and costs at most one pool
//! place for at most the deadline.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Gauges and counters, keyed by name and labels.
///
/// Two kinds: the per-sample gauges of each guest ([`SampleGauges`]: written in place at every
/// sample, formatted only when scraped) and everything else (rare events: a map keyed by name
/// and formatted labels).
#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<(String, String), f64>>,
    guests: Mutex<BTreeMap<String, Arc<SampleGauges>>>,
}

/// What one guest's sampling updates at every sample. A sample costs one uncontended lock and
/// stores of numbers: no label formatting and no allocation once its sensor set is known (a new
/// set, e.g. after a reboot, is copied once).
#[derive(Default)]
pub struct SampleGauges {
    inner: Mutex<Sampled>,
}

#[derive(Default)]
struct Sampled {
    up: Option<bool>,
    samples: u64,
    sample_seconds: f64,
    budget_ratio: Option<f64>,
    budget_seconds: f64,
    sensors: Vec<SensorGauge>,
}

struct SensorGauge {
    id: u32,
    name: String,
    value: u64,
    threshold: u64,
}

impl SampleGauges {
    fn with<T>(&self, f: impl FnOnce(&mut Sampled) -> T) -> T {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// Whether the last sample succeeded (`bdmon_up`).
    pub fn set_up(&self, up: bool) {
        self.with(|g| g.up = Some(up));
    }

    /// One good sample: how long it took, and each sensor's value and the threshold in force
    /// (`threshold(sensor)`).
    pub fn sampled(
        &self,
        took: Duration,
        sensors: &[introspect::sensorbox::Sensor],
        threshold: impl Fn(&introspect::sensorbox::Sensor) -> u64,
    ) {
        self.with(|g| {
            g.samples += 1;
            g.sample_seconds = took.as_secs_f64();
            let same = g.sensors.len() == sensors.len()
                && g.sensors.iter().zip(sensors).all(|(a, b)| a.id == b.id);
            if !same {
                g.sensors = sensors
                    .iter()
                    .map(|s| SensorGauge {
                        id: s.id,
                        name: s.name.clone(),
                        value: 0,
                        threshold: 0,
                    })
                    .collect();
            }
            for (gauge, s) in g.sensors.iter_mut().zip(sensors) {
                gauge.value = s.value;
                gauge.threshold = threshold(s);
            }
        });
    }

    /// The pause budget: share used in the current window, and all pause time charged.
    pub fn budget(&self, ratio: f64, total_seconds: f64) {
        self.with(|g| {
            g.budget_ratio = Some(ratio);
            g.budget_seconds = total_seconds;
        });
    }

    /// Appends this guest's lines of metric `name` to `out`.
    fn render(&self, guest: &str, name: &str, out: &mut String) {
        use std::fmt::Write as _;
        let l = labels(&[("guest", guest)]);
        self.with(|g| {
            let mut line = |v: f64| {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            };
            match name {
                "bdmon_up" => {
                    if let Some(up) = g.up {
                        line(if up { 1.0 } else { 0.0 });
                    }
                }
                "bdmon_samples_total" if g.samples > 0 => line(g.samples as f64),
                "bdmon_sample_seconds" if g.samples > 0 => line(g.sample_seconds),
                "bdmon_pause_budget_used_ratio" => {
                    if let Some(r) = g.budget_ratio {
                        line(r);
                    }
                }
                "bdmon_budget_pause_seconds_total" if g.budget_ratio.is_some() => {
                    line(g.budget_seconds)
                }
                "bdmon_sensor_value" | "bdmon_sensor_threshold" => {
                    for s in &g.sensors {
                        let v = if name == "bdmon_sensor_value" {
                            s.value
                        } else {
                            s.threshold
                        };
                        let sl = labels(&[("guest", guest), ("sensor", &s.name)]);
                        let _ = writeln!(out, "{name}{{{sl}}} {}", v as f64);
                    }
                }
                _ => {}
            }
        });
    }
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
    /// The per-sample gauges of `guest` (made on first use; keep the `Arc`).
    pub fn guest(&self, guest: &str) -> Arc<SampleGauges> {
        let mut m = match self.guests.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(guest.to_owned()).or_default().clone()
    }

    /// Forgets `guest`'s per-sample gauges (it left the fleet).
    pub fn forget_guest(&self, guest: &str) {
        let mut m = match self.guests.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.remove(guest);
    }

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
        let guests: Vec<(String, Arc<SampleGauges>)> = match self.guests.lock() {
            Ok(g) => g.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let mut out = String::new();
        for (name, kind, help) in HELP {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (guest, g) in &guests {
                g.render(guest, name, &mut out);
            }
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

    /// Serves `GET /metrics` on `addr` with the default [`ServeLimits`]; returns the bound address.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        self.serve_with(addr, ServeLimits::default())
    }

    /// Serves `GET /metrics` on `addr` from a thread of its own, each client on a thread of its
    /// own, at most `limits.max_clients` at once; returns the bound address.
    pub fn serve_with(
        self: &Arc<Self>,
        addr: SocketAddr,
        limits: ServeLimits,
    ) -> std::io::Result<SocketAddr> {
        let l = TcpListener::bind(addr)?;
        let bound = l.local_addr()?;
        let me = self.clone();
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || loop {
                let s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of fds and the like: back off a little rather than spin.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        std::thread::sleep(ACCEPT_BACKOFF);
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&active, limits.max_clients) else {
                    refuse(&s);
                    continue;
                };
                let me = me.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        me.answer(&s, limits);
                    });
                if let Err(e) = spawned {
                    // The closure (and with it the slot and the socket) is dropped.
                    tracing::warn!("metrics endpoint: cannot start a client thread: {e}");
                }
            })?;
        Ok(bound)
    }

    /// Reads one request within the deadline and the size bound, and answers it.
    fn answer(&self, s: &TcpStream, limits: ServeLimits) {
        let deadline = Instant::now() + limits.deadline;
        let (status, body) = match read_head(s, deadline, limits.max_request) {
            Ok(line) if line.starts_with("GET /metrics") => ("200 OK", self.render()),
            Ok(_) => ("404 Not Found", "only GET /metrics\n".to_string()),
            Err(HeadError::TooLong) => (
                "414 URI Too Long",
                format!("request longer than {} bytes\n", limits.max_request),
            ),
            // Silent, gone, or out of time: nobody to answer.
            Err(HeadError::Closed | HeadError::Timeout) => return,
        };
        let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if s.set_write_timeout(Some(left)).is_err() {
            return;
        }
        let mut w = s;
        let _ = write!(
            w,
            "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.shutdown(Shutdown::Write);
    }
}

/// Bounds of the metrics endpoint: a scraper gets its answer even while other clients are slow,
/// hostile or numerous.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Clients served at once; one more is answered `503` and closed at once.
    pub max_clients: usize,
    /// From accept to the last byte of the answer; a client still sending (however slowly) or
    /// not reading when it passes is dropped.
    pub deadline: Duration,
    /// The request line and headers together; a longer request is answered `414` and closed,
    /// having buffered no more than this.
    pub max_request: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_clients: 4,
            deadline: Duration::from_secs(5),
            max_request: 8 << 10,
        }
    }
}

/// After a failed accept (out of file descriptors, ...), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One of the pool's places, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a client beyond the pool without reading or waiting: one non-blocking write.
fn refuse(s: &TcpStream) {
    let body = "too many metrics clients at once; retry\n";
    if s.set_nonblocking(true).is_ok() {
        // Whatever the client already sent is read (bounded) so closing does not reset the
        // connection before it reads the answer.
        let mut sink = [0u8; 4096];
        let _ = (&*s).read(&mut sink);
        let mut w = s;
        let _ = write!(
            w,
            "HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.shutdown(Shutdown::Write);
    }
}

/// Why no request was read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The request (line and headers) is longer than the bound.
    TooLong,
    /// The client closed (or the socket failed) before the end of its headers.
    Closed,
    /// The deadline passed first.
    Timeout,
}

/// Reads the request head (up to the blank line) and returns its first line. Never buffers more
/// than `max` bytes, never waits past `deadline` (each read waits only for what is left of it).
fn read_head(s: &TcpStream, deadline: Instant, max: usize) -> Result<String, HeadError> {
    let mut head: Vec<u8> = Vec::with_capacity(max.min(1024));
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(HeadError::Timeout)?;
        s.set_read_timeout(Some(left))
            .map_err(|_| HeadError::Closed)?;
        let room = max.saturating_sub(head.len()).min(chunk.len());
        if room == 0 {
            return Err(HeadError::TooLong);
        }
        let n = match (&*s).read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HeadError::Timeout)
            }
            Err(_) => return Err(HeadError::Closed),
        };
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            let first = head[..end]
                .split(|b| *b == b'\n')
                .next()
                .unwrap_or_default();
            return Ok(String::from_utf8_lossy(first).trim_end().to_string());
        }
    }
}

/// Where the head ends (the blank line: `\r\n\r\n` or a bare `\n\n`), if it does.
fn head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
