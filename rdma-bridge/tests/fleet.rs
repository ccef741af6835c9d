//! `rdma-bridge serve` with a `[fleet]` section against a real etcd (`/usr/bin/etcd`): the guest
//! is registered, only the monitor the fleet assigns may LOCK and WRITE, the assignment follows
//! the group, and a clean stop (SIGTERM) takes the guest out of the fleet at once.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Config, Monitor, Scratch, HOOKS};
use fleet::testing::EtcdServer;
use fleet::{FleetConfig, Member, Watcher};
use rdma_bridge::client::Bridge;
use rdma_bridge::tls::Identity;

/// Kills the bridge if the test ends early.
struct Bridged(Child);

impl Drop for Bridged {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn only_the_assigned_monitor_may_lock_and_write() {
    let etcd = EtcdServer::start();
    let scratch = Scratch::new(&["mon1", "mon2"]);
    let ram = common::ram_with_sensor_box(2);
    std::fs::write(scratch.path().join("guest.mem"), &ram).unwrap();
    let tables = format!(
        "[fleet]\nguest = \"vm1\"\nendpoints = [\"{}\"]\nttl_s = 10\nmonitors_per_guest = 1\n",
        etcd.endpoint()
    );
    let config = Config {
        audit_log: "audit.jsonl",
        top: "",
        monitors: &[
            Monitor::healer("mon1", false),
            Monitor::healer("mon2", false),
        ],
        tables: &tables,
    };
    let cfg_path = scratch.path().join("bridge.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rdma-bridge"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--dump")
        .arg(scratch.path().join("guest.mem"))
        .arg("--dump-writable")
        .arg("--backdoor")
        .arg(format!(
            "{:#x}+{:#x}",
            common::BACKDOOR_RANGE.0,
            common::BACKDOOR_RANGE.1
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let bridge = Bridged(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("rdma-bridge: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let mut err_lines = BufReader::new(stderr).lines();
    let registered = err_lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("registered guest"))
        .expect("no registration line");
    assert!(
        registered.contains(&format!("registered guest vm1 in etcd {}", etcd.endpoint())),
        "{registered}"
    );

    let fc = FleetConfig {
        ttl_s: 2,
        connect_timeout_ms: 1000,
        ..FleetConfig::with_endpoints(vec![etcd.endpoint()])
    };
    let w = Watcher::start(fc.clone()).unwrap();
    wait_until("vm1 registered", Duration::from_secs(5), || {
        w.view().guests.contains_key("vm1")
    });
    let rec = w.view().guests["vm1"].clone();
    assert_eq!(rec.bridge, addr.to_string());
    assert_eq!(rec.engine, "dump");
    assert_eq!(rec.kernel, "patched");
    assert_eq!(rec.cert_sha256.len(), 64, "{rec:?}");

    let pki = scratch.path().join("pki");
    let connect = |name: &str| Bridge::connect(addr, &Identity::from_pki_dir(&pki, name)).unwrap();
    let (mut b1, mut b2) = (connect("mon1"), connect("mon2"));
    let lease = Duration::from_millis(500);

    // No member yet: nobody is assigned, nobody may lock.
    let e = b1.lock(lease).unwrap_err().to_string();
    assert!(
        e.contains("monitor mon1 is not assigned to guest vm1 in the fleet (assigned: none)"),
        "{e}"
    );

    // mon1 joins: it is the guest's one monitor.
    let m1 = Member::join(fc.clone(), "mon1").unwrap();
    wait_until("mon1 may lock", Duration::from_secs(5), || {
        b1.lock(lease).is_ok()
    });
    b1.write(HOOKS + 64, b"KILL").unwrap();
    b1.unlock().unwrap();
    let mut buf = [0u8; 4];
    let hooks = usize::try_from(HOOKS).unwrap() + 64;
    buf.copy_from_slice(
        &std::fs::read(scratch.path().join("guest.mem")).unwrap()[hooks..hooks + 4],
    );
    assert_eq!(&buf, b"KILL");
    // mon2 is listed but not assigned: it reads, it may not lock or write.
    assert!(!b2.fetch_sb().unwrap().is_empty());
    b2.status().unwrap();
    let e = b2.lock(lease).unwrap_err().to_string();
    assert!(
        e.contains("monitor mon2 is not assigned to guest vm1 in the fleet (assigned: mon1)"),
        "{e}"
    );
    let e = b2.write(HOOKS + 64, b"LIVE").unwrap_err().to_string();
    assert!(e.contains("not assigned"), "{e}");

    // mon1 leaves, mon2 joins: the guest passes to mon2.
    m1.leave();
    let _m2 = Member::join(fc, "mon2").unwrap();
    wait_until("mon2 may lock", Duration::from_secs(5), || {
        b2.lock(lease).is_ok()
    });
    b2.unlock().unwrap();
    let e = b1.lock(lease).unwrap_err().to_string();
    assert!(e.contains("(assigned: mon2)"), "{e}");

    let audit = std::fs::read_to_string(scratch.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"denied\"")
            && l.contains("not assigned in the fleet")
            && l.contains("mon2")),
        "{audit}"
    );

    // A clean stop takes the guest out of the fleet at once (its lease TTL is 10 s).
    drop((b1, b2));
    let stopped = Instant::now();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(i32::try_from(bridge.0.id()).unwrap(), libc::SIGTERM) };
    wait_until("vm1 gone", Duration::from_secs(4), || {
        !w.view().guests.contains_key("vm1")
    });
    assert!(stopped.elapsed() < Duration::from_secs(4));
}
