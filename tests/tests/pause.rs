//! The pause lock on both engines: a paused guest really stops (a counter in guest memory stands
//! still), a resumed one moves again, and a pause whose holder dies or whose lease runs out never
//! leaves the guest frozen. Plus the hand-written tiny guest on this machine's own /dev/kvm.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backdoors_tests::kvmhost::freeze::Thaw;
use backdoors_tests::site::{Engine, Site};
use backdoors_tests::vm::{GuestMem, Vm, VmSpec};
use backdoors_tests::{bdvmm_bin, tiny_guest, Images};
use introspect::mem::PhysMem;

const COUNTER_MAGIC: &[u8] = b"BDCOUNTER-MAGIC!";

/// Boots the patched kernel running the `counter` program and finds its page in guest RAM at the
/// physical address the program printed; returns the VM, its memory and the counter's address.
fn counter_guest(engine: Engine) -> (Vm, GuestMem, u64) {
    let img = Images::load();
    let spec = VmSpec::on(
        engine,
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "bd.scenario=counter bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    let line = vm.expect_line("COUNTER ready", Duration::from_secs(120));
    let phys = line
        .split(" phys=0x")
        .nth(1)
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .filter(|p| *p != 0)
        .unwrap_or_else(|| panic!("counter printed no address: {line:?}"));
    let mem = vm.guest_mem();
    let mut magic = [0u8; 16];
    mem.read(phys, &mut magic).expect("counter page in RAM");
    assert_eq!(&magic, COUNTER_MAGIC, "no counter page at {phys:#x}");
    (vm, mem, phys + 24)
}

fn counter_moves(read: impl Fn() -> u64, within: Duration) -> bool {
    let start = read();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if read() != start {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn assert_stopped(read: impl Fn() -> u64) {
    let a = read();
    std::thread::sleep(Duration::from_millis(300));
    let b = read();
    assert_eq!(a, b, "counter changed while the guest was paused");
}

fn pause_stops_the_guest_and_resume_restarts_it(engine: Engine) {
    let (vm, mem, counter) = counter_guest(engine);
    let read = || mem.read_u64(counter).expect("counter in RAM");
    assert!(
        counter_moves(read, Duration::from_secs(5)),
        "counter does not move"
    );
    let mut c = vm.client();
    for _ in 0..3 {
        let p = c.pause(Some(Duration::from_secs(10))).unwrap();
        assert!(!p.renewed);
        assert!(p.pause_ns > 0);
        assert_eq!(c.status().unwrap().state, "paused");
        assert_stopped(read);
        let r = c.resume().unwrap();
        assert!(r.was_paused);
        assert!(
            counter_moves(read, Duration::from_secs(5)),
            "counter did not move after resume"
        );
    }
    // The page is still the counter's (it was not migrated under us).
    let mut magic = [0u8; 16];
    mem.read(counter - 24, &mut magic).unwrap();
    assert_eq!(&magic, COUNTER_MAGIC);
    // Registers are readable; a running Linux guest has paging on and long mode active.
    let regs = c.regs(0).unwrap();
    assert_ne!(regs.cr0 & (1 << 31), 0, "paging off? {regs:?}");
    assert_ne!(regs.cr3, 0);
    assert_ne!(regs.efer & (1 << 10), 0, "long mode not active? {regs:?}");
    assert_eq!(c.status().unwrap().engine, engine.name());
}

#[test]
fn tcg_pause_stops_the_guest_and_resume_restarts_it() {
    pause_stops_the_guest_and_resume_restarts_it(Engine::Tcg);
}

#[test]
fn kvm_pause_stops_the_guest_and_resume_restarts_it() {
    pause_stops_the_guest_and_resume_restarts_it(Engine::Kvm);
}

fn lease_survives_neither_a_dead_holder_nor_its_own_end(engine: Engine) {
    let (vm, mem, counter) = counter_guest(engine);
    let read = || mem.read_u64(counter).expect("counter in RAM");

    // A holder that dies (SIGKILL, no goodbye) while pausing with a long lease. On the kvm
    // engine it talks to bdvmm through the harness's relay into the kvm host: its death closes
    // the relayed connection just the same.
    let mut holder = Command::new(bdvmm_bin())
        .args(["ctl", "--api"])
        .arg(&vm.api)
        .args(["pause", "--lease-ms", "600000", "--hold-ms", "600000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = vm.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status().unwrap().state != "paused" {
        assert!(
            Instant::now() < deadline,
            "the holder never paused the guest"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.status().unwrap().lease_holder.as_deref(), Some("other"));
    assert!(
        c.pause(None).is_err(),
        "a second client must not take a held pause"
    );
    assert_stopped(read);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        counter_moves(read, Duration::from_secs(2)),
        "guest still frozen after the lease holder died"
    );
    assert_eq!(c.status().unwrap().state, "running");

    // A holder that stays connected but lets its lease run out.
    // (The lease is longer than the 300 ms in which the counter must stand still.)
    let p = c.pause(Some(Duration::from_millis(1000))).unwrap();
    assert_eq!(p.lease_ms, 1000);
    assert_stopped(read);
    assert!(
        counter_moves(read, Duration::from_secs(2)),
        "guest still frozen after its lease ran out"
    );
    let st = c.status().unwrap();
    assert_eq!(st.state, "running");
    assert_eq!(st.lease_expiries, 2);
    // Every leased pause is counted in the guest's paused time, the one that ran out included.
    assert!(
        st.paused_ns_total >= 1_000_000_000,
        "paused_ns_total {} after a 1000 ms lease ran out",
        st.paused_ns_total
    );
}

#[test]
fn tcg_lease_survives_neither_a_dead_holder_nor_its_own_end() {
    lease_survives_neither_a_dead_holder_nor_its_own_end(Engine::Tcg);
}

#[test]
fn kvm_lease_survives_neither_a_dead_holder_nor_its_own_end() {
    lease_survives_neither_a_dead_holder_nor_its_own_end(Engine::Kvm);
}

/// The tiny guest (2 vCPUs) on this machine's own /dev/kvm, once it runs, with the directory
/// that holds its kernel; None (after a SKIP line) on a host without /dev/kvm.
fn tiny_kvm_guest() -> Option<(tempfile::TempDir, Vm)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm on this host");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_guest::elf()).unwrap();
    let spec = VmSpec {
        kernel,
        initrd: None,
        cmdline: "tiny".into(),
        engine: Engine::Kvm,
        mem: 64,
        vcpus: 2,
        extra: Vec::new(),
        site: Some(Site::local()),
    };
    let mut vm = Vm::start(&spec);
    vm.expect(tiny_guest::BANNER, Duration::from_secs(30));
    Some((dir, vm))
}

/// This machine's own /dev/kvm (nested PVM here) cannot run Linux, but runs the tiny guest:
/// the kvm engine's pause path without a kvm host in between.
#[test]
fn kvm_pause_stops_a_tiny_guest_on_this_machines_kvm() {
    let Some((_dir, vm)) = tiny_kvm_guest() else {
        return;
    };
    let (mem, _) = vm.memory();
    let read = || mem.read_u64(tiny_guest::COUNTER_GPA).unwrap() & 0xffff_ffff;
    assert!(
        counter_moves(read, Duration::from_secs(5)),
        "tiny guest counter does not move"
    );
    let mut c = vm.client();
    for _ in 0..5 {
        let p = c.pause(Some(Duration::from_secs(10))).unwrap();
        assert!(p.pause_ns > 0);
        assert_stopped(read);
        c.resume().unwrap();
        assert!(counter_moves(read, Duration::from_secs(5)));
    }
    let regs = c.regs(0).unwrap();
    assert!(
        (0x10_0000..0x10_1000).contains(&regs.rip),
        "vCPU 0 should be inside the tiny guest's code: {regs:?}"
    );
    assert_eq!(regs.cr0 & 1, 1, "protected mode expected: {regs:?}");
    // vCPU 1 is an application processor that nobody woke up: still answers.
    c.regs(1).unwrap();
    assert!(c.regs(2).is_err());
}

/// A vCPU thread that stops answering (ptrace-stopped: the kvm engine's "halted CPU" fault) must
/// cost a pause request one timeout and never the VM: the pause is refused with the reason,
/// bdvmm keeps serving its API and memory and names the vCPUs in `status`, later pauses and
/// register reads fail at once instead of waiting again, and once the threads wake they run the
/// guest (not left paused by the failed pause) and pause normally again.
#[test]
fn kvm_a_frozen_vcpu_costs_a_pause_and_never_the_vm() {
    let Some((dir, mut vm)) = tiny_kvm_guest() else {
        return;
    };
    let (mem, _) = vm.memory();
    let read = || mem.read_u64(tiny_guest::COUNTER_GPA).unwrap() & 0xffff_ffff;
    assert!(
        counter_moves(read, Duration::from_secs(5)),
        "tiny guest idle"
    );

    let pidfile = dir.path().join("tracer.pid");
    let out = Command::new(env!("CARGO_BIN_EXE_bd-kvmhost"))
        .args(["freeze-threads", "--comm", "bdvmm", "--cmdline"])
        .arg(vm.api.to_string_lossy().as_ref())
        .arg("--pidfile")
        .arg(&pidfile)
        .output()
        .expect("bd-kvmhost");
    assert!(
        out.status.success(),
        "freeze-threads: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tracer: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("tracer pid");
    let mut thaw = Thaw::new(tracer);
    assert!(
        !counter_moves(read, Duration::from_millis(500)),
        "the counter moves with both vCPU threads frozen"
    );

    let mut c = vm.client();
    let first = c
        .pause(Some(Duration::from_secs(10)))
        .unwrap_err()
        .to_string();
    assert!(first.contains("did not acknowledge"), "{first}");
    let st = c.status().expect("bdvmm answers after the failed pause");
    assert_eq!(st.state, "running", "no lease was granted: {st:?}");
    assert_eq!(st.unanswering_vcpus, vec![0, 1], "{st:?}");
    let again = c
        .pause(Some(Duration::from_secs(10)))
        .unwrap_err()
        .to_string();
    assert!(again.contains("has not answered the VMM"), "{again}");
    let regs = c.regs(0).unwrap_err().to_string();
    assert!(regs.contains("has not answered the VMM"), "{regs}");
    // Its memory is still served, and bdvmm is still there.
    read();
    assert!(
        vm.try_exit().is_none(),
        "bdvmm exited:\n{}",
        vm.diagnostics()
    );

    thaw.now();
    assert!(
        counter_moves(read, Duration::from_secs(10)),
        "the guest does not run after its vCPU threads woke:\n{}",
        vm.diagnostics()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.status().unwrap().unanswering_vcpus.is_empty() {
        assert!(Instant::now() < deadline, "the woken vCPUs never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.pause(Some(Duration::from_secs(10)))
        .expect("pause after the thaw");
    assert_stopped(read);
    c.resume().unwrap();
    assert!(counter_moves(read, Duration::from_secs(5)));
    c.regs(0).expect("regs after the thaw");
}
