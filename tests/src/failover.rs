//! The talk's session recovery, end to end: a real multi-tier service (`bd-auction`: front end
//! in a guest, PostgreSQL on this machine) serving client sessions; the front end's guest fails
//! mid-run with a fault; bdmon, attached to it through its bridge, sees the hang, extracts the
//! front end's State Boxes without the guest's help, hands them to a standby front end in a
//! second guest, which takes over the service address; the clients' sessions go on.
//!
//! Two root filesystem guests on one LAN ([`GuestLan`]): on tcg both here, on kvm both inside one
//! kvm host. The front end comes on an app disk ([`app_disk`]) that the image's `app` scenario
//! mounts and runs; its `start.sh` also runs a root fault agent on port 7099 that the test asks
//! for `netdown`, `panic`, `softhang` or `driver`; `freeze` stops the vCPUs from outside (SIGSTOP
//! to QEMU, or a ptrace stop of bdvmm's vCPU threads only), as a hardware hang would. [`Pair`] fails the two guests
//! over in turn: the failed one is restarted in place and comes back as the standby.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::bridge::{BridgeProc, BridgeSetup};
use crate::guestnet::GuestLan;
use crate::rootfs::{Placed, RootfsGuest, RootfsSpec};
use crate::site::{Engine, Site};
use crate::Images;

const BOOT: Duration = Duration::from_secs(300);
/// The front end's user in the guest (user2 of the image).
pub const FRONT_UID: u32 = 1001;
/// Its command name as the kernel keeps it (15 bytes).
pub const FRONT_COMM: &str = "bd-auction-fron";
/// Client sessions and requests per session.
pub const SESSIONS: usize = 60;
/// Requests of one session (LOGIN, VIEW/BID mix, LOGOUT).
pub const REQUESTS: usize = 12;
const FAULT_PORT: u16 = 7099;
/// The guest's NIC's `NET_RX:eth0` (the per-device Progress Box sensor) must advance within this
/// (ms) while clients run.
const NET_RX_MS: u64 = 1500;
const SERVICE_PORT: u16 = 7070;
const ADMIN_PORT: u16 = 7071;

/// The faults of the talk, as a VM allows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The vCPUs stop (SIGSTOP to QEMU, or a ptrace stop of bdvmm's vCPU threads): a halted CPU.
    Freeze,
    /// `ip link set eth0 down` in the guest.
    NetDown,
    /// A kernel panic that stays dead (`panic=0`).
    Panic,
    /// A root SCHED_FIFO spinner takes the only vCPU.
    SoftHang,
    /// The network driver stops: virtio_net is unbound from the NIC, as after a driver crash;
    /// nothing services the device's queues any more.
    Driver,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 5] = [
        Fault::Freeze,
        Fault::Panic,
        Fault::SoftHang,
        Fault::NetDown,
        Fault::Driver,
    ];

    /// Its name (the fault agent's word).
    pub fn name(self) -> &'static str {
        match self {
            Fault::Freeze => "freeze",
            Fault::NetDown => "netdown",
            Fault::Panic => "panic",
            Fault::SoftHang => "softhang",
            Fault::Driver => "driver",
        }
    }
}

/// What one run saw.
pub struct Report {
    /// The engine.
    pub engine: Engine,
    /// The fault.
    pub fault: Fault,
    /// The clients' view.
    pub load: auction::client::Report,
    /// The database's view.
    pub check: auction::db::CheckReport,
    /// bdmon's events.
    pub events: Vec<Value>,
    /// When the fault was injected (Unix ms).
    pub fault_ms: u64,
    /// bdmon's output, the guests' consoles.
    pub diagnostics: String,
}

impl Report {
    /// bdmon's `failover` event.
    pub fn failover(&self) -> Option<&Value> {
        self.events.iter().find(|e| e["event"] == "failover")
    }
}

