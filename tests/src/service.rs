//! A real service under attack, healed (or not) while its clients watch: the Debian root
//! filesystem guest runs redis-server, [`RedisLoad`] loads it from this machine over the guest's
//! network, an intruder (user1) attacks on request (the image's `attack` scenario), first with
//! bdmon attached from this machine through the bridge, then again without it. [`run`] does it
//! all and returns what happened; the test (`tests/tests/service.rs`) asserts on it, the bench
//! (`tests/benches/service.rs`) prints it.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::bridge::{BridgeProc, BridgeSetup};
use crate::load::{self, median, Outcome, RedisLoad, Window};
use crate::rootfs::{RootfsGuest, RootfsSpec};
use crate::site::Engine;

const BOOT: Duration = Duration::from_secs(240);
/// How long one attack may run in the guest (then it stops itself).
pub const ATTACK_SECONDS: u64 = 30;
/// The guest's RAM, MiB: small, so that the memory hog's first-touch page faults (very slow on a
/// nested guest) fill it within the attack.
pub const GUEST_MIB: u64 = 256;
/// The intruder.
pub const USER1: u64 = 1000;
const USER2: u32 = 1001;
/// Connections of each redis-benchmark window.
const CLIENTS: u32 = 4;
/// Baseline windows before the first attack.
const BASELINE_WINDOWS: usize = 8;
/// Windows kept after the healed attack's repair.
const AFTER_WINDOWS: usize = 8;
/// How many windows from 2 s after the repair make the "back" p99 (their median).
pub const BACK_WINDOWS: usize = 5;

/// Requests per redis-benchmark window and how long a window may take before it counts as timed
/// out: about a second's worth of requests on an idle guest. A request to a kvm guest crosses the
/// kvm host's emulated network twice (QEMU TCG), so it gets fewer.
pub fn window(engine: Engine) -> (u32, Duration) {
    match engine {
        Engine::Tcg => (4000, Duration::from_secs(3)),
        Engine::Kvm => (2000, Duration::from_secs(30)),
    }
}

/// The attacks: a CPU fork bomb, or a self-respawning memory hog (30 children of 12 MiB, 1.4x
/// the guest's [`GUEST_MIB`]: the OOM killer must run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// `forkbomb --mode cpu`.
    ForkBomb,
    /// `memhog --children 30 --mb 12`.
    MemoryHog,
}

impl Attack {
    /// The scenario's name for it.
    pub fn kind(self) -> &'static str {
        match self {
            Attack::ForkBomb => "cpu",
            Attack::MemoryHog => "mem",
        }
    }
}

/// What one run saw.
pub struct Report {
    /// The engine.
    pub engine: Engine,
    /// The attack.
    pub attack: Attack,
    /// Every window, both phases.
    pub windows: Vec<Window>,
    /// When the load started (Unix ms): time 0 of the tables.
    pub t0_ms: u64,
    /// The median p99 of the baseline windows, ms.
    pub baseline_p99: f64,
    /// When the healed attack started.
    pub healed_attack_ms: u64,
    /// bdmon's `repair` events of the healed attack.
    pub repairs: Vec<Value>,
    /// Every bdmon event of the healed attack.
    pub events: Vec<Value>,
    /// bdmon's output.
    pub bdmon_output: String,
    /// The time of the last repair (Unix ms).
    pub last_repair_ms: Option<u64>,
    /// redis-server's pid at the start, and after the healed attack.
    pub pid_before: String,
    /// redis-server's pid after the healed attack (None: no answer).
    pub pid_after_heal: Option<String>,
    /// When the unhealed attack started and ended.
    pub crippled_ms: (u64, u64),
    /// redis-server's pid after the unhealed attack (None: no answer).
    pub pid_after_crippled: Option<String>,
    /// The guest's diagnostics at the end.
    pub diagnostics: String,
}

