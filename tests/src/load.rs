//! A real load generator from Debian against a guest's redis-server: `redis-benchmark` (GET, a
//! fixed number of requests from a few connections) run back to back from this machine, each run
//! a *window* with its own throughput and p50/p99 latency as redis-benchmark reports them. A run
//! that does not finish in time is a window that timed out: what a client of a crippled service
//! sees. Windows last about a second on an idle guest, so the series reads as per-second figures.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How one window ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every request answered.
    Done {
        /// Requests per second.
        rps: f64,
        /// Median latency, ms.
        p50_ms: f64,
        /// 99th-percentile latency, ms.
        p99_ms: f64,
    },
    /// Not every request was answered within the window's time limit.
    TimedOut,
    /// redis-benchmark failed (e.g. connection refused: no server).
    Failed(String),
}

/// One redis-benchmark run.
#[derive(Clone, Debug)]
pub struct Window {
    /// When it started, Unix ms.
    pub start_ms: u64,
    /// When it ended, Unix ms.
    pub end_ms: u64,
    /// How.
    pub outcome: Outcome,
}

impl Window {
    /// Its p99 in ms, if it finished.
    pub fn p99(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Done { p99_ms, .. } => Some(p99_ms),
            _ => None,
        }
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One row of redis-benchmark's `--csv` output (a header line, then one line per test): the
/// requests per second, p50 and p99 (ms) of the test named `test`, or of the first test.
pub fn csv_row(text: &str, test: Option<&str>) -> Result<(f64, f64, f64), String> {
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(|l| {
            l.split(',')
                .map(|c| c.trim().trim_matches('"').to_string())
                .collect()
        })
        .collect();
    let head = rows
        .iter()
        .find(|r| r.first().is_some_and(|c| c == "test"))
        .ok_or_else(|| format!("no CSV header in redis-benchmark's output:\n{text}"))?;
    let row = rows
        .iter()
        .filter(|r| r.len() > 1 && r.first().is_some_and(|c| c != "test"))
        .find(|r| test.is_none_or(|t| r.first().is_some_and(|c| c == t)))
        .ok_or_else(|| {
            format!(
                "no {} row in redis-benchmark's output:\n{text}",
                test.unwrap_or("test")
            )
        })?;
    let col = |name: &str| -> Result<f64, String> {
        let i = head
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("redis-benchmark's CSV has no {name} column"))?;
        row.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("redis-benchmark's {name} is not a number"))
    };
    Ok((col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?))
}

/// The first test of redis-benchmark's `--csv` output as a window's outcome.
pub fn parse_csv(text: &str) -> Option<Outcome> {
    let (rps, p50_ms, p99_ms) = csv_row(text, None).ok()?;
    Some(Outcome::Done {
        rps,
        p50_ms,
        p99_ms,
    })
}

/// redis-benchmark running in windows until stopped.
pub struct RedisLoad {
    stop: Arc<AtomicBool>,
    windows: Arc<Mutex<Vec<Window>>>,
    thread: Option<JoinHandle<()>>,
}

impl RedisLoad {
    /// Starts windows of `requests` GETs from `clients` connections against `ip:6379`, each
    /// limited to `limit`.
    pub fn start(ip: &str, requests: u32, clients: u32, limit: Duration) -> RedisLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let windows = Arc::new(Mutex::new(Vec::new()));
        let (ip, s, w) = (ip.to_string(), stop.clone(), windows.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let start_ms = now_ms();
                let out = Command::new("timeout")
                    .args(["--signal=KILL", &format!("{}", limit.as_secs_f64())])
                    .args(["redis-benchmark", "-h", &ip, "-p", "6379", "-t", "get"])
                    .args(["-n", &requests.to_string(), "-c", &clients.to_string()])
                    .args(["--csv", "--precision", "3"])
                    .output();
                let outcome = match out {
                    Err(e) => Outcome::Failed(format!("cannot run redis-benchmark: {e}")),
                    // timeout(1) exits 124, or (with KILL) dies of the signal it sent.
                    Ok(o)
                        if matches!(o.status.code(), Some(124 | 137))
                            || o.status.signal() == Some(libc::SIGKILL) =>
                    {
                        Outcome::TimedOut
                    }
                    Ok(o) => {
                        let text = String::from_utf8_lossy(&o.stdout);
                        match (o.status.success(), parse_csv(&text)) {
                            (true, Some(r)) => r,
                            _ => Outcome::Failed(format!(
                                "{}: {}{}",
                                o.status,
                                text.trim(),
                                String::from_utf8_lossy(&o.stderr).trim()
                            )),
                        }
                    }
                };
                if matches!(outcome, Outcome::Failed(_)) {
                    // Do not spin on a refused connection.
                    std::thread::sleep(Duration::from_millis(200));
                }
                w.lock().unwrap().push(Window {
                    start_ms,
                    end_ms: now_ms(),
                    outcome,
                });
            }
        });
        RedisLoad {
            stop,
            windows,
            thread: Some(thread),
        }
    }

    /// The windows so far.
    pub fn windows(&self) -> Vec<Window> {
        self.windows.lock().unwrap().clone()
    }

    /// Waits until `n` more windows than now have ended, or `timeout`.
    pub fn wait_windows(&self, n: usize, timeout: Duration) {
        let target = self.windows().len() + n;
        let deadline = std::time::Instant::now() + timeout;
        while self.windows().len() < target && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops after the current window; returns every window.
    pub fn stop(mut self) -> Vec<Window> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.windows()
    }
}

impl Drop for RedisLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The median of `v` (upper median for even lengths); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// One line per window, times relative to `t0_ms`, for a report or a failure message.
pub fn table(windows: &[Window], t0_ms: u64) -> String {
    let mut s = String::from("   start_s    end_s        rps     p50_ms     p99_ms\n");
    for w in windows {
        let rel = |t: u64| (t as f64 - t0_ms as f64) / 1000.0;
        let line = match &w.outcome {
            Outcome::Done {
                rps,
                p50_ms,
                p99_ms,
            } => format!(
                "{:>10.2} {:>8.2} {rps:>10.0} {p50_ms:>10.3} {p99_ms:>10.3}\n",
                rel(w.start_ms),
                rel(w.end_ms)
            ),
            Outcome::TimedOut => format!(
                "{:>10.2} {:>8.2}  timed out\n",
                rel(w.start_ms),
                rel(w.end_ms)
            ),
            Outcome::Failed(why) => format!(
                "{:>10.2} {:>8.2}  failed: {}\n",
                rel(w.start_ms),
                rel(w.end_ms),
                why.lines().next().unwrap_or("")
            ),
        };
        s.push_str(&line);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_redis_benchmark_7_parses() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"GET\",\"29411.76\",\"0.190\",\"0.056\",\"0.175\",\"0.295\",\"0.511\",\"1.111\"\n";
        assert_eq!(
            parse_csv(text),
            Some(Outcome::Done {
                rps: 29411.76,
                p50_ms: 0.175,
                p99_ms: 0.511
            })
        );
        assert_eq!(parse_csv(""), None);
        assert_eq!(parse_csv("\"test\",\"rps\"\n\"GET\",\"x\"\n"), None);
    }
}