/// The front end's start script (run as root by the image's `app` scenario).
const START_SH: &str = r#"#!/bin/sh
# The auction front end (as user2, with the capabilities to take the service address) and the
# test's fault agent (as root, on port 7099). BD_ROLE counts on the first boot only: a guest
# restarted after a failover comes back as a standby (the boot count is kept on the root disk).
mkdir -p /var/lib/bdapp
boots=$(($(cat /var/lib/bdapp/boots 2>/dev/null || echo 0) + 1))
echo $boots >/var/lib/bdapp/boots
sync
role=${BD_ROLE:-standby}
[ $boots -gt 1 ] && role=standby
primary=""
[ "$role" = primary ] && primary=--primary
mkdir -p /var/log/bd
/usr/bin/setpriv --reuid=1001 --regid=1001 --init-groups --inh-caps=+net_admin,+net_raw \
	--ambient-caps=+net_admin,+net_raw -- /app/bd-auction-front --listen 0.0.0.0:7070 \
	--admin 0.0.0.0:7071 --db "$BD_DB" --name "$BD_NAME" $primary --vip "$BD_VIP" --dev eth0 \
	--ip-cmd /usr/sbin/ip --arping-cmd "/bin/busybox arping" >/var/log/bd/front.log 2>&1 &
front=$!
i=0
# Ready when the admin port listens (7071 = 0x1BAF, state 0A = LISTEN).
while ! grep -q ':1BAF 00000000:0000 0A' /proc/net/tcp && [ $i -lt 600 ]; do
	if ! kill -0 $front 2>/dev/null; then
		echo "APP front failed:"; tail -n 20 /var/log/bd/front.log
		exit 1
	fi
	sleep 0.1
	i=$((i + 1))
done
echo "APP front up boot=$boots role=$role pid=$front"
while true; do
	f=$(busybox nc -l -p 7099 2>/dev/null | head -n 1)
	echo "APP fault $f"
	case "$f" in
	netdown) ip link set eth0 down ;;
	panic) echo c >/proc/sysrq-trigger ;;
	softhang) rtspin --seconds 900 & ;;
	driver)
		for d in /sys/bus/virtio/drivers/virtio_net/virtio*; do
			echo "${d##*/}" >/sys/bus/virtio/drivers/virtio_net/unbind
		done
		;;
	log) tail -n 40 /var/log/bd/front.log ;;
	esac
done
"#;

/// An ext4 image holding the front end (stripped) and its start script, for the `app`
/// scenario.
pub fn app_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("app");
    std::fs::create_dir_all(&tree).expect("app dir");
    let front = crate::workspace_bin("bd-auction-front");
    assert!(
        front.exists(),
        "{} missing: cargo build -p bd-auction",
        front.display()
    );
    let st = std::process::Command::new("strip")
        .arg("-o")
        .arg(tree.join("bd-auction-front"))
        .arg(&front)
        .status()
        .expect("strip (binutils)");
    assert!(st.success(), "strip {}", front.display());
    std::fs::write(tree.join("start.sh"), START_SH).expect("start.sh");
    let img = dir.join("app.ext4");
    let f = std::fs::File::create(&img).expect("app.ext4");
    f.set_len(64 << 20).expect("size app.ext4");
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "bdapp", "-d"])
        .arg(&tree)
        .arg(&img)
        .output()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// Asks a guest's fault agent for `fault` (fire and forget: the guest may die at once).