impl Report {
    /// The p99 the clients saw once healed: the median p99 of the first [`BACK_WINDOWS`] windows
    /// that started at least 2 s after the last repair. One window's p99 (its 1 % slowest
    /// requests) moves by ±50 % from window to window on a quiet nested guest, so a single
    /// window would judge the noise, not the healing.
    pub fn p99_2s_after_repair(&self) -> Option<f64> {
        let r = self.last_repair_ms?;
        let p: Vec<f64> = self
            .windows
            .iter()
            .filter(|w| w.start_ms >= r + 2000)
            .take(BACK_WINDOWS)
            .filter_map(Window::p99)
            .collect();
        if p.len() < BACK_WINDOWS {
            return None;
        }
        median(&p)
    }

    /// The windows of the unhealed attack: every window that overlaps it (one that started just
    /// before it and timed out because of it counts).
    pub fn crippled_windows(&self) -> Vec<&Window> {
        let (from, to) = self.crippled_ms;
        self.windows
            .iter()
            .filter(|w| w.end_ms > from && w.start_ms < to)
            .collect()
    }

    /// How many of those failed or timed out.
    pub fn crippled_failures(&self) -> usize {
        self.crippled_windows()
            .iter()
            .filter(|w| !matches!(w.outcome, Outcome::Done { .. }))
            .count()
    }

    /// The worst p99 among those that finished, ms.
    pub fn crippled_worst_p99(&self) -> f64 {
        self.crippled_windows()
            .iter()
            .filter_map(|w| w.p99())
            .fold(0.0, f64::max)
    }

    /// A summary and the window table.
    pub fn text(&self) -> String {
        let rel = |t: u64| t.saturating_sub(self.t0_ms);
        format!(
            "{} {:?}: baseline p99 {:.3} ms; healed attack at {} ms, {} repair(s), last at {} ms; \
             unhealed attack {}..{} ms: {} of {} windows failed, worst p99 {:.3} ms; redis pid {} -> {:?} -> {:?}\n{}",
            self.engine.name(),
            self.attack,
            self.baseline_p99,
            rel(self.healed_attack_ms),
            self.repairs.len(),
            self.last_repair_ms.map(rel).unwrap_or(0),
            rel(self.crippled_ms.0),
            rel(self.crippled_ms.1),
            self.crippled_failures(),
            self.crippled_windows().len(),
            self.crippled_worst_p99(),
            self.pid_before,
            self.pid_after_heal,
            self.pid_after_crippled,
            load::table(&self.windows, self.t0_ms)
        )
    }
}

fn events(dir: &Path) -> Vec<Value> {
    crate::bdmon_events(dir)
}

/// Asks the guest's scenario for attack `n` and waits for it to start; `context` goes into the
/// failure message.
fn start_attack(g: &mut RootfsGuest, n: u32, kind: &str, context: &str) -> u64 {
    let reply = g.redis(&["set", "bd:attack", &format!("{n}:{kind}")]);
    assert_eq!(
        reply,
        "OK",
        "cannot ask for attack {n}\n{context}\n{}",
        g.vm.diagnostics()
    );
    g.vm.expect(&format!("ATTACK {n} {kind} starts"), BOOT);
    load::now_ms()
}

