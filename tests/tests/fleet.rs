//! A fleet on etcd: Debian's etcd server, thirty memory-image bridges that register their guests
//! in it, and three real `bdmon`s that join it and divide the guests so that each has two
//! monitors. One monitor is killed, one is cut off from etcd (a blackhole route in its network
//! namespace: it still reaches every bridge), and etcd itself restarts; after each, every guest
//! is watched by its assigned monitors again.
//!
//! Who watches what is read from each bdmon's own events (`assigned`, `released`, `attached`,
//! `fenced`), which it writes as it acts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backdoors_tests::bench::sensor_box_image;
use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::child::Spawned;
use backdoors_tests::netns::{self, NetNs};
use backdoors_tests::workspace_bin;
use fleet::testing::EtcdServer;
use serde_json::Value;

const GUESTS: usize = 30;
const PER_GUEST: usize = 2;
const TTL_S: u64 = 2;
const BACKDOOR: u64 = 0x10_0000;
const MONITORS: [&str; 3] = ["mon1", "mon2", "mon3"];

fn spec(name: &'static str) -> MonitorSpec {
    MonitorSpec {
        name,
        read: &["sb"],
        write: &[],
        restart: false,
        lock: false,
        regs: false,
    }
}

/// A bdmon of the fleet, its events in `dir`.
struct Monitor {
    name: &'static str,
    dir: tempfile::TempDir,
    proc: Spawned,
}

impl Monitor {
    fn start(name: &'static str, pki: &Path, etcd: &str, ns: Option<&str>) -> Monitor {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "sample_ms = 50\nevents = \"events.jsonl\"\n[mem]\nenabled = false\n\
             [fleet]\nendpoints = [\"{etcd}\"]\nttl_s = {TTL_S}\nconnect_timeout_ms = 500\n\
             monitor = \"{name}\"\npki = \"{}\"\nmonitors_per_guest = {PER_GUEST}\n",
            pki.display()
        );
        let path = dir.path().join("bdmon.toml");
        std::fs::write(&path, cfg).unwrap();
        let mut cmd = netns::command(ns, &workspace_bin("bdmon"));
        cmd.arg("run").arg("--config").arg(&path);
        let mut proc = Spawned::start(cmd, name);
        proc.wait_line("bdmon: watching", Duration::from_secs(30));
        Monitor { name, dir, proc }
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The guests it watches now (assigned and not released since), each with when it was
    /// assigned and when its first sample after that came (`attached`).
    fn holds(&self) -> BTreeMap<String, (f64, Option<f64>)> {
        let mut held: BTreeMap<String, (f64, Option<f64>)> = BTreeMap::new();
        for e in self.events() {
            let (Some(g), Some(ts)) = (e["guest"].as_str(), e["ts_ms"].as_f64()) else {
                continue;
            };
            match e["event"].as_str() {
                Some("assigned") => {
                    held.insert(g.to_owned(), (ts, None));
                }
                Some("released") => {
                    held.remove(g);
                }
                Some("attached") => {
                    if let Some(h) = held.get_mut(g) {
                        h.1.get_or_insert(ts);
                    }
                }
                _ => {}
            }
        }
        held
    }
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Guest name -> the monitors (of `mons`) that watch it and have sampled it.
fn watchers(mons: &[&Monitor]) -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut w: BTreeMap<String, BTreeSet<&'static str>> = (0..GUESTS)
        .map(|i| (format!("g{i}"), BTreeSet::new()))
        .collect();
    for m in mons {
        for (g, (_, attached)) in m.holds() {
            if attached.is_some() {
                w.entry(g).or_default().insert(m.name);
            }
        }
    }
    w
}