fn ask_agent(ip: &str, fault: &str) {
    let addr: SocketAddr = format!("{ip}:{FAULT_PORT}").parse().expect("agent address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("fault agent {addr}: {e}"));
    s.write_all(format!("{fault}\n").as_bytes())
        .expect("fault agent");
}

/// Stops (`stop`) or lets go on the guest's vCPUs behind bdvmm's back: SIGSTOP/SIGCONT to QEMU
/// (tcg), or a ptrace stop of bdvmm's vCPU threads alone (kvm, inside the kvm host:
/// [`crate::kvmhost::freeze`]). bdvmm still says "running".
fn freeze(g: &RootfsGuest, stop: bool) {
    match g.vm.site().kvm() {
        None => {
            let sig = if stop { "-STOP" } else { "-CONT" };
            let pid = g.vm.local_pid().expect("bdvmm's pid");
            let out = std::process::Command::new("pkill")
                .args([sig, "-P", &pid.to_string(), "qemu-system"])
                .output()
                .expect("pkill");
            assert!(
                out.status.success() || !stop,
                "no QEMU child of bdvmm {pid}"
            );
        }
        Some(h) => {
            // Only the vCPU threads: a stop signal would stop all of bdvmm (its API and the
            // bridge's reads with it), which is not a halted CPU. `bd-kvmhost freeze-threads`
            // ptrace-stops them from a detached tracer; killing the tracer lets them go on.
            let api = g.vm.site_api().to_string();
            let pidfile = format!("/run/bdfreeze-{:x}", fnv(&api));
            if stop {
                let out = h.sh(
                    &format!(
                        "/opt/bd/bin/bd-kvmhost freeze-threads --cmdline '{api}' --pidfile {pidfile}"
                    ),
                    &[],
                );
                assert!(out.contains("frozen"), "no vCPU thread stopped: {out}");
            } else {
                h.sh(
                    &format!(
                        "[ -f {pidfile} ] && kill -KILL $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}; true"
                    ),
                    &[],
                );
            }
        }
    }
}

/// FNV-1a of `s`, for a short file name.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Two guests on one LAN serving the auction service in turn, each with its bridge; the
/// database here.
pub struct Pair {
    engine: Engine,
    /// The guests (0 = front-a, 1 = front-b).
    pub guests: Vec<RootfsGuest>,
    bridges: Vec<(BridgeSetup, BridgeProc)>,
    plans: Vec<Plan>,
    lan: GuestLan,
    db: auction::pg::Cluster,
    /// Which guest serves now.
    pub primary: usize,
    /// Each guest's boots (its front end's count, kept on its root disk).
    boots: [usize; 2],
    /// "APP front up" lines on each guest's current bdvmm's console.
    seen: [usize; 2],
    seed: u64,
    /// Every bid the clients saw committed, all runs: the database must hold exactly these.
    bids: Vec<auction::db::Bid>,
    _dir: tempfile::TempDir,
}

/// Waits until `needle` has appeared `n` times on `g`'s console. `Err` with bdvmm's exit status
/// if it exited first; panics after `timeout`.
fn wait_nth(
    g: &mut RootfsGuest,
    needle: &str,
    n: usize,
    timeout: Duration,
) -> Result<(), std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while g.vm.stdout().matches(needle).count() < n {
        if let Some(st) = g.vm.try_exit() {
            return Err(st);
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "no {needle:?} #{n} within {timeout:?}\n{}",
                g.vm.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// True if bdvmm ended because the guest triple-faulted: on the kvm engine nested in a kvm host,
/// the emulated AMD-V does this by itself now and then while a guest boots (see
/// `.config/nextest.toml`); not something the failover under test did.
fn platform_flake(g: &RootfsGuest) -> bool {
    g.vm.engine() == Engine::Kvm && g.vm.stderr().contains("triple-faulted")
}

/// What boots one guest of the pair again: its kernel parameters and its place.
struct Plan {
    params: String,
    placed: Placed,
}

fn launch(engine: Engine, plan: &Plan) -> RootfsGuest {
    let mut spec = RootfsSpec::new(engine, &plan.params);
    spec.mem = 384;
    // A panicked front end's memory must stay reachable: its sessions are there.
    spec.extra = vec!["--on-panic".into(), "keep".into()];
    spec.placed = Some(plan.placed.clone());
    RootfsGuest::start(&spec)
}

fn start_bridge(g: &RootfsGuest) -> (BridgeSetup, BridgeProc) {
    let setup = BridgeSetup::one_monitor(&g.vm.site().listen_addr(), true);
    let b = BridgeProc::start(&g.vm, &setup);
    (setup, b)
}

/// Boots a guest from `plan` until its front end is up; a guest the nested platform killed
/// while booting ([`platform_flake`]) is booted once more.
fn boot_until_up(engine: Engine, plan: &Plan) -> RootfsGuest {
    let mut g = launch(engine, plan);
    match wait_nth(&mut g, "APP front up", 1, BOOT) {
        Ok(()) => return g,
        Err(st) if platform_flake(&g) => {
            eprintln!(
                "a guest triple-faulted while booting ({st}; nested AMD-V): booting it again\n{}",
                crate::vm::tail(&g.vm.stderr())
            );
        }
        Err(st) => panic!(
            "bdvmm exited ({st}) before its front end was up\n{}",
            g.vm.diagnostics()
        ),
    }
    drop(g);
    let mut g = launch(engine, plan);
    if let Err(st) = wait_nth(&mut g, "APP front up", 1, BOOT) {
        panic!(
            "bdvmm exited ({st}) before its front end was up, twice\n{}",
            g.vm.diagnostics()
        );
    }
    g
}

impl Pair {
    /// Boots both guests (front-a the primary) and their bridges, and the database.
    pub fn boot(engine: Engine) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app_disk(dir.path());
        let img = Images::load();
        let rootfs = img.get("BD_ROOTFS_IMAGE").to_path_buf();
        // The site and each guest's disks there.
        let (site, disks): (Arc<Site>, [Vec<String>; 2]) = match engine {
            Engine::Tcg => {
                let copy = |n: &str| {
                    let p = dir.path().join(n);
                    let st = std::process::Command::new("cp")
                        .args(["--sparse=always", "--reflink=auto"])
                        .arg(&rootfs)
                        .arg(&p)
                        .status()
                        .expect("cp");
                    assert!(st.success());
                    p.display().to_string()
                };
                let a = app.display().to_string() + ",ro";
                (
                    Site::local(),
                    [vec![copy("a.img"), a.clone()], vec![copy("b.img"), a]],
                )
            }
            Engine::Kvm => (
                Site::kvm_host_with_disks(&[&rootfs, &app, &rootfs, &app]),
                [
                    vec!["/dev/vda".into(), "/dev/vdb,ro".into()],
                    vec!["/dev/vdc".into(), "/dev/vdd,ro".into()],
                ],
            ),
        };
        let lan = GuestLan::new(&site, 2);
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port for PostgreSQL");
        let db = auction::pg::Cluster::start(&["0.0.0.0".parse().expect("addr")], port)
            .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
        let db_url = format!(
            "postgresql://postgres@{}:{}/{}?connect_timeout=5",
            lan.this_machine,
            db.port(),
            auction::pg::DATABASE
        );
        let plans: Vec<Plan> = [("primary", "front-a"), ("standby", "front-b")]
            .iter()
            .enumerate()
            .map(|(i, (role, name))| Plan {
                params: format!(
                    "quiet panic=0 bd.scenario=app bd.app_disk=/dev/vdb bd.role={role} \
                     bd.name={name} bd.vip={} bd.db={db_url}",
                    lan.vip
                ),
                placed: Placed {
                    site: site.clone(),
                    disks: disks[i].clone(),
                    port: lan.ports[i].clone(),
                },
            })
            .collect();
        let guests: Vec<RootfsGuest> = plans.iter().map(|p| boot_until_up(engine, p)).collect();
        let bridges = guests.iter().map(start_bridge).collect();
        Pair {
            engine,
            guests,
            bridges,
            plans,
            lan,
            db,
            primary: 0,
            boots: [1, 1],
            seen: [1, 1],
            seed: 1,
            bids: Vec::new(),
            _dir: dir,
        }
    }

    /// Runs the clients against the service address, fails the primary with `fault` mid-run
    /// with bdmon watching it (the standby its failover target), and reports. The standby serves
    /// afterwards ([`Pair::primary`]); the failed guest is left as it is (see [`Pair::restore`]).
    pub fn fail(&mut self, fault: Fault) -> Report {
        let (p, s) = (self.primary, 1 - self.primary);
        for i in [p, s] {
            if let Some(st) = self.guests[i].vm.try_exit() {
                panic!(
                    "front {i}'s bdvmm exited ({st}) before the {fault:?} run\n{}",
                    self.guests[i].vm.diagnostics()
                );
            }
        }
        let (setup, bridge) = &self.bridges[p];
        let vip: SocketAddr = format!("{}:{SERVICE_PORT}", self.lan.vip_addr())
            .parse()
            .expect("vip");
        self.seed += 1;
        let load = auction::client::Load {
            addrs: vec![vip],
            sessions: SESSIONS,
            requests_per_session: REQUESTS,
            deadline: Duration::from_secs(300),
            // Nested in the kvm host a request's database round trips take tens of ms and the
            // front end runs them one at a time: 60 sessions queue for over a second.
            timeout: if self.engine == Engine::Kvm {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            },
            seed: self.seed,
            ..auction::client::Load::default()
        };
        // The Progress Box's contract holds only while the service has clients: a health
        // prober (as a load balancer's) connects every 100 ms from before bdmon watches until
        // the run ends.
        let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let prober = {
            let probing = probing.clone();
            std::thread::spawn(move || {
                while probing.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = TcpStream::connect_timeout(&vip, Duration::from_millis(100));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        std::thread::sleep(Duration::from_secs(1));
        let mon_dir = tempfile::tempdir().expect("tempdir");
        let cfg = format!(
            "sample_ms = 20\nevents = \"events.jsonl\"\n[proc]\nenabled = false\n[mem]\nenabled = false\n\
             [cpu]\nenabled = false\n[hang]\nmin_stall_ms = 1000\nfree_cpu = \"off\"\n\
             [[guest]]\nname = \"{}\"\nbridge = \"{}\"\npki = \"{}\"\nmonitor = \"mon1\"\n{}\
             [guest.thresholds]\n\"NET_RX:eth0\" = {NET_RX_MS}\n[guest.failover]\nbackup = \"{}:{ADMIN_PORT}\"\n\
             comm = \"{FRONT_COMM}\"\nuid = {FRONT_UID}\n",
            ["front-a", "front-b"][p],
            bridge.addr,
            setup.pki().display(),
            self.engine.bdmon_guest_limits(),
            self.lan.ports[s].guest_ip,
        );
        let mut mon = crate::start_bdmon(mon_dir.path(), &cfg);
        // Sessions can be moved only from a guest whose kernel bdmon has located (it does so
        // while the guest is healthy): wait for that, then let it watch a little.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !crate::bdmon_events(mon_dir.path())
            .iter()
            .any(|e| e["event"] == "located")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "bdmon did not locate the primary's kernel within 120 s\nevents: {:#?}\n{}\n\
                 bridge:\n{}\nthe primary:\n{}",
                crate::bdmon_events(mon_dir.path()),
                mon.output(),
                crate::vm::tail(&bridge.output()),
                self.guests[p].vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let clients = std::thread::spawn(move || auction::client::run(&load));
        std::thread::sleep(Duration::from_secs(2));
        let fault_ms = crate::load::now_ms();
        match fault {
            Fault::Freeze => freeze(&self.guests[p], true),
            other => ask_agent(self.guests[p].ip(), other.name()),
        }
        let report = clients.join().expect("client threads");
        probing.store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = prober.join();
        self.bids.extend(report.bids.iter().cloned());
        let bids = &self.bids;
        let check = self
            .db
            .client()
            .map_err(|e| e.to_string())
            .and_then(|mut c| auction::db::check(&mut c, bids).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("database check: {e}"));
        let _ = mon.terminate(Duration::from_secs(10));
        let events = crate::bdmon_events(mon_dir.path());
        let failed_over = events.iter().any(|e| e["event"] == "failover");
        if failed_over {
            self.primary = s;
        }
        let diagnostics = format!(
            "bdmon:\n{}\nbridge:\n{}\nfront-a:\n{}\nfront-b:\n{}",
            mon.output(),
            crate::vm::tail(&bridge.output()),
            self.guests[0].vm.diagnostics(),
            self.guests[1].vm.diagnostics()
        );
        Report {
            engine: self.engine,
            fault,
            load: report,
            check,
            events,
            fault_ms,
            diagnostics,
        }
    }

    /// Brings guest `i` back as a standby: restarts it in place through its bridge (after
    /// thawing frozen vCPUs) and waits for its front end, which comes up as a standby on every
    /// boot after the first.
    pub fn restore(&mut self, i: usize) {
        freeze(&self.guests[i], false);
        // A failed guest may have taken its VMM with it (nested in a kvm host the emulated AMD-V
        // sometimes triple-faults a guest, also one the fault left spinning): then bring it back
        // as an operator would, started anew on the same disks.
        if let Some(st) = self.guests[i].vm.try_exit() {
            self.cold_start(i, &format!("its bdvmm had exited ({st})"));
            return self.expect_standby(i);
        }
        let (setup, bridge) = &self.bridges[i];
        let mut b = bridge.connect(&setup.id("mon1"));
        b.restart().unwrap_or_else(|e| {
            panic!(
                "restart front {i}: {e}\n{}",
                self.guests[i].vm.diagnostics()
            )
        });
        drop(b);
        self.boots[i] += 1;
        self.seen[i] += 1;
        match wait_nth(&mut self.guests[i], "APP front up", self.seen[i], BOOT) {
            Ok(()) => {}
            Err(st) if platform_flake(&self.guests[i]) => {
                // The reset killed the guest (nested AMD-V): the boot did not get as far as
                // counting itself, so the cold start is this boot.
                self.boots[i] -= 1;
                self.cold_start(i, &format!("it triple-faulted on its restart ({st})"));
            }
            Err(st) => panic!(
                "bdvmm exited ({st}) before front {i} came back\n{}",
                self.guests[i].vm.diagnostics()
            ),
        }
        self.expect_standby(i);
    }

    /// Replaces guest `i` (whose bdvmm has exited) by a new one on the same disks and LAN port,
    /// with a new bridge, and waits for its front end.
    fn cold_start(&mut self, i: usize, why: &str) {
        eprintln!(
            "front {i}: {why}; starting it anew on the same disks\n{}",
            crate::vm::tail(&self.guests[i].vm.stderr())
        );
        drop(self.bridges.remove(i));
        drop(self.guests.remove(i));
        let g = boot_until_up(self.engine, &self.plans[i]);
        self.bridges.insert(i, start_bridge(&g));
        self.guests.insert(i, g);
        self.boots[i] += 1;
        self.seen[i] = 1;
    }

    /// Checks that guest `i`'s front end came back as a standby on its latest boot.
    fn expect_standby(&mut self, i: usize) {
        // The console may hold only the start of the line that `wait_nth` counted.
        let line = format!("APP front up boot={} role=standby", self.boots[i]);
        if let Err(why) = self.guests[i].vm.wait_for(&line, Duration::from_secs(30)) {
            panic!("guest {i} did not come back as a standby: {why}");
        }
    }
}

/// One failover of a fresh pair (front-a fails with `fault`, front-b takes over).
pub fn run(engine: Engine, fault: Fault) -> Report {
    Pair::boot(engine).fail(fault)
}

impl Report {
    /// Panics, with everything that explains it, unless every session completed with every reply
    /// right, the database holds every committed bid exactly once, and bdmon failed over once
    /// with at least one State Box and none refused.
    pub fn assert_recovered(&self) {
        let ctx = || {
            format!(
                "{:?} {:?}: {} sessions completed, {} wrong, {} gave up, {} requests\nevents: {:#?}\n{}",
                self.engine,
                self.fault,
                self.load.completed,
                self.load.wrong.len(),
                self.load.gave_up.len(),
                self.load.requests.len(),
                self.events,
                self.diagnostics
            )
        };
        assert!(
            self.load.wrong.is_empty(),
            "wrong replies: {:#?}\n{}",
            self.load.wrong,
            ctx()
        );
        assert!(
            self.load.gave_up.is_empty() && self.load.completed == SESSIONS,
            "{} of {SESSIONS} sessions completed, gave up: {:?}\n{}",
            self.load.completed,
            self.load.gave_up,
            ctx()
        );
        assert!(
            self.check.is_clean(),
            "database: {:#?}\n{}",
            self.check,
            ctx()
        );
        let f = self
            .failover()
            .unwrap_or_else(|| panic!("no failover event\n{}", ctx()));
        assert!(
            f["boxes"].as_u64().unwrap_or(0) > 0,
            "no State Box moved: {f}\n{}",
            ctx()
        );
        assert_eq!(
            f["refused_slots"].as_array().map(Vec::len),
            Some(0),
            "refused: {f}\n{}",
            ctx()
        );
        let after = self
            .load
            .requests
            .iter()
            .filter(|r| r.ok && r.end_ns / 1_000_000 > self.fault_ms)
            .count();
        assert!(after > 0, "no request served after the fault\n{}", ctx());
    }
}
