//! A load report as a time series: per bucket (e.g. 100 ms), completions per second and the
//! median and 99th-percentile latency of the requests that completed in it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::client::Report;

/// One bucket of the series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// Bucket start, ms from the first request's start.
    pub t_ms: u64,
    /// Requests that completed (OK) in it.
    pub completions: usize,
    /// Completions per second.
    pub per_s: f64,
    /// Median latency, ms (None: no completion).
    pub p50_ms: Option<f64>,
    /// 99th-percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let last = sorted.len() - 1;
    let rank = (q * f64::from(u32::try_from(last).unwrap_or(u32::MAX))).ceil();
    let i = (0..=last)
        .find(|&i| f64::from(u32::try_from(i).unwrap_or(u32::MAX)) >= rank)
        .unwrap_or(last);
    sorted.get(i).copied()
}

/// Buckets the completed requests of `report` by their end time.
pub fn series(report: &Report, bucket: Duration) -> Vec<Bucket> {
    let ok: Vec<_> = report.requests.iter().filter(|r| r.ok).collect();
    let Some(t0) = report.requests.iter().map(|r| r.start_ns).min() else {
        return Vec::new();
    };
    let width = u64::try_from(bucket.as_nanos()).unwrap_or(u64::MAX).max(1);
    let n = ok
        .iter()
        .map(|r| (r.end_ns.saturating_sub(t0) / width) + 1)
        .max()
        .unwrap_or(0);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); usize::try_from(n).unwrap_or(0)];
    for r in ok {
        let i = usize::try_from(r.end_ns.saturating_sub(t0) / width).unwrap_or(0);
        let ns = r.end_ns.saturating_sub(r.start_ns);
        // Latencies are far below 2^52 ns: the conversion is exact enough for milliseconds.
        let ms = Duration::from_nanos(ns).as_secs_f64() * 1000.0;
        if let Some(b) = lat.get_mut(i) {
            b.push(ms);
        }
    }
    let secs = bucket.as_secs_f64();
    let width_ms = u64::try_from(bucket.as_millis()).unwrap_or(u64::MAX);
    lat.into_iter()
        .enumerate()
        .map(|(i, mut l)| {
            l.sort_by(f64::total_cmp);
            let count = u32::try_from(l.len()).unwrap_or(u32::MAX);
            Bucket {
                t_ms: u64::try_from(i)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(width_ms),
                completions: l.len(),
                per_s: if secs > 0.0 {
                    f64::from(count) / secs
                } else {
                    0.0
                },
                p50_ms: quantile(&l, 0.5),
                p99_ms: quantile(&l, 0.99),
            }
        })
        .collect()
}

/// The series as CSV: `t_ms,completions,per_s,p50_ms,p99_ms` (empty latency when none).
pub fn to_csv(buckets: &[Bucket]) -> String {
    let mut out = String::from("t_ms,completions,per_s,p50_ms,p99_ms\n");
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    for b in buckets {
        let _ = writeln!(
            out,
            "{},{},{:.1},{},{}",
            b.t_ms,
            b.completions,
            b.per_s,
            opt(b.p50_ms),
            opt(b.p99_ms)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RequestRecord;

    fn req(start_ms: u64, end_ms: u64) -> RequestRecord {
        RequestRecord {
            session: 0,
            sid: 1,
            seq: 1,
            op: "VIEW",
            start_ns: start_ms * 1_000_000,
            end_ns: end_ms * 1_000_000,
            attempts: 1,
            ok: true,
        }
    }

    #[test]
    fn buckets_count_and_measure() {
        let report = Report {
            requests: vec![req(0, 10), req(0, 50), req(5, 250)],
            ..Report::default()
        };
        let s = series(&report, Duration::from_millis(100));
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].completions, 2);
        assert_eq!(s[0].per_s, 20.0);
        assert_eq!(s[0].p50_ms, Some(50.0));
        assert_eq!(s[1].completions, 0);
        assert_eq!(s[1].p99_ms, None);
        assert_eq!(s[2].p99_ms, Some(245.0));
        let csv = to_csv(&s);
        assert!(csv.starts_with(
            "t_ms,completions,per_s,p50_ms,p99_ms\n0,2,20.0,50.000,50.000\n100,0,0.0,,\n"
        ));
    }
}
