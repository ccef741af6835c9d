//! rdma-bridge end to end: bdvmm and the bridge run on a host of their own — a network namespace
//! (tcg engine) or a kvm host (kvm engine) — and the monitors (this test process) reach them over a
//! veth pair or a tap device, through mutual TLS and the Guard.

use std::time::{Duration, Instant};

use backdoors_tests::bridge::{BridgeProc, BridgeSetup, MonitorSpec};
use backdoors_tests::site::{Engine, Site};
use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::Images;
use introspect::hooks::{KillTarget, Mailbox};
use introspect::sensorbox::ids;
use rdma_bridge::client::BridgeMem;
use rdma_bridge::wire::{self, code};

const BOOT: Duration = Duration::from_secs(120);

fn pid_after(out: &str, prefix: &str) -> u32 {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').split(prefix).nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"))
}

/// A patched guest on `engine` running `params`, on a host of its own.
fn guest(engine: Engine, params: &str) -> Vm {
    let img = Images::load();
    let mut spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        &format!("quiet bd.halt=wait {params}"),
    );
    spec.site = Some(Site::remote_host(engine));
    Vm::start(&spec)
}

const READER: MonitorSpec = MonitorSpec {
    name: "mon1",
    read: &["sb", "ram"],
    write: &["hooks"],
    restart: false,
    lock: true,
    regs: true,
};

fn a_remote_monitor_reads_the_sensor_box_and_process_table(engine: Engine) {
    let mut vm = guest(engine, "bd.scenario=spawn bd.count=200");
    vm.expect("BACKDOORS: procs end", Duration::from_secs(300));
    let setup = BridgeSetup::new(
        &vm.site().listen_addr(),
        &[
            READER,
            MonitorSpec {
                name: "sbonly",
                read: &["sb"],
                write: &[],
                restart: false,
                lock: false,
                regs: false,
            },
        ],
        1,
        1000,
    );
    let bridge = BridgeProc::start(&vm, &setup);

    let mut b = bridge.connect(&setup.id("mon1"));
    let sb = b.sensor_box().expect("FETCH_SB");
    let nprocs = sb.value(ids::NPROCS).expect("NPROCS");
    assert!(nprocs >= 200, "NPROCS {nprocs}");
    let ticks = sb.value(ids::TIMER_TICKS).expect("ticks");

    // The process table, read remotely, is the guest's own.
    let want: Vec<(u32, u32, u32, String)> = vm
        .stdout()
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROC "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect();
    assert!(want.len() >= 200);
    let mem = BridgeMem::new(b);
    let t0 = Instant::now();
    let table = mem.process_table(None).expect("remote process table");
    eprintln!(
        "remote process table: {} tasks in {:?}, {} READ round trips",
        table.value.len(),
        t0.elapsed(),
        mem.round_trips()
    );
    for (pid, ppid, uid, comm) in &want {
        let p = table
            .value
            .iter()
            .find(|p| p.task.pid == *pid)
            .unwrap_or_else(|| panic!("pid {pid} ({comm}) missing"));
        assert_eq!((p.task.ppid, p.task.uid), (*ppid, *uid), "pid {pid}");
        if p.task.uid != 0 || *ppid != 2 {
            assert_eq!(&p.task.comm, comm, "pid {pid}");
        }
    }
    let mut b = mem.into_inner();
    // The Sensor Box moves on: the guest runs again after the walk.
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.sensor_box().unwrap().value(ids::TIMER_TICKS).unwrap() > ticks);

    // A monitor granted only the Sensor Box reads nothing else and writes nothing.
    let mut s = bridge.connect(&setup.id("sbonly"));
    assert!(s.sensor_box().is_ok());
    let (bd, _) = s.backdoor();
    assert_eq!(
        s.read(0x10_0000, 4096).unwrap_err().code(),
        Some(code::DENIED)
    );
    assert_eq!(
        s.write(bd + 0x2000, &[0; 4]).unwrap_err().code(),
        Some(code::DENIED)
    );
    // Nor may it pause the guest or read its registers (CR3, RIP and GS base defeat KASLR).
    assert_eq!(
        s.lock(Duration::from_secs(1)).unwrap_err().code(),
        Some(code::DENIED)
    );
    assert_eq!(s.regs(0).unwrap_err().code(), Some(code::DENIED));
    // And mon1 may write only the hooks, not RAM or the Sensor Box header.
    assert_eq!(
        b.write(0x10_0000, &[0; 4]).unwrap_err().code(),
        Some(code::DENIED)
    );
    assert_eq!(b.write(bd, &[0; 4]).unwrap_err().code(), Some(code::DENIED));
    assert!(!setup.audit_events("denied").is_empty());

    // The CLI does the same from the monitor's side.
    let out = std::process::Command::new(backdoors_tests::bridge::bridge_bin())
        .args(["sb", "--bridge", &bridge.addr, "--name", "mon1", "--pki"])
        .arg(setup.pki())
        .output()
        .expect("run rdma-bridge sb");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("NPROCS"), "{text}");
}

