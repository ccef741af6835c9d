//! The pause lock: a paused guest really stops, a resumed one moves again, and a pause whose
//! holder dies or whose lease runs out never leaves the guest frozen.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backdoors_tests::vm::{Vm, VmSpec};
use backdoors_tests::{bdvmm_bin, tiny_guest, Images};
use introspect::mem::{MappedMem, PhysMem};

const COUNTER_MAGIC: &[u8] = b"BDCOUNTER-MAGIC!";

/// Boots the patched kernel running the `counter` program and finds its page in guest RAM.
fn counter_guest() -> (Vm, MappedMem, u64) {
    let img = Images::load();
    let spec = VmSpec::tcg(
        img.get("BD_KERNEL_BZIMAGE"),
        img.get("BD_INITRAMFS"),
        "bd.scenario=counter bd.halt=wait",
    );
    let mut vm = Vm::start(&spec);
    vm.expect("COUNTER ready", Duration::from_secs(60));
    let (mem, _) = vm.memory();
    let hits = mem.find(COUNTER_MAGIC, 4096);
    assert_eq!(hits.len(), 1, "expected one counter page, found {hits:x?}");
    (vm, mem, hits[0] + 24)
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

#[test]
fn tcg_pause_stops_the_guest_and_resume_restarts_it() {
    let (vm, mem, counter) = counter_guest();
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
    // Registers are readable; a running Linux guest has paging on and a kernel-half GS base or
    // runs user code.
    let regs = c.regs(0).unwrap();
    assert_ne!(regs.cr0 & (1 << 31), 0, "paging off? {regs:?}");
    assert_ne!(regs.cr3, 0);
    assert_ne!(regs.efer & (1 << 10), 0, "long mode not active? {regs:?}");
}

#[test]
fn tcg_lease_survives_neither_a_dead_holder_nor_its_own_end() {
    let (vm, mem, counter) = counter_guest();
    let read = || mem.read_u64(counter).expect("counter in RAM");

    // A holder that dies (SIGKILL, no goodbye) while pausing with a long lease.
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
    let p = c.pause(Some(Duration::from_millis(300))).unwrap();
    assert_eq!(p.lease_ms, 300);
    assert_stopped(read);
    assert!(
        counter_moves(read, Duration::from_secs(2)),
        "guest still frozen after its lease ran out"
    );
    let st = c.status().unwrap();
    assert_eq!(st.state, "running");
    assert_eq!(st.lease_expiries, 2);
}

#[test]
fn kvm_pause_stops_a_tiny_guest() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: no /dev/kvm on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_guest::elf()).unwrap();
    let spec = VmSpec {
        kernel,
        initrd: None,
        cmdline: "tiny".into(),
        engine: "kvm".into(),
        mem: 64,
        vcpus: 2,
        extra: Vec::new(),
        netns: None,
    };
    let mut vm = Vm::start(&spec);
    vm.expect(tiny_guest::BANNER, Duration::from_secs(30));
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