/// Waits until every guest is watched by exactly the monitors `expected(guest)` says; returns
/// how long that took, or panics with who watches what.
fn wait_for(
    mons: &[&Monitor],
    timeout: Duration,
    what: &str,
    expected: impl Fn(&str) -> BTreeSet<&'static str>,
) -> Duration {
    let t = Instant::now();
    loop {
        let w = watchers(mons);
        if w.iter().all(|(g, ms)| *ms == expected(g)) {
            return t.elapsed();
        }
        if t.elapsed() > timeout {
            let wrong: Vec<String> = w
                .iter()
                .filter(|(g, ms)| **ms != expected(g))
                .map(|(g, ms)| format!("{g}: {ms:?} (expected {:?})", expected(g)))
                .collect();
            let logs: Vec<String> = mons
                .iter()
                .map(|m| format!("--- {}:\n{}", m.name, m.proc.output()))
                .collect();
            panic!(
                "{what}: not within {timeout:?}:\n{}\n{}",
                wrong.join("\n"),
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The monitors rendezvous hashing gives `guest` among `live`.
fn assigned(guest: &str, live: &[&'static str]) -> BTreeSet<&'static str> {
    let members: BTreeSet<String> = live.iter().map(|s| s.to_string()).collect();
    let names = fleet::assigned(guest, &members, PER_GUEST);
    live.iter()
        .copied()
        .filter(|m| names.iter().any(|n| n == m))
        .collect()
}

/// Thirty bridges registered in etcd, listening on `ip`.
fn bridges(setup: &BridgeSetup, etcd: &str, ip: &str, dir: &Path) -> Vec<BridgeProc> {
    let base = std::fs::read_to_string(&setup.config).unwrap();
    let base = base.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{ip}:0\""),
        1,
    );
    (0..GUESTS)
        .map(|i| {
            let img = dir.join(format!("mem-{i}"));
            sensor_box_image(&img, 2, BACKDOOR, 8, 100, |_| {});
            // Next to the original, so that its relative paths (pki/, the audit log) hold.
            let cfg: PathBuf = setup.config.with_file_name(format!("bridge-g{i}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "{base}[fleet]\nguest = \"g{i}\"\nendpoints = [\"{etcd}\"]\nttl_s = {TTL_S}\n\
                     connect_timeout_ms = 500\nmonitors_per_guest = {PER_GUEST}\n"
                ),
            )
            .unwrap();
            BridgeProc::start_dump(&cfg, &img, (BACKDOOR, 1 << 20))
        })
        .collect()
}

/// Three monitors share thirty guests, two each, as rendezvous hashing over the live members
/// says; a killed monitor's guests are watched again within the lease TTL + 1 s, and none is
/// ever left without a monitor; a monitor cut off from etcd fences itself (drops every guest)
/// while the others take over, and comes back when the path heals; after an etcd restart the
/// fleet is whole again.
#[test]
fn a_fleet_of_three_monitors_shares_thirty_guests_and_survives_a_death_a_partition_and_an_etcd_restart(
) {
    let ns = NetNs::new().expect("network namespace");
    // Bridges on the veth's address (reachable from the namespace and from here), etcd on a
    // second one that the namespace can be cut off from alone.
    let etcd_ip = ns.add_host_address(3).expect("second address");
    let mut etcd = EtcdServer::start_on(&etcd_ip);
    let endpoint = etcd.endpoint();
    let work = tempfile::tempdir().unwrap();
    let setup = BridgeSetup::new("127.0.0.1:0", &MONITORS.map(spec), 1, 1000);
    let bridges = bridges(&setup, &endpoint, &ns.host_ip, work.path());
    assert_eq!(bridges.len(), GUESTS);
    let pki = setup.pki();

    let mut mon1 = Monitor::start("mon1", &pki, &endpoint, None);
    let mon2 = Monitor::start("mon2", &pki, &endpoint, None);
    let mon3 = Monitor::start("mon3", &pki, &endpoint, Some(&ns.name));
    let all = ["mon1", "mon2", "mon3"];
    let took = wait_for(
        &[&mon1, &mon2, &mon3],
        Duration::from_secs(30),
        "every guest watched by its two monitors",
        |g| assigned(g, &all),
    );
    eprintln!("fleet formed: every guest watched by its 2 monitors after {took:?}");

    // mon3 loses etcd but not the bridges: it must stop acting before the others take over.
    let had = mon3.holds();
    ns.blackhole(&etcd_ip, true).expect("cut mon3 off etcd");
    let cut_at = now_ms();
    let two = ["mon1", "mon2"];
    wait_for(
        &[&mon1, &mon2, &mon3],
        Duration::from_secs(TTL_S + 10),
        "mon3 fenced, mon1 and mon2 watching everything",
        |g| assigned(g, &two),
    );
    let fenced_ts = mon3
        .events()
        .into_iter()
        .find(|e| e["event"] == "fenced")
        .and_then(|e| e["ts_ms"].as_f64())
        .expect("mon3 said it is fenced");
    let takeovers: Vec<f64> = [&mon1, &mon2]
        .iter()
        .flat_map(|m| m.events())
        .filter(|e| e["event"] == "assigned" && e["ts_ms"].as_f64() > Some(cut_at))
        .filter(|e| e["guest"].as_str().is_some_and(|g| had.contains_key(g)))
        .filter_map(|e| e["ts_ms"].as_f64())
        .collect();
    let first = takeovers.iter().copied().fold(f64::MAX, f64::min);
    let last = takeovers.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "mon3 cut off etcd: fenced after {:.0} ms; its {} guests taken over from {:.0} to {:.0} ms \
         after the cut",
        fenced_ts - cut_at,
        had.len(),
        first - cut_at,
        last - cut_at
    );
    assert!(!takeovers.is_empty(), "nobody took mon3's guests over");
    assert!(
        fenced_ts <= first,
        "a guest of mon3 was taken over before mon3 had fenced itself"
    );
    assert!(
        mon3.holds().is_empty(),
        "a fenced monitor still watches guests"
    );

    ns.blackhole(&etcd_ip, false).expect("heal the partition");
    let took = wait_for(
        &[&mon1, &mon2, &mon3],
        Duration::from_secs(TTL_S + 15),
        "mon3 back in the fleet",
        |g| assigned(g, &all),
    );
    eprintln!("partition healed: mon3 back after {took:?}");

    // A monitor dies without a word: its lease runs out and its guests move.
    let before = mon1.holds();
    assert!(!before.is_empty(), "mon1 watched nothing");
    let killed_at = now_ms();
    mon1.proc.crash();
    let left = ["mon2", "mon3"];
    wait_for(
        &[&mon2, &mon3],
        Duration::from_secs(TTL_S + 10),
        "mon1's guests taken over",
        |g| assigned(g, &left),
    );
    let mut worst = 0.0f64;
    for g in before.keys() {
        let holder = if mon2.holds().contains_key(g) {
            &mon2
        } else {
            &mon3
        };
        let (_, attached) = holder.holds()[g];
        worst = worst.max(attached.expect("attached") - killed_at);
    }
    eprintln!(
        "mon1 killed: its {} guests watched again after at most {worst:.0} ms (TTL {TTL_S} s)",
        before.len()
    );
    assert!(
        worst <= (TTL_S * 1000 + 1000) as f64,
        "a guest of the dead monitor waited {worst:.0} ms (TTL {TTL_S} s + 1 s allowed)"
    );
    // Two monitors each: losing one never left a guest unwatched — the survivors dropped none.
    let dropped: Vec<Value> = [&mon2, &mon3]
        .iter()
        .flat_map(|m| m.events())
        .filter(|e| e["event"] == "released" && e["ts_ms"].as_f64() > Some(killed_at))
        .collect();
    assert!(dropped.is_empty(), "a survivor dropped guests: {dropped:?}");

    // etcd down longer than the TTL: no monitor can prove anything, every one stands down.
    etcd.stop();
    wait_for(
        &[&mon2, &mon3],
        Duration::from_secs(TTL_S + 10),
        "every monitor fenced while etcd is down",
        |_| BTreeSet::new(),
    );
    // Back with its data: leases and keys are put again, the watchers list again.
    etcd.start_again();
    let took = wait_for(
        &[&mon2, &mon3],
        Duration::from_secs(30),
        "the fleet after an etcd restart",
        |g| assigned(g, &left),
    );
    eprintln!("etcd restarted after an outage: fleet whole again after {took:?}");
    drop(bridges);
}

/// A fork bomb in a real guest (tcg, patched kernel) whose bridge wants two monitors to agree
/// on every write (`agreement.k = 2`) and gets two of the fleet's three: the two assigned bdmons
/// diagnose the same paused guest (the second joins the first's pause), issue the same mailbox
/// writes, and the bridge applies each once both voted; the third monitor never touches it.
#[test]
fn tcg_a_fork_bomb_is_healed_by_the_two_monitors_the_fleet_assigns_with_two_agreeing() {
    healed_by_the_two_assigned(backdoors_tests::site::Engine::Tcg);
}

/// The same on bdvmm's kvm engine: the guest and its bridge run in a kvm host, which registers
/// the guest in an etcd that listens on this machine's end of the kvm host's tap; the three
/// bdmons run here, outside the kvm host, as remote monitors do.
#[test]
fn kvm_a_fork_bomb_is_healed_by_the_two_monitors_the_fleet_assigns_with_two_agreeing() {
    healed_by_the_two_assigned(backdoors_tests::site::Engine::Kvm);
}

fn healed_by_the_two_assigned(engine: backdoors_tests::site::Engine) {
    use backdoors_tests::site::Engine;
    use backdoors_tests::vm::{Vm, VmSpec};
    use backdoors_tests::Images;
    backdoors_tests::panic_summary_on_stdout();
    let img = Images::load();
    let spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "quiet bd.halt=wait bd.scenario=forkbomb bd.mode=cpu bd.iterations=25",
    );
    let mut vm = Vm::start(&spec);
    let nested = engine == Engine::Kvm;
    vm.expect(
        "BACKDOORS: scenario",
        Duration::from_secs(if nested { 300 } else { 180 }),
    );
    // The bridge inside a kvm host reaches this machine at the tap's host address.
    let etcd = match vm.site().kvm() {
        Some(h) => EtcdServer::start_on(&h.host_ip),
        None => EtcdServer::start(),
    };
    let endpoint = etcd.endpoint();
    let mons: Vec<MonitorSpec> = MONITORS
        .into_iter()
        .map(|name| MonitorSpec {
            name,
            read: &["sb", "ram"],
            write: &["hooks"],
            restart: false,
            lock: true,
            regs: true,
        })
        .collect();
    // Nested, a diagnosis walks for seconds (see `Engine::bdmon_guest_limits`): the second
    // monitor's vote may come that much after the first's.
    let window_ms = if nested { 10_000 } else { 2000 };
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &mons, 2, window_ms);
    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str(&format!(
        "[fleet]\nguest = \"vm1\"\nendpoints = [\"{endpoint}\"]\nttl_s = 5\nmonitors_per_guest = 2\n"
    ));
    std::fs::write(&setup.config, text).unwrap();
    let bridge = BridgeProc::start(&vm, &setup);
    let pki = setup.pki();
    let dirs: Vec<tempfile::TempDir> = MONITORS
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let mut procs: Vec<Spawned> = MONITORS
        .iter()
        .zip(&dirs)
        .map(|(name, dir)| {
            // Nested times are not hardware times (as `Engine::bdmon_guest_limits`).
            let (budget, limits) = if nested {
                ("pause_budget_percent = 25\n", "lease_ms = 10000\nwalk_ms = 8000\n")
            } else {
                ("", "")
            };
            let cfg = format!(
                "sample_ms = 10\nevents = \"events.jsonl\"\nspare_users = [1001]\n{budget}[cpu]\nenabled = false\n\
                 [fleet]\nendpoints = [\"{endpoint}\"]\nttl_s = 5\nmonitor = \"{name}\"\n\
                 pki = \"{}\"\nmonitors_per_guest = 2\n{limits}[fleet.thresholds]\nNPROCS = 300\n",
                pki.display()
            );
            backdoors_tests::start_bdmon(dir.path(), &cfg)
        })
        .collect();
    let events = |dir: &tempfile::TempDir| -> Vec<Value> {
        std::fs::read_to_string(dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let dump = |procs: &[Spawned]| {
        let logs: Vec<String> = MONITORS
            .iter()
            .zip(&dirs)
            .zip(procs)
            .map(|((n, d), p)| format!("--- {n}: {:#?}\n{}", events(d), p.output()))
            .collect();
        format!("{}\n{}", logs.join("\n"), bridge.output())
    };
    if let Err(why) = vm.wait_for("useful finished rc=0", Duration::from_secs(300)) {
        panic!("{why}\n{}\n{}", dump(&procs), vm.diagnostics());
    }
    // The healers confirm recovery from the sensors, which can lag the kills (and useful's end)
    // by a few seconds on a loaded machine.
    let healed = || {
        dirs.iter()
            .flat_map(&events)
            .filter(|e| e["event"] == "healed")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while healed() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        healed() > 0,
        "no monitor saw the guest healed; {}",
        dump(&procs)
    );
    let live: Vec<&'static str> = MONITORS.to_vec();
    let want = assigned("vm1", &live);
    assert_eq!(want.len(), 2);
    for (name, dir) in MONITORS.iter().zip(&dirs) {
        let ev = events(dir);
        let got = ev
            .iter()
            .any(|e| e["event"] == "assigned" && e["guest"] == "vm1");
        assert_eq!(
            got,
            want.contains(name),
            "{name}: assigned {got}; {}",
            dump(&procs)
        );
        if want.contains(name) {
            assert!(
                ev.iter()
                    .any(|e| e["event"] == "repair" && e["uid"] == 1000),
                "{name} took no part in the repair; {}",
                dump(&procs)
            );
        } else {
            assert!(
                !ev.iter().any(|e| e["event"] == "repair"),
                "{name} repaired a guest it was not assigned"
            );
        }
    }
    // Every write the bridge applied was voted by exactly the two assigned monitors.
    let applied = setup.audit_events("write_applied");
    assert!(!applied.is_empty(), "no write applied; {}", dump(&procs));
    for a in &applied {
        let voters: BTreeSet<&str> = a["voters"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(voters, want, "{a}");
    }
    // The second monitor's LOCK came while the first held the pause waiting for its vote.
    let joined = setup.audit_events("lock_joined");
    assert!(!joined.is_empty(), "no joint pause; {}", dump(&procs));
    // What each monitor's repair rounds held the guest paused (a joined pause counts for both).
    let held: Vec<u64> = dirs
        .iter()
        .flat_map(&events)
        .filter(|e| e["event"] == "repair")
        .filter_map(|e| e["lock_held_us"].as_u64())
        .collect();
    println!(
        "{engine:?}: fork bomb healed with k = 2 by {want:?}: {} agreed writes, {} joined pauses, \
         repair rounds held the lock {held:?} us",
        applied.len(),
        joined.len()
    );
    for p in &mut procs {
        assert!(p.terminate(Duration::from_secs(10)).is_some());
    }
    drop(bridge);
}