#[test]
fn tcg_a_remote_monitor_reads_the_sensor_box_and_process_table() {
    a_remote_monitor_reads_the_sensor_box_and_process_table(Engine::Tcg);
}

#[test]
fn kvm_a_remote_monitor_reads_the_sensor_box_and_process_table() {
    a_remote_monitor_reads_the_sensor_box_and_process_table(Engine::Kvm);
}

fn two_of_three_monitors_must_agree_before_a_kill_is_written(engine: Engine) {
    let mut vm = guest(engine, "bd.scenario=repair");
    vm.expect_line("REPAIR sleeper pid=", BOOT);
    let out = vm.stdout();
    let busy = pid_after(&out, "REPAIR busy pid=");
    let sleeper = pid_after(&out, "REPAIR sleeper pid=");
    let mons: Vec<MonitorSpec> = ["mon1", "mon2", "mon3"]
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
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &mons, 2, 1500);
    let bridge = BridgeProc::start(&vm, &setup);

    // Each monitor finds the target itself from the process table.
    let start_time = |mem: &BridgeMem, pid: u32| {
        let t = mem.process_table(None).expect("process table");
        t.value
            .iter()
            .find(|p| p.task.pid == pid)
            .map(|p| p.task.start_time)
            .expect("target listed")
    };
    let post = |name: &'static str, pid: u32| {
        let mem = BridgeMem::new(bridge.connect(&setup.id(name)));
        let st = start_time(&mem, pid);
        let sb = mem.bridge().sensor_box().expect("sb");
        let mb = Mailbox::open(&mem, &sb).expect("mailbox");
        mb.post(
            &mem,
            KillTarget::Pid {
                pid,
                start_time: st,
            },
            7,
        )
        .map_err(|e| e.to_string())
    };

    // One monitor alone: its first write waits for agreement, expires, and nothing happens.
    let e = post("mon1", busy).expect_err("a lone monitor's write was applied");
    assert!(e.contains("not confirmed"), "{e}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !vm.stdout().contains(&format!("REPAIR exited pid={busy}")),
        "killed without agreement"
    );
    let expired = setup.audit_events("write_expired");
    assert!(!expired.is_empty() && expired[0]["voters"] == serde_json::json!(["mon1"]));

    // Two agree (the third stays silent): the request is written and the guest kills the target.
    std::thread::scope(|s| {
        let a = s.spawn(|| post("mon1", busy));
        let b = s.spawn(|| post("mon3", busy));
        a.join().unwrap().expect("mon1's post");
        b.join().unwrap().expect("mon3's post");
    });
    vm.expect(
        &format!("REPAIR exited pid={busy} status=137"),
        Duration::from_secs(30),
    );
    let applied = setup.audit_events("write_applied");
    assert!(
        applied.len() >= 2,
        "the whole slot, then the doorbell: {applied:?}"
    );
    assert!(applied
        .iter()
        .all(|e| e["voters"].as_array().map(|v| v.len()) == Some(2)));
    // The sleeper was never agreed on, and lives.
    assert!(!vm
        .stdout()
        .contains(&format!("REPAIR exited pid={sleeper}")));
}