/// Boots the guest, measures a baseline, attacks with bdmon attached, then without.
pub fn run(engine: Engine, attack: Attack) -> Report {
    let kind = attack.kind();
    let mut spec = RootfsSpec::new(
        engine,
        &format!("quiet bd.scenario=attack bd.seconds={ATTACK_SECONDS} bd.children=30 bd.mb=12"),
    );
    spec.mem = GUEST_MIB;
    let mut g = RootfsGuest::start(&spec);
    g.vm.expect("BACKDOORS: service up", BOOT);
    g.vm.expect("ATTACK waiting", BOOT);
    let pid_before = g.redis_info("process_id").expect("redis INFO process_id");

    let setup = BridgeSetup::one_monitor(&g.vm.site().listen_addr(), false);
    let bridge = BridgeProc::start(&g.vm, &setup);
    let dir = tempfile::tempdir().expect("tempdir");
    // The service's user, as the guest's own process table says (Debian allocates system uids
    // as packages install): an operator spares the users of the services a guest exists for.
    let table = rdma_bridge::client::BridgeMem::new(bridge.connect(&setup.id("mon1")))
        .process_table(None)
        .expect("process table")
        .value;
    let redis_uid = table
        .iter()
        .find(|p| p.task.comm == "redis-server")
        .map(|p| p.task.uid)
        .unwrap_or_else(|| panic!("no redis-server in the process table"));

    // Run 300 processes and touch most of the guest's RAM once before the baseline (user2, all
    // gone at once), so that the baseline and the windows after an attack see the guest in the
    // same state: on a nested kvm guest, kernel and user memory touched for the first time
    // leave every later request slower (by about 1.3x, measured without this).
    start_attack(&mut g, 0, "warm", "");
    g.vm.expect("ATTACK 0 warm over", BOOT);

    let t0_ms = load::now_ms();
    let (requests, limit) = window(engine);
    let load = RedisLoad::start(g.ip(), requests, CLIENTS, limit);
    load.wait_windows(BASELINE_WINDOWS, Duration::from_secs(300));
    let p99s: Vec<f64> = load.windows().iter().filter_map(Window::p99).collect();
    let baseline_p99 = median(&p99s).unwrap_or_else(|| {
        panic!(
            "no baseline: no window finished\n{}\n{}",
            load::table(&load.windows(), t0_ms),
            g.vm.diagnostics()
        )
    });

    // With bdmon.
    let nested = engine.bdmon_guest_limits();
    let cfg = format!(
        "sample_ms = 10\nevents = \"events.jsonl\"\nspare_users = [{USER2}, {redis_uid}]\n\
         [[guest]]\nname = \"vm1\"\nbridge = \"{}\"\npki = \"{}\"\nmonitor = \"mon1\"\n{nested}\
         [guest.thresholds]\nNPROCS = 300\n",
        bridge.addr,
        setup.pki().display()
    );
    let mut mon = crate::start_bdmon(dir.path(), &cfg);
    let healed_attack_ms = start_attack(&mut g, 1, kind, "");
    if let Err(why) = g.vm.wait_for(&format!("ATTACK 1 {kind} over"), BOOT) {
        panic!(
            "{why}\nevents: {:#?}\nbdmon: {}",
            events(dir.path()),
            mon.output()
        );
    }
    load.wait_windows(AFTER_WINDOWS, Duration::from_secs(300));
    // A repair can come late (another round, or another healer): the clients are watched until
    // BACK_WINDOWS windows have started 2 s after the last one, or a minute more has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let last = events(dir.path())
            .iter()
            .filter(|e| e["event"] == "repair")
            .filter_map(|r| r["ts_ms"].as_u64())
            .max()
            .unwrap_or(0);
        let after = load
            .windows()
            .iter()
            .filter(|w| w.start_ms >= last + 2000)
            .count();
        if after >= BACK_WINDOWS {
            break;
        }
        load.wait_windows(1, Duration::from_secs(30));
    }
    let _ = mon.terminate(Duration::from_secs(10));
    let bdmon_output = mon.output();
    let events = events(dir.path());
    let repairs: Vec<Value> = events
        .iter()
        .filter(|e| e["event"] == "repair")
        .cloned()
        .collect();
    let last_repair_ms = repairs.iter().filter_map(|r| r["ts_ms"].as_u64()).max();
    let pid_after_heal = g.redis_info("process_id");

    // Without bdmon.
    let context = format!(
        "bdmon events: {events:#?}\n{}",
        load::table(&load.windows(), t0_ms)
    );
    let from = start_attack(&mut g, 2, kind, &context);
    g.vm.expect(&format!("ATTACK 2 {kind} over"), BOOT);
    let to = load::now_ms();
    load.wait_windows(2, Duration::from_secs(60));
    let windows = load.stop();
    let pid_after_crippled = g.redis_info("process_id");
    drop(bridge);
    Report {
        engine,
        attack,
        windows,
        t0_ms,
        baseline_p99,
        healed_attack_ms,
        repairs,
        events,
        bdmon_output,
        last_repair_ms,
        pid_before,
        pid_after_heal,
        crippled_ms: (from, to),
        pid_after_crippled,
        diagnostics: g.vm.diagnostics(),
    }
}
