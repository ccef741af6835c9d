//! One bdmon watching many guests: monitor CPU, memory, threads and detection latency.
//!
//! Each guest is a memory image with a 100-sensor Sensor Box served by its own `rdma-bridge
//! serve --dump` process (mutual TLS over loopback, as a remote monitor sees a guest); one real
//! `bdmon run` watches them all at `--period-ms`. Over `--seconds` the bench reads bdmon's CPU
//! time and RSS from /proc and the samples it took from its metrics; then it writes an
//! out-of-contract value into one image after another (the file the bridge serves, while it
//! serves it) and times each until bdmon's `violation` event.
//!
//! `cargo bench -p backdoors-tests --bench scale -- [--guests 100,1000] [--period-ms 10]
//!  [--seconds 10] [--violations 40] [--csv FILE]`
//!
//! `--per-sample K` instead takes K samples of one guest back to back in this process, through
//! bdmon's own sampling path (the tokio session's `FETCH_SB`, the parse, `GuestLoop::observe`:
//! gauges and contract checks) — run it under `valgrind --tool=callgrind` with two values of K
//! and divide the difference of the instruction totals by the difference of K: the instructions
//! of one sample, which repeat exactly whatever the machine is doing (`make scale` does).
//!
//! The bridges run on the same 2 cores as bdmon: at 1,000 guests every 10 ms they must answer
//! 100,000 `FETCH_SB`s a second, which bounds what the monitor can be given.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backdoors_tests::bench::{arg, sensor_box_image};
use backdoors_tests::bridge::{bridge_bin, BridgeSetup, MonitorSpec};
use backdoors_tests::workspace_bin;
use introspect::sensorbox::HEADER_SIZE;

const MON: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["sb"],
    write: &[],
    restart: false,
    lock: false,
    regs: false,
};

/// Where each image's Sensor Box is.
const BACKDOOR: u64 = 0x10_0000;
/// First sensor id: 3 (NPROCS) so that a violation has an HM to call (and an event to log).
const FIRST_ID: u32 = 3;
/// Offset of a sensor's value in its 64-byte slot.
const VALUE_OFFSET: u64 = 16;

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn proc_stat(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3; utime 14, stime 15 (1-based in proc(5)).
    let tick = 100.0; // USER_HZ
    let cpu = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        (cpu(14) + cpu(15)) / tick,
        field("VmRSS:"),
        field("Threads:"),
    )
}