#[test]
fn tcg_two_of_three_monitors_must_agree_before_a_kill_is_written() {
    two_of_three_monitors_must_agree_before_a_kill_is_written(Engine::Tcg);
}

#[test]
fn kvm_two_of_three_monitors_must_agree_before_a_kill_is_written() {
    two_of_three_monitors_must_agree_before_a_kill_is_written(Engine::Kvm);
}

fn a_dead_monitor_or_a_crashed_bridge_never_leaves_the_guest_frozen(engine: Engine) {
    let mut vm = guest(engine, "bd.scenario=counter");
    vm.expect("BACKDOORS: scenario counter started", BOOT);
    let setup = BridgeSetup::new(&vm.site().listen_addr(), &[READER], 1, 1000);
    let mut bridge = BridgeProc::start(&vm, &setup);
    let ticks = |b: &mut rdma_bridge::client::Bridge| {
        b.sensor_box()
            .expect("sb")
            .value(ids::TIMER_TICKS)
            .expect("ticks")
    };
    let mut watcher = bridge.connect(&setup.id("mon1"));
    let progressing = |w: &mut rdma_bridge::client::Bridge| {
        let a = ticks(w);
        std::thread::sleep(Duration::from_millis(300));
        ticks(w) > a
    };
    assert!(progressing(&mut watcher));

    // 1. A monitor takes the lock for the longest lease (10 s) and its connection dies (as when its process is
    //    killed: the kernel closes the socket). The guest runs again at once.
    let mut m = bridge.connect(&setup.id("mon1"));
    assert_eq!(watcher.status().unwrap().state, wire::VM_RUNNING);
    m.lock(Duration::from_secs(10)).expect("lock");
    assert_eq!(watcher.status().unwrap().state, wire::VM_PAUSED);
    assert!(!progressing(&mut watcher), "the guest ran while locked");
    let locked = Instant::now();
    drop(m);
    assert!(
        progressing(&mut watcher),
        "still frozen after the holder died"
    );
    eprintln!(
        "guest ran again {:?} after the holder died",
        locked.elapsed()
    );
    assert!(!setup.audit_events("lock_released").is_empty());

    // 2. A monitor that hangs while holding the lock: the lease ends it.
    let mut m = bridge.connect(&setup.id("mon1"));
    m.lock(Duration::from_millis(500)).expect("lock");
    std::thread::sleep(Duration::from_millis(800));
    assert!(progressing(&mut watcher), "still frozen after the lease");
    let e = m.unlock().unwrap_err();
    assert_eq!(e.code(), Some(code::NOT_LOCKED), "{e}");
    assert!(!setup.audit_events("lock_expired").is_empty());

    // 3. The bridge itself crashes while a monitor holds the lock: bdvmm ends the lease.
    let mut m = bridge.connect(&setup.id("mon1"));
    m.lock(Duration::from_secs(10)).expect("lock");
    bridge.crash();
    let mut c = vm.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status().expect("status").lease_holder.is_some() {
        assert!(
            Instant::now() < deadline,
            "bdvmm kept the crashed bridge's lease"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new bridge serves the same, still-running VM.
    let bridge = BridgeProc::start(&vm, &setup);
    let mut w = bridge.connect(&setup.id("mon1"));
    assert!(
        progressing(&mut w),
        "the guest did not survive the bridge crash"
    );

    // 4. The VM exits: the bridge stops by itself, cleanly.
    let mut bridge = bridge;
    drop(vm);
    let st = bridge
        .wait_exit(Duration::from_secs(10))
        .expect("bridge outlived its VM");
    assert!(st.success(), "{st}\n{}", bridge.output());
    assert!(bridge.output().contains("the VM exited"));
}

#[test]
fn tcg_a_dead_monitor_or_a_crashed_bridge_never_leaves_the_guest_frozen() {
    a_dead_monitor_or_a_crashed_bridge_never_leaves_the_guest_frozen(Engine::Tcg);
}

#[test]
fn kvm_a_dead_monitor_or_a_crashed_bridge_never_leaves_the_guest_frozen() {
    a_dead_monitor_or_a_crashed_bridge_never_leaves_the_guest_frozen(Engine::Kvm);
}