fn scrape_samples(addr: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("bdmon_samples_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts one bridge per image and returns them with their addresses.
fn bridges(setup: &BridgeSetup, images: &[PathBuf], logs: &Path) -> (Kill, Vec<String>) {
    let mut kids = Kill(Vec::new());
    let mut logs_of = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let log = logs.join(format!("bridge-{i}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bridge_bin())
            .args(["serve", "--config"])
            .arg(&setup.config)
            .arg("--dump")
            .arg(img)
            .arg("--backdoor")
            .arg(format!("{BACKDOOR:#x}+{:#x}", 1 << 20))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start rdma-bridge");
        kids.0.push(child);
        logs_of.push(log);
    }
    let mut addrs = vec![String::new(); images.len()];
    let deadline = Instant::now() + Duration::from_secs(120);
    while addrs.iter().any(String::is_empty) {
        assert!(Instant::now() < deadline, "bridges did not start in 120 s");
        for (i, log) in logs_of.iter().enumerate() {
            if addrs[i].is_empty() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if let Some(rest) = text.split("rdma-bridge: listening on ").nth(1) {
                    addrs[i] = rest.split_whitespace().next().unwrap_or("").to_string();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (kids, addrs)
}

struct Row {
    guests: usize,
    period_ms: u64,
    samples_per_s: f64,
    expected_per_s: f64,
    cpu_percent: f64,
    us_per_sample: f64,
    rss_mib: f64,
    threads: u64,
    detect_p50_ms: f64,
    detect_p99_ms: f64,
    detected: usize,
    injected: usize,
}

fn run(n: usize, period_ms: u64, seconds: u64, violations: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let images: Vec<PathBuf> = (0..n)
        .map(|i| dir.path().join(format!("mem-{i}")))
        .collect();
    for img in &images {
        sensor_box_image(img, 2, BACKDOOR, 100, FIRST_ID, |_| {});
    }
    let t0 = Instant::now();
    let (_bridges, addrs) = bridges(&setup, &images, dir.path());
    println!("  {n} bridges up in {:.1} s", t0.elapsed().as_secs_f64());
    let metrics = format!("127.0.0.1:{}", free_port());
    let events = dir.path().join("events.jsonl");
    let mut text = format!(
        "sample_ms = {period_ms}\nevents = \"{}\"\nmetrics = \"{metrics}\"\n[mem]\nenabled = false\n",
        events.display()
    );
    let pki = setup.config.parent().unwrap().join("pki");
    for (i, a) in addrs.iter().enumerate() {
        text.push_str(&format!(
            "[[guest]]\nname = \"g{i}\"\nbridge = \"{a}\"\npki = \"{}\"\nmonitor = \"mon1\"\n",
            pki.display()
        ));
    }
    let cfg = dir.path().join("bdmon.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = std::fs::File::create(dir.path().join("bdmon.log")).unwrap();
    let bdmon = Command::new(workspace_bin("bdmon"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start bdmon");
    let pid = bdmon.id();
    let _bdmon = Kill(vec![bdmon]);
    // Attach everyone (the first sample of each guest opens its sessions) and settle.
    std::thread::sleep(Duration::from_secs(3).max(Duration::from_millis(n as u64 * 4)));
    let s0 = scrape_samples(&metrics);
    let (c0, w0) = (proc_stat(pid).0, Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, rss_kib, threads) = proc_stat(pid);
    let wall = w0.elapsed().as_secs_f64();
    let s1 = scrape_samples(&metrics);
    let samples_per_s = (s1 - s0) / wall;
    let cpu = c1 - c0;
    // Violations: one guest at a time, a sensor pushed over its threshold in the served file.
    let mut lat = Vec::new();
    let mut injected = Vec::new();
    let slot = BACKDOOR + HEADER_SIZE as u64 + VALUE_OFFSET; // sensor 0 (NPROCS)
    for v in 0..violations {
        let g = (v * 7919) % n;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&images[g])
            .unwrap();
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        f.write_all_at(&5000u64.to_le_bytes(), slot).unwrap();
        injected.push((format!("g{g}"), at));
        std::thread::sleep(Duration::from_millis(150));
        f.write_all_at(&0u64.to_le_bytes(), slot).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let evs = std::fs::read_to_string(&events).unwrap_or_default();
    let seen: Vec<(String, f64)> = evs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "violation")
        .filter_map(|e| Some((e["guest"].as_str()?.to_string(), e["ts_ms"].as_f64()?)))
        .collect();
    for (g, at) in &injected {
        if let Some((_, ts)) = seen.iter().find(|(sg, ts)| sg == g && *ts + 1.0 >= *at) {
            lat.push(ts - at);
        }
    }
    lat.sort_by(f64::total_cmp);
    // The sample `permille`/1000 of the way through, rounded to the nearest index.
    let pct = |permille: usize| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) * permille + 500) / 1000]
        }
    };
    Row {
        guests: n,
        period_ms,
        samples_per_s,
        expected_per_s: n as f64 * 1000.0 / period_ms as f64,
        cpu_percent: 100.0 * cpu / wall,
        us_per_sample: 1e6 * cpu / (s1 - s0).max(1.0),
        rss_mib: rss_kib as f64 / 1024.0,
        threads,
        detect_p50_ms: pct(500),
        detect_p99_ms: pct(990),
        detected: lat.len(),
        injected: injected.len(),
    }
}

/// K samples of one guest through bdmon's sampling path, in this process.
fn per_sample(k: usize) {
    use bdmon::config::Config;
    use bdmon::dispatcher::GuestLoop;
    use bdmon::events::Events;
    use bdmon::hm::Registry;
    use bdmon::metrics::Metrics;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let setup = BridgeSetup::new("127.0.0.1:0", &[MON], 1, 1000);
    let img = dir.path().join("mem");
    sensor_box_image(&img, 2, BACKDOOR, 100, FIRST_ID, |_| {});
    let (_bridges, addrs) = bridges(&setup, std::slice::from_ref(&img), dir.path());
    let pki = setup.config.parent().unwrap().join("pki");
    let text = format!(
        "[[guest]]\nname = \"g\"\nbridge = \"{}\"\npki = \"{}\"\nmonitor = \"mon1\"\n",
        addrs[0],
        pki.display()
    );
    let cfg = Arc::new(Config::parse(&text, &dir.path().join("bdmon.toml")).unwrap());
    let g = cfg.guests[0].clone();
    let id = g.identity();
    let mut l = GuestLoop::new(
        cfg,
        g,
        Registry::new(),
        Arc::new(Events::to_writer(Box::new(std::io::sink()))),
        Arc::new(Metrics::default()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut b = bridge_client::nonblocking::AsyncBridge::connect(
            &addrs[0],
            &id,
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let mut sb = introspect::sensorbox::SensorBox::default();
        for _ in 0..k {
            let t = Instant::now();
            b.sensor_box_into(&mut sb).await.expect("FETCH_SB");
            let v = l.observe(&sb, t, t.elapsed());
            assert!(v.is_empty());
        }
    });
    println!("{k} samples taken");
}

fn main() {
    if let Some(k) = arg("--per-sample") {
        per_sample(k.parse().expect("--per-sample: a count"));
        return;
    }
    let guests: Vec<usize> = arg("--guests")
        .unwrap_or_else(|| "100,1000".into())
        .split(',')
        .map(|v| v.parse().expect("--guests: numbers"))
        .collect();
    let period_ms: u64 = arg("--period-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seconds: u64 = arg("--seconds").and_then(|v| v.parse().ok()).unwrap_or(10);
    let violations: usize = arg("--violations")
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut csv = String::from("guests,period_ms,samples_per_s,expected_per_s,monitor_cpu_percent,monitor_us_per_sample,rss_mib,threads,detect_p50_ms,detect_p99_ms,detected,injected\n");
    println!("--- one bdmon, N guests (memory-image bridges, 100 sensors each, TLS over loopback), sampling every {period_ms} ms");
    for n in guests {
        let r = run(n, period_ms, seconds, violations);
        println!(
            "{:>5} guests: {:>7.0} samples/s of {:>7.0}  monitor CPU {:>5.1} % of one core = {:>5.1} us/sample  RSS {:>5.1} MiB  {:>3} threads  detection p50 {:>5.1} ms p99 {:>5.1} ms ({}/{} seen)",
            r.guests, r.samples_per_s, r.expected_per_s, r.cpu_percent, r.us_per_sample, r.rss_mib, r.threads, r.detect_p50_ms, r.detect_p99_ms, r.detected, r.injected
        );
        csv.push_str(&format!(
            "{},{},{:.0},{:.0},{:.1},{:.2},{:.1},{},{:.1},{:.1},{},{}\n",
            r.guests,
            r.period_ms,
            r.samples_per_s,
            r.expected_per_s,
            r.cpu_percent,
            r.us_per_sample,
            r.rss_mib,
            r.threads,
            r.detect_p50_ms,
            r.detect_p99_ms,
            r.detected,
            r.injected
        ));
    }
    if let Some(path) = arg("--csv") {
        std::fs::write(path, csv).expect("write the CSV");
    }
}
